//! The referrers of a manifest (OCI distribution spec 1.1: signatures, SBOMs and other
//! artifacts whose `subject` is that manifest), through the plan ([`Walk`]).
//!
//! On each endpoint: `GET /v2/<name>/referrers/<digest>` (every page, when the registry
//! paginates with `Link`); when the registry answers 404 there (it has no referrers API),
//! the referrers tag schema: the image index under the tag `<alg>-<hex>` of the subject's
//! digest, which clients such as cosign, notation and oras maintain on such registries. A
//! 404 there too (no referrers on that endpoint) moves on like any 404; the caller decides
//! what "not found everywhere" means (an empty list).

use bytes::Bytes;
use reqwest::header::{ACCEPT, HeaderMap, HeaderValue, LINK};
use reqwest::{Method, StatusCode};

use crate::client::{Client, read_limited, status_error};
use crate::error::Error;
use crate::walk::Walk;
use kagami_config::oci::{Hasher, MAX_MANIFEST_SIZE, ManifestView, OCI_INDEX};
use kagami_config::{Digest, EndpointAttempt, Plan};

/// The most pages of one referrers answer that are followed.
const MAX_PAGES: usize = 64;

/// How an endpoint gave its referrers list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferrersVia {
    /// The referrers API.
    Api,
    /// The image index under the tag-schema tag (the registry has no referrers API).
    TagSchema,
}

/// A referrers list: an OCI image index (at most 4 MiB), checked to be one.
#[derive(Debug, Clone)]
pub struct Referrers {
    /// The index as received (one page), or the pages merged into one index.
    pub bytes: Bytes,
    /// sha256 of `bytes` (for the tag schema, the tagged index's verified digest).
    pub digest: Digest,
    /// The endpoint that answered (base URL).
    pub endpoint: String,
    pub via: ReferrersVia,
}

/// The tag under which the referrers tag schema keeps the referrers of `subject`:
/// `<alg>-<hex>`, the algorithm cut to 32 characters and the hex to 64.
pub fn referrers_tag(subject: &Digest) -> String {
    let s = subject.to_string();
    let (alg, hex) = s.split_once(':').unwrap_or(("sha256", &s));
    let cut = |v: &str, n: usize| v.chars().take(n).collect::<String>();
    format!("{}-{}", cut(alg, 32), cut(hex, 64))
}

/// Reads a referrers answer strictly: an image index (schema version 2, the index media
/// type if it names one, every descriptor readable and sized).
pub fn check_index(bytes: &[u8]) -> Result<Vec<serde_json::Value>, String> {
    let view = ManifestView::checked(bytes)?;
    if let Some(mt) = &view.media_type
        && mt != OCI_INDEX
    {
        return Err(format!("media type {mt:?} is not an OCI image index"));
    }
    if !view.layers.is_empty() || view.config.is_some() {
        return Err("an image manifest, not an index".into());
    }
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(v.get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default())
}

/// An image index listing `manifests`, as kagami writes one.
pub fn index_of(manifests: Vec<serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    }))
    .expect("JSON values serialise")
}

impl Client {
    /// The referrers of `subject` through the plan ([`Walk`]).
    pub async fn referrers(&self, plan: &Plan, subject: &Digest) -> Result<Referrers, Error> {
        let what = || format!("referrers of {}@{subject}", plan.image.name());
        Walk::new(plan, 0, self.health())
            .run(what, |_, a| self.referrers_from(a, subject))
            .await
    }

    /// The referrers of `subject` on one endpoint: its referrers API, else (a 404) its
    /// tag-schema index.
    pub async fn referrers_from(
        &self,
        a: &EndpointAttempt,
        subject: &Digest,
    ) -> Result<Referrers, Error> {
        let scopes = [a.token_scope()];
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(OCI_INDEX));
        let mut url = a.url("referrers", &subject.to_string());
        let mut pages: Vec<Vec<u8>> = Vec::new();
        let mut total = 0u64;
        loop {
            let resp = self
                .send(a, &scopes, Method::GET, &url, headers.clone(), None)
                .await?;
            if resp.status() == StatusCode::NOT_FOUND && pages.is_empty() {
                return self.referrers_tag_schema(a, subject).await;
            }
            if resp.status() != StatusCode::OK {
                return Err(status_error(&url, resp).await);
            }
            let next = resp
                .headers()
                .get(LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| next_link(&url, l));
            let limit = MAX_MANIFEST_SIZE - total;
            let Some(body) = read_limited(&url, resp, limit).await? else {
                return Err(Error::ManifestTooBig {
                    url,
                    limit: MAX_MANIFEST_SIZE,
                });
            };
            total += body.len() as u64;
            check_index(&body).map_err(|why| Error::InvalidManifest {
                url: url.clone(),
                why: format!("referrers answer: {why}"),
            })?;
            pages.push(body);
            match next {
                Some(Err(why)) => {
                    return Err(Error::InvalidManifest {
                        url,
                        why: format!("referrers answer: {why}"),
                    });
                }
                Some(Ok(n)) if pages.len() < MAX_PAGES => url = n,
                Some(Ok(_)) => {
                    return Err(Error::InvalidManifest {
                        url,
                        why: format!("referrers answer of more than {MAX_PAGES} pages"),
                    });
                }
                None => break,
            }
        }
        let bytes = if pages.len() == 1 {
            pages.pop().expect("one page")
        } else {
            let all = pages
                .iter()
                .flat_map(|p| check_index(p).unwrap_or_default())
                .collect();
            index_of(all)
        };
        Ok(Referrers {
            digest: Hasher::digest(kagami_config::reference::Algorithm::Sha256, &bytes),
            bytes: Bytes::from(bytes),
            endpoint: a.endpoint.base(),
            via: ReferrersVia::Api,
        })
    }

    async fn referrers_tag_schema(
        &self,
        a: &EndpointAttempt,
        subject: &Digest,
    ) -> Result<Referrers, Error> {
        let m = self.manifest_from(a, &referrers_tag(subject)).await?;
        check_index(&m.bytes).map_err(|why| Error::InvalidManifest {
            url: a.url("manifests", &referrers_tag(subject)),
            why: format!("referrers tag: {why}"),
        })?;
        Ok(Referrers {
            bytes: m.bytes,
            digest: m.digest,
            endpoint: m.endpoint,
            via: ReferrersVia::TagSchema,
        })
    }
}

/// The URL of the next page from a `Link: <...>; rel="next"` header, resolved against the
/// URL of the page that named it: `None` when there is no next page, `Err` when the next
/// page is elsewhere. Only a URL of the page's own origin is followed: the endpoint's
/// credentials go with it, and a registry's answer must not send them (or kagami)
/// elsewhere.
fn next_link(current: &str, link: &str) -> Option<Result<String, String>> {
    let (target, rel) = link.split_once(';')?;
    if !rel.replace(' ', "").contains("rel=\"next\"") {
        return None;
    }
    let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
    let page = url::Url::parse(current).ok()?;
    let Ok(next) = page.join(target) else {
        return Some(Err(format!("next page {target:?} is not a URL")));
    };
    Some(if next.origin() == page.origin() {
        Ok(next.to_string())
    } else {
        Err(format!("next page {next} is not on this endpoint"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn tag_schema_names() {
        assert_eq!(
            referrers_tag(&D.parse().unwrap()),
            "sha256-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        );
        let long = format!("sha512:{}", "ab".repeat(64));
        assert_eq!(
            referrers_tag(&long.parse().unwrap()),
            format!("sha512-{}", "ab".repeat(32))
        );
    }

    #[test]
    fn next_links_resolve_against_the_page() {
        assert_eq!(
            next_link(
                "http://r.example/v2/a/referrers/x?ns=y",
                "</v2/a/referrers/x?n=1&last=z>; rel=\"next\""
            ),
            Some(Ok(
                "http://r.example/v2/a/referrers/x?n=1&last=z".to_string()
            ))
        );
        for elsewhere in [
            "file:///x",
            "http://other.example/v2/a",
            "https://r.example/v2/a",
            "http://r.example:81/v2/a",
        ] {
            assert!(
                matches!(
                    next_link(
                        "http://r.example/v2/a",
                        &format!("<{elsewhere}>; rel=\"next\"")
                    ),
                    Some(Err(_))
                ),
                "{elsewhere}"
            );
        }
        assert_eq!(
            next_link("http://r.example/v2/a", "</v2/b>; rel=\"prev\""),
            None
        );
    }

    #[test]
    fn answers_must_be_indexes() {
        let idx = index_of(vec![serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": D, "size": 10, "artifactType": "application/x.sig"
        })]);
        assert_eq!(check_index(&idx).unwrap().len(), 1);
        assert!(
            check_index(br#"{"schemaVersion":2,"manifests":[]}"#)
                .unwrap()
                .is_empty()
        );
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"c","digest":"{D}","size":1}},"layers":[]}}"#
        );
        assert!(check_index(manifest.as_bytes()).is_err());
        assert!(check_index(br#"{"schemaVersion":2,"manifests":[{"digest":"x"}]}"#).is_err());
        assert!(
            check_index(br#"{"schemaVersion":2,"mediaType":"text/plain","manifests":[]}"#).is_err()
        );
    }
}
