//! A TUN device made of two in-memory queues, like wireguard-go's `tuntest.NewChannelTUN`: the
//! test plays the applications on the host (it injects packets the daemon reads and receives the
//! packets the daemon writes).
//!
//! What it does not simulate: the kernel's routing (every injected packet is read, whatever its
//! destination), the MTU (a packet longer than the reader's buffer is dropped with an error),
//! offload (no virtio-net header, no GSO super-packets on read, no GRO coalescing on write), and
//! the interface's address (see [`FakeUnderlay`](super::FakeUnderlay)).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};

use crate::io::{TunDevice, TunReader, TunWriter};

/// The side of the device the daemon holds (its reading and writing halves).
pub struct ChannelTun {
    shared: Arc<Shared>,
    written: mpsc::UnboundedSender<Vec<u8>>,
}

/// The side of the device the test holds: the host's applications. Clones share the queues.
#[derive(Clone)]
pub struct TunHandle {
    shared: Arc<Shared>,
    written: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<u8>>>>,
}

struct Shared {
    /// Injected packets, not read yet.
    injected: Mutex<VecDeque<Vec<u8>>>,
    notify: Notify,
}

impl ChannelTun {
    /// A new device and the test's handle on it.
    pub fn new() -> (ChannelTun, TunHandle) {
        let shared = Arc::new(Shared {
            injected: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = TunHandle {
            shared: shared.clone(),
            written: Arc::new(tokio::sync::Mutex::new(rx)),
        };
        (
            ChannelTun {
                shared,
                written: tx,
            },
            handle,
        )
    }
}

impl TunHandle {
    /// Queues `packet` as if an application on the host sent it into the interface; the
    /// daemon's next read returns it.
    pub fn inject(&self, packet: Vec<u8>) {
        self.shared.injected.lock().unwrap().push_back(packet);
        self.shared.notify.notify_waiters();
    }

    /// The next packet the daemon wrote to the device (the bytes at `offset..` of its buffer),
    /// waiting for one; `None` once the device and all its writers are dropped and everything
    /// written was received.
    pub async fn recv(&self) -> Option<Vec<u8>> {
        self.written.lock().await.recv().await
    }

    /// The next packet the daemon wrote, without waiting; `None` when there is none now (or
    /// another task is in [`recv`](Self::recv)).
    pub fn try_recv(&self) -> Option<Vec<u8>> {
        self.written.try_lock().ok()?.try_recv().ok()
    }

    /// How many injected packets the daemon has not read yet.
    pub fn unread(&self) -> usize {
        self.shared.injected.lock().unwrap().len()
    }
}

impl TunDevice for ChannelTun {
    type Reader = ChannelTunReader;
    type Writer = ChannelTunWriter;

    fn reader(&self) -> ChannelTunReader {
        ChannelTunReader {
            shared: self.shared.clone(),
        }
    }

    fn writer(&self) -> ChannelTunWriter {
        ChannelTunWriter {
            written: self.written.clone(),
        }
    }
}

/// Reads injected packets (several readers share one queue).
pub struct ChannelTunReader {
    shared: Arc<Shared>,
}

impl TunReader for ChannelTunReader {
    /// Waits for injected packets and returns as many as `bufs` (and `sizes`) have room for,
    /// one per buffer. A packet longer than its buffer is dropped and returned as an error
    /// (when it is the first of the read; otherwise the read ends before it).
    async fn read(&mut self, bufs: &mut [&mut [u8]], sizes: &mut [usize]) -> io::Result<usize> {
        let room = bufs.len().min(sizes.len());
        if room == 0 {
            return Ok(0);
        }
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut queue = self.shared.injected.lock().unwrap();
                let mut n = 0;
                while n < room {
                    let Some(p) = queue.front() else { break };
                    if p.len() > bufs[n].len() {
                        if n > 0 {
                            break;
                        }
                        let p = queue.pop_front().unwrap_or_default();
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "injected packet of {} bytes is longer than the read buffer ({})",
                                p.len(),
                                bufs[0].len()
                            ),
                        ));
                    }
                    let p = queue.pop_front().unwrap_or_default();
                    bufs[n][..p.len()].copy_from_slice(&p);
                    sizes[n] = p.len();
                    n += 1;
                }
                if n > 0 {
                    return Ok(n);
                }
            }
            notified.await;
        }
    }
}

/// Writes packets for the test to receive (several writers share one queue).
pub struct ChannelTunWriter {
    written: mpsc::UnboundedSender<Vec<u8>>,
}

impl TunWriter for ChannelTunWriter {
    /// Queues each `bufs[i][offset..]` as one packet, in order. Nothing is coalesced; a
    /// packet nobody will receive (the handle is gone) is dropped silently, as the kernel
    /// would deliver it to an application that does not read.
    async fn write(&mut self, bufs: &mut [Vec<u8>], offset: usize) -> io::Result<()> {
        for b in bufs.iter() {
            let packet = b.get(offset..).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "offset beyond the buffer")
            })?;
            let _ = self.written.send(packet.to_vec());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The read contract's slices over `store`'s buffers.
    pub fn slices(store: &mut [Vec<u8>]) -> Vec<&mut [u8]> {
        store.iter_mut().map(Vec::as_mut_slice).collect()
    }

    #[tokio::test]
    async fn injected_packets_are_read_in_batches() {
        let (tun, handle) = ChannelTun::new();
        let mut reader = tun.reader();
        for i in 0..3u8 {
            handle.inject(vec![i; 10 + i as usize]);
        }
        let mut store = vec![vec![0u8; 100]; 2];
        let mut bufs = slices(&mut store);
        let mut sizes = vec![0usize; 2];
        assert_eq!(reader.read(&mut bufs, &mut sizes).await.unwrap(), 2);
        assert_eq!(&bufs[0][..sizes[0]], &[0u8; 10]);
        assert_eq!(&bufs[1][..sizes[1]], &[1u8; 11]);
        assert_eq!(reader.read(&mut bufs, &mut sizes).await.unwrap(), 1);
        assert_eq!(&bufs[0][..sizes[0]], &[2u8; 12]);
        assert_eq!(handle.unread(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_waits_for_an_injection_and_survives_the_handle() {
        let (tun, handle) = ChannelTun::new();
        let mut reader = tun.reader();
        let read = tokio::spawn(async move {
            let mut store = vec![vec![0u8; 100]; 4];
            let mut bufs = slices(&mut store);
            let mut sizes = vec![0usize; 4];
            let n = reader.read(&mut bufs, &mut sizes).await.unwrap();
            (n, bufs[0][..sizes[0]].to_vec(), reader)
        });
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!read.is_finished());
        handle.inject(vec![7; 5]);
        let (n, p, mut reader) = read.await.unwrap();
        assert_eq!((n, p), (1, vec![7; 5]));

        drop(handle);
        let mut store = vec![vec![0u8; 100]];
        let mut bufs = slices(&mut store);
        let mut sizes = vec![0usize];
        let waited = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            reader.read(&mut bufs, &mut sizes),
        )
        .await;
        assert!(waited.is_err(), "a read without a handle waits");
    }

    #[tokio::test]
    async fn an_oversized_packet_is_an_error_and_is_dropped() {
        let (tun, handle) = ChannelTun::new();
        let mut reader = tun.reader();
        handle.inject(vec![1; 200]);
        handle.inject(vec![2; 20]);
        let mut store = vec![vec![0u8; 100]; 2];
        let mut bufs = slices(&mut store);
        let mut sizes = vec![0usize; 2];
        assert!(reader.read(&mut bufs, &mut sizes).await.is_err());
        assert_eq!(reader.read(&mut bufs, &mut sizes).await.unwrap(), 1);
        assert_eq!(sizes[0], 20);
    }

    #[tokio::test]
    async fn written_packets_reach_the_handle_from_several_writers() {
        let (tun, handle) = ChannelTun::new();
        let mut w1 = tun.writer();
        let mut w2 = tun.writer();
        let mut bufs = vec![vec![0xee, 0xee, 1, 2, 3], vec![0xee, 0xee, 4]];
        w1.write(&mut bufs, 2).await.unwrap();
        w2.write(&mut [vec![9, 9, 9]], 0).await.unwrap();
        assert_eq!(handle.recv().await, Some(vec![1, 2, 3]));
        assert_eq!(handle.try_recv(), Some(vec![4]));
        assert_eq!(handle.recv().await, Some(vec![9, 9, 9]));
        assert_eq!(handle.try_recv(), None);
        drop((tun, w1, w2));
        assert_eq!(handle.recv().await, None, "the device is gone");
    }
}
