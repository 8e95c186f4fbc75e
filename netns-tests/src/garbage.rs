//! Hostile input: random and malformed TCP streams and UDP datagrams. Run these inside a
//! namespace with [`Ns::run_in`](crate::Ns::run_in).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::io::AsRawFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// xorshift64*: fast, seedable, good enough for garbage.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let mut seed = [0u8; 8];
        if let Ok(mut f) = File::open("/dev/urandom") {
            let _ = f.read_exact(&mut seed);
        }
        Rng::seeded(t ^ u64::from_le_bytes(seed) ^ u64::from(std::process::id()))
    }

    pub fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

/// One hostile datagram: random bytes, or shaped like WireGuard (type 1-4, three zero bytes)
/// or like a2a's own messages (0xA2, kind), with random or extreme lengths.
pub fn datagram(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(10) {
        0 => 0,
        1 => 1 + rng.below(3),
        2 => 1200 + rng.below(300),
        3 => 148, // WireGuard handshake initiation size
        4 => 92,  // handshake response
        5 => 64,  // cookie reply
        _ => rng.below(200),
    };
    let mut d = rng.bytes(len);
    match rng.below(4) {
        0 if len >= 4 => {
            d[0] = 1 + rng.below(4) as u8;
            d[1..4].fill(0);
        }
        1 if len >= 2 => {
            d[0] = 0xA2;
            d[1] = rng.below(4) as u8;
        }
        _ => {}
    }
    d
}

/// Sends `count` hostile datagrams to `target` (plus a few maximum-size ones); returns how
/// many were sent.
pub fn udp_flood(target: SocketAddr, count: usize) -> io::Result<usize> {
    let mut rng = Rng::new();
    let socks: Vec<UdpSocket> = (0..8)
        .map(|_| UdpSocket::bind("0.0.0.0:0"))
        .collect::<io::Result<_>>()?;
    let mut sent = 0;
    for i in 0..count {
        let d = if i % 500 == 0 {
            rng.bytes(65_507)
        } else {
            datagram(&mut rng)
        };
        // Errors such as ECONNREFUSED from an earlier ICMP are expected.
        if socks[i % socks.len()].send_to(&d, target).is_ok() {
            sent += 1;
        }
        if i % 256 == 0 {
            // Let the receiver breathe a little, so most datagrams are actually processed.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(sent)
}

/// What [`tcp_garbage`] managed to do.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpStats {
    pub connected: usize,
    pub failed: usize,
    pub bytes: usize,
}

fn set_rst_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Opens `conns` connections to `target`, writes hostile bytes on each and closes it (some
/// with a RST): random bytes, frame headers announcing 64 KiB followed by nothing, zero
/// length frames, a few bytes, or nothing at all.
pub fn tcp_garbage(target: SocketAddr, conns: usize) -> TcpStats {
    let mut rng = Rng::new();
    let mut stats = TcpStats::default();
    for i in 0..conns {
        let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(3)) else {
            stats.failed += 1;
            continue;
        };
        stats.connected += 1;
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let payload = match i % 6 {
            0 => {
                let n = 1 + rng.below(8192);
                rng.bytes(n)
            }
            1 => vec![0xff, 0xff],
            2 => {
                let mut v = vec![0xff, 0xff];
                v.extend(rng.bytes(1000));
                v
            }
            3 => {
                let mut v = vec![0, 0];
                let n = rng.below(100);
                v.extend(rng.bytes(n));
                v
            }
            4 => {
                let n = 1 + rng.below(3);
                rng.bytes(n)
            }
            _ => Vec::new(),
        };
        if let Ok(()) = s.write_all(&payload) {
            stats.bytes += payload.len();
        }
        if i % 3 == 0 {
            set_rst_on_close(&s);
        }
    }
    stats
}

/// Opens `n` connections to `target` that send nothing (or only a partial frame header)
/// and keeps them open: the caller holds the returned streams.
pub fn tcp_hold_open(target: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut held = Vec::new();
    let mut failed = 0;
    for i in 0..n {
        match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
            Ok(mut s) => {
                if i % 4 == 1 {
                    let _ = s.write_all(&[0x01]); // half a length prefix
                } else if i % 4 == 2 {
                    let _ = s.write_all(&[0xff, 0xff, 0x00]); // a 64 KiB frame, never finished
                }
                held.push(s);
            }
            Err(_) => failed += 1,
        }
    }
    (held, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_varied() {
        let mut rng = Rng::seeded(42);
        let ds: Vec<Vec<u8>> = (0..1000).map(|_| datagram(&mut rng)).collect();
        assert!(ds.iter().any(|d| d.is_empty()));
        assert!(ds.iter().any(|d| d.len() > 1000));
        assert!(ds
            .iter()
            .any(|d| d.len() >= 4 && d[0] <= 4 && d[1..4] == [0, 0, 0]));
        assert!(ds.iter().any(|d| d.len() >= 2 && d[0] == 0xA2));
    }
}
