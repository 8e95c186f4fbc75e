//! The bounded HTTP/1.1 responder both binaries serve their Prometheus metrics with
//! (`a2ad --metrics ADDR`, `a2a-coordinator --metrics ADDR`): a GET of `/metrics` is answered
//! with the text a renderer makes at that moment; anything else with 404, 405 or 400.
//!
//! What a scrape may cost is bounded: [`MAX_SCRAPERS`] connections at once (more are closed at
//! once), a request head of at most [`MAX_REQUEST`] bytes read within [`REQUEST_TIMEOUT`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Scrapes served at once; a connection beyond them is closed unanswered.
pub const MAX_SCRAPERS: usize = 8;
/// Longest request head read.
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a scraper has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the listener for `--metrics ADDR`; the error says what went wrong and what to do.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!(
            "cannot serve metrics on {addr}: {e} (is the port in use? pick another \
             --metrics ADDR)"
        )
    })
}

/// Serves `/metrics` on `listener` until the task is dropped; `render` makes the text of one
/// scrape (called once per GET of `/metrics`, never for a refused request).
pub async fn serve<R, F>(listener: TcpListener, render: R)
where
    R: Fn() -> F + Send + Sync + 'static,
    F: Future<Output = String> + Send + 'static,
{
    let render = Arc::new(render);
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // too many at once: closed unanswered
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _ = answer(stream, &*render).await;
            drop(permit);
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    Metrics,
    NotFound,
    BadMethod,
    Malformed,
}

/// Reads the request line of `head`.
pub fn parse_head(head: &[u8]) -> Asked {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Asked::Malformed;
    };
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(target), Some(version), None) if version.starts_with("HTTP/1.") => {
            match (method, target.split('?').next()) {
                ("GET", Some("/metrics")) => Asked::Metrics,
                ("GET", _) => Asked::NotFound,
                _ => Asked::BadMethod,
            }
        }
        _ => Asked::Malformed,
    }
}

/// Answers one scrape on `stream`, with the text of `render` when it asks for `/metrics`.
pub async fn answer<S, R, F>(mut stream: S, render: &R) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: Fn() -> F,
    F: Future<Output = String>,
{
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    let asked = match read {
        Ok(Ok(())) => parse_head(&head),
        Ok(Err(e)) => return Err(e),
        Err(_) => Asked::Malformed,
    };
    let (status, kind, body) = match asked {
        Asked::Metrics => ("200 OK", CONTENT_TYPE, render().await),
        Asked::NotFound => (
            "404 Not Found",
            "text/plain",
            "the metrics are served at /metrics\n".into(),
        ),
        Asked::BadMethod => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
        Asked::Malformed => ("400 Bad Request", "text/plain", "bad request\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Whether metrics bound at `addr` would be reachable from beyond this host and its private
/// networks (the caller warns).
pub fn is_exposed(addr: SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            // 100.64.0.0/10 (carrier-grade NAT space, and a2a's default overlay) is private too.
            let cgnat = ip.octets()[0] == 100 && ip.octets()[1] & 0xc0 == 64;
            !(ip.is_loopback() || ip.is_private() || ip.is_link_local() || cgnat)
        }
        std::net::IpAddr::V6(ip) => {
            !(ip.is_loopback() || ip.is_unique_local() || ip.is_unicast_link_local())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_get_of_metrics_is_answered_with_them() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(
            parse_head(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(
            parse_head(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Asked::BadMethod
        );
        assert_eq!(parse_head(b"\x16\x03\x01garbage"), Asked::Malformed);
        assert_eq!(parse_head(b""), Asked::Malformed);
        assert_eq!(
            parse_head(b"GET /metrics SPDY/3 extra\r\n"),
            Asked::Malformed
        );
    }

    #[test]
    fn public_addresses_are_flagged() {
        assert!(!is_exposed("127.0.0.1:9100".parse().unwrap()));
        assert!(!is_exposed("10.1.2.3:9100".parse().unwrap()));
        assert!(!is_exposed("100.64.0.1:9100".parse().unwrap()));
        assert!(!is_exposed("[::1]:9100".parse().unwrap()));
        assert!(is_exposed("0.0.0.0:9100".parse().unwrap()));
        assert!(is_exposed("198.51.100.7:9100".parse().unwrap()));
    }

    /// The whole exchange over an in-memory stream: the renderer runs for a GET of /metrics
    /// only, and its text is the body.
    #[tokio::test]
    async fn a_scrape_gets_the_rendered_text_and_a_refusal_renders_nothing() {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let render = || {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async { "m_total 1\n".to_string() }
        };
        for (request, want, body) in [
            (
                &b"GET /metrics HTTP/1.1\r\n\r\n"[..],
                "200 OK",
                "m_total 1\n",
            ),
            (b"GET /x HTTP/1.1\r\n\r\n", "404 Not Found", "/metrics"),
            (b"PUT /metrics HTTP/1.1\r\n\r\n", "405", "GET only"),
        ] {
            let (mut client, server) = tokio::io::duplex(4096);
            client.write_all(request).await.unwrap();
            answer(server, &render).await.unwrap();
            let mut got = String::new();
            client.read_to_string(&mut got).await.unwrap();
            assert!(got.starts_with(&format!("HTTP/1.1 {want}")), "{got}");
            assert!(got.ends_with(body) || got.contains(body), "{got}");
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
