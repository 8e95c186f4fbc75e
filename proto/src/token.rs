//! The join token: everything a node needs to join a network, in one printable string.
//!
//! Layout (before base32): `version(1) | coordinator_key(32) | network_secret(32) |
//! prefix_addr(4) | prefix_len(1) | endpoint_count(1) | (len(1) | utf8 "host:port")* | check(4)`,
//! where `check` is the first four bytes of SHA-256 over everything before it. The string is
//! `a2a1` followed by lowercase, unpadded RFC 4648 base32 of those bytes.

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The printable prefix of every version-1 token.
pub const TOKEN_PREFIX: &str = "a2a1";
const VERSION: u8 = 1;
const CHECK_LEN: usize = 4;
/// Bytes before the endpoint list.
const FIXED_LEN: usize = 1 + 32 + 32 + 4 + 1 + 1;
/// At most this many coordinator endpoints in a token.
pub const MAX_ENDPOINTS: usize = 8;

/// Why a token string was refused. Every message names the token and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "token is empty: pass the join token printed by a2a-coordinator (it starts with \"a2a1\")"
    )]
    Empty,
    #[error("token does not start with \"a2a1\": this is not an a2a join token (copy the whole line printed by a2a-coordinator)")]
    WrongPrefix,
    #[error("token has an invalid character {0:?} at position {1}: a token holds only letters a-z and digits 2-7 after \"a2a1\"")]
    BadCharacter(char, usize),
    #[error("token is truncated: expected at least {expected} characters, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("token is too long: {extra} characters after its end; copy exactly one token")]
    TrailingData { extra: usize },
    #[error("token is corrupted: its checksum does not match (a character was changed or lost); copy it again")]
    Checksum,
    #[error("token version {0} is not supported by this a2a (it knows version 1); upgrade a2a")]
    UnsupportedVersion(u8),
    #[error("token carries an invalid overlay prefix: {0}")]
    BadPrefix(String),
    #[error("token carries an invalid coordinator endpoint: {0}")]
    BadEndpoint(String),
    #[error("token carries no coordinator endpoint")]
    NoEndpoint,
}

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The coordinator's static X25519 public key, pinned by the control channel.
    pub coordinator_key: [u8; 32],
    /// The network secret K; the network signing key is derived from it.
    pub network_secret: [u8; 32],
    /// The overlay prefix node addresses are derived in.
    pub prefix: Ipv4Net,
    /// Coordinator endpoints, `host:port`, tried in order.
    pub endpoints: Vec<String>,
}

impl fmt::Debug for JoinToken {
    // Never print the network secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("prefix", &self.prefix)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// Appends the endpoint list (`count | (len | utf8)*`) and the 4-byte SHA-256 check to `bytes`,
/// and prints `prefix` and lowercase base32: the tail shared by tokens and invite codes.
pub(crate) fn encode_checked(prefix: &str, mut bytes: Vec<u8>, endpoints: &[String]) -> String {
    bytes.push(endpoints.len() as u8);
    for e in endpoints {
        bytes.push(e.len() as u8);
        bytes.extend_from_slice(e.as_bytes());
    }
    let check = Sha256::digest(&bytes);
    bytes.extend_from_slice(&check[..CHECK_LEN]);
    format!("{prefix}{}", base32(true).encode(&bytes))
}

pub(crate) fn base32(strict: bool) -> data_encoding::Encoding {
    let mut spec = data_encoding::Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.translate.from.push_str("ABCDEFGHIJKLMNOPQRSTUVWXYZ");
    spec.translate.to.push_str("abcdefghijklmnopqrstuvwxyz");
    spec.check_trailing_bits = strict;
    spec.encoding().expect("valid base32 specification")
}

/// Checks one `host:port` endpoint string.
pub fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| format!("{endpoint:?} has no port (expected HOST:PORT)"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{endpoint:?} has no host (expected HOST:PORT)"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{endpoint:?} has no valid port (1-65535)")),
        Ok(_) => {
            if endpoint.len() > 255 {
                Err("endpoint is longer than 255 bytes".into())
            } else {
                Ok(())
            }
        }
    }
}

/// Checks an endpoint given to be put in a new token or invite (`--endpoint`): as
/// [`validate_endpoint`], and an IPv6 address must be in brackets (`[2001:db8::7]:7600`):
/// unbracketed, `2001:db8::7:7600` could be that address without a port. (Decoding does not
/// refuse what it accepted before.)
pub fn validate_new_endpoint(endpoint: &str) -> Result<(), String> {
    validate_endpoint(endpoint)?;
    let (host, _) = endpoint.rsplit_once(':').unwrap_or_default();
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "{endpoint:?}: an IPv6 address needs brackets, [ADDRESS]:PORT \
             (e.g. [2001:db8::7]:7600)"
        ));
    }
    Ok(())
}

impl JoinToken {
    /// A token for a brand-new network with a fresh random secret.
    pub fn new_network(
        coordinator_key: [u8; 32],
        endpoints: Vec<String>,
        prefix: Ipv4Net,
    ) -> Result<Self, TokenError> {
        let mut network_secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut network_secret);
        let token = JoinToken {
            coordinator_key,
            network_secret,
            prefix: prefix.trunc(),
            endpoints,
        };
        token.validate()?;
        Ok(token)
    }

    fn validate(&self) -> Result<(), TokenError> {
        if self.endpoints.is_empty() {
            return Err(TokenError::NoEndpoint);
        }
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(TokenError::BadEndpoint(format!(
                "more than {MAX_ENDPOINTS} endpoints"
            )));
        }
        for e in &self.endpoints {
            validate_endpoint(e).map_err(TokenError::BadEndpoint)?;
        }
        validate_prefix(self.prefix).map_err(TokenError::BadPrefix)
    }

    /// The printable form, `a2a1…`.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(FIXED_LEN + 64 + CHECK_LEN);
        bytes.push(VERSION);
        bytes.extend_from_slice(&self.coordinator_key);
        bytes.extend_from_slice(&self.network_secret);
        bytes.extend_from_slice(&self.prefix.network().octets());
        bytes.push(self.prefix.prefix_len());
        encode_checked(TOKEN_PREFIX, bytes, &self.endpoints)
    }

    /// Parses a token strictly; surrounding white space is ignored.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Empty);
        }
        let body = match text.get(..TOKEN_PREFIX.len()) {
            Some(p) if p.eq_ignore_ascii_case(TOKEN_PREFIX) => &text[TOKEN_PREFIX.len()..],
            _ => return Err(TokenError::WrongPrefix),
        };
        if let Some((i, c)) = body
            .char_indices()
            .find(|(_, c)| !matches!(c, 'a'..='z' | 'A'..='Z' | '2'..='7'))
        {
            return Err(TokenError::BadCharacter(c, TOKEN_PREFIX.len() + i));
        }
        // A strict decode refuses a last character with non-zero unused bits (a changed
        // character); a lenient one still yields the bytes, so a cut token is named as truncated.
        // A tail of 1, 3 or 6 characters is never a whole encoding: one character too many or
        // too few. Without that last character it is one, and what it holds says which.
        let (bytes, unused_bits_set, extra_char) = match base32(true).decode(body.as_bytes()) {
            Ok(b) => (b, false, false),
            Err(_) => match base32(false).decode(body.as_bytes()) {
                Ok(b) => (b, true, false),
                Err(_) => {
                    let b = base32(false)
                        .decode(&body.as_bytes()[..body.len() - 1])
                        .unwrap_or_default();
                    (b, false, true)
                }
            },
        };
        let got = text.len();
        let need = |n: usize| TokenError::Truncated {
            expected: TOKEN_PREFIX.len() + encoded_len(n),
            got,
        };
        if bytes.len() < FIXED_LEN + CHECK_LEN {
            return Err(need(FIXED_LEN + CHECK_LEN));
        }
        if bytes[0] != VERSION {
            return Err(TokenError::UnsupportedVersion(bytes[0]));
        }
        let mut at = FIXED_LEN;
        let count = bytes[FIXED_LEN - 1] as usize;
        let mut endpoint_ranges = Vec::with_capacity(count);
        for _ in 0..count {
            let len = *bytes.get(at).ok_or_else(|| need(at + 1 + CHECK_LEN))? as usize;
            let range = at + 1..at + 1 + len;
            if range.end + CHECK_LEN > bytes.len() {
                return Err(need(range.end + CHECK_LEN));
            }
            at = range.end;
            endpoint_ranges.push(range);
        }
        let end = at + CHECK_LEN;
        if bytes.len() < end {
            return Err(need(end));
        }
        if bytes.len() > end || extra_char {
            let extra = body.len().saturating_sub(encoded_len(end));
            return Err(TokenError::TrailingData {
                extra: extra.max(1),
            });
        }
        let check = Sha256::digest(&bytes[..at]);
        if unused_bits_set || check[..CHECK_LEN] != bytes[at..end] {
            return Err(TokenError::Checksum);
        }
        let mut coordinator_key = [0u8; 32];
        coordinator_key.copy_from_slice(&bytes[1..33]);
        let mut network_secret = [0u8; 32];
        network_secret.copy_from_slice(&bytes[33..65]);
        let addr = Ipv4Addr::new(bytes[65], bytes[66], bytes[67], bytes[68]);
        let prefix = Ipv4Net::new(addr, bytes[69])
            .map_err(|_| TokenError::BadPrefix(format!("length {} is over 32", bytes[69])))?;
        let endpoints = endpoint_ranges
            .into_iter()
            .map(|r| {
                String::from_utf8(bytes[r].to_vec())
                    .map_err(|_| TokenError::BadEndpoint("not UTF-8".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let token = JoinToken {
            coordinator_key,
            network_secret,
            prefix,
            endpoints,
        };
        token.validate()?;
        Ok(token)
    }
}

/// Checks that a prefix can hold an overlay network (IPv4, /8 to /28, network address given).
pub fn validate_prefix(prefix: Ipv4Net) -> Result<(), String> {
    if prefix.prefix_len() < 8 || prefix.prefix_len() > 28 {
        return Err(format!(
            "{prefix} must be between /8 and /28 to hold a network of nodes"
        ));
    }
    if prefix.trunc() != prefix {
        return Err(format!(
            "{prefix} has host bits set; did you mean {}?",
            prefix.trunc()
        ));
    }
    Ok(())
}

pub(crate) fn encoded_len(bytes: usize) -> usize {
    (bytes * 8).div_ceil(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken::new_network(
            [7u8; 32],
            vec!["10.0.0.1:7000".into(), "hub.example.org:443".into()],
            "100.64.0.0/10".parse().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn round_trips() {
        let t = sample();
        let s = t.encode();
        assert!(s.starts_with("a2a1"));
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert_eq!(
            JoinToken::parse(&s.to_uppercase().replacen("A2A1", "a2a1", 1)).unwrap(),
            t
        );
        assert_eq!(JoinToken::parse(&format!("  {s}\n")).unwrap(), t);
    }

    #[test]
    fn fresh_networks_differ() {
        assert_ne!(sample().network_secret, sample().network_secret);
    }

    #[test]
    fn every_truncation_is_refused_by_name() {
        let s = sample().encode();
        for cut in 0..s.len() {
            let err = JoinToken::parse(&s[..cut]).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("token"), "{cut}: {msg}");
            if cut > 8 {
                assert!(
                    matches!(err, TokenError::Truncated { .. }),
                    "cut at {cut}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn every_single_character_change_is_refused() {
        // Endpoint lengths 1..=5 give every possible number of unused bits in the last character.
        for extra in 0..5 {
            let mut t = sample();
            t.endpoints = vec![format!("h{}:1", "x".repeat(extra))];
            let s = t.encode();
            for i in 4..s.len() {
                for c in "abcdefghijklmnopqrstuvwxyz234567".chars() {
                    let mut b = s.clone().into_bytes();
                    if b[i] == c as u8 {
                        continue;
                    }
                    b[i] = c as u8;
                    let changed = String::from_utf8(b).unwrap();
                    let err = JoinToken::parse(&changed);
                    assert!(err.is_err(), "change to {c} at {i} accepted");
                    assert!(err.unwrap_err().to_string().starts_with("token"));
                }
            }
        }
    }

    #[test]
    fn foreign_and_garbage_strings_are_refused() {
        assert_eq!(JoinToken::parse(""), Err(TokenError::Empty));
        assert_eq!(JoinToken::parse("tskey-abc"), Err(TokenError::WrongPrefix));
        assert!(matches!(
            JoinToken::parse("a2a1hello!world"),
            Err(TokenError::BadCharacter('!', 9))
        ));
        let s = sample().encode();
        assert!(matches!(
            JoinToken::parse(&format!("{s}aaaaaaaa")),
            Err(TokenError::TrailingData { .. })
        ));
    }

    #[test]
    fn truncation_message_names_expected_length() {
        let s = sample().encode();
        let err = JoinToken::parse(&s[..40]).unwrap_err().to_string();
        assert!(
            err.starts_with("token is truncated: expected at least"),
            "{err}"
        );
    }

    /// Found by fuzz/fuzz_targets/token_decode.rs: a body whose last group had 3 or 6
    /// characters (never a whole encoding) was named truncated with an expected length below
    /// the length given ("expected at least 150 characters, got 151"), and a whole token with
    /// one character appended was called truncated too.
    #[test]
    fn a_truncated_token_expects_more_than_it_got_and_an_extra_character_is_trailing_data() {
        for extra in 0..5 {
            let mut t = sample();
            t.endpoints = vec![format!("h{}:1", "x".repeat(extra))];
            let s = t.encode();
            for cut in 5..s.len() {
                match JoinToken::parse(&s[..cut]) {
                    Err(TokenError::Truncated { expected, got }) => {
                        assert!(expected > got, "cut at {cut}: {expected} <= {got}");
                        assert!(
                            expected <= s.len(),
                            "cut at {cut}: {expected} > {}",
                            s.len()
                        );
                    }
                    other => panic!("cut at {cut}: {other:?}"),
                }
            }
            for c in ['a', 'q', '7'] {
                assert_eq!(
                    JoinToken::parse(&format!("{s}{c}")),
                    Err(TokenError::TrailingData { extra: 1 }),
                    "{s}{c}"
                );
            }
        }
        let fuzzed = "a2a1afl5wszvt4r24xqunzhckeqfm4chejiggdqobyhbiaaaaa4aebwqorr7vouuna";
        match JoinToken::parse(fuzzed) {
            Err(TokenError::Truncated { expected, got }) => assert!(expected > got),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn endpoints_and_prefixes_are_validated() {
        assert!(validate_endpoint("1.2.3.4:80").is_ok());
        assert!(validate_endpoint("[::1]:80").is_ok());
        assert!(validate_endpoint("host").is_err());
        assert!(validate_endpoint(":80").is_err());
        assert!(validate_endpoint("h:0").is_err());
        assert!(validate_new_endpoint("[2001:db8::7]:7600").is_ok());
        assert!(validate_new_endpoint("hub.example.org:7600").is_ok());
        let e = validate_new_endpoint("2001:db8::7:7600").unwrap_err();
        assert!(e.contains("brackets"), "{e}");
        assert!(validate_new_endpoint("[2001:db8::7:7600").is_err());
        assert!(validate_prefix("100.64.0.0/10".parse().unwrap()).is_ok());
        assert!(validate_prefix("100.64.0.1/10".parse().unwrap()).is_err());
        assert!(validate_prefix("10.0.0.0/30".parse().unwrap()).is_err());
        assert!(JoinToken::new_network([0; 32], vec![], "10.0.0.0/8".parse().unwrap()).is_err());
    }

    /// A token may carry an IPv4 and an IPv6 endpoint (the format always held several).
    #[test]
    fn a_dual_stack_token_round_trips() {
        let t = JoinToken::new_network(
            [7u8; 32],
            vec!["198.51.100.7:7600".into(), "[2001:db8::7]:7600".into()],
            "100.64.0.0/10".parse().unwrap(),
        )
        .unwrap();
        let back = JoinToken::parse(&t.encode()).unwrap();
        assert_eq!(back.endpoints, t.endpoints);
        let addrs: Vec<std::net::SocketAddr> =
            back.endpoints.iter().map(|e| e.parse().unwrap()).collect();
        assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = sample();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("network_secret"));
        assert!(!dbg.contains("7, 7, 7"));
    }
}
