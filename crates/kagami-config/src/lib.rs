//! kagami's configuration layer: `registries.yaml` loading and checking, image
//! references, the resolution plan, containerd `hosts.toml` rendering and the
//! `registries.conf.d` drop-in for containers/image clients (podman, buildah, skopeo, CRI-O),
//! and [`oci`], what kagami knows of OCI content (media types, manifests, hashing).
//!
//! Invariant: this crate does no network I/O. It reads files only to load the
//! configuration and the certificates it names, and writes only through
//! [`containerd::write_hosts_dir`]; [`oci`] does no I/O at all.

pub mod config;
pub mod containerd;
pub mod diag;
pub mod endpoint;
pub mod oci;
pub mod plan;
pub mod policy;
pub mod raw;
pub mod reference;
pub mod registries_conf;
pub mod yaml;

pub use config::{
    Auth, Config, HostConfig, LoadError, Mirror, Report, Rewrite, Tls, check_file, check_str,
};
pub use diag::{Diagnostic, Severity};
pub use endpoint::Endpoint;
pub use plan::{Attempt, EndpointAttempt, Plan, PlanOptions, Source, plan};
pub use policy::Policy;
pub use reference::{Digest, Reference, ReferenceError};
