//! The client side of a2ad's local API.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use a2a_proto::api::{ApiRequest, ApiResponse, MAX_API_LINE};

/// Longest a request may take (`up` waits up to 20 s for the coordinator).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends one request and reads the response; errors say what to do.
pub fn call(socket: &Path, request: &ApiRequest) -> Result<ApiResponse, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
            "a2ad is not running (no daemon listening on {}): start it with `sudo systemctl start a2ad` \
             or run `a2ad` (with the same --state-dir/--socket as this command)",
            socket.display()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on {}: run as root or as a member of the a2a group",
            socket.display()
        ),
        _ => format!("cannot reach a2ad at {}: {e}", socket.display()),
    })?;
    stream
        .set_read_timeout(Some(CALL_TIMEOUT))
        .and_then(|_| stream.set_write_timeout(Some(CALL_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| format!("cannot send the request to a2ad: {e}"))?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_API_LINE as u64))
        .read_line(&mut reply)
        .map_err(|e| format!("no answer from a2ad: {e}"))?;
    if reply.is_empty() {
        return Err("a2ad closed the connection without answering; see its log".into());
    }
    serde_json::from_str(&reply).map_err(|e| {
        format!("a2ad answered something this a2actl does not understand ({e}); are both the same version?")
    })
}
