//! kagami's OCI distribution client.
//!
//! It walks a [`kagami_config::Plan`]: for each manifest and blob it tries the plan's
//! endpoint attempts in order, with each endpoint's own credentials and TLS settings,
//! and moves on to the next one on any failure (ARCHITECTURE.md, kagami-client). Everything it
//! returns has been checked against its digest; blobs are streamed, never held whole
//! in memory.
//!
//! Invariants:
//! - a token request carries exactly one scope for pulls, the path actually sent to
//!   that endpoint ([`kagami_config::EndpointAttempt::token_scope`]);
//! - credentials are sent only to the endpoint's own origin (and to the token realm it
//!   names); redirects to another origin are followed without them, and a 401 from
//!   another origin is never answered with them;
//! - redirects go to http(s) only, never from https to http; with
//!   [`ClientOptions::public_only_for_name_chosen`], an attempt whose host came from the
//!   image name alone reaches public addresses only ([`guard`]);
//! - an endpoint backing off after a rate limit, or whose circuit is open, is skipped by
//!   every walk of the client ([`health`]), and the error says so;
//! - the client knows nothing about peers, the local store or files other than those a
//!   caller hands it.

pub mod auth;
mod client;
pub mod error;
pub mod guard;
pub mod health;
mod pull;
mod push;
mod referrers;
mod tags;
mod tls;
mod walk;

pub use client::{Client, ClientOptions};
pub use error::{AttemptError, Error, RegistryError};
pub use health::{EndpointStatus, Health, HealthEvents, HealthPolicy};
pub use pull::{BlobStream, Manifest, ManifestHead, OpenedBlob};
pub use push::{Mount, push_target};
pub use referrers::{Referrers, ReferrersVia, check_index, index_of, referrers_tag};
pub use tags::{MAX_TAG_LIST, TagPage};
pub use walk::{Walk, endpoint_attempts};
