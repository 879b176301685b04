//! Listing a repository's tags (`GET /v2/<name>/tags/list`), with the registry's own
//! pagination (`n`, `last`, and a `Link` header to the next page).

use reqwest::header::{HeaderMap, LINK};
use reqwest::{Method, StatusCode};

use crate::client::{Client, read_limited, status_error};
use crate::error::Error;
use crate::walk::Walk;
use kagami_config::{EndpointAttempt, Plan};

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
    /// One page of the tag list through the plan ([`Walk`]).
    pub async fn tags(
        &self,
        plan: &Plan,
        n: Option<u32>,
        last: Option<&str>,
    ) -> Result<TagPage, Error> {
        let what = || format!("tag list of {}", plan.image.name());
        Walk::new(plan, 0, self.health())
            .run(what, |_, a| self.tags_from(a, n, last))
            .await
    }

    /// One page of the tag list of the attempt's repository, from `last` on (exclusive),
    /// at most `n` tags when given.
    pub async fn tags_from(
        &self,
        a: &EndpointAttempt,
        n: Option<u32>,
        last: Option<&str>,
    ) -> Result<TagPage, Error> {
        let mut url = a.url("tags", "list");
        // In a block: the serializer is not `Send`, and must not live across an await.
        let query = {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            if let Some(n) = n {
                q.append_pair("n", &n.to_string());
            }
            if let Some(last) = last {
                q.append_pair("last", last);
            }
            q.finish()
        };
        if !query.is_empty() {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&query);
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
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "n" => n = v.parse().ok(),
            "last" => last = Some(v.into_owned()),
            _ => {}
        }
    }
    Some((n, last?))
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
    }
}
