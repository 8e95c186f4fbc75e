//! The packets that make a refused connection fail fast instead of hanging: a TCP RST, or an
//! ICMP / ICMPv6 "administratively prohibited", built as the answer to a refused packet (from
//! its destination to its source). I/O-free; written into a caller's buffer, nothing allocated.

/// Most of the refused packet an ICMPv6 error quotes (the whole error stays within the IPv6
/// minimum MTU, 1280).
const ICMP6_QUOTE: usize = 1280 - 40 - 8;

fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The pseudo-header sum of a transport checksum.
fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let acc = sum(dst, sum(src, 0));
    acc + u32::from(proto) + (len as u32 & 0xffff) + ((len as u32) >> 16)
}

/// Writes an IP header from `src` to `dst` (4 or 16 bytes each) for `payload_len` bytes of
/// `proto`; returns the header's length.
fn ip_header(out: &mut [u8], src: &[u8], dst: &[u8], proto: u8, payload_len: usize) -> usize {
    if src.len() == 4 {
        let total = 20 + payload_len;
        out[..20].fill(0);
        out[0] = 0x45;
        out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        out[6] = 0x40; // don't fragment
        out[8] = 64;
        out[9] = proto;
        out[12..16].copy_from_slice(src);
        out[16..20].copy_from_slice(dst);
        let c = fold(sum(&out[..20], 0));
        out[10..12].copy_from_slice(&c.to_be_bytes());
        20
    } else {
        out[..40].fill(0);
        out[0] = 0x60;
        out[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
        out[6] = proto;
        out[7] = 64;
        out[8..24].copy_from_slice(src);
        out[24..40].copy_from_slice(dst);
        40
    }
}

/// Source, destination and where the transport header starts, for a packet without IPv6
/// extension headers (what a refusal answers; anything else gets no answer).
fn addresses(p: &[u8]) -> Option<(&[u8], &[u8], u8, usize)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            (ihl >= 20 && ihl <= p.len()).then(|| (&p[12..16], &p[16..20], p[9], ihl))
        }
        6 if p.len() >= 40 => Some((&p[8..24], &p[24..40], p[6], 40)),
        _ => None,
    }
}

/// The packet's length by its IP header, at most what is there (a packet read from the TUN
/// device may carry WireGuard's padding after it).
fn ip_len(p: &[u8]) -> usize {
    let n = if p[0] >> 4 == 4 {
        usize::from(u16::from_be_bytes([p[2], p[3]]))
    } else {
        40 + usize::from(u16::from_be_bytes([p[4], p[5]]))
    };
    n.min(p.len())
}

/// A TCP RST answering the TCP segment `p` (RFC 9293 3.10.7.1: a segment with ACK gets a RST
/// with that sequence number; one without gets RST+ACK acknowledging it). Returns the length
/// written to `out` (at least 60 bytes), or `None` if `p` is not a TCP segment or is a RST.
pub fn tcp_rst(p: &[u8], out: &mut [u8]) -> Option<usize> {
    let (src, dst, proto, off) = addresses(p)?;
    let p = &p[..ip_len(p)];
    if proto != 6 || p.len() < off + 20 || out.len() < 60 {
        return None;
    }
    let t = &p[off..];
    let flags = t[13];
    if flags & 0x04 != 0 {
        return None; // never answer a RST
    }
    let data_off = usize::from(t[12] >> 4) * 4;
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
    let seg_len = t.len().saturating_sub(data_off) as u32
        + u32::from(flags & 0x02 != 0)
        + u32::from(flags & 0x01 != 0);
    let h = ip_header(out, dst, src, 6, 20);
    let r = &mut out[h..h + 20];
    r.fill(0);
    r[0..2].copy_from_slice(&t[2..4]);
    r[2..4].copy_from_slice(&t[0..2]);
    if flags & 0x10 != 0 {
        r[4..8].copy_from_slice(&ack.to_be_bytes());
        r[13] = 0x04;
    } else {
        r[8..12].copy_from_slice(&seq.wrapping_add(seg_len).to_be_bytes());
        r[13] = 0x14;
    }
    r[12] = 5 << 4;
    let c = fold(sum(r, pseudo(dst, src, 6, 20)));
    r[16..18].copy_from_slice(&c.to_be_bytes());
    Some(h + 20)
}

/// An ICMP "communication administratively prohibited" (IPv4 type 3 code 13, ICMPv6 type 1
/// code 1) answering `p`, quoting its header and the start of its payload. Returns the length
/// written to `out`, or `None` if `p` is itself an ICMP error or `out` is too small.
pub fn prohibited(p: &[u8], out: &mut [u8]) -> Option<usize> {
    let (src, dst, proto, off) = addresses(p)?;
    let p = &p[..ip_len(p)];
    let v4 = src.len() == 4;
    if let Some(&t) = p.get(off) {
        let is_error = if v4 {
            proto == 1 && t != 8 && t != 0
        } else {
            proto == 58 && t < 128
        };
        if is_error {
            return None; // never answer an error with an error
        }
    }
    let quote = if v4 {
        (off + 8).min(p.len())
    } else {
        p.len().min(ICMP6_QUOTE)
    };
    let ip_len = if v4 { 20 } else { 40 };
    if out.len() < ip_len + 8 + quote {
        return None;
    }
    let icmp_proto = if v4 { 1 } else { 58 };
    let h = ip_header(out, dst, src, icmp_proto, 8 + quote);
    let m = &mut out[h..h + 8 + quote];
    m[..8].fill(0);
    (m[0], m[1]) = if v4 { (3, 13) } else { (1, 1) };
    m[8..].copy_from_slice(&p[..quote]);
    let base = if v4 {
        0
    } else {
        pseudo(dst, src, 58, 8 + quote)
    };
    let c = fold(sum(m, base));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    Some(h + 8 + quote)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn4() -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&8080u16.to_be_bytes());
        p[24..28].copy_from_slice(&1000u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x02;
        p
    }

    /// A checksum over data that includes its own checksum field folds to zero.
    fn verifies(data: &[u8], base: u32) -> bool {
        fold(sum(data, base)) == 0
    }

    #[test]
    fn a_syn_gets_a_rst_ack_from_its_destination_acknowledging_it() {
        let syn = syn4();
        let mut out = [0u8; 128];
        let n = tcp_rst(&syn, &mut out).unwrap();
        assert_eq!(n, 40);
        let r = &out[..n];
        assert!(verifies(&r[..20], 0), "IPv4 header checksum");
        assert_eq!(&r[12..16], &[100, 64, 0, 2]);
        assert_eq!(&r[16..20], &[100, 64, 0, 1]);
        assert_eq!(u16::from_be_bytes([r[20], r[21]]), 8080);
        assert_eq!(u16::from_be_bytes([r[22], r[23]]), 40000);
        assert_eq!(u32::from_be_bytes([r[28], r[29], r[30], r[31]]), 1001);
        assert_eq!(r[33], 0x14, "RST+ACK");
        assert!(verifies(&r[20..], pseudo(&r[12..16], &r[16..20], 6, 20)));
    }

    #[test]
    fn a_segment_with_ack_gets_a_rst_with_its_ack_number_and_a_rst_gets_nothing() {
        let mut seg = syn4();
        seg[33] = 0x10;
        seg[28..32].copy_from_slice(&777u32.to_be_bytes());
        let mut out = [0u8; 128];
        let n = tcp_rst(&seg, &mut out).unwrap();
        assert_eq!(
            u32::from_be_bytes([out[24], out[25], out[26], out[27]]),
            777
        );
        assert_eq!(out[33], 0x04);
        assert_eq!(n, 40);
        seg[33] = 0x04;
        assert_eq!(tcp_rst(&seg, &mut out), None);
        assert_eq!(tcp_rst(&seg[..30], &mut out), None, "truncated");
        assert_eq!(tcp_rst(&[0x45], &mut out), None);
    }

    #[test]
    fn ipv6_rst_and_prohibited_carry_valid_checksums() {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&20u16.to_be_bytes());
        p[6] = 6;
        p[8] = 0xfd;
        p[23] = 1;
        p[24] = 0xfd;
        p[39] = 2;
        p[40..42].copy_from_slice(&5000u16.to_be_bytes());
        p[42..44].copy_from_slice(&22u16.to_be_bytes());
        p[52] = 5 << 4;
        p[53] = 0x02;
        let mut out = [0u8; 1400];
        let n = tcp_rst(&p, &mut out).unwrap();
        assert_eq!(n, 60);
        assert_eq!(out[6], 6);
        assert!(verifies(
            &out[40..60],
            pseudo(&out[8..24], &out[24..40], 6, 20)
        ));
        let n = prohibited(&p, &mut out).unwrap();
        assert_eq!(n, 40 + 8 + 60);
        assert_eq!((out[40], out[41]), (1, 1));
        assert_eq!(&out[48..n], &p[..]);
        assert!(verifies(
            &out[40..n],
            pseudo(&out[8..24], &out[24..40], 58, n - 40)
        ));
    }

    #[test]
    fn icmp_prohibited_quotes_the_header_and_eight_bytes_and_never_answers_an_error() {
        let mut udp = syn4();
        udp[9] = 17;
        let mut out = [0u8; 256];
        let n = prohibited(&udp, &mut out).unwrap();
        assert_eq!(n, 20 + 8 + 28);
        assert_eq!(out[9], 1);
        assert_eq!((out[20], out[21]), (3, 13));
        assert_eq!(&out[28..n], &udp[..28]);
        assert!(verifies(&out[20..n], 0));
        let error = out[..n].to_vec();
        assert_eq!(prohibited(&error, &mut out), None);
        assert_eq!(prohibited(&udp, &mut out[..30]), None, "no room");
    }
}
