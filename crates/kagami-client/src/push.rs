//! Writing to a registry (for `kagami sync`): blob existence checks, cross-repository
//! mounts, monolithic uploads streamed from a file, and manifest PUTs.

use std::path::Path;

use bytes::Bytes;
use kagami_config::endpoint::Endpoint;
use kagami_config::{Config, EndpointAttempt, Source};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION};
use reqwest::{Method, StatusCode};
use url::Url;

use crate::client::{Client, ReqBody, status_error};
use crate::error::Error;
use kagami_config::Digest;
use kagami_config::oci::MANIFEST_ACCEPT;

/// A repository in a registry kagami writes to, with the auth and TLS settings of
/// `configs[<host>]`.
pub fn push_target(config: &Config, host: &str, repository: &str) -> EndpointAttempt {
    let endpoint = Endpoint::default_for(host);
    let host_config = config.config_for_host(host);
    EndpointAttempt {
        source: Source::Default,
        endpoint,
        repository: repository.to_string(),
        ns: None,
        rewrite: None,
        config_key: host_config.map(|c| c.host.clone()),
        auth: host_config.and_then(|c| c.auth.clone()),
        tls: host_config.and_then(|c| c.tls.clone()),
        // The target is named on the command line, not by a client of a server.
        name_chosen: false,
    }
}

/// What a mount request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// The registry linked the blob from the other repository.
    Mounted,
    /// The registry started an ordinary upload instead (at this location).
    Upload(String),
}

fn push_scope(t: &EndpointAttempt) -> String {
    format!("repository:{}:pull,push", t.repository)
}

impl Client {
    /// HEAD of a blob in the target repository.
    pub async fn blob_exists(&self, t: &EndpointAttempt, digest: &Digest) -> Result<bool, Error> {
        let url = t.url("blobs", &digest.to_string());
        let resp = self
            .send(
                t,
                &[push_scope(t)],
                Method::HEAD,
                &url,
                HeaderMap::new(),
                None,
            )
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(&url, resp).await),
        }
    }

    /// The digest of a manifest in the target, `None` when it does not exist.
    pub async fn manifest_digest(
        &self,
        t: &EndpointAttempt,
        reference: &str,
    ) -> Result<Option<Digest>, Error> {
        let url = t.url("manifests", reference);
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let resp = self
            .send(t, &[push_scope(t)], Method::HEAD, &url, h, None)
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(status_error(&url, resp).await),
        }
    }

    /// `POST /v2/<name>/blobs/uploads/?mount=<digest>&from=<repo>`.
    pub async fn mount_blob(
        &self,
        t: &EndpointAttempt,
        digest: &Digest,
        from: &str,
    ) -> Result<Mount, Error> {
        let base = t.url("blobs", "uploads/");
        let mut u = Url::parse(&base).map_err(|e| bad_url(&base, e))?;
        u.query_pairs_mut()
            .append_pair("mount", &digest.to_string())
            .append_pair("from", from);
        let scopes = [push_scope(t), format!("repository:{from}:pull")];
        let resp = self
            .send(t, &scopes, Method::POST, u.as_str(), HeaderMap::new(), None)
            .await?;
        match resp.status() {
            StatusCode::CREATED => Ok(Mount::Mounted),
            StatusCode::ACCEPTED => Ok(Mount::Upload(location(u.as_str(), &resp)?)),
            _ => Err(status_error(u.as_str(), resp).await),
        }
    }

    /// Starts an upload: `POST /v2/<name>/blobs/uploads/`; returns its location.
    pub async fn start_upload(&self, t: &EndpointAttempt) -> Result<String, Error> {
        let url = t.url("blobs", "uploads/");
        let resp = self
            .send(
                t,
                &[push_scope(t)],
                Method::POST,
                &url,
                HeaderMap::new(),
                None,
            )
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(status_error(&url, resp).await);
        }
        location(&url, &resp)
    }

    /// Finishes an upload in one PUT whose body streams from `path`.
    pub async fn upload_file(
        &self,
        t: &EndpointAttempt,
        location: &str,
        digest: &Digest,
        path: &Path,
        size: u64,
    ) -> Result<(), Error> {
        let mut u = Url::parse(location).map_err(|e| bad_url(location, e))?;
        u.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let body = ReqBody::File(path.to_path_buf(), size);
        let resp = self
            .send(t, &[push_scope(t)], Method::PUT, u.as_str(), h, Some(body))
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(status_error(u.as_str(), resp).await);
        }
        Ok(())
    }

    /// Uploads a blob from a file (HEAD first; nothing is sent when it is there).
    pub async fn push_blob_file(
        &self,
        t: &EndpointAttempt,
        digest: &Digest,
        path: &Path,
        size: u64,
    ) -> Result<(), Error> {
        let location = self.start_upload(t).await?;
        self.upload_file(t, &location, digest, path, size).await
    }

    /// `PUT /v2/<name>/manifests/<reference>` with the manifest's own media type.
    pub async fn put_manifest(
        &self,
        t: &EndpointAttempt,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), Error> {
        let url = t.url("manifests", reference);
        let mut h = HeaderMap::new();
        let ct = HeaderValue::from_str(media_type).map_err(|_| Error::InvalidManifest {
            url: url.clone(),
            why: format!("media type {media_type:?} is not a header value"),
        })?;
        h.insert(CONTENT_TYPE, ct);
        let resp = self
            .send(
                t,
                &[push_scope(t)],
                Method::PUT,
                &url,
                h,
                Some(ReqBody::Bytes(bytes)),
            )
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(status_error(&url, resp).await);
        }
        Ok(())
    }
}

fn bad_url(u: &str, e: url::ParseError) -> Error {
    Error::InvalidManifest {
        url: u.to_string(),
        why: format!("invalid URL: {e}"),
    }
}

/// The upload location of a 202 answer, made absolute.
fn location(url: &str, resp: &reqwest::Response) -> Result<String, Error> {
    let loc = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Error::Status {
            url: url.to_string(),
            status: resp.status().as_u16(),
            body: Some(crate::error::RegistryError::Text(
                "upload started without a Location header".into(),
            )),
            retry_after: None,
        })?;
    let base = Url::parse(url).map_err(|e| bad_url(url, e))?;
    Ok(base.join(loc).map_err(|e| bad_url(loc, e))?.to_string())
}
