//! `kagami serve`: the pull-through mirror containerd talks to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use kagami_config::containerd::{RenderOptions, render, write_hosts_dir};
use kagami_config::{Config, Endpoint, Policy};
use kagami_server::{AppState, ServerOptions, router};
use kagami_store::{Store, StoreOptions};
use tokio::signal::unix::{SignalKind, signal};

use super::print_diagnostics;

/// Where kagami looks for registries.yaml when --config is not given.
const DEFAULT_CONFIG: &str = "/etc/kagami/registries.yaml";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// registries.yaml (K3s format). When the file does not exist, kagami uses its
    /// embedded default, which mirrors the well-known public registries (docker.io,
    /// ghcr.io, quay.io, registry.k8s.io, ...) from their default endpoints. The file
    /// is reloaded on SIGHUP and when it changes; a new version with errors is refused
    /// and the old one kept.
    #[arg(long, short = 'c', env = "KAGAMI_CONFIG", value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// The policy file (pin, warm, tagTTL, gc; see docs/policy.md). Default: policy.yaml
    /// next to --config, used when it exists; a file named here must exist. Reloaded with
    /// registries.yaml (SIGHUP, or when it changes); a version with errors is fatal at start
    /// and refused on reload.
    #[arg(long, env = "KAGAMI_POLICY", value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Address to listen on for containerd (the OCI distribution API), /metrics, /healthz
    /// and /readyz.
    #[arg(long, env = "KAGAMI_LISTEN", default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    /// Directory of the content store (blobs, tags) and other state.
    #[arg(long, env = "KAGAMI_DATA_DIR", default_value = "/var/lib/kagami")]
    data_dir: PathBuf,
    /// Largest size of the content store (e.g. 20GiB, 500MB); least recently used blobs
    /// are evicted beyond it. Unlimited when not set.
    #[arg(long, env = "KAGAMI_MAX_STORE_SIZE", value_parser = parse_size)]
    max_store_size: Option<u64>,
    /// Evict blobs not used for this long (e.g. 30d, 12h), besides the size limit; never
    /// one being read or written, nor one of an image the policy file pins. Checked every
    /// tenth of it (between 1 s and 1 h). When not set, the policy's gc.maxUnusedAge
    /// applies; this flag wins over it. Off when neither is set.
    #[arg(long, env = "KAGAMI_MAX_BLOB_AGE", value_parser = parse_duration, value_name = "DURATION")]
    max_blob_age: Option<Duration>,
    /// How long a resolved tag is served before kagami asks upstream again (e.g. 300s,
    /// 5m, 1h). Digests never expire. When every upstream fails, the cached digest is
    /// served anyway.
    #[arg(long, env = "KAGAMI_TAG_TTL", default_value = "5m", value_parser = parse_duration)]
    tag_ttl: Duration,
    /// As K3s's flag: no default endpoint for registries that have a mirrors entry.
    #[arg(long, env = "KAGAMI_DISABLE_DEFAULT_REGISTRY_ENDPOINT")]
    disable_default_registry_endpoint: bool,
    /// The registry of requests that name none — no `?ns=` and no registry in the path —
    /// as dockerd's `registry-mirrors` sends them (`/v2/library/alpine/manifests/3.20`).
    /// An empty value refuses such requests.
    #[arg(long, env = "KAGAMI_DEFAULT_REGISTRY", value_name = "REGISTRY", default_value = "docker.io", value_parser = parse_registry)]
    default_registry: String,
    /// Client connections served at once on --listen; more are accepted and closed. Default:
    /// half the open-file limit, between 64 and 1024 (each costs up to ~150 KiB under
    /// load). The peer listener takes half of it.
    #[arg(long, env = "KAGAMI_MAX_CONNECTIONS", value_name = "N")]
    max_connections: Option<usize>,
    /// Write containerd's hosts.toml files into DIR at start (and on reload), with this
    /// kagami first for every registry it serves.
    #[arg(long, env = "KAGAMI_CONTAINERD_HOSTS_DIR", value_name = "DIR")]
    containerd_hosts_dir: Option<PathBuf>,
    /// Share content with other kagami nodes: the address of this node's P2P router
    /// (libp2p Kademlia DHT over TCP), e.g. 10.0.0.5:5001. Without it, no sharing.
    #[arg(long, env = "KAGAMI_P2P_LISTEN", value_name = "ADDR")]
    p2p_listen: Option<SocketAddr>,
    /// Where this node serves content to other nodes over HTTP (only what it holds).
    /// Default: the --p2p-listen address with the next port.
    #[arg(long, env = "KAGAMI_P2P_HTTP_LISTEN", value_name = "ADDR")]
    p2p_http_listen: Option<SocketAddr>,
    /// A node to join through (repeatable, or comma-separated in the env var): host:port
    /// (a DNS name joins every address it resolves to), a libp2p multiaddr with or without
    /// /p2p/<peer-id>, or http://host:port, the peer HTTP address of any member.
    #[arg(
        long,
        env = "KAGAMI_P2P_BOOTSTRAP",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    p2p_bootstrap: Vec<String>,
    /// The network's pre-shared key (64 hex characters, or libp2p's swarm.key format):
    /// nodes without it can neither join nor download from a node.
    #[arg(long, env = "KAGAMI_P2P_PSK_FILE", value_name = "FILE")]
    p2p_psk_file: Option<PathBuf>,
    /// Resolve `latest` tags through other nodes too (off, as in K3s).
    #[arg(long, env = "KAGAMI_P2P_RESOLVE_LATEST")]
    p2p_resolve_latest: bool,
    /// Share the images of this node's containerd with other nodes (those of shared
    /// registries, such as images imported from air-gap tarballs), read live through
    /// containerd's API; nothing is copied into kagami's store. Needs --p2p-listen.
    #[cfg(feature = "containerd")]
    #[arg(long, env = "KAGAMI_CONTAINERD_CONTENT")]
    containerd_content: bool,
    /// containerd's gRPC socket, for --containerd-content.
    #[cfg(feature = "containerd")]
    #[arg(long, env = "KAGAMI_CONTAINERD_ADDRESS", value_name = "PATH", default_value = kagami_containerd::DEFAULT_SOCKET)]
    containerd_address: PathBuf,
    /// The containerd namespace whose images are shared, for --containerd-content (the
    /// kubelet's is k8s.io).
    #[cfg(feature = "containerd")]
    #[arg(long, env = "KAGAMI_CONTAINERD_NAMESPACE", value_name = "NS", default_value = kagami_containerd::DEFAULT_NAMESPACE)]
    containerd_namespace: String,
    /// With --containerd-content: once containerd, reached before, has been unreachable this
    /// long, /healthz answers 503, so that the kubelet's liveness probe restarts kagami. A
    /// socket mounted into the container as a file keeps pointing at the old socket when
    /// containerd restarts; the restart mounts the new one. 0 turns this off.
    #[cfg(feature = "containerd")]
    #[arg(long, env = "KAGAMI_CONTAINERD_HEALTH_TIMEOUT", default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    containerd_health_timeout: Duration,
    /// The most blob fetches from other nodes or registries at once (and uncached
    /// pass-throughs); a cold request that finds no room within 5 s gets 503 with
    /// Retry-After.
    #[arg(
        long,
        env = "KAGAMI_MAX_FETCHES",
        value_name = "N",
        default_value_t = 16
    )]
    max_fetches: usize,
    /// Memory the blob fetches in flight may hold together, taken per chunk received (a
    /// fetch short of it waits, and its clients read from disk), e.g. 16MiB.
    #[arg(long, env = "KAGAMI_FETCH_MEMORY", value_name = "SIZE", default_value = "12MiB", value_parser = parse_size)]
    fetch_memory: u64,
    /// The largest blob fetched when no manifest served by this node gives its size
    /// (a manifest's descriptor size always applies when known), e.g. 16GiB.
    #[arg(long, env = "KAGAMI_MAX_BLOB_SIZE", value_name = "SIZE", default_value = "16GiB", value_parser = parse_size)]
    max_blob_size: u64,
    /// The slowest a source body may be, in bytes per second averaged over 30 s (e.g.
    /// 16KiB); a slower one is cut and the fetch continues from the next source. 0 turns
    /// the check off.
    #[arg(long, env = "KAGAMI_MIN_FETCH_RATE", value_name = "SIZE", default_value = "16KiB", value_parser = parse_size)]
    min_fetch_rate: u64,
    /// Log format: text for people, json for collectors.
    #[arg(long, env = "KAGAMI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    init_logging(args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(args))
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KAGAMI_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Loads the configuration for serve: the file, or the embedded default when it does not
/// exist. Errors are fatal at start and refused on reload.
fn load(path: &Path) -> anyhow::Result<Config> {
    if !path.exists() {
        tracing::info!(path = %path.display(), "no registries.yaml; using the embedded default (the well-known public registries)");
        return Ok(Config::embedded_default());
    }
    match Config::load(path) {
        Ok((config, warnings)) => {
            for w in &warnings {
                tracing::warn!("{w}");
            }
            Ok(config)
        }
        Err(kagami_config::LoadError::Invalid { errors, .. }) => {
            print_diagnostics(&errors);
            anyhow::bail!(
                "{} has {} error(s); run `kagami check --config {}`",
                path.display(),
                errors.len(),
                path.display()
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// The policy file and whether it must exist (named by --policy) or is optional (next to
/// registries.yaml).
fn policy_path(args: &Args) -> (PathBuf, bool) {
    match &args.policy {
        Some(p) => (p.clone(), true),
        None => {
            let dir = match args.config.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            (dir.join(kagami_config::policy::POLICY_FILE), false)
        }
    }
}

/// Loads the policy file: an optional one that does not exist is an empty policy. Errors
/// are fatal at start and refused on reload.
fn load_policy(path: &Path, required: bool) -> anyhow::Result<Policy> {
    if !required && !path.exists() {
        return Ok(Policy::default());
    }
    match Policy::load(path) {
        Ok((policy, warnings)) => {
            for w in &warnings {
                tracing::warn!("{w}");
            }
            Ok(policy)
        }
        Err(kagami_config::LoadError::Invalid { errors, .. }) => {
            print_diagnostics(&errors);
            anyhow::bail!(
                "{} has {} error(s); run `kagami check --policy {}`",
                path.display(),
                errors.len(),
                path.display()
            )
        }
        Err(e) => Err(e.into()),
    }
}

fn write_hosts(args: &Args, config: &Config) -> anyhow::Result<()> {
    let Some(dir) = &args.containerd_hosts_dir else {
        return Ok(());
    };
    let mirror =
        Endpoint::parse(&format!("http://{}", args.listen)).context("--listen as an endpoint")?;
    let files = render(
        config,
        &RenderOptions {
            mirror: Some(mirror),
            disable_default_endpoint: args.disable_default_registry_endpoint,
        },
    );
    let report = write_hosts_dir(dir, &files)
        .with_context(|| format!("writing hosts.toml under {}", dir.display()))?;
    for p in &report.skipped {
        tracing::warn!(dir = %p.display(), "left alone: its hosts.toml was not written by kagami");
    }
    tracing::info!(dir = %dir.display(), written = report.written.len(), removed = report.removed.len(), "containerd hosts.toml files written");
    Ok(())
}

async fn serve(args: Args) -> anyhow::Result<ExitCode> {
    // Checked here rather than by clap, which would also refuse KAGAMI_CONTAINERD_CONTENT=false.
    #[cfg(feature = "containerd")]
    if args.containerd_content && args.p2p_listen.is_none() {
        anyhow::bail!(
            "--containerd-content shares containerd's images with other nodes: it needs --p2p-listen"
        );
    }
    let config = load(&args.config)?;
    let (policy_file, policy_required) = policy_path(&args);
    let policy = load_policy(&policy_file, policy_required)?;
    if !policy.is_empty() {
        tracing::info!(path = %policy_file.display(), pinned = policy.pin.len(), tag_ttl_rules = policy.tag_ttl.len(), "policy file loaded");
    }
    let store = Store::open(
        args.data_dir.join("store"),
        StoreOptions {
            max_size: args.max_store_size,
            memory: Some(args.fetch_memory),
        },
    )
    .await
    .with_context(|| format!("opening the content store in {}", args.data_dir.display()))?;
    let upstream = Arc::new(kagami_server::client_upstream::ClientUpstream::for_mirror());
    write_hosts(&args, &config)?;
    let state = AppState::new(
        config,
        store,
        upstream,
        ServerOptions {
            tag_ttl: args.tag_ttl,
            disable_default_endpoint: args.disable_default_registry_endpoint,
            default_registry: Some(args.default_registry.clone()).filter(|r| !r.is_empty()),
            limits: kagami_server::FetchLimits {
                max_fetches: args.max_fetches,
                fetch_memory: args.fetch_memory,
                max_blob_size: args.max_blob_size,
                min_rate: args.min_fetch_rate,
                ..Default::default()
            },
        },
    );
    state.status().set_listen(args.listen.to_string());
    state.set_policy(policy).await;
    let admin = kagami_server::admin::Admin::create(&args.data_dir).with_context(|| {
        format!(
            "writing the admin token {}",
            args.data_dir
                .join(kagami_server::admin::ADMIN_TOKEN_FILE)
                .display()
        )
    })?;
    kagami_server::admin::enable(&state, admin);
    let peer_server = match args.p2p_listen {
        Some(listen) => Some(start_p2p(&args, listen, &state).await?),
        None => None,
    };
    #[cfg(feature = "containerd")]
    if args.containerd_content {
        start_containerd(&args, &state)?;
    }
    // After the P2P join: a node that knows no members yet would rank itself among the
    // holders of every image.
    apply_warm_list(&state);
    tokio::spawn(evict_by_age(state.clone(), args.max_blob_age));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %args.listen, data_dir = %args.data_dir.display(), config = %args.config.display(), "kagami serving");

    let args = Arc::new(args);
    tokio::spawn(reload_loop(args.clone(), state.clone()));

    let shutdown_state = state.clone();
    // Header timeout, connection cap, request ids: see kagami_server::listener.
    kagami_server::listener::serve(
        listener,
        router(state.clone()),
        kagami_server::listener::ListenOptions {
            max_connections: max_connections(&args),
            ..Default::default()
        },
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down: finishing requests in progress");
            shutdown_state.set_ready(false);
        },
    )
    .await
    .context("serving")?;
    if let Some(peer_server) = peer_server {
        kagami_server::peers::withdraw_all(&state).await;
        peer_server.abort();
    }
    Ok(ExitCode::SUCCESS)
}

/// Joins the P2P network: the router, the peer HTTP API, and advertising the store.
async fn start_p2p(
    args: &Args,
    listen: SocketAddr,
    state: &AppState,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let opts = super::node::P2pOptions {
        listen,
        http_listen: args.p2p_http_listen,
        bootstrap: args.p2p_bootstrap.clone(),
        psk: super::node::load_psk(args.p2p_psk_file.as_deref())?,
        resolve_latest: args.p2p_resolve_latest,
        data_dir: args.data_dir.clone(),
        max_connections: max_connections(args),
    };
    Ok(super::node::start_p2p(&opts, state).await?.peer_server)
}

/// Shares containerd's images with other nodes; an unreachable containerd is retried in
/// the background (kagami serves meanwhile).
#[cfg(feature = "containerd")]
fn start_containerd(args: &Args, state: &AppState) -> anyhow::Result<()> {
    if !kagami_containerd::valid_namespace(&args.containerd_namespace) {
        anyhow::bail!(
            "--containerd-namespace {:?} is not a containerd namespace (letters and digits, separated by single '.', '_' or '-')",
            args.containerd_namespace
        );
    }
    tracing::info!(socket = %args.containerd_address.display(), namespace = %args.containerd_namespace, "sharing containerd's images with other nodes");
    let (content, _) = kagami_server::containerd::start(
        state,
        args.containerd_address.clone(),
        args.containerd_namespace.clone(),
    );
    content.set_health_timeout(args.containerd_health_timeout);
    Ok(())
}

async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `--max-blob-age`, else the policy's `gc.maxUnusedAge` (read at each round, so a reload
/// applies): every tenth of the age (1 s to 1 h), evicts the blobs not used for it (never a
/// pinned one). With neither set, looks again every 5 s.
async fn evict_by_age(state: kagami_server::AppState, flag: Option<Duration>) {
    loop {
        let Some(age) = flag.or(state.policy().gc.max_unused_age) else {
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        };
        let (blobs, bytes) = state.store().evict_unused_for(age).await;
        if blobs > 0 {
            let by = if flag.is_some() {
                "--max-blob-age"
            } else {
                "the policy's gc.maxUnusedAge"
            };
            tracing::info!(blobs, bytes, max_blob_age = ?age, "evicted blobs unused for longer than {by}");
        }
        let every = (age / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        tokio::time::sleep(every).await;
    }
}

/// Reloads registries.yaml and the policy file on SIGHUP and when either's modification
/// time changes (checked every 2 s). A file with errors is refused: the running version of
/// it stays.
async fn reload_loop(args: Arc<Args>, state: AppState) {
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let (policy_file, policy_required) = policy_path(&args);
    let mut seen: Option<SystemTime> = mtime(&args.config);
    let mut policy_seen: Option<SystemTime> = mtime(&policy_file);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let forced = tokio::select! {
            _ = hup.recv() => true,
            _ = tick.tick() => false,
        };
        let now = mtime(&args.config);
        if forced || now != seen {
            seen = now;
            reload_config(&args, &state);
        }
        let now = mtime(&policy_file);
        if forced || now != policy_seen {
            policy_seen = now;
            match load_policy(&policy_file, policy_required) {
                Ok(policy) => {
                    state.set_policy(policy).await;
                    apply_warm_list(&state);
                    tracing::info!(path = %policy_file.display(), "policy file reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "new policy file refused; keeping the running one")
                }
            }
        }
    }
}

/// Hands the policy's warm list (docs/warm.md) to the node's warmer, replacing the one it
/// had; the runtime list (`kagami warm`) stays.
fn apply_warm_list(state: &AppState) {
    let warm = state.policy().warm.clone();
    state.warmer().set_list(warm.images, warm.copies);
}

fn reload_config(args: &Args, state: &AppState) {
    match load(&args.config) {
        Ok(config) => {
            if let Err(e) = write_hosts(args, &config) {
                tracing::warn!(error = %format!("{e:#}"), "cannot rewrite hosts.toml files");
            }
            state.set_config(config);
            #[cfg(feature = "containerd")]
            if let Some(c) = state.containerd() {
                c.request_rescan();
            }
            tracing::info!(path = %args.config.display(), "configuration reloaded");
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "new configuration refused; keeping the running one")
        }
    }
}

/// Parses sizes like `500MB`, `20GiB`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 500MB or 20GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0f64.powi(4),
        u => {
            return Err(format!(
                "invalid size unit {u:?} in {s:?}: use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            ));
        }
    };
    Ok((n * mult) as u64)
}

/// Parses durations like `300s`, `5m`, `1h`, `300`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 300s, 5m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        u => {
            return Err(format!(
                "invalid duration unit {u:?} in {s:?}: use s, m, h or d"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

/// `--max-connections`, or the listener's default.
fn max_connections(args: &Args) -> usize {
    args.max_connections
        .unwrap_or_else(kagami_server::listener::default_max_connections)
}

/// A registry name (`host` or `host:port`), or empty.
fn parse_registry(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    kagami_config::endpoint::validate_host(s)
        .map(|()| s.to_string())
        .map_err(|e| format!("{s:?} is not a registry name: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("GB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5 minutes").is_err());
    }
}
