//! `tags/list`: the upstream's list, page by page as the client asks (`n`, `last`), when an
//! endpoint answers; else the tags this mirror has resolved (an upstream outage, or a
//! registry served only by peers), with a log line.

use std::sync::Arc;
use std::time::Duration;

use kagami_store::Store;

use crate::origin::Source;
use crate::path::Query;
use crate::peers::Cluster;
use crate::service::error::ApiError;
use crate::service::reply::TagsReply;
use crate::service::{Deps, RequestContext};
use crate::upstream::Upstream;

/// The most tags one answer lists when the client does not say (`n`).
const TAGS_PAGE_MAX: usize = 10_000;

/// Tag lists.
pub(crate) struct Tags {
    store: Store,
    upstream: Arc<dyn Upstream>,
    cluster: Cluster,
    /// How long a tag learnt from a peer counts.
    tag_ttl: Duration,
}

impl Tags {
    pub(crate) fn new(deps: &Deps, tag_ttl: Duration) -> Tags {
        Tags {
            store: deps.store.clone(),
            upstream: deps.upstream.clone(),
            cluster: deps.cluster.clone(),
            tag_ttl,
        }
    }

    /// One page of the repository's tags, as the query asks.
    pub(crate) async fn list(
        &self,
        ctx: &RequestContext,
        query: &Query,
    ) -> Result<TagsReply, ApiError> {
        let (path, plan) = (&ctx.path, &**ctx.plan());
        let n =
            match query.get("n") {
                None => None,
                Some(v) => Some(v.parse::<u32>().map_err(|_| {
                    ApiError::bad_request(format!("n={v:?} is not a number of tags"))
                })?),
            };
        let last = query.get("last").filter(|l| !l.is_empty());
        // Whether nothing was found rather than an endpoint failing (nothing to ask is that
        // too).
        let mut not_found = true;
        let why_local = if kagami_client::endpoint_attempts(plan).next().is_some() {
            match self.upstream.tags(plan, n, last).await {
                Ok(page) => {
                    // The list is in lexical order (the distribution spec asks for it, and
                    // docker-registry 2.8 does not sort); registries that ignore `n` and
                    // `last` (2.8 does) are paginated here.
                    let (mut tags, mut next) = (page.tags, page.next);
                    tags.sort();
                    if let Some(last) = last {
                        tags.retain(|t| t.as_str() > last);
                    }
                    if let Some(n) = n
                        && tags.len() > n as usize
                    {
                        tags.truncate(n as usize);
                        next = tags.last().map(|t| (Some(n), t.clone()));
                    }
                    return Ok(TagsReply {
                        tags,
                        next,
                        source: Source::Upstream,
                    });
                }
                Err(e) => {
                    not_found = e.not_found;
                    e.message
                }
            }
        } else {
            "no endpoint to ask".to_string()
        };
        let mut tags = self.store.list_tags(&path.registry, &path.repository);
        if let Some(peers) = self.cluster.peers() {
            tags.extend(peers.learnt_tags(&path.registry, &path.repository, self.tag_ttl));
            tags.sort();
            tags.dedup();
        }
        if tags.is_empty() {
            let e = ApiError::name_unknown(format!(
                "{}/{}: no tags known to this mirror ({why_local})",
                path.registry, path.repository
            ));
            return Err(e.upstream(not_found));
        }
        tracing::info!(registry = %path.registry, repository = %path.repository, reason = %why_local, "tag list answered from the tags this mirror has resolved");
        tags.sort();
        if let Some(last) = last {
            tags.retain(|t| t.as_str() > last);
        }
        let limit = n.map_or(TAGS_PAGE_MAX, |n| n as usize);
        let next = (limit > 0 && tags.len() > limit).then(|| (n, tags[limit - 1].clone()));
        tags.truncate(limit);
        Ok(TagsReply {
            tags,
            next,
            source: Source::Local,
        })
    }
}
