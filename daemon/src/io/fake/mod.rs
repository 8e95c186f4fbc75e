//! In-memory fakes of the I/O contracts, for fast tests without root or sockets.
