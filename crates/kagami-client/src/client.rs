//! The HTTP core: one reqwest client per (origin, TLS settings), requests with auth
//! (Basic, Bearer tokens, OAuth2 refresh tokens) and redirects followed by hand, so that
//! credentials never leave the host they were configured for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use kagami_config::endpoint::{is_loopback_host, split_host_port};
use kagami_config::{Auth, EndpointAttempt, Tls};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use url::Url;

use crate::auth::{BearerChallenge, Challenge, Identity, TokenCache, TokenKey, TokenResponse};
use crate::error::{Error, RegistryError};

/// Timeouts and identity of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time allowed to open a connection (TCP and TLS) to one endpoint.
    pub connect_timeout: Duration,
    /// Time allowed between two reads of a response: an endpoint that stops sending
    /// for this long is given up on.
    pub read_timeout: Duration,
    pub user_agent: String,
    /// Requests of attempts whose host came from the image name alone
    /// ([`EndpointAttempt::name_chosen`]) go to DNS names with public addresses only, and
    /// so do their redirects ([`crate::guard`]). For servers, whose clients choose image
    /// names; off for the command line, whose user does.
    pub public_only_for_name_chosen: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(30),
            user_agent: concat!("kagami/", env!("CARGO_PKG_VERSION")).into(),
            public_only_for_name_chosen: false,
        }
    }
}

/// An OCI distribution client. Cheap to clone; clones share connections and tokens.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    options: ClientOptions,
    /// reqwest clients by (origin, address of the TLS settings (0 for none), public
    /// addresses only).
    http: Mutex<HashMap<(String, usize, bool), reqwest::Client>>,
    tokens: TokenCache,
    /// Token requests are made one at a time, so that concurrent requests that need the
    /// same token cause one token request.
    token_lock: tokio::sync::Mutex<()>,
    /// The last challenge seen per origin, to authenticate the next requests up front.
    challenges: Mutex<HashMap<String, Challenge>>,
    /// Rate limits and circuits of the endpoints, shared by every walk of this client.
    pub(crate) health: crate::health::Health,
}

/// A body that can be sent more than once (after an auth retry).
#[derive(Debug, Clone)]
pub(crate) enum ReqBody {
    Bytes(Bytes),
    File(std::path::PathBuf, u64),
}

impl ReqBody {
    async fn make(&self) -> Result<(reqwest::Body, u64), Error> {
        match self {
            ReqBody::Bytes(b) => Ok((reqwest::Body::from(b.clone()), b.len() as u64)),
            ReqBody::File(p, len) => {
                let f = tokio::fs::File::open(p)
                    .await
                    .map_err(|e| Error::io(format!("opening {}", p.display()), e))?;
                Ok((reqwest::Body::from(f), *len))
            }
        }
    }
}

impl Default for Client {
    fn default() -> Self {
        Client::new(ClientOptions::default())
    }
}

impl Client {
    /// A client with an endpoint [`Health`](crate::Health) of its own, with the default
    /// thresholds.
    pub fn new(options: ClientOptions) -> Client {
        Client::with_health(options, crate::health::Health::default())
    }

    /// A client whose walks skip endpoints as `health` says (and tell it what happened).
    pub fn with_health(options: ClientOptions, health: crate::health::Health) -> Client {
        Client {
            inner: Arc::new(Inner {
                options,
                http: Mutex::new(HashMap::new()),
                tokens: TokenCache::default(),
                token_lock: tokio::sync::Mutex::new(()),
                challenges: Mutex::new(HashMap::new()),
                health,
            }),
        }
    }

    /// The endpoint health its walks follow.
    pub fn health(&self) -> &crate::health::Health {
        &self.inner.health
    }

    /// The reqwest client for an origin with the given TLS settings (built once);
    /// `public_only` resolves names to public addresses only.
    fn http_client(
        &self,
        origin: &str,
        tls: Option<&Arc<Tls>>,
        public_only: bool,
    ) -> Result<reqwest::Client, Error> {
        let key = (
            origin.to_string(),
            tls.map_or(0, |t| Arc::as_ptr(t) as usize),
            public_only,
        );
        let mut map = self.inner.http.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let host = origin.split_once("://").map_or(origin, |(_, h)| h);
        let config = if origin.starts_with("http://") {
            crate::tls::plain_http_config()
        } else {
            crate::tls::rustls_config(tls.map(|t| &**t))
        }
        .map_err(|why| Error::TlsSetup {
            host: host.to_string(),
            why,
        })?;
        let o = &self.inner.options;
        let mut b = reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(o.connect_timeout)
            .read_timeout(o.read_timeout)
            .user_agent(o.user_agent.clone())
            .pool_idle_timeout(Duration::from_secs(60));
        if is_loopback_host(split_host_port(host).0) {
            b = b.no_proxy();
        }
        if public_only {
            // Checked at connect time, on the addresses actually used. Directly: through
            // an HTTP proxy, the proxy would resolve the name and nothing would be checked.
            b = b.dns_resolver(crate::guard::PublicOnly).no_proxy();
        }
        let c = b.build().map_err(|e| Error::TlsSetup {
            host: host.to_string(),
            why: crate::error::chain(&e),
        })?;
        map.insert(key, c.clone());
        Ok(c)
    }

    /// Sends a request to an attempt's endpoint with its credentials, following
    /// redirects and answering one 401 challenge. `scopes` are the token scopes to ask
    /// for if the registry wants a Bearer token. The response may have any status.
    pub(crate) async fn send(
        &self,
        a: &EndpointAttempt,
        scopes: &[String],
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Option<ReqBody>,
    ) -> Result<Response, Error> {
        let origin = a.endpoint.origin();
        let mut auth = self.preemptive_auth(a, scopes, url).await?;
        let mut sent_fresh = false;
        loop {
            let (resp, home) = self
                .send_following(a, &method, url, &headers, body.as_ref(), auth.as_ref())
                .await?;
            // A 401 from another origin (the target of a redirect) is that origin's
            // business: answering it would send this endpoint's credentials to a token
            // service chosen by someone else.
            if resp.status() != StatusCode::UNAUTHORIZED || sent_fresh || !home {
                return Ok(resp);
            }
            sent_fresh = true;
            let challenges: Vec<Challenge> = resp
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(crate::auth::parse_challenges)
                .collect();
            let bearer = challenges.iter().find_map(|c| match c {
                Challenge::Bearer(b) => Some(b.clone()),
                Challenge::Basic => None,
            });
            let challenge = match bearer {
                Some(b) => Challenge::Bearer(b),
                None if challenges.contains(&Challenge::Basic) => Challenge::Basic,
                None => return Ok(resp),
            };
            self.inner
                .challenges
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(origin.clone(), challenge.clone());
            let fresh = match &challenge {
                Challenge::Bearer(b) => {
                    // The token we sent (if any) was refused: forget it.
                    if auth.is_some() {
                        self.inner.tokens.remove(&token_key(a, b, scopes));
                    }
                    Some(bearer_header(&self.token(a, b, scopes, url).await?))
                }
                Challenge::Basic => basic_header(a.auth.as_ref()),
            };
            if fresh.is_none() || fresh == auth {
                return Ok(resp);
            }
            auth = fresh;
        }
    }

    /// The Authorization header to send before any challenge, when this origin has
    /// challenged before.
    async fn preemptive_auth(
        &self,
        a: &EndpointAttempt,
        scopes: &[String],
        url: &str,
    ) -> Result<Option<HeaderValue>, Error> {
        let known = self
            .inner
            .challenges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&a.endpoint.origin())
            .cloned();
        Ok(match known {
            Some(Challenge::Bearer(b)) => {
                Some(bearer_header(&self.token(a, &b, scopes, url).await?))
            }
            Some(Challenge::Basic) => basic_header(a.auth.as_ref()),
            None => None,
        })
    }

    /// One request, following up to 10 redirects. The Authorization header goes only to
    /// the attempt's own origin (scheme, host and port); a redirect elsewhere is followed
    /// without it, with default TLS settings. Redirects go to http(s) only and never from
    /// https to http; for a name-chosen attempt of a public-only client, every hop must be
    /// a DNS name with public addresses. Returns the response and whether it came from
    /// the attempt's own origin.
    async fn send_following(
        &self,
        a: &EndpointAttempt,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        body: Option<&ReqBody>,
        auth: Option<&HeaderValue>,
    ) -> Result<(Response, bool), Error> {
        let home = endpoint_origin(a);
        let public_only = self.inner.options.public_only_for_name_chosen && a.name_chosen;
        let mut url = Url::parse(url).map_err(|e| Error::Auth {
            url: url.to_string(),
            why: format!("invalid URL: {e}"),
        })?;
        for _ in 0..10 {
            if public_only && let Some(why) = crate::guard::refuse_host(&url) {
                return Err(Error::Refused {
                    url: url.to_string(),
                    why,
                });
            }
            let origin = origin_of(&url);
            let same = origin == home;
            let client = self.http_client(
                &origin,
                if same { a.tls.as_ref() } else { None },
                public_only,
            )?;
            let mut req = client
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if same && let Some(h) = auth {
                req = req.header(AUTHORIZATION, h.clone());
            }
            if let Some(b) = body {
                let (body, len) = b.make().await?;
                req = req.header(reqwest::header::CONTENT_LENGTH, len).body(body);
            }
            let resp = req.send().await.map_err(|source| Error::Network {
                url: url.to_string(),
                source,
            })?;
            if resp.status().is_redirection()
                && let Some(loc) = resp.headers().get(LOCATION).and_then(|l| l.to_str().ok())
            {
                let next = url.join(loc).map_err(|e| Error::Auth {
                    url: url.to_string(),
                    why: format!("bad redirect location {loc:?}: {e}"),
                })?;
                if let Some(why) = crate::guard::refuse_redirect(&url, &next) {
                    return Err(Error::Refused {
                        url: url.to_string(),
                        why,
                    });
                }
                tracing::debug!(from = %url, to = %next, "redirect");
                url = next;
                continue;
            }
            return Ok((resp, same));
        }
        Err(Error::Redirects {
            url: url.to_string(),
        })
    }

    /// A token for `scopes` from the challenge's realm: from the cache, else requested.
    async fn token(
        &self,
        a: &EndpointAttempt,
        ch: &BearerChallenge,
        scopes: &[String],
        url: &str,
    ) -> Result<String, Error> {
        let key = token_key(a, ch, scopes);
        if let Some(t) = self.inner.tokens.get(&key) {
            return Ok(t);
        }
        let _guard = self.inner.token_lock.lock().await;
        if let Some(t) = self.inner.tokens.get(&key) {
            return Ok(t);
        }
        let auth_err = |why: String| Error::Auth {
            url: url.to_string(),
            why,
        };
        let realm = Url::parse(&ch.realm)
            .map_err(|e| auth_err(format!("token realm {:?} is not a URL: {e}", ch.realm)))?;
        if realm.scheme() != "https" && realm.scheme() != "http" {
            return Err(auth_err(format!(
                "token realm {:?} is not http(s)",
                ch.realm
            )));
        }
        // Credentials go to the realm the endpoint named only over https, or on the
        // endpoint's own host name.
        let endpoint_host = split_host_port(&a.endpoint.host).0;
        let creds_ok = realm.scheme() == "https" || realm.host_str() == Some(endpoint_host);
        let realm_origin = origin_of(&realm);
        let tls = (realm_origin == endpoint_origin(a))
            .then_some(a.tls.as_ref())
            .flatten();
        // The realm is named by the endpoint; for a name-chosen endpoint of a public-only
        // client it must be public too.
        let public_only = self.inner.options.public_only_for_name_chosen && a.name_chosen;
        if public_only && let Some(why) = crate::guard::refuse_host(&realm) {
            return Err(auth_err(format!("token realm refused: {why}")));
        }
        let client = self.http_client(&realm_origin, tls, public_only)?;
        let (token, lifetime) = match (&a.auth, creds_ok) {
            (Some(Auth::IdentityToken(refresh)), true) => {
                let form = [
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.as_str()),
                ];
                oauth_post(&client, &realm, ch, scopes, &form).await?
            }
            (Some(Auth::Basic { username, password }), true) => {
                let form = [
                    ("grant_type", "password"),
                    ("username", username.as_str()),
                    ("password", password.as_str()),
                ];
                match oauth_post(&client, &realm, ch, scopes, &form).await {
                    Ok(t) => t,
                    // Token servers that only know the docker GET flow.
                    Err(Error::Status { status, .. }) if (400..500).contains(&status) => {
                        token_get(&client, &realm, ch, scopes, basic_header(a.auth.as_ref()))
                            .await?
                    }
                    Err(e) => return Err(e),
                }
            }
            _ => token_get(&client, &realm, ch, scopes, None).await?,
        };
        tracing::debug!(realm = %ch.realm, scope = %scopes.join(" "), ?lifetime, "token issued");
        self.inner.tokens.put(key, token.clone(), lifetime);
        Ok(token)
    }
}

fn token_key(a: &EndpointAttempt, ch: &BearerChallenge, scopes: &[String]) -> TokenKey {
    let identity = match &a.auth {
        None => Identity::Anonymous,
        Some(Auth::Basic { username, .. }) => Identity::Basic(username.clone()),
        Some(Auth::IdentityToken(t)) => {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            t.hash(&mut h);
            Identity::RefreshToken(h.finish())
        }
    };
    TokenKey {
        realm: ch.realm.clone(),
        service: ch.service.clone(),
        scope: scopes.join(" "),
        identity,
    }
}

/// The OAuth2 form POST to a token endpoint (refresh-token or password grant).
async fn oauth_post(
    client: &reqwest::Client,
    realm: &Url,
    ch: &BearerChallenge,
    scopes: &[String],
    grant: &[(&str, &str)],
) -> Result<(String, Duration), Error> {
    // Built in a block: the serializer is not Send and must not live across an await.
    let body = {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in grant {
            form.append_pair(k, v);
        }
        if let Some(s) = &ch.service {
            form.append_pair("service", s);
        }
        form.append_pair("scope", &scopes.join(" "));
        form.append_pair("client_id", "kagami");
        form.finish()
    };
    let resp = client
        .post(realm.clone())
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
        .send()
        .await
        .map_err(|source| Error::Network {
            url: realm.to_string(),
            source,
        })?;
    read_token(realm, resp).await
}

/// The docker token GET: `realm?service=..&scope=..`, with Basic credentials if any.
async fn token_get(
    client: &reqwest::Client,
    realm: &Url,
    ch: &BearerChallenge,
    scopes: &[String],
    basic: Option<HeaderValue>,
) -> Result<(String, Duration), Error> {
    let mut u = realm.clone();
    {
        let mut q = u.query_pairs_mut();
        if let Some(s) = &ch.service {
            q.append_pair("service", s);
        }
        for s in scopes {
            q.append_pair("scope", s);
        }
    }
    let mut req = client.get(u.clone());
    if let Some(h) = basic {
        req = req.header(AUTHORIZATION, h);
    }
    let resp = req.send().await.map_err(|source| Error::Network {
        url: u.to_string(),
        source,
    })?;
    read_token(&u, resp).await
}

async fn read_token(url: &Url, resp: Response) -> Result<(String, Duration), Error> {
    let status = resp.status();
    let retry_after = retry_after(&resp);
    let body = resp.bytes().await.map_err(|source| Error::Network {
        url: url.to_string(),
        source,
    })?;
    if !status.is_success() {
        return Err(Error::Status {
            url: url.to_string(),
            status: status.as_u16(),
            body: RegistryError::parse(&body),
            retry_after,
        });
    }
    serde_json::from_slice::<TokenResponse>(&body)
        .ok()
        .and_then(TokenResponse::into_token)
        .ok_or_else(|| Error::Auth {
            url: url.to_string(),
            why: "token endpoint answered without a token".into(),
        })
}

fn bearer_header(token: &str) -> HeaderValue {
    let mut h = HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
    h.set_sensitive(true);
    h
}

fn basic_header(auth: Option<&Auth>) -> Option<HeaderValue> {
    let Some(Auth::Basic { username, password }) = auth else {
        return None;
    };
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    let mut h = HeaderValue::from_str(&format!("Basic {enc}")).ok()?;
    h.set_sensitive(true);
    Some(h)
}

/// `scheme://host[:port]` of a URL, with the port only when it is explicit.
pub(crate) fn origin_of(u: &Url) -> String {
    let host = match u.host() {
        Some(url::Host::Ipv6(a)) => format!("[{a}]"),
        Some(h) => h.to_string(),
        None => String::new(),
    };
    match u.port() {
        Some(p) => format!("{}://{host}:{p}", u.scheme()),
        None => format!("{}://{host}", u.scheme()),
    }
}

/// The attempt's origin in the form [`origin_of`] gives (default ports dropped).
pub(crate) fn endpoint_origin(a: &EndpointAttempt) -> String {
    Url::parse(&a.endpoint.origin())
        .map(|u| origin_of(&u))
        .unwrap_or_else(|_| a.endpoint.origin())
}

/// Reads a response body into memory, at most `limit` bytes.
pub(crate) async fn read_limited(
    url: &str,
    mut resp: Response,
    limit: u64,
) -> Result<Option<Vec<u8>>, Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|source| Error::Network {
        url: url.to_string(),
        source,
    })? {
        if (out.len() + chunk.len()) as u64 > limit {
            return Ok(None);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Some(out))
}

/// Turns a non-success response into [`Error::Status`], keeping the registry's body.
pub(crate) async fn status_error(url: &str, resp: Response) -> Error {
    let status = resp.status().as_u16();
    let retry_after = retry_after(&resp);
    let body = read_limited(url, resp, 64 * 1024)
        .await
        .ok()
        .flatten()
        .and_then(|b| RegistryError::parse(&b));
    Error::Status {
        url: url.to_string(),
        status,
        body,
        retry_after,
    }
}

/// The `Retry-After` of a 429 or a 503 ([`crate::health::parse_retry_after`]).
fn retry_after(resp: &Response) -> Option<Duration> {
    if !matches!(resp.status().as_u16(), 429 | 503) {
        return None;
    }
    let v = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    crate::health::parse_retry_after(v, std::time::SystemTime::now())
}

/// Used by tests and callers that want a shared crypto provider.
pub(crate) fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    static P: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let o = |s: &str| origin_of(&Url::parse(s).unwrap());
        assert_eq!(o("http://127.0.0.1:5000/v2/x"), "http://127.0.0.1:5000");
        assert_eq!(o("https://h/v2"), "https://h");
        assert_eq!(o("https://h:443/v2"), "https://h");
        assert_eq!(o("http://[::1]:80/"), "http://[::1]");
        assert_eq!(o("http://[::1]:81/"), "http://[::1]:81");
    }
}
