//! The resolution plan: for an image, the ordered list of places kagami tries
//! (docs/configuration.md, ARCHITECTURE.md). A pure function of the image, the configuration and the options.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::config::{Auth, Config, Tls};
use crate::endpoint::{Endpoint, is_loopback_registry, sends_ns};
use crate::reference::Reference;

/// Options that change the plan.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// K3s's `--disable-default-registry-endpoint`: no default endpoint for registries that
    /// have a `mirrors` entry.
    pub disable_default_endpoint: bool,
}

/// Where an attempt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The local store, then other nodes (only for registries shared between nodes).
    Peers,
    /// One of the mirror entry's endpoints.
    Mirror,
    /// The registry's own endpoint.
    Default,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Peers => "peers",
            Source::Mirror => "mirror",
            Source::Default => "default",
        }
    }
}

/// A registry endpoint to try, with everything needed to talk to it.
#[derive(Debug, Clone)]
pub struct EndpointAttempt {
    pub source: Source,
    pub endpoint: Endpoint,
    /// The repository path sent to this endpoint (after rewrite).
    pub repository: String,
    /// `?ns=<registry>` added to every request, as containerd does for a host that is
    /// not the registry itself.
    pub ns: Option<String>,
    /// The rewrite rule that changed the repository, as (pattern, replacement).
    pub rewrite: Option<(String, String)>,
    /// The `configs` key the auth and TLS settings come from.
    pub config_key: Option<String>,
    pub auth: Option<Auth>,
    pub tls: Option<Arc<Tls>>,
    /// True when the host came from the image name alone: the default endpoint of a
    /// registry that has no `mirrors` entry of its own (reached through `"*"`, or through
    /// nothing). A server that takes image names from its clients lets such an attempt
    /// reach public addresses only (see docs/security.md); `configs."*".auth` is never
    /// sent to it.
    pub name_chosen: bool,
}

impl EndpointAttempt {
    /// `<base>/<repository>/<kind>/<reference>` plus `?ns=` when it applies.
    pub fn url(&self, kind: &str, reference: &str) -> String {
        let mut u = format!(
            "{}/{}/{kind}/{reference}",
            self.endpoint.base(),
            self.repository
        );
        if let Some(ns) = &self.ns {
            u.push_str("?ns=");
            u.push_str(ns);
        }
        u
    }

    /// The scope a token request for this attempt carries: the path actually sent.
    pub fn token_scope(&self) -> String {
        // An override path `/v2/<prefix>` means the registry sees `<prefix>/<repository>`.
        let prefix = match self.endpoint.path.find("/v2/") {
            Some(i) if self.endpoint.override_path => self.endpoint.path[i + 4..].trim_matches('/'),
            _ => "",
        };
        if !prefix.is_empty() {
            format!("repository:{prefix}/{}:pull", self.repository)
        } else {
            format!("repository:{}:pull", self.repository)
        }
    }
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a handful per plan; boxing buys nothing
pub enum Attempt {
    Peers,
    Endpoint(EndpointAttempt),
}

/// The ordered attempts for one image.
#[derive(Debug, Clone)]
pub struct Plan {
    pub image: Reference,
    pub attempts: Vec<Attempt>,
}

/// True when a registry's content is shared between nodes (docs/p2p.md).
pub fn is_shared(config: &Config, registry: &str) -> bool {
    !is_loopback_registry(registry) && config.mirror_for(registry).is_some()
}

/// Computes the plan for `image`.
pub fn plan(image: &Reference, config: &Config, options: PlanOptions) -> Plan {
    let registry = image.registry.as_str();
    let mut attempts = Vec::new();
    if is_shared(config, registry) {
        attempts.push(Attempt::Peers);
    }
    let mirror = config.mirror_for(registry);
    let default = Endpoint::default_for(registry);
    let use_default = !(options.disable_default_endpoint && mirror.is_some());
    if let Some(m) = mirror {
        let rewrite = m.rewrites.iter().find_map(|r| {
            let out = r.apply(&image.repository);
            (out != image.repository)
                .then(|| (out, (r.pattern.as_str().to_string(), r.replacement.clone())))
        });
        let mut endpoints: &[Endpoint] = &m.endpoints;
        // K3s: a last endpoint equal to the default endpoint is the default endpoint.
        if use_default && endpoints.last() == Some(&default) {
            endpoints = &endpoints[..endpoints.len() - 1];
        }
        for ep in endpoints {
            let (repository, rule) = match &rewrite {
                Some((out, rule)) => (out.clone(), Some(rule.clone())),
                None => (image.repository.clone(), None),
            };
            attempts.push(Attempt::Endpoint(endpoint_attempt(
                Source::Mirror,
                ep.clone(),
                repository,
                rule,
                &ep.host,
                registry,
                config,
            )));
        }
    }
    if use_default {
        attempts.push(Attempt::Endpoint(endpoint_attempt(
            Source::Default,
            default,
            image.repository.clone(),
            None,
            registry,
            registry,
            config,
        )));
    }
    Plan {
        image: image.clone(),
        attempts,
    }
}

fn endpoint_attempt(
    source: Source,
    endpoint: Endpoint,
    repository: String,
    rewrite: Option<(String, String)>,
    config_host: &str,
    registry: &str,
    config: &Config,
) -> EndpointAttempt {
    // The host is named by the configuration when it is a mirrors endpoint, or the default
    // endpoint of a registry with a mirrors entry of its own, or an endpoint some entry
    // lists (a last endpoint equal to the default endpoint is tried as the default).
    let name_chosen = source == Source::Default
        && !config.mirrors.iter().any(|m| m.registry == registry)
        && !config
            .mirrors
            .iter()
            .any(|m| m.endpoints.contains(&endpoint));
    let host_config = config.config_for_host(config_host);
    // `configs."*".auth` goes only to hosts the file names (docs/security.md).
    let auth = host_config
        .filter(|c| !(name_chosen && c.host == "*"))
        .and_then(|c| c.auth.clone());
    EndpointAttempt {
        source,
        ns: sends_ns(&endpoint.host, registry).then(|| registry.to_string()),
        endpoint,
        repository,
        rewrite,
        config_key: host_config.map(|c| c.host.clone()),
        auth,
        tls: host_config.and_then(|c| c.tls.clone()),
        name_chosen,
    }
}

impl Plan {
    /// The JSON form printed by `kagami explain --format json`.
    pub fn to_json(&self) -> Value {
        let reference = self.image.reference();
        let attempts: Vec<Value> = self
            .attempts
            .iter()
            .map(|a| match a {
                Attempt::Peers => json!({"source": "peers"}),
                Attempt::Endpoint(e) => {
                    let tls = e.tls.as_deref();
                    json!({
                        "source": e.source.as_str(),
                        "endpoint": e.endpoint.base(),
                        "repository": e.repository,
                        "url": e.url("manifests", &reference),
                        "ns": e.ns,
                        "rewrite": e.rewrite.as_ref().map(|(p, r)| json!({"pattern": p, "replacement": r})),
                        "auth": e.auth.as_ref().map_or("none", Auth::kind),
                        "config": e.config_key,
                        "token_scope": e.token_scope(),
                        "tls": {
                            "ca_file": tls.and_then(|t| t.ca_file.as_ref()).map(|p| p.display().to_string()),
                            "client_cert": tls.is_some_and(|t| t.client.is_some()),
                            "insecure_skip_verify": tls.is_some_and(|t| t.insecure_skip_verify),
                        },
                    })
                }
            })
            .collect();
        json!({
            "image": self.image.to_string(),
            "registry": self.image.registry,
            "repository": self.image.repository,
            "reference": reference,
            "attempts": attempts,
        })
    }

    /// The text form printed by `kagami explain`.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let reference = self.image.reference();
        let mut s = String::new();
        let _ = writeln!(s, "image      {}", self.image);
        let _ = writeln!(s, "registry   {}", self.image.registry);
        let _ = writeln!(s, "repository {}", self.image.repository);
        let _ = writeln!(s, "reference  {reference}");
        let _ = writeln!(s, "attempts, in order:");
        if self.attempts.is_empty() {
            let _ = writeln!(
                s,
                "  (none: every endpoint is disabled; pulls of this image fail)"
            );
        }
        for (i, a) in self.attempts.iter().enumerate() {
            match a {
                Attempt::Peers => {
                    let _ = writeln!(
                        s,
                        "  {}. peers    this node's store, then other nodes (registry is shared)",
                        i + 1
                    );
                }
                Attempt::Endpoint(e) => {
                    let _ = writeln!(
                        s,
                        "  {}. {:<8} {}",
                        i + 1,
                        e.source.as_str(),
                        e.url("manifests", &reference)
                    );
                    if let Some((p, r)) = &e.rewrite {
                        let _ = writeln!(
                            s,
                            "     rewrite  {} -> {} (rule {p:?} => {r:?})",
                            self.image.repository, e.repository
                        );
                    }
                    let auth = match (&e.auth, &e.config_key) {
                        (Some(a), Some(k)) => format!("{} (configs.{k:?})", a.kind()),
                        _ => "none".into(),
                    };
                    let _ = writeln!(s, "     auth     {auth}; token scope {}", e.token_scope());
                    if let Some(t) = e.tls.as_deref() {
                        let mut parts = Vec::new();
                        if let Some(ca) = &t.ca_file {
                            parts.push(format!("ca {}", ca.display()));
                        }
                        if let Some(c) = &t.client {
                            parts.push(format!("client cert {}", c.cert_file.display()));
                        }
                        if t.insecure_skip_verify {
                            parts.push("insecure_skip_verify".into());
                        }
                        if !parts.is_empty() {
                            let _ = writeln!(s, "     tls      {}", parts.join(", "));
                        }
                    }
                }
            }
        }
        s
    }
}
