//! The checked form of `registries.yaml`: endpoints normalised, regexes compiled,
//! credentials decoded and certificates loaded. Everything here is ready to use; every
//! problem found on the way is a [`Diagnostic`] with file, line, column and key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use regex::Regex;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::diag::{Diagnostic, Diagnostics, Severity};
use crate::endpoint::{DOCKER_HUB, DOCKER_HUB_HOST, Endpoint, HostError, validate_host};
use crate::raw::{self, RawAuth, RawTls, Spanned};
use crate::yaml::{self, Pos};

/// The registries.yaml kagami uses when none exists: the well-known public registries,
/// each from its default endpoint. Not `"*"`: a client of `kagami serve` names the
/// registry, and `"*"` would let it make kagami connect anywhere (docs/security.md).
pub const EMBEDDED_DEFAULT: &str = "\
# kagami's embedded default: the well-known public registries, each from its default endpoint
mirrors:
  docker.io:
  ghcr.io:
  quay.io:
  registry.k8s.io:
  gcr.io:
  mcr.microsoft.com:
  public.ecr.aws:
  registry.gitlab.com:
  docker.elastic.co:
  nvcr.io:
  cgr.dev:
";

/// The registries [`EMBEDDED_DEFAULT`] mirrors.
pub const EMBEDDED_DEFAULT_REGISTRIES: &[&str] = &[
    "docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "gcr.io",
    "mcr.microsoft.com",
    "public.ecr.aws",
    "registry.gitlab.com",
    "docker.elastic.co",
    "nvcr.io",
    "cgr.dev",
];

/// A checked registries.yaml.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Where the configuration came from (for messages).
    pub source: PathBuf,
    /// `mirrors` entries in file order.
    pub mirrors: Vec<Mirror>,
    /// `configs` entries in file order.
    pub configs: Vec<HostConfig>,
}

/// A `mirrors` entry.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// The registry name, or `*`.
    pub registry: String,
    /// Normalised endpoints in order, duplicates removed.
    pub endpoints: Vec<Endpoint>,
    /// Rewrite rules in file order.
    pub rewrites: Vec<Rewrite>,
}

/// One rewrite rule: a regex on the repository path and its replacement.
#[derive(Debug, Clone)]
pub struct Rewrite {
    pub pattern: Regex,
    pub replacement: String,
}

impl Rewrite {
    /// Go's `ReplaceAllString`: every match replaced, `$1`/`${name}`/`$$` expanded.
    pub fn apply(&self, repository: &str) -> String {
        self.pattern
            .replace_all(repository, self.replacement.as_str())
            .into_owned()
    }
}

/// A `configs` entry.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// `host[:port]` or `*`.
    pub host: String,
    pub auth: Option<Auth>,
    pub tls: Option<Arc<Tls>>,
}

/// Credentials for one host, after K3s's precedence rules.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// From `username`/`password`, or from `auth` (base64 of `user:password`).
    Basic { username: String, password: String },
    /// An OAuth2 refresh token, exchanged at the registry's token endpoint.
    IdentityToken(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Basic { username, .. } => write!(f, "Basic({username:?}, <redacted>)"),
            Auth::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
        }
    }
}

impl Auth {
    /// The name used in plans: `basic` or `identity_token`.
    pub fn kind(&self) -> &'static str {
        match self {
            Auth::Basic { .. } => "basic",
            Auth::IdentityToken(_) => "identity_token",
        }
    }
}

/// TLS settings for one host, with the files already loaded.
#[derive(Debug)]
pub struct Tls {
    pub ca_file: Option<PathBuf>,
    /// Certificates from `ca_file`, added to the system roots.
    pub ca_certs: Vec<CertificateDer<'static>>,
    pub client: Option<ClientIdentity>,
    pub insecure_skip_verify: bool,
}

/// A client certificate chain and its private key (mTLS).
#[derive(Debug)]
pub struct ClientIdentity {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// The outcome of loading a file: the configuration when it is usable, and every
/// diagnostic found (warnings included).
#[derive(Debug)]
pub struct Report {
    pub config: Option<Config>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Report {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Warning)
    }
}

/// Errors from [`Config::load`]: the file cannot be read, or it has errors.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} has {} error(s):\n{}", path.display(), errors.len(), errors.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        errors: Vec<Diagnostic>,
    },
}

impl Config {
    /// Loads and checks a file; any error makes the whole file unusable.
    pub fn load(path: &Path) -> Result<(Config, Vec<Diagnostic>), LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_report(path, check_str(&text, path))
    }

    /// Loads and checks text (e.g. the embedded default).
    pub fn parse(text: &str, path: &Path) -> Result<(Config, Vec<Diagnostic>), LoadError> {
        Self::from_report(path, check_str(text, path))
    }

    fn from_report(path: &Path, report: Report) -> Result<(Config, Vec<Diagnostic>), LoadError> {
        match report.config {
            Some(c) => Ok((c, report.diagnostics)),
            None => Err(LoadError::Invalid {
                path: path.to_path_buf(),
                errors: report.errors().cloned().collect(),
            }),
        }
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Config {
        Self::parse(EMBEDDED_DEFAULT, Path::new("<embedded default>"))
            .expect("the embedded default is valid")
            .0
    }

    /// The `mirrors` entry for a registry: the one named exactly like it, else `*`.
    pub fn mirror_for(&self, registry: &str) -> Option<&Mirror> {
        self.mirrors
            .iter()
            .find(|m| m.registry == registry)
            .or_else(|| self.mirrors.iter().find(|m| m.registry == "*"))
    }

    /// The `configs` entry for a host: its own, then its Docker Hub alias, then `*`.
    pub fn config_for_host(&self, host: &str) -> Option<&HostConfig> {
        let own = |h: &str| self.configs.iter().find(|c| c.host == h);
        let alias = match host {
            DOCKER_HUB => Some(DOCKER_HUB_HOST),
            DOCKER_HUB_HOST => Some(DOCKER_HUB),
            _ => None,
        };
        // For Docker Hub, the API host's entry wins over the `docker.io` one.
        let hub_first = if host == DOCKER_HUB {
            alias.and_then(own).or_else(|| own(host))
        } else {
            own(host).or_else(|| alias.and_then(own))
        };
        hub_first.or_else(|| own("*"))
    }
}

/// Parses and checks registries.yaml text, collecting every problem.
pub fn check_str(text: &str, path: &Path) -> Report {
    let mut diags = Diagnostics::new(path);
    let root = match yaml::parse(text) {
        Ok(root) => root,
        Err(e) => {
            let d = diags.error(e.pos, "", format!("YAML syntax error: {}", e.message));
            if let Some(hint) = star_hint(text, e.pos) {
                d.hint(hint);
            }
            return Report {
                config: None,
                diagnostics: diags.items,
            };
        }
    };
    let raw = raw::decode(root.as_ref(), &mut diags);
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let config = build(raw, path, base, &mut diags);
    let ok = !diags.has_errors();
    diags.items.sort_by_key(|d| (d.line, d.column));
    Report {
        config: ok.then_some(config),
        diagnostics: diags.items,
    }
}

/// Reads and checks a file. A missing file is an error here (K3s treats it as empty;
/// `serve` uses the embedded default instead).
pub fn check_file(path: &Path) -> Report {
    match std::fs::read_to_string(path) {
        Ok(text) => check_str(&text, path),
        Err(e) => {
            let mut diags = Diagnostics::new(path);
            diags.error(Pos::default(), "", format!("cannot read file: {e}"));
            Report {
                config: None,
                diagnostics: diags.items,
            }
        }
    }
}

/// An unquoted `*` is a YAML alias indicator: point at the fix.
fn star_hint(text: &str, pos: Pos) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let from = pos.line.saturating_sub(3);
    let to = pos.line.min(lines.len());
    (from..to)
        .find(|&i| lines[i].trim_start().starts_with("*:"))
        .map(|i| format!("the unquoted * on line {} starts a YAML alias; quote the wildcard registry: \"*\":", i + 1))
}

fn build(raw: raw::RawRegistries, path: &Path, base: &Path, diags: &mut Diagnostics) -> Config {
    let mut config = Config {
        source: path.to_path_buf(),
        ..Config::default()
    };
    for (name, rm) in raw.mirrors {
        if let Some(m) = build_mirror(&name, rm, diags) {
            config.mirrors.push(m);
        }
    }
    for (name, rc) in raw.configs {
        if let Some(c) = build_host_config(&name, rc, base, diags) {
            config.configs.push(c);
        }
    }
    cross_checks(&config, diags);
    config
}

fn check_name(name: &Spanned<String>, what: &str, diags: &mut Diagnostics) -> bool {
    if name.value == "*" {
        return true;
    }
    match validate_host(&name.value) {
        Ok(()) => true,
        Err(e) => {
            let d = diags.error(
                name.pos,
                &name.path,
                format!("invalid {what} {:?}: {e}", name.value),
            );
            match e {
                HostError::Url => {
                    let bare = name
                        .value
                        .split("://")
                        .nth(1)
                        .unwrap_or("")
                        .split('/')
                        .next()
                        .unwrap_or("");
                    d.hint(format!(
                        "{what}s are bare host[:port] names: write {bare:?}"
                    ));
                }
                HostError::Path if what == "registry name" => {
                    d.hint("a mirrors key is a registry name such as \"docker.io\"; to map repository paths use rewrite");
                }
                HostError::Path => {
                    d.hint("configs keys are bare host[:port] names, without a path");
                }
                _ => {}
            }
            false
        }
    }
}

fn build_mirror(
    name: &Spanned<String>,
    rm: raw::RawMirror,
    diags: &mut Diagnostics,
) -> Option<Mirror> {
    let valid = check_name(name, "registry name", diags);
    if name.value == DOCKER_HUB_HOST {
        diags
            .warning(name.pos, &name.path, "images are named docker.io/..., not registry-1.docker.io/...")
            .hint("this entry only applies to references that spell out registry-1.docker.io; use the key \"docker.io\"");
    }
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for raw_ep in &rm.endpoint {
        match Endpoint::parse(&raw_ep.value) {
            Ok(ep) => {
                if let Some(first) = rm
                    .endpoint
                    .iter()
                    .find(|e| Endpoint::parse(&e.value).as_ref() == Ok(&ep))
                    && first.pos != raw_ep.pos
                {
                    diags.warning(
                        raw_ep.pos,
                        &raw_ep.path,
                        format!(
                            "duplicate endpoint {} (same as line {}); it is ignored",
                            ep.base(),
                            first.pos.line
                        ),
                    );
                    continue;
                }
                endpoints.push(ep);
            }
            Err(e) => {
                diags.error(
                    raw_ep.pos,
                    &raw_ep.path,
                    format!("invalid endpoint {:?}: {e}", raw_ep.value),
                );
            }
        }
    }
    let mut rewrites = Vec::new();
    for (pattern, replacement) in &rm.rewrite {
        match Regex::new(&pattern.value) {
            Ok(re) => {
                check_replacement(&re, pattern, replacement, diags);
                if pattern.value.contains('\\') || pattern.value.contains('"') {
                    diags
                        .warning(pattern.pos, &pattern.path, "K3s writes this pattern into hosts.toml without escaping")
                        .hint("containerd then fails to parse that hosts.toml and silently uses the default endpoint; kagami containerd-config escapes it correctly");
                }
                rewrites.push(Rewrite {
                    pattern: re,
                    replacement: replacement.value.clone(),
                });
            }
            Err(e) => {
                let msg = e.to_string();
                let summary = msg
                    .lines()
                    .last()
                    .unwrap_or(&msg)
                    .trim()
                    .trim_start_matches("error: ")
                    .to_string();
                diags.error(
                    pattern.pos,
                    &pattern.path,
                    format!(
                        "rewrite pattern {:?} does not compile: {summary}",
                        pattern.value
                    ),
                );
            }
        }
    }
    if rm.endpoint.is_empty()
        && let Some((p, _)) = rm.rewrite.first()
    {
        diags
            .warning(p.pos, &p.path, "rewrite has no effect: this mirror has no endpoints")
            .hint("rewrites apply to the mirror's endpoints, never to the default endpoint or to peers");
    }
    if rm.rewrite.len() > 1
        && let Some((p, _)) = rm.rewrite.get(1)
    {
        diags
            .warning(
                p.pos,
                &p.path,
                "more than one rewrite rule: kagami tries them in file order, K3s in random order",
            )
            .hint(
                "make the patterns mutually exclusive (anchor them) so that both behave the same",
            );
    }
    valid.then(|| Mirror {
        registry: name.value.clone(),
        endpoints,
        rewrites,
    })
}

/// A reference to a capture group in a replacement: `$1`, `${1}`, `$name`, `${name}`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct GroupRef {
    pub name: String,
    pub braced: bool,
}

/// The group references in a replacement, with the same rules as Go's `Expand` and
/// Rust's `regex::Captures::expand`: `$$` is a literal `$`, a name is the longest run of
/// `[A-Za-z0-9_]`.
pub(crate) fn group_refs(replacement: &str) -> Vec<GroupRef> {
    let b = replacement.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'$' {
            i += 1;
            continue;
        }
        if b.get(i + 1) == Some(&b'$') {
            i += 2;
            continue;
        }
        if b.get(i + 1) == Some(&b'{') {
            if let Some(end) = replacement[i + 2..].find('}') {
                let name = &replacement[i + 2..i + 2 + end];
                if !name.is_empty() && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
                {
                    out.push(GroupRef {
                        name: name.into(),
                        braced: true,
                    });
                }
                i += 3 + end;
                continue;
            }
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut j = start;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        if j > start {
            out.push(GroupRef {
                name: replacement[start..j].into(),
                braced: false,
            });
        }
        i = j.max(i + 1);
    }
    out
}

fn check_replacement(
    re: &Regex,
    pattern: &Spanned<String>,
    replacement: &Spanned<String>,
    diags: &mut Diagnostics,
) {
    let groups = re.captures_len() - 1;
    for r in group_refs(&replacement.value) {
        let spelled = if r.braced {
            format!("${{{}}}", r.name)
        } else {
            format!("${}", r.name)
        };
        if let Ok(n) = r.name.parse::<usize>() {
            if n > groups {
                let has = match groups {
                    0 => "has no capture groups".to_string(),
                    1 => "has only 1 capture group".to_string(),
                    g => format!("has only {g} capture groups"),
                };
                let d = diags.error(
                    replacement.pos,
                    &replacement.path,
                    format!("replacement {:?} refers to group {n} ({spelled}), but group {n} does not exist: the pattern {:?} {has}", replacement.value, pattern.value),
                );
                if groups == 0 {
                    d.hint("capture what you want to keep with parentheses, e.g. \"^cp/(.+)$\"; without a group, $1 expands to an empty string");
                }
            }
            continue;
        }
        if re.capture_names().flatten().any(|n| n == r.name) {
            continue;
        }
        let leading_digits: String = r.name.chars().take_while(char::is_ascii_digit).collect();
        let d = diags.error(
            replacement.pos,
            &replacement.path,
            format!("replacement {:?} refers to a group named {:?} ({spelled}), which the pattern {:?} does not define", replacement.value, r.name, pattern.value),
        );
        if !leading_digits.is_empty() && !r.braced {
            d.hint(format!(
                "{spelled} is read as the group named {:?}; write ${{{leading_digits}}}{} for group {leading_digits} followed by text",
                r.name,
                &r.name[leading_digits.len()..]
            ));
        } else {
            d.hint("write $$ for a literal $");
        }
    }
}

fn build_host_config(
    name: &Spanned<String>,
    rc: raw::RawRegistryConfig,
    base: &Path,
    diags: &mut Diagnostics,
) -> Option<HostConfig> {
    let valid = check_name(name, "configs key", diags);
    let auth = rc.auth.as_ref().and_then(|a| build_auth(name, a, diags));
    let tls = rc.tls.as_ref().and_then(|t| build_tls(t, base, diags));
    valid.then(|| HostConfig {
        host: name.value.clone(),
        auth,
        tls: tls.map(Arc::new),
    })
}

fn build_auth(
    host: &Spanned<String>,
    a: &Spanned<RawAuth>,
    diags: &mut Diagnostics,
) -> Option<Auth> {
    let r = &a.value;
    let nonempty =
        |s: &Option<Spanned<String>>| s.as_ref().filter(|s| !s.value.is_empty()).cloned();
    let (username, password, auth, token) = (
        nonempty(&r.username),
        nonempty(&r.password),
        nonempty(&r.auth),
        nonempty(&r.identity_token),
    );
    if host.value == "*" && (username.is_some() || auth.is_some() || token.is_some()) {
        diags
            .warning(a.key_pos, &a.path, "K3s never uses configs.\"*\".auth")
            .hint(
                "kagami sends these credentials to every host that has no configs entry of its own",
            );
    }
    if host.value == DOCKER_HUB && (username.is_some() || auth.is_some() || token.is_some()) {
        diags
            .warning(a.key_pos, &a.path, "K3s looks up Docker Hub credentials under \"registry-1.docker.io\", the host that answers 401; these under \"docker.io\" are not used by K3s/containerd")
            .hint("kagami accepts either name; for K3s, move them to configs.\"registry-1.docker.io\"");
    }
    if let Some(u) = username {
        if password.is_none() {
            diags.warning(u.pos, &u.path, "username without a password");
        }
        for other in [&auth, &token].into_iter().flatten() {
            diags.warning(
                other.pos,
                &other.path,
                "ignored: username is set, and username/password take precedence",
            );
        }
        return Some(Auth::Basic {
            username: u.value,
            password: password.map(|p| p.value).unwrap_or_default(),
        });
    }
    if let Some(p) = &password {
        diags
            .warning(p.pos, &p.path, "password without a username is ignored")
            .hint("set username too, or use auth: base64(\"user:password\")");
    }
    if let Some(t) = token {
        if let Some(other) = &auth {
            diags.warning(
                other.pos,
                &other.path,
                "ignored: identity_token is set and takes precedence",
            );
        }
        return Some(Auth::IdentityToken(t.value));
    }
    if let Some(encoded) = auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.value.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        let Some(decoded) = decoded else {
            diags
                .error(encoded.pos, &encoded.path, "auth is not valid base64")
                .hint("auth is base64(\"username:password\"), e.g. the output of: printf 'user:pass' | base64");
            return None;
        };
        let Some((u, p)) = decoded.split_once(':') else {
            diags
                .error(
                    encoded.pos,
                    &encoded.path,
                    "auth decodes to a string without ':'",
                )
                .hint("auth is base64(\"username:password\")");
            return None;
        };
        return Some(Auth::Basic {
            username: u.to_string(),
            password: p.to_string(),
        });
    }
    diags.warning(
        a.key_pos,
        &a.path,
        "auth has no credentials (username, auth or identity_token)",
    );
    None
}

fn resolve(base: &Path, file: &str) -> PathBuf {
    let p = base.join(file);
    // containerd resolves relative paths in hosts.toml against the hosts directory, so
    // everything kagami hands on is absolute.
    std::path::absolute(&p).unwrap_or(p)
}

fn build_tls(t: &Spanned<RawTls>, base: &Path, diags: &mut Diagnostics) -> Option<Tls> {
    let r = &t.value;
    let mut ok = true;
    let mut tls = Tls {
        ca_file: None,
        ca_certs: Vec::new(),
        client: None,
        insecure_skip_verify: r.insecure_skip_verify.as_ref().is_some_and(|b| b.value),
    };
    for f in [&r.ca_file, &r.cert_file, &r.key_file]
        .into_iter()
        .flatten()
    {
        if Path::new(&f.value).is_relative() {
            diags
                .warning(f.pos, &f.path, format!("relative path {:?}", f.value))
                .hint(format!("kagami resolves it against the directory of registries.yaml ({}), K3s against its own working directory: use an absolute path", base.display()));
        }
    }
    if let Some(ca) = &r.ca_file {
        let path = resolve(base, &ca.value);
        match load_certs(&path) {
            Ok(certs) => {
                tls.ca_file = Some(path);
                tls.ca_certs = certs;
            }
            Err(e) => {
                diags.error(ca.pos, &ca.path, format!("ca_file {}: {e}", path.display()));
                ok = false;
            }
        }
        if tls.insecure_skip_verify
            && let Some(b) = &r.insecure_skip_verify
        {
            diags.warning(
                b.pos,
                &b.path,
                "insecure_skip_verify is true, so ca_file is not used to verify anything",
            );
        }
    }
    match (&r.cert_file, &r.key_file) {
        (Some(c), None) => {
            diags
                .error(c.pos, &c.path, "cert_file is set but key_file is not")
                .hint("a client certificate needs both cert_file and key_file");
            ok = false;
        }
        (None, Some(k)) => {
            diags
                .error(k.pos, &k.path, "key_file is set but cert_file is not")
                .hint("a client certificate needs both cert_file and key_file");
            ok = false;
        }
        (Some(c), Some(k)) => {
            let cert_path = resolve(base, &c.value);
            let key_path = resolve(base, &k.value);
            let chain = load_certs(&cert_path).map_err(|e| {
                diags.error(
                    c.pos,
                    &c.path,
                    format!("cert_file {}: {e}", cert_path.display()),
                );
            });
            let key = load_key(&key_path).map_err(|e| {
                diags.error(
                    k.pos,
                    &k.path,
                    format!("key_file {}: {e}", key_path.display()),
                );
            });
            match (chain, key) {
                (Ok(chain), Ok(key)) => {
                    if let Err(e) = keys_match(&chain, &key) {
                        diags
                            .error(
                                k.pos,
                                &k.path,
                                format!(
                                    "key_file {} does not belong to cert_file {}: {e}",
                                    key_path.display(),
                                    cert_path.display()
                                ),
                            )
                            .hint("the private key must be the one the certificate was issued for");
                        ok = false;
                    } else {
                        tls.client = Some(ClientIdentity {
                            cert_file: cert_path,
                            key_file: key_path,
                            chain,
                            key,
                        });
                    }
                }
                _ => ok = false,
            }
        }
        (None, None) => {}
    }
    ok.then_some(tls)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate (BEGIN CERTIFICATE) in the file".into());
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| format!("no PEM private key in the file ({e})"))
}

fn keys_match(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<(), String> {
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("unsupported private key: {e}"))?;
    let certified = rustls::sign::CertifiedKey::new(chain.to_vec(), signing);
    certified
        .keys_match()
        .map_err(|_| "the certificate's public key is not the private key's".to_string())
}

/// Checks that need the whole file.
fn cross_checks(config: &Config, diags: &mut Diagnostics) {
    let has = |h: &str| config.configs.iter().any(|c| c.host == h);
    if has(DOCKER_HUB) && has(DOCKER_HUB_HOST) {
        diags.warning(Pos::default(), "configs", "both \"docker.io\" and \"registry-1.docker.io\" have configs entries; \"registry-1.docker.io\" is used for Docker Hub");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_refs_follow_go_expand() {
        let names = |s: &str| {
            group_refs(s)
                .into_iter()
                .map(|r| r.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names("a/$1"), ["1"]);
        assert_eq!(names("${1}x $name $$ $"), ["1", "name"]);
        assert_eq!(names("$1x"), ["1x"]);
        assert!(names("$$1").is_empty());
    }

    #[test]
    fn rewrite_replaces_all() {
        let r = Rewrite {
            pattern: Regex::new("a").unwrap(),
            replacement: "b".into(),
        };
        assert_eq!(r.apply("banana"), "bbnbnb");
    }

    #[test]
    fn embedded_default_serves_the_public_registries_by_name() {
        let c = Config::embedded_default();
        let names: Vec<&str> = c.mirrors.iter().map(|m| m.registry.as_str()).collect();
        assert_eq!(names, EMBEDDED_DEFAULT_REGISTRIES);
        assert!(c.mirrors.iter().all(|m| m.endpoints.is_empty()));
        assert_eq!(c.mirror_for("quay.io").unwrap().registry, "quay.io");
        // Nothing else: no "*", so a client cannot name any other host.
        assert!(c.mirror_for("127.0.0.1:5000").is_none());
        assert!(c.mirror_for("evil.example.com").is_none());
    }
}
