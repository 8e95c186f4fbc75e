use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::*;
use crate::io::Connector;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The next datagram (or GRO batch), waiting for it.
async fn recv(u: &FakeUdp) -> (Vec<u8>, Received) {
    let mut buf = vec![0u8; 65536];
    loop {
        if let Some(r) = u.try_recv(&mut buf).unwrap() {
            return (buf[..r.len].to_vec(), r);
        }
        u.readable().await;
    }
}

fn try_recv(u: &FakeUdp) -> Option<(Vec<u8>, Received)> {
    let mut buf = vec![0u8; 65536];
    let r = u.try_recv(&mut buf).unwrap()?;
    Some((buf[..r.len].to_vec(), r))
}

#[tokio::test(start_paused = true)]
async fn datagrams_arrive_from_the_sender_and_the_unknown_are_counted() {
    let net = FakeNet::new();
    let a = net.bind_udp(sa("10.0.0.1:1000")).unwrap();
    let b = net.bind_udp(sa("10.0.0.2:2000")).unwrap();
    assert_eq!(
        net.bind_udp(sa("10.0.0.2:2000")).unwrap_err().kind(),
        io::ErrorKind::AddrInUse
    );
    a.send(b"hello", 5, sa("10.0.0.2:2000")).await.unwrap();
    let (data, r) = recv(&b).await;
    assert_eq!(data, b"hello");
    assert_eq!((r.len, r.segment, r.from), (5, 5, sa("10.0.0.1:1000")));
    assert!(try_recv(&b).is_none());

    a.send(b"x", 1, sa("10.0.0.2:2001")).await.unwrap();
    a.send(b"x", 1, sa("10.0.0.9:2000")).await.unwrap();
    drop(b);
    a.send(b"x", 1, sa("10.0.0.2:2000")).await.unwrap();
    let b = net.bind_udp(sa("10.0.0.2:2000")).expect("dropping unbinds");
    let s = net.stats();
    assert_eq!((s.delivered, s.no_listener), (1, 3));
    assert!(try_recv(&b).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_gso_send_is_split_and_gro_coalesces_a_run_of_one_size() {
    let net = FakeNet::new();
    let a = net.bind_udp(sa("10.0.0.1:1")).unwrap();
    let c = net.bind_udp(sa("10.0.0.3:3")).unwrap();
    let b = net.bind_udp(sa("10.0.0.2:2")).unwrap();
    assert_eq!(a.max_segments(), 64);
    let data: Vec<u8> = (0..25).collect();
    a.send(&data, 10, b.local_addr()).await.unwrap();
    let sizes: Vec<_> = (0..3).map(|_| try_recv(&b).unwrap().1.len).collect();
    assert_eq!(sizes, [10, 10, 5], "one datagram per call without GRO");
    assert_eq!(net.stats().delivered, 3);

    b.set_gro(true);
    a.send(&data, 10, b.local_addr()).await.unwrap();
    a.send(&data[..20], 10, b.local_addr()).await.unwrap();
    c.send(&data[..10], 10, b.local_addr()).await.unwrap();
    let (got, r) = try_recv(&b).unwrap();
    assert_eq!(
        (got, r.segment),
        (data.clone(), 10),
        "the short one ends a batch"
    );
    let (got, r) = try_recv(&b).unwrap();
    assert_eq!((got.len(), r.segment, r.from), (20, 10, a.local_addr()));
    let (_, r) = try_recv(&b).unwrap();
    assert_eq!(
        (r.len, r.from),
        (10, c.local_addr()),
        "another source, another batch"
    );
    assert!(try_recv(&b).is_none());

    // Segments of other sizes do not join.
    a.send(&data[..10], 10, b.local_addr()).await.unwrap();
    a.send(&data[..12], 12, b.local_addr()).await.unwrap();
    assert_eq!(try_recv(&b).unwrap().1.len, 10);
    assert_eq!(try_recv(&b).unwrap().1.len, 12);
}

#[tokio::test(start_paused = true)]
async fn loss_is_about_the_percent_set_and_repeats_with_the_seed() {
    async fn run(seed: u64) -> (u64, Vec<u8>) {
        let net = FakeNet::with_seed(seed);
        let a = net.bind_udp(sa("10.0.0.1:1")).unwrap();
        let b = net.bind_udp(sa("10.0.0.2:2")).unwrap();
        net.host(ip("10.0.0.2"))
            .set_impairment(Impairment::loss(20.0));
        for i in 0..4000u32 {
            a.send(&i.to_be_bytes(), 4, b.local_addr()).await.unwrap();
        }
        let mut firsts = Vec::new();
        while let Some((d, _)) = try_recv(&b) {
            if firsts.len() < 50 {
                firsts.push(d[3]);
            }
        }
        let s = net.stats();
        assert_eq!(s.lost + s.delivered, 4000);
        (s.lost, firsts)
    }
    let (lost, firsts) = run(7).await;
    assert!((700..900).contains(&lost), "lost {lost} of 4000 at 20%");
    assert_eq!(run(7).await, (lost, firsts.clone()), "same seed, same run");
    assert_ne!(run(8).await.1, firsts, "another seed, another run");
}

#[tokio::test(start_paused = true)]
async fn latency_follows_the_paused_clock() {
    let net = FakeNet::new();
    let a = net.bind_udp(sa("10.0.0.1:1")).unwrap();
    let b = net.bind_udp(sa("10.0.0.2:2")).unwrap();
    let (ha, hb) = (net.host(ip("10.0.0.1")), net.host(ip("10.0.0.2")));
    net.set_link(
        &ha,
        &hb,
        Impairment::latency(Duration::from_millis(40), Duration::ZERO),
    );
    hb.set_impairment(Impairment::latency(
        Duration::from_millis(10),
        Duration::ZERO,
    ));
    let start = Instant::now();
    a.send(b"late", 4, b.local_addr()).await.unwrap();
    assert!(try_recv(&b).is_none(), "not arrived yet");
    b.readable().await;
    assert_eq!(start.elapsed(), Duration::from_millis(50), "link + host");
    assert_eq!(try_recv(&b).unwrap().0, b"late");

    // Jitter stays within its bound.
    net.set_link(
        &ha,
        &hb,
        Impairment::latency(Duration::from_millis(40), Duration::from_millis(20)),
    );
    let start = Instant::now();
    for _ in 0..20 {
        a.send(b"j", 1, b.local_addr()).await.unwrap();
    }
    for _ in 0..20 {
        recv(&b).await;
        let e = start.elapsed();
        assert!(e >= Duration::from_millis(50) && e <= Duration::from_millis(70));
    }
}

#[tokio::test(start_paused = true)]
async fn reordering_lets_later_datagrams_overtake() {
    let net = FakeNet::with_seed(3);
    let a = net.bind_udp(sa("10.0.0.1:1")).unwrap();
    let b = net.bind_udp(sa("10.0.0.2:2")).unwrap();
    net.host(ip("10.0.0.1")).set_impairment(Impairment {
        reorder_percent: 25.0,
        reorder_delay: Duration::from_millis(5),
        ..Impairment::default()
    });
    for i in 0..100u8 {
        a.send(&[i], 1, b.local_addr()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut order = Vec::new();
    for _ in 0..100 {
        order.push(recv(&b).await.0[0]);
    }
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..100).collect::<Vec<u8>>(), "all arrive");
    let overtaken = order.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(overtaken > 5, "{overtaken} inversions in {order:?}");
}

#[tokio::test(start_paused = true)]
async fn block_udp_one_way_and_both_ways() {
    let net = FakeNet::new();
    let (ha, hb) = (net.host(ip("10.0.0.1")), net.host(ip("10.0.0.2")));
    let a = ha.bind_udp(1).unwrap();
    let b = hb.bind_udp(2).unwrap();
    net.block_udp(&ha, &hb, Direction::OneWay);
    a.send(b"x", 1, b.local_addr()).await.unwrap();
    b.send(b"y", 1, a.local_addr()).await.unwrap();
    assert!(try_recv(&b).is_none());
    assert_eq!(try_recv(&a).unwrap().0, b"y");
    net.block_udp(&ha, &hb, Direction::BothWays);
    b.send(b"y", 1, a.local_addr()).await.unwrap();
    assert!(try_recv(&a).is_none());
    net.unblock_udp(&ha, &hb, Direction::BothWays);
    a.send(b"x", 1, b.local_addr()).await.unwrap();
    assert_eq!(try_recv(&b).unwrap().0, b"x");
    assert_eq!(net.stats().blocked, 2);
}

/// A host behind a NAT of `kind` and two public servers.
fn natted(kind: NatKind) -> (FakeNet, Nat, FakeUdp, FakeUdp, FakeUdp) {
    let net = FakeNet::new();
    let nat = net.nat(ip("203.0.113.1"), kind);
    let inside = nat.host(ip("192.168.1.2")).bind_udp(5000).unwrap();
    let s1 = net.bind_udp(sa("198.51.100.1:3478")).unwrap();
    let s2 = net.bind_udp(sa("198.51.100.2:3478")).unwrap();
    (net, nat, inside, s1, s2)
}

#[tokio::test(start_paused = true)]
async fn an_easy_nat_keeps_one_mapping_and_a_hard_one_does_not() {
    let (_net, nat, inside, s1, s2) = natted(NatKind::Easy);
    inside.send(b"1", 1, s1.local_addr()).await.unwrap();
    inside.send(b"2", 1, s2.local_addr()).await.unwrap();
    let (f1, f2) = (try_recv(&s1).unwrap().1.from, try_recv(&s2).unwrap().1.from);
    assert_eq!(f1.ip(), IpAddr::V4(ip("203.0.113.1")), "the NAT's address");
    assert_ne!(f1.port(), 5000, "ports are not preserved");
    assert_eq!(f1, f2, "endpoint-independent mapping");
    assert_eq!(nat.mappings(), 1);

    let (_net, nat, inside, s1, s2) = natted(NatKind::Hard);
    inside.send(b"1", 1, s1.local_addr()).await.unwrap();
    inside.send(b"2", 1, s2.local_addr()).await.unwrap();
    inside.send(b"3", 1, s1.local_addr()).await.unwrap();
    let (f1, f2) = (try_recv(&s1).unwrap().1.from, try_recv(&s2).unwrap().1.from);
    assert_eq!(f1.ip(), f2.ip());
    assert_ne!(f1.port(), f2.port(), "a port per destination");
    assert_eq!(try_recv(&s1).unwrap().1.from, f1, "kept for the same one");
    assert_eq!(nat.mappings(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_nat_admits_only_remotes_its_inside_sent_to() {
    for kind in [NatKind::Easy, NatKind::Hard] {
        let (net, _nat, inside, s1, s2) = natted(kind);
        inside.send(b"out", 3, s1.local_addr()).await.unwrap();
        let public = try_recv(&s1).unwrap().1.from;
        s2.send(b"unsolicited", 11, public).await.unwrap();
        let other_port = net.bind_udp(sa("198.51.100.1:9")).unwrap();
        other_port.send(b"other port", 10, public).await.unwrap();
        s1.send(b"to nowhere", 10, sa("203.0.113.1:1"))
            .await
            .unwrap();
        assert!(try_recv(&inside).is_none(), "{kind:?}");
        assert_eq!(net.stats().nat_filtered, 3);
        s1.send(b"reply", 5, public).await.unwrap();
        let (d, r) = try_recv(&inside).unwrap();
        assert_eq!((d, r.from), (b"reply".to_vec(), s1.local_addr()));
    }
}

#[tokio::test(start_paused = true)]
async fn mappings_expire_when_idle_and_outbound_traffic_refreshes_them() {
    let (_net, nat, inside, s1, _s2) = natted(NatKind::Easy);
    nat.set_timeout(Duration::from_secs(30));
    inside.send(b"a", 1, s1.local_addr()).await.unwrap();
    let public = try_recv(&s1).unwrap().1.from;
    tokio::time::sleep(Duration::from_secs(20)).await;
    inside.send(b"b", 1, s1.local_addr()).await.unwrap();
    assert_eq!(try_recv(&s1).unwrap().1.from, public);
    tokio::time::sleep(Duration::from_secs(25)).await;
    s1.send(b"refreshed", 9, public).await.unwrap();
    assert!(
        try_recv(&inside).is_some(),
        "45 s after the mapping was made"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(nat.mappings(), 0);
    s1.send(b"expired", 7, public).await.unwrap();
    assert!(try_recv(&inside).is_none(), "inbound does not refresh");
    inside.send(b"c", 1, s1.local_addr()).await.unwrap();
    assert_ne!(try_recv(&s1).unwrap().1.from, public, "a new mapping");
}

#[tokio::test(start_paused = true)]
async fn hosts_behind_one_nat_talk_directly_and_hairpinning_is_optional() {
    let net = FakeNet::new();
    let nat = net.nat(ip("203.0.113.1"), NatKind::Easy);
    let a = nat.host(ip("192.168.1.2")).bind_udp(1).unwrap();
    let b = nat.host(ip("192.168.1.3")).bind_udp(1).unwrap();
    // The same private address behind another router is another host.
    let elsewhere = net
        .nat(ip("203.0.113.2"), NatKind::Easy)
        .host(ip("192.168.1.3"))
        .bind_udp(1)
        .unwrap();
    let s = net.bind_udp(sa("198.51.100.1:1")).unwrap();
    a.send(b"lan", 3, b.local_addr()).await.unwrap();
    assert_eq!(try_recv(&b).unwrap().1.from, a.local_addr());
    assert!(try_recv(&elsewhere).is_none());

    b.send(b"x", 1, s.local_addr()).await.unwrap();
    let b_public = try_recv(&s).unwrap().1.from;
    a.send(b"x", 1, s.local_addr()).await.unwrap();
    let a_public = try_recv(&s).unwrap().1.from;
    a.send(b"hairpin", 7, b_public).await.unwrap();
    assert!(try_recv(&b).is_none(), "no hairpinning by default");
    nat.set_hairpin(true);
    a.send(b"hairpin", 7, b_public).await.unwrap();
    assert!(try_recv(&b).is_none(), "b never sent to a's public address");
    b.send(b"hairpin", 7, a_public).await.unwrap();
    let (d, r) = try_recv(&a).unwrap();
    assert_eq!(
        (d, r.from),
        (b"hairpin".to_vec(), b_public),
        "a sent to b's"
    );
    a.send(b"back", 4, b_public).await.unwrap();
    assert_eq!(try_recv(&b).unwrap().1.from, a_public);
}

#[tokio::test(start_paused = true)]
async fn a_full_receive_queue_drops() {
    let net = FakeNet::new();
    let a = net.bind_udp(sa("10.0.0.1:1")).unwrap();
    let b = net.bind_udp(sa("10.0.0.2:2")).unwrap();
    for _ in 0..RECV_QUEUE + 3 {
        a.send(b"x", 1, b.local_addr()).await.unwrap();
    }
    assert_eq!(net.stats().queue_full, 3);
}

#[tokio::test(start_paused = true)]
async fn streams_connect_through_a_nat_and_are_refused_without_a_listener() {
    let net = FakeNet::new();
    let listener = net.listen_tcp(sa("198.51.100.1:443")).unwrap();
    let nat = net.nat(ip("203.0.113.1"), NatKind::Hard);
    let client = nat.host(ip("192.168.1.2")).connector();
    let addrs = client.resolve("198.51.100.1:443").await.unwrap();
    assert_eq!(addrs, [sa("198.51.100.1:443")]);
    assert!(client.resolve("coordinator.example:443").await.is_err());

    let mut c = client.connect(addrs[0]).await.unwrap();
    let (mut s, peer) = listener.accept().await.unwrap();
    assert_eq!(
        peer.ip(),
        IpAddr::V4(ip("203.0.113.1")),
        "the NAT's address"
    );
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    s.write_all(b"pong").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    drop(s);
    assert_eq!(c.read(&mut buf).await.unwrap(), 0, "closed: EOF");

    let e = client.connect(sa("198.51.100.1:444")).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    drop(listener);
    let e = client.connect(addrs[0]).await.unwrap_err();
    assert_eq!(
        e.kind(),
        io::ErrorKind::ConnectionRefused,
        "stopped listening"
    );
}

#[tokio::test(start_paused = true)]
async fn blocked_or_unknown_destinations_time_out() {
    let net = FakeNet::new();
    let server = net.host(ip("198.51.100.1"));
    let _listener = server.listen_tcp(443).unwrap();
    let client = net.host(ip("10.0.0.1")).connector();
    let nat = net.nat(ip("203.0.113.1"), NatKind::Easy);
    let _inside = nat.host(ip("192.168.1.2")).listen_tcp(443).unwrap();
    for to in ["198.51.100.9:443", "203.0.113.1:443"] {
        let start = Instant::now();
        let e = client.connect(sa(to)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{to}");
        assert_eq!(start.elapsed(), SYN_TIMEOUT);
    }
    server.block_tcp(true);
    let e = client.connect(sa("198.51.100.1:443")).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    server.block_tcp(false);
    assert!(client.connect(sa("198.51.100.1:443")).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn cutting_a_hosts_streams_resets_both_ends() {
    let net = FakeNet::new();
    let server = net.host(ip("198.51.100.1"));
    let listener = server.listen_tcp(443).unwrap();
    let client = net.host(ip("10.0.0.1")).connector();
    let mut c = client.connect(sa("198.51.100.1:443")).await.unwrap();
    let (mut s, _) = listener.accept().await.unwrap();
    let reading = tokio::spawn(async move {
        let mut buf = [0u8; 1];
        c.read(&mut buf).await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.cut_streams();
    let e = reading.await.unwrap().unwrap_err();
    assert_eq!(
        e.kind(),
        io::ErrorKind::ConnectionReset,
        "a waiting read wakes"
    );
    let e = s.write_all(b"x").await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    assert!(
        client.connect(sa("198.51.100.1:443")).await.is_ok(),
        "new streams still connect"
    );
}
