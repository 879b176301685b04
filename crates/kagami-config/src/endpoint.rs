//! Endpoint and host name normalisation (docs/configuration.md), shared by the loader,
//! the planner and the hosts.toml renderer.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::Url;

/// Docker Hub's registry name in image references.
pub const DOCKER_HUB: &str = "docker.io";
/// The host Docker Hub's API actually answers on.
pub const DOCKER_HUB_HOST: &str = "registry-1.docker.io";

/// A normalised registry endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]` exactly as requests address it (Docker Hub's `docker.io` becomes
    /// `registry-1.docker.io`).
    pub host: String,
    /// The API base path: `/v2`, or the override path as written (no trailing slash).
    pub path: String,
    /// True when the path is not `/v2`: containerd's `override_path = true`.
    pub override_path: bool,
}

impl Endpoint {
    /// The API base URL, e.g. `https://h/v2` or `https://h/v2/dockerhub`.
    pub fn base(&self) -> String {
        format!("{}://{}{}", self.scheme, self.host, self.path)
    }

    /// `scheme://host` with no path: containerd's `server` and hosts.toml form.
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.host)
    }

    /// Parses and normalises an endpoint as written under `mirrors.*.endpoint`.
    pub fn parse(raw: &str) -> Result<Endpoint, EndpointError> {
        use EndpointError as E;
        if raw.trim().is_empty() {
            return Err(E::Empty);
        }
        if raw.chars().any(char::is_whitespace) {
            return Err(E::Whitespace);
        }
        let (explicit_scheme, rest) = match raw.split_once("://") {
            Some((s, rest)) => (Some(s.to_ascii_lowercase()), rest),
            None => (None, raw),
        };
        if let Some(s) = &explicit_scheme
            && s != "http"
            && s != "https"
        {
            return Err(E::Scheme(s.clone()));
        }
        // Parse with a placeholder scheme first so that the host and port can be inspected.
        let url = Url::parse(&format!("https://{rest}")).map_err(|e| E::Invalid(e.to_string()))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(E::Credentials);
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(E::QueryOrFragment);
        }
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or(E::NoHost)?;
        // `Url` drops :443 for https; keep the port as written.
        let port = explicit_port(rest);
        let scheme = match explicit_scheme {
            Some(s) => s,
            None if is_loopback_host(host) && port.is_some_and(|p| p != 443) => "http".into(),
            None => "https".into(),
        };
        let mut host = match port {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        if host == DOCKER_HUB {
            host = DOCKER_HUB_HOST.to_string();
        }
        let path = url.path().trim_end_matches('/');
        let (path, override_path) = match path {
            "" | "/v2" => ("/v2".to_string(), false),
            p => (p.to_string(), true),
        };
        Ok(Endpoint {
            scheme,
            host,
            path,
            override_path,
        })
    }

    /// The default endpoint of a registry: Docker Hub's API host, else `https://<name>`
    /// (plain http for a loopback name with a port other than 443).
    pub fn default_for(registry: &str) -> Endpoint {
        if registry == DOCKER_HUB || registry == DOCKER_HUB_HOST {
            return Endpoint {
                scheme: "https".into(),
                host: DOCKER_HUB_HOST.into(),
                path: "/v2".into(),
                override_path: false,
            };
        }
        let (host, port) = split_host_port(registry);
        let scheme = if is_loopback_host(host) && port.is_some_and(|p| p != 443) {
            "http"
        } else {
            "https"
        };
        Endpoint {
            scheme: scheme.into(),
            host: registry.to_string(),
            path: "/v2".into(),
            override_path: false,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("endpoint is empty")]
    Empty,
    #[error("endpoint contains whitespace")]
    Whitespace,
    #[error("unsupported scheme {0:?}: only http and https are accepted")]
    Scheme(String),
    #[error("endpoint has no host")]
    NoHost,
    #[error("endpoint contains credentials; put them under configs.<host>.auth")]
    Credentials,
    #[error("endpoint has a query string or fragment")]
    QueryOrFragment,
    #[error("invalid endpoint URL: {0}")]
    Invalid(String),
}

fn explicit_port(rest: &str) -> Option<u16> {
    let authority = rest.split('/').next().unwrap_or("");
    let after_host = match authority.rfind(']') {
        Some(i) => &authority[i + 1..],
        None => authority,
    };
    after_host
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
}

/// Splits `host[:port]` (IPv6 in brackets).
pub fn split_host_port(s: &str) -> (&str, Option<u16>) {
    if let Some(end) = s.strip_prefix('[').and_then(|r| r.find(']')) {
        let host = &s[..end + 2];
        let port = s[end + 2..].strip_prefix(':').and_then(|p| p.parse().ok());
        return (host, port);
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (s, None),
    }
}

/// containerd's notion of a local host: `localhost` or a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(IpAddr::V6(ip)) => ip == Ipv6Addr::LOCALHOST,
        Err(_) => false,
    }
}

/// True when `name` (`host[:port]`) is a loopback registry.
pub fn is_loopback_registry(name: &str) -> bool {
    is_loopback_host(split_host_port(name).0)
}

/// Checks a registry name or `configs` key: a bare `host[:port]`.
pub fn validate_host(name: &str) -> Result<(), HostError> {
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    if name.contains("://") {
        return Err(HostError::Url);
    }
    if name.contains('/') {
        return Err(HostError::Path);
    }
    if name.chars().any(|c| c.is_whitespace()) {
        return Err(HostError::Invalid("contains whitespace".into()));
    }
    let (host, port) = split_host_port(name);
    if name.len() > host.len() && port.is_none() {
        return Err(HostError::Invalid(
            "port is not a number from 1 to 65535".into(),
        ));
    }
    if port == Some(0) {
        return Err(HostError::Invalid("port 0".into()));
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').unwrap_or(inner);
        return inner
            .parse::<Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| HostError::Invalid("not an IPv6 address".into()));
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    if host.len() > 253 {
        return Err(HostError::Invalid(
            "host name longer than 253 characters".into(),
        ));
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(HostError::Invalid(format!(
                "{label:?} is not a valid host name label"
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("name is empty")]
    Empty,
    #[error("a URL is not a registry name")]
    Url,
    #[error("a registry name has no path")]
    Path,
    #[error("{0}")]
    Invalid(String),
}

/// containerd adds `?ns=<registry>` when it talks to a host other than the registry itself
/// (Docker Hub's API host counts as the registry).
pub fn sends_ns(endpoint_host: &str, registry: &str) -> bool {
    endpoint_host != registry && !(registry == DOCKER_HUB && endpoint_host == DOCKER_HUB_HOST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> String {
        Endpoint::parse(s).unwrap().base()
    }

    #[test]
    fn scheme_defaults() {
        assert_eq!(ep("mirror.example.com"), "https://mirror.example.com/v2");
        assert_eq!(ep("localhost:5000"), "http://localhost:5000/v2");
        assert_eq!(ep("127.0.0.5:5000"), "http://127.0.0.5:5000/v2");
        assert_eq!(ep("[::1]:5000"), "http://[::1]:5000/v2");
        assert_eq!(ep("127.0.0.1:443"), "https://127.0.0.1:443/v2");
        assert_eq!(ep("127.0.0.1"), "https://127.0.0.1/v2");
        assert_eq!(ep("https://localhost:5000"), "https://localhost:5000/v2");
        assert_eq!(ep("HTTP://h:80/"), "http://h:80/v2");
    }

    #[test]
    fn paths() {
        let e = Endpoint::parse("mirror2.example.com/v2/dockerhub").unwrap();
        assert!(e.override_path);
        assert_eq!(e.base(), "https://mirror2.example.com/v2/dockerhub");
        assert!(!Endpoint::parse("h/v2/").unwrap().override_path);
        assert!(!Endpoint::parse("h/").unwrap().override_path);
        assert_eq!(ep("https://h/prefix/"), "https://h/prefix");
    }

    #[test]
    fn docker_hub_host() {
        assert_eq!(ep("docker.io"), "https://registry-1.docker.io/v2");
        assert_eq!(
            Endpoint::default_for("docker.io").base(),
            "https://registry-1.docker.io/v2"
        );
        assert_eq!(
            Endpoint::default_for("127.0.0.1:5000").base(),
            "http://127.0.0.1:5000/v2"
        );
        assert_eq!(
            Endpoint::default_for("quay.io").base(),
            "https://quay.io/v2"
        );
    }

    #[test]
    fn errors() {
        assert_eq!(Endpoint::parse(""), Err(EndpointError::Empty));
        assert_eq!(
            Endpoint::parse("ftp://h"),
            Err(EndpointError::Scheme("ftp".into()))
        );
        assert_eq!(
            Endpoint::parse("https://u:p@h"),
            Err(EndpointError::Credentials)
        );
        assert!(Endpoint::parse("https://h:99999").is_err());
        assert_eq!(
            Endpoint::parse("h?x=1"),
            Err(EndpointError::QueryOrFragment)
        );
    }

    #[test]
    fn hosts() {
        assert!(validate_host("docker.io").is_ok());
        assert!(validate_host("127.0.0.1:5000").is_ok());
        assert!(validate_host("[::1]:5000").is_ok());
        assert_eq!(validate_host("https://x"), Err(HostError::Url));
        assert_eq!(validate_host("x/y"), Err(HostError::Path));
        assert!(validate_host("x:abc").is_err());
        assert!(validate_host("-x.com").is_err());
        assert!(validate_host("a_b.com").is_err());
    }

    #[test]
    fn ns() {
        assert!(!sends_ns("registry-1.docker.io", "docker.io"));
        assert!(!sends_ns("quay.io", "quay.io"));
        assert!(sends_ns("harbor.example.com", "docker.io"));
    }
}
