//! WireGuard handshake messages built by hand (whitepaper §5.4), for tests that forge them: a
//! handshake initiation from a static key of the test's choosing (even a low-order point that
//! no real peer would use), initiations with random fields but a valid MAC1 (a flood that
//! passes the first check), MAC2 from a cookie, and opening the cookie of a cookie reply.
//!
//! Nothing here is for production: the ephemeral key comes from the OS, errors panic, and no
//! step is constant-time. The tests of this crate check every message against boringtun, the
//! implementation a2ad runs.
//!
//! Message layout of an initiation (148 bytes): type `1` and three zero bytes, sender index
//! (little endian), unencrypted ephemeral (32), encrypted static (32 + 16), encrypted TAI64N
//! timestamp (12 + 16), MAC1 (16), MAC2 (16).

use std::time::{SystemTime, UNIX_EPOCH};

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use rand::RngCore;
use x25519_dalek::{PublicKey, StaticSecret};

/// The length of a handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// The length of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;

const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
const LABEL_MAC1: &[u8] = b"mac1----";
const LABEL_COOKIE: &[u8] = b"cookie--";

/// A forged handshake initiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initiation {
    /// The datagram, [`INITIATION_LEN`] bytes.
    pub message: Vec<u8>,
    /// Its MAC1: a cookie reply to it is sealed with this (see [`open_cookie`]).
    pub mac1: [u8; 16],
}

/// HASH(LABEL_MAC1 || responder's public key): the key of MAC1 (whitepaper §5.4.4).
pub fn mac1_key(responder: &[u8; 32]) -> [u8; 32] {
    hash(&[LABEL_MAC1, responder])
}

/// HASH(LABEL_COOKIE || responder's public key): the key a cookie reply is sealed with
/// (whitepaper §5.4.7).
pub fn cookie_key(responder: &[u8; 32]) -> [u8; 32] {
    hash(&[LABEL_COOKIE, responder])
}

/// MAC(key, msg): keyed BLAKE2s with a 16-byte output (MAC1 under [`mac1_key`], MAC2 under a
/// cookie).
pub fn mac16(key: &[u8], msg: &[u8]) -> [u8; 16] {
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("a BLAKE2s key");
    Mac::update(&mut m, msg);
    m.finalize_fixed().into()
}

/// Writes MAC1 for `responder` into a handshake message (initiation or response: the MACs are
/// its last 32 bytes), and MAC2 from `cookie` (zeros without one, as a sender without a cookie
/// sends). Returns MAC1.
pub fn set_macs(message: &mut [u8], responder: &[u8; 32], cookie: Option<&[u8; 16]>) -> [u8; 16] {
    let n = message.len();
    assert!(n >= 32, "a handshake message ends with two MACs");
    let mac1 = mac16(&mac1_key(responder), &message[..n - 32]);
    message[n - 32..n - 16].copy_from_slice(&mac1);
    let mac2 = cookie.map_or([0; 16], |c| mac16(c, &message[..n - 16]));
    message[n - 16..].copy_from_slice(&mac2);
    mac1
}

/// The TAI64N label of a moment, as an initiation carries it (a responder accepts only a
/// timestamp greater than the last one it accepted from that peer).
pub fn tai64n(t: SystemTime) -> [u8; 12] {
    let d = t.duration_since(UNIX_EPOCH).expect("a time after 1970");
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&(d.as_secs() + (1 << 62) + 37).to_be_bytes());
    out[8..].copy_from_slice(&d.subsec_nanos().to_be_bytes());
    out
}

/// A valid handshake initiation from the holder of `static_secret` to `responder` (a public
/// key), with sender index `sender`, timestamped now, and MAC2 from `cookie` if given. A
/// responder that has the initiator's public key as a peer answers it.
pub fn initiation(
    responder: &[u8; 32],
    static_secret: &[u8; 32],
    sender: u32,
    cookie: Option<&[u8; 16]>,
) -> Initiation {
    let secret = StaticSecret::from(*static_secret);
    let static_public = PublicKey::from(&secret).to_bytes();
    let ss = secret
        .diffie_hellman(&PublicKey::from(*responder))
        .to_bytes();
    initiation_with(
        responder,
        &static_public,
        &ss,
        sender,
        tai64n(SystemTime::now()),
        cookie,
    )
}

/// A handshake initiation claiming the static key `static_public`, where `ss` is the
/// static-static DH as the responder computes it (DH(responder's secret, `static_public`)).
/// With a real key pair that is what [`initiation`] computes; the point of this form is a
/// static key nobody holds the secret of, e.g. a low-order point, whose DH with any key is
/// all zeros, so `ss = [0; 32]` forges it. `timestamp`: see [`tai64n`].
pub fn initiation_with(
    responder: &[u8; 32],
    static_public: &[u8; 32],
    ss: &[u8; 32],
    sender: u32,
    timestamp: [u8; 12],
    cookie: Option<&[u8; 16]>,
) -> Initiation {
    let ck = hash(&[CONSTRUCTION]);
    let h = hash(&[&ck, IDENTIFIER]);
    let h = hash(&[&h, responder]);
    let e = StaticSecret::random_from_rng(rand::rngs::OsRng);
    let e_pub = PublicKey::from(&e).to_bytes();
    let mut m = vec![0u8; INITIATION_LEN];
    m[0] = 1;
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    m[8..40].copy_from_slice(&e_pub);
    let h = hash(&[&h, &e_pub]);
    let ck = kdf1(&ck, &e_pub);
    let es = e.diffie_hellman(&PublicKey::from(*responder));
    let (ck, k) = kdf2(&ck, es.as_bytes());
    let enc_static = seal(&k, static_public, &h);
    m[40..88].copy_from_slice(&enc_static);
    let h = hash(&[&h, &enc_static]);
    let (_, k) = kdf2(&ck, ss);
    m[88..116].copy_from_slice(&seal(&k, &timestamp, &h));
    let mac1 = set_macs(&mut m, responder, cookie);
    Initiation { message: m, mac1 }
}

/// A handshake initiation from nobody: random ephemeral, static and timestamp fields, but a
/// valid MAC1 for `responder` (and MAC2 from `cookie` if given), so it passes the first check
/// and counts against the responder's handshake rate limit before its decryption fails. What
/// a flood of cheap initiations sends.
pub fn random_initiation(
    responder: &[u8; 32],
    sender: u32,
    cookie: Option<&[u8; 16]>,
    rng: &mut impl RngCore,
) -> Initiation {
    let mut m = vec![0u8; INITIATION_LEN];
    rng.fill_bytes(&mut m[8..116]);
    m[0] = 1;
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    let mac1 = set_macs(&mut m, responder, cookie);
    Initiation { message: m, mac1 }
}

/// The cookie in a cookie reply (type 3, [`COOKIE_REPLY_LEN`] bytes) from `responder` to a
/// message whose MAC1 was `mac1` (whitepaper §5.4.7): XChaCha20-Poly1305 under
/// [`cookie_key`], with MAC1 as associated data. `None` when the reply does not open.
pub fn open_cookie(reply: &[u8], responder: &[u8; 32], mac1: &[u8; 16]) -> Option<[u8; 16]> {
    if reply.len() != COOKIE_REPLY_LEN || reply[..4] != [3, 0, 0, 0] {
        return None;
    }
    let key = cookie_key(responder);
    let cipher = <XChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(&key.into());
    let payload = Payload {
        msg: &reply[32..64],
        aad: mac1,
    };
    let cookie = cipher.decrypt(reply[8..32].into(), payload).ok()?;
    cookie.try_into().ok()
}

/// The receiver index of a cookie reply (or response): the sender index of the message it
/// answers.
pub fn receiver_index(reply: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(reply.get(4..8)?.try_into().ok()?))
}

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <hmac::SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key).expect("HMAC key");
    for p in parts {
        Mac::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

fn kdf1(ck: &[u8; 32], input: &[u8]) -> [u8; 32] {
    hmac(&hmac(ck, &[input]), &[&[1]])
}

fn kdf2(ck: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32]) {
    let t = hmac(ck, &[input]);
    let ck = hmac(&t, &[&[1]]);
    let k = hmac(&t, &[&ck, &[2]]);
    (ck, k)
}

fn seal(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let c = <ChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(key.into());
    let payload = Payload {
        msg: plaintext,
        aad,
    };
    c.encrypt(&[0u8; 12].into(), payload)
        .expect("ChaCha20-Poly1305 seals any length")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    use boringtun::noise::handshake::parse_handshake_anon;
    use boringtun::noise::rate_limiter::RateLimiter;
    use boringtun::noise::{Packet, Tunn, TunnResult};
    use boringtun::x25519;

    const R: [u8; 32] = [3; 32];
    const I: [u8; 32] = [4; 32];
    const FROM: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    fn public(secret: &[u8; 32]) -> [u8; 32] {
        x25519::PublicKey::from(&x25519::StaticSecret::from(*secret)).to_bytes()
    }

    /// A boringtun responder with secret `R` and one peer.
    fn responder(peer: [u8; 32]) -> Tunn {
        let r = x25519::StaticSecret::from(R);
        Tunn::new(r, x25519::PublicKey::from(peer), None, None, 1, None)
    }

    /// Whether `t` answers `init` with a handshake response.
    fn answers(t: &mut Tunn, init: &[u8]) -> bool {
        let mut out = vec![0u8; 2048];
        match t.decapsulate(Some(FROM), init, &mut out) {
            TunnResult::WriteToNetwork(r) => r.len() == 92 && r[0] == 2,
            _ => false,
        }
    }

    #[test]
    fn boringtun_answers_the_forged_initiation() {
        let init = initiation(&public(&R), &I, 77, None);
        assert_eq!(init.message.len(), INITIATION_LEN);
        assert!(answers(&mut responder(public(&I)), &init.message));
        // Another responder key, or a tunnel expecting another peer: no answer.
        assert!(!answers(
            &mut responder(public(&I)),
            &initiation(&public(&[5; 32]), &I, 78, None).message
        ));
        assert!(!answers(&mut responder(public(&[6; 32])), &init.message));
    }

    #[test]
    fn boringtun_reads_the_claimed_static_key_and_sender() {
        let init = initiation(&public(&R), &I, 0xdead_beef, None);
        let Ok(Packet::HandshakeInit(p)) = Tunn::parse_incoming_packet(&init.message) else {
            panic!("not an initiation");
        };
        let r = x25519::StaticSecret::from(R);
        let half = parse_handshake_anon(&r, &x25519::PublicKey::from(&r), &p).expect("opens");
        assert_eq!(half.peer_static_public, public(&I));
        assert_eq!(half.peer_index, 0xdead_beef);
    }

    #[test]
    fn a_low_order_static_key_is_forged_without_a_secret() {
        // The all-zero point: its DH with any key is all zeros.
        let low = [0u8; 32];
        let init = initiation_with(
            &public(&R),
            &low,
            &[0; 32],
            9,
            tai64n(SystemTime::now()),
            None,
        );
        assert!(answers(&mut responder(low), &init.message));
    }

    #[test]
    fn random_initiations_pass_mac1_and_nothing_else() {
        let r_pub = public(&R);
        let limiter = RateLimiter::new(&x25519::PublicKey::from(r_pub), 1000);
        let mut rng = rand::thread_rng();
        let mut out = [0u8; 256];
        let a = random_initiation(&r_pub, 1, None, &mut rng);
        let b = random_initiation(&r_pub, 2, None, &mut rng);
        assert_ne!(a.message[8..116], b.message[8..116]);
        assert!(matches!(
            limiter.verify_packet(Some(FROM), &a.message, &mut out),
            Ok(Packet::HandshakeInit(_))
        ));
        // MAC1 for another responder fails the first check.
        let other = random_initiation(&public(&[5; 32]), 3, None, &mut rng);
        assert!(limiter
            .verify_packet(Some(FROM), &other.message, &mut out)
            .is_err());
        // Decryption fails.
        assert!(!answers(&mut responder(public(&I)), &a.message));
    }

    #[test]
    fn a_cookie_reply_opens_and_its_cookie_makes_mac2() {
        let r_pub = public(&R);
        // Limit 0: always under load, so every initiation needs a valid MAC2.
        let limiter = RateLimiter::new(&x25519::PublicKey::from(r_pub), 0);
        let mut out = [0u8; 256];
        let init = initiation(&r_pub, &I, 42, None);
        let reply = match limiter.verify_packet(Some(FROM), &init.message, &mut out) {
            Err(TunnResult::WriteToNetwork(reply)) => reply.to_vec(),
            _ => panic!("no cookie reply under load"),
        };
        assert_eq!(reply.len(), COOKIE_REPLY_LEN);
        assert_eq!(receiver_index(&reply), Some(42));
        assert_eq!(open_cookie(&reply, &[5; 32], &init.mac1), None);
        assert_eq!(open_cookie(&reply, &r_pub, &[0; 16]), None);
        let cookie = open_cookie(&reply, &r_pub, &init.mac1).expect("the cookie opens");
        for again in [
            initiation(&r_pub, &I, 43, Some(&cookie)),
            random_initiation(&r_pub, 44, Some(&cookie), &mut rand::thread_rng()),
        ] {
            assert!(
                matches!(
                    limiter.verify_packet(Some(FROM), &again.message, &mut out),
                    Ok(Packet::HandshakeInit(_))
                ),
                "MAC2 from the cookie is accepted"
            );
        }
        // From another address the cookie is worth nothing.
        let other = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3));
        let again = initiation(&r_pub, &I, 45, Some(&cookie));
        assert!(matches!(
            limiter.verify_packet(Some(other), &again.message, &mut out),
            Err(TunnResult::WriteToNetwork(_))
        ));
    }

    #[test]
    fn set_macs_matches_the_reference_mac1() {
        let r_pub = public(&R);
        let mut m = initiation(&r_pub, &I, 1, None).message;
        let mac1 = mac16(&mac1_key(&r_pub), &m[..116]);
        assert_eq!(m[116..132], mac1);
        assert_eq!(m[132..], [0; 16]);
        m[116..].fill(0xff);
        assert_eq!(set_macs(&mut m, &r_pub, None), mac1);
    }
}
