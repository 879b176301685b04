//! Listing a repository's tags (`GET /v2/<name>/tags/list`), with the registry's own
//! pagination (`n`, `last`, and a `Link` header to the next page).

use reqwest::header::{HeaderMap, LINK};
use reqwest::{Method, StatusCode};

use crate::client::{Client, read_limited, status_error};
use crate::error::Error;
use kagami_config::EndpointAttempt;

/// The most a tag list answer may weigh.
pub const MAX_TAG_LIST: u64 = 4 * 1024 * 1024;

/// One page of a tag list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagPage {
    pub tags: Vec<String>,
    /// The `n` and `last` parameters of the next page, when the registry said there is one.
    pub next: Option<(Option<u32>, String)>,
    /// The endpoint that answered (base URL).
    pub endpoint: String,
}

#[derive(serde::Deserialize)]
struct Raw {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

impl Client {
    /// One page of the tag list of the attempt's repository, from `last` on (exclusive),
    /// at most `n` tags when given.
    pub async fn tags_from(
        &self,
        a: &EndpointAttempt,
        n: Option<u32>,
        last: Option<&str>,
    ) -> Result<TagPage, Error> {
        let mut url = a.url("tags", "list");
        let mut params = Vec::new();
        if let Some(n) = n {
            params.push(format!("n={n}"));
        }
        if let Some(last) = last {
            params.push(format!("last={}", encode(last)));
        }
        for p in params {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&p);
        }
        let resp = self
            .send(
                a,
                &[a.token_scope()],
                Method::GET,
                &url,
                HeaderMap::new(),
                None,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(&url, resp).await);
        }
        let next = resp
            .headers()
            .get(LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_page);
        let Some(body) = read_limited(&url, resp, MAX_TAG_LIST).await? else {
            return Err(Error::InvalidManifest {
                url,
                why: format!("tag list larger than {MAX_TAG_LIST} bytes"),
            });
        };
        let raw: Raw = serde_json::from_slice(&body).map_err(|e| Error::InvalidManifest {
            url: url.clone(),
            why: format!("tag list is not valid JSON: {e}"),
        })?;
        Ok(TagPage {
            tags: raw.tags.unwrap_or_default(),
            next,
            endpoint: a.endpoint.base(),
        })
    }
}

/// The `n` and `last` of a `Link: <...?n=10&last=x>; rel="next"` header.
pub fn next_page(link: &str) -> Option<(Option<u32>, String)> {
    let (target, rel) = link.split_once(';')?;
    if !rel.replace(' ', "").contains("rel=\"next\"") {
        return None;
    }
    let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
    let query = target.split_once('?')?.1;
    let mut n = None;
    let mut last = None;
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("n", v)) => n = v.parse().ok(),
            Some(("last", v)) => last = Some(percent_decode(v)),
            _ => {}
        }
    }
    Some((n, last?))
}

/// Percent-encodes what a tag may hold beyond URL-safe characters (tags are
/// `[A-Za-z0-9_][A-Za-z0-9_.-]*`, but a `last` taken from elsewhere may not be).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes of a query value (invalid ones are kept as they are).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_gives_the_next_page() {
        assert_eq!(
            next_page("</v2/library/alpine/tags/list?n=2&last=3.19>; rel=\"next\""),
            Some((Some(2), "3.19".to_string()))
        );
        assert_eq!(
            next_page("</v2/x/tags/list?last=a%2Bb&n=50>; rel=next"),
            None,
            "rel must be quoted \"next\""
        );
        assert_eq!(next_page("</v2/x/tags/list?n=5>; rel=\"next\""), None);
        assert_eq!(next_page("garbage"), None);
        assert_eq!(percent_decode("a%2Bb"), "a+b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(encode("a+b/c"), "a%2Bb%2Fc");
    }
}
