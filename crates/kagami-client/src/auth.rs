//! Registry authentication: `WWW-Authenticate` challenges, and the token cache.
//!
//! A token is cached per (realm, service, scope, credential identity) until its
//! `expires_in` runs out. Each token request carries exactly one scope for pulls (see
//! ARCHITECTURE.md, kagami-client, and k3s-io/k3s#11238): the scope is chosen by the caller, never
//! taken from the challenge.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer(BearerChallenge),
}

/// `Bearer realm="...",service="...",scope="..."`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BearerChallenge {
    pub realm: String,
    pub service: Option<String>,
    /// The scope the registry suggested; kagami does not use it (it sends its own).
    pub scope: Option<String>,
}

/// Parses a `WWW-Authenticate` value into its challenges (RFC 7235: a scheme, then
/// comma-separated `key=token` or `key="quoted string"` parameters; several challenges
/// may share one header). Unknown schemes and malformed parts are skipped.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out = Vec::new();
    for (scheme, params) in parse_raw(header) {
        let get = |k: &str| {
            params
                .iter()
                .find(|(pk, _)| pk.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        if scheme.eq_ignore_ascii_case("basic") {
            out.push(Challenge::Basic);
        } else if scheme.eq_ignore_ascii_case("bearer")
            && let Some(realm) = get("realm").filter(|r| !r.is_empty())
        {
            out.push(Challenge::Bearer(BearerChallenge {
                realm,
                service: get("service"),
                scope: get("scope"),
            }));
        }
    }
    out
}

type RawChallenge = (String, Vec<(String, String)>);

fn parse_raw(s: &str) -> Vec<RawChallenge> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out: Vec<RawChallenge> = Vec::new();
    let is_tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&c);
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t' || b[*i] == b',') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            break;
        }
        // A token: either a new scheme or a parameter name.
        let start = i;
        while i < b.len() && is_tchar(b[i]) {
            i += 1;
        }
        if i == start {
            // Not a token character: skip it.
            i += 1;
            continue;
        }
        let token = &s[start..i];
        let mut j = i;
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        if j < b.len() && b[j] == b'=' && !out.is_empty() {
            // A parameter of the current challenge.
            j += 1;
            while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
                j += 1;
            }
            let mut value = String::new();
            if j < b.len() && b[j] == b'"' {
                j += 1;
                let mut chars = s[j..].char_indices();
                let mut end = s.len();
                while let Some((k, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => {
                            end = j + k + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                i = end;
            } else {
                let vs = j;
                while j < b.len() && b[j] != b',' && b[j] != b' ' && b[j] != b'\t' {
                    j += 1;
                }
                value.push_str(&s[vs..j]);
                i = j;
            }
            if let Some(last) = out.last_mut() {
                last.1.push((token.to_string(), value));
            }
        } else {
            out.push((token.to_string(), Vec::new()));
        }
    }
    out
}

/// Who a token is for: anonymous, or a credential (named, never holding the secret).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Identity {
    Anonymous,
    Basic(String),
    RefreshToken(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TokenKey {
    pub realm: String,
    pub service: Option<String>,
    /// The scopes, space-separated (one for pulls).
    pub scope: String,
    pub identity: Identity,
}

#[derive(Debug, Clone)]
struct Cached {
    token: String,
    expires: Instant,
}

/// Tokens by (realm, service, scope, identity).
#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    map: Mutex<HashMap<TokenKey, Cached>>,
}

/// The lifetime assumed when a token response has no `expires_in` (the distribution
/// token spec's default).
pub(crate) const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Tokens are dropped this long before they expire, so that a request never carries a
/// token that runs out on the way.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5);

impl TokenCache {
    pub fn get(&self, key: &TokenKey) -> Option<String> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .filter(|c| Instant::now() < c.expires)
            .map(|c| c.token.clone())
    }

    pub fn put(&self, key: TokenKey, token: String, lifetime: Duration) {
        let lifetime = lifetime.saturating_sub(EXPIRY_MARGIN);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, c| Instant::now() < c.expires);
        map.insert(
            key,
            Cached {
                token,
                expires: Instant::now() + lifetime,
            },
        );
    }

    pub fn remove(&self, key: &TokenKey) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(key);
    }
}

/// A token endpoint's answer (distribution token spec and OAuth2).
#[derive(Debug, serde::Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    pub fn into_token(self) -> Option<(String, Duration)> {
        let token = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))?;
        // The spec: a minimum of 60 seconds is assumed.
        let lifetime = self
            .expires_in
            .filter(|&s| s > 0)
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        Some((token, lifetime))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn docker_hub_challenge() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        assert_eq!(
            parse_challenges(h),
            vec![Challenge::Bearer(BearerChallenge {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })]
        );
    }

    #[test]
    fn variants() {
        assert_eq!(
            parse_challenges(r#"Basic realm="kagami-test""#),
            vec![Challenge::Basic]
        );
        assert_eq!(parse_challenges("basic"), vec![Challenge::Basic]);
        // Unquoted values, odd spacing and case, an escaped quote.
        assert_eq!(
            parse_challenges(
                r#"bearer  REALM = http://t/x , service="a\"b",scope=repository:x:pull"#
            ),
            vec![Challenge::Bearer(BearerChallenge {
                realm: "http://t/x".into(),
                service: Some("a\"b".into()),
                scope: Some("repository:x:pull".into()),
            })]
        );
        // Two challenges in one header.
        let two = parse_challenges(r#"Bearer realm="http://t",service="s", Basic realm="r""#);
        assert_eq!(two.len(), 2);
        assert_eq!(two[1], Challenge::Basic);
        // A Bearer challenge without a realm is useless.
        assert_eq!(parse_challenges(r#"Bearer service="s""#), vec![]);
        assert_eq!(parse_challenges(""), vec![]);
        assert_eq!(parse_challenges("Negotiate abc=="), vec![]);
    }

    #[test]
    fn token_response() {
        let r: TokenResponse =
            serde_json::from_str(r#"{"token":"t","access_token":"a","expires_in":300}"#).unwrap();
        assert_eq!(r.into_token(), Some(("t".into(), Duration::from_secs(300))));
        let r: TokenResponse = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        assert_eq!(r.into_token(), Some(("a".into(), DEFAULT_TOKEN_LIFETIME)));
        let r: TokenResponse = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(r.into_token(), None);
    }

    #[test]
    fn cache_expiry() {
        let c = TokenCache::default();
        let k = TokenKey {
            realm: "r".into(),
            service: None,
            scope: "s".into(),
            identity: Identity::Anonymous,
        };
        c.put(k.clone(), "t".into(), Duration::from_secs(60));
        assert_eq!(c.get(&k).as_deref(), Some("t"));
        // Shorter than the margin: already expired.
        c.put(k.clone(), "t2".into(), Duration::from_secs(1));
        assert_eq!(c.get(&k), None);
    }

    fn quote(s: &str) -> String {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = parse_challenges(&s);
        }

        #[test]
        fn round_trip(
            realm in "[ -~]{1,40}",
            service in proptest::option::of("[ -~]{0,30}"),
            scope in proptest::option::of("[a-z0-9:/._,-]{1,40}"),
            order in any::<bool>(),
        ) {
            let mut parts = vec![format!("realm={}", quote(&realm))];
            if let Some(s) = &service { parts.push(format!("service={}", quote(s))); }
            if let Some(s) = &scope { parts.push(format!("scope={}", quote(s))); }
            if order { parts.reverse(); }
            let h = format!("Bearer {}", parts.join(","));
            prop_assert_eq!(
                parse_challenges(&h),
                vec![Challenge::Bearer(BearerChallenge { realm, service, scope })]
            );
        }
    }
}
