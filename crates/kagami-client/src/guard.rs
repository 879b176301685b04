//! Where a request may go when its host was chosen by the image name rather than by the
//! configuration (`EndpointAttempt::name_chosen`, when the client is built with
//! `ClientOptions::public_only_for_name_chosen`, as `kagami serve` does): to a DNS name
//! whose addresses are all public, never to an IP literal, loopback, link-local, private
//! or otherwise special address. The address is checked when the connection is opened
//! (a DNS resolver wrapper), so a name that resolves differently the second time (DNS
//! rebinding) is caught too; such requests ignore proxy settings, since a proxy would
//! resolve the name itself. And, for every request: redirects only to http(s), never
//! from https down to http.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::Url;

/// True for an address a name-chosen request must not reach: anything but a global
/// unicast address.
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (b & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
        || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24, IETF protocol assignments
        || (a == 198 && (b & 0xfe) == 18) // 198.18.0.0/15, benchmarking
        || a >= 240 // reserved
}

fn non_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        // IPv4-compatible ::a.b.c.d and NAT64 64:ff9b::/96 carry an IPv4 address.
        || (s[..6] == [0; 6] && non_public_v4(embedded_v4(s[6], s[7])))
        || (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && non_public_v4(embedded_v4(s[6], s[7])))
        // 6to4 2002:a.b.c.d::/48.
        || (s[0] == 0x2002 && non_public_v4(embedded_v4(s[1], s[2])))
}

/// Why a name-chosen request may not go to `url` before any DNS lookup, if it may not:
/// its host is an IP literal (public or not: a registry reached through `"*"` must be a
/// DNS name).
pub(crate) fn refuse_host(url: &Url) -> Option<String> {
    match url.host() {
        Some(url::Host::Domain(_)) => None,
        Some(_) => Some(format!(
            "{} is an IP address; a registry without a mirrors entry of its own must be a DNS name",
            url.host_str().unwrap_or_default()
        )),
        None => Some("the URL has no host".into()),
    }
}

/// Why a redirect from `from` to `to` is not followed, if it is not: a scheme other than
/// http(s), or https down to http.
pub(crate) fn refuse_redirect(from: &Url, to: &Url) -> Option<String> {
    if to.scheme() != "http" && to.scheme() != "https" {
        return Some(format!("redirect to a {:?} URL", to.scheme()));
    }
    if from.scheme() == "https" && to.scheme() == "http" {
        return Some("redirect from https to plain http".into());
    }
    None
}

/// The error [`PublicOnly`] fails with: a name with no public address.
#[derive(Debug)]
pub struct NonPublicName(String);

impl std::fmt::Display for NonPublicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NonPublicName {}

/// True when a request failed because its host has no public address.
pub fn is_refused_address(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<NonPublicName>() {
            return true;
        }
        cur = c.source();
    }
    false
}

/// The system resolver, keeping only public addresses; a name with none left fails.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            type BoxError = Box<dyn std::error::Error + Send + Sync>;
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| !is_non_public(a.ip()))
                .collect();
            if public.is_empty() {
                let found: Vec<String> = all.iter().map(|a| a.ip().to_string()).collect();
                return Err(Box::new(NonPublicName(format!(
                    "{host} resolves to no public address ({}); a registry without a mirrors \
                     entry of its own may only be reached on public addresses",
                    if found.is_empty() {
                        "none at all".to_string()
                    } else {
                        found.join(", ")
                    }
                ))) as BoxError);
            }
            let addrs: Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_addresses() {
        for s in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:c0a8:0101::1",
        ] {
            assert!(is_non_public(s.parse().unwrap()), "{s} must be refused");
        }
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ] {
            assert!(!is_non_public(s.parse().unwrap()), "{s} is public");
        }
    }

    #[test]
    fn ip_literals_are_refused_names_are_not() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(refuse_host(&u("https://127.0.0.1:5000/v2/")).is_some());
        assert!(refuse_host(&u("https://[::1]/v2/")).is_some());
        assert!(refuse_host(&u("https://8.8.8.8/v2/")).is_some());
        assert!(refuse_host(&u("https://registry.example.com/v2/")).is_none());
    }

    #[test]
    fn redirect_rules() {
        let u = |s: &str| Url::parse(s).unwrap();
        let https = u("https://r.example.com/v2/x/blobs/sha256:1");
        let http = u("http://r.example.com/v2/x/blobs/sha256:1");
        assert!(refuse_redirect(&https, &u("https://s3.example.com/b?sig=1")).is_none());
        assert!(refuse_redirect(&http, &u("https://s3.example.com/b")).is_none());
        assert!(refuse_redirect(&http, &u("http://s3.example.com/b")).is_none());
        assert!(refuse_redirect(&https, &u("http://s3.example.com/b")).is_some());
        assert!(refuse_redirect(&http, &u("file:///etc/passwd")).is_some());
        assert!(refuse_redirect(&https, &u("ftp://h/x")).is_some());
    }

    #[tokio::test]
    async fn resolver_drops_loopback() {
        // `localhost` resolves to loopback addresses only: nothing is left.
        let r = PublicOnly.resolve("localhost".parse().unwrap()).await;
        let err = r.err().expect("localhost must not resolve");
        assert!(is_refused_address(&*err), "{err}");
        assert!(err.to_string().contains("no public address"), "{err}");
    }
}
