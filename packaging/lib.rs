//! Nothing to build: this crate only carries `[package.metadata.deb]` for the Debian package
//! `a2a` (see Cargo.toml beside this file and `packaging/build-deb`).
