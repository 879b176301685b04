//! kagami's own policy file (`policy.yaml`, next to registries.yaml): what this node keeps
//! (`pin`), what the cluster pre-fetches (`warm`), how long a tag is trusted per repository
//! (`tagTTL`) and when unused blobs go (`gc`). Decoded by hand from the position-keeping
//! tree ([`crate::yaml`]) like registries.yaml, so every problem is a [`Diagnostic`] with
//! file, line, column, key path and, for an unknown key, a "did you mean".
//!
//! ```yaml
//! pin:
//!   - registry.k8s.io/pause:3.10
//! warm:
//!   copies: 2
//!   images: [docker.io/library/nginx:1.27]
//! tagTTL:
//!   - match: "docker.io/library/*"
//!     ttl: 10m
//! gc:
//!   maxUnusedAge: 720h
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;

use crate::config::LoadError;
use crate::diag::{Diagnostic, Diagnostics, Severity};
use crate::raw::{key_str, mapping, scalar, type_error, unknown_key_error};
use crate::reference::Reference;
use crate::yaml::{self, Node, NodeKind, Pos};

/// The file name kagami looks for next to registries.yaml.
pub const POLICY_FILE: &str = "policy.yaml";

/// A checked policy file.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Where it came from (for messages); empty for [`Policy::default`].
    pub source: PathBuf,
    /// Images whose content eviction never removes from this node's store.
    pub pin: Vec<Reference>,
    pub warm: Warm,
    /// Per-repository tag TTLs, first match wins.
    pub tag_ttl: Vec<TagTtlRule>,
    pub gc: Gc,
}

/// `warm`: images the cluster fetches ahead of the first pull.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Warm {
    /// How many nodes should hold each image; `None`: every node.
    pub copies: Option<u32>,
    pub images: Vec<Reference>,
}

/// `gc`: eviction by age.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gc {
    /// Evict blobs not used for this long (`maxUnusedAge`).
    pub max_unused_age: Option<Duration>,
}

/// One `tagTTL` rule: a glob over `<registry>/<repository>` and its TTL.
#[derive(Debug, Clone)]
pub struct TagTtlRule {
    /// The glob as written.
    pub pattern: String,
    pub ttl: Duration,
    regex: Regex,
}

impl TagTtlRule {
    /// A rule from a glob (`*` within a path segment, `**` across segments).
    pub fn new(pattern: &str, ttl: Duration) -> Result<TagTtlRule, String> {
        Ok(TagTtlRule {
            pattern: pattern.to_string(),
            ttl,
            regex: glob_regex(pattern)?,
        })
    }

    /// Whether the rule applies to `registry/repository`.
    pub fn matches(&self, registry: &str, repository: &str) -> bool {
        self.regex.is_match(&format!("{registry}/{repository}"))
    }
}

impl Policy {
    /// Loads and checks a file; any error makes the whole file unusable.
    pub fn load(path: &Path) -> Result<(Policy, Vec<Diagnostic>), LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let report = check_str(&text, path);
        match report.policy {
            Some(p) => Ok((p, report.diagnostics)),
            None => Err(LoadError::Invalid {
                path: path.to_path_buf(),
                errors: report
                    .diagnostics
                    .into_iter()
                    .filter(|d| d.severity == Severity::Error)
                    .collect(),
            }),
        }
    }

    /// The TTL of the first `tagTTL` rule matching `registry/repository`, if any.
    pub fn tag_ttl_for(&self, registry: &str, repository: &str) -> Option<Duration> {
        self.tag_ttl
            .iter()
            .find(|r| r.matches(registry, repository))
            .map(|r| r.ttl)
    }

    /// Whether the file says nothing at all.
    pub fn is_empty(&self) -> bool {
        self.pin.is_empty()
            && self.warm == Warm::default()
            && self.tag_ttl.is_empty()
            && self.gc == Gc::default()
    }
}

/// The outcome of checking a policy file: the policy when it is usable, and every
/// diagnostic found (warnings included).
#[derive(Debug)]
pub struct PolicyReport {
    pub policy: Option<Policy>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Reads and checks a policy file; a missing file is an error here.
pub fn check_file(path: &Path) -> PolicyReport {
    match std::fs::read_to_string(path) {
        Ok(text) => check_str(&text, path),
        Err(e) => {
            let mut diags = Diagnostics::new(path);
            diags.error(Pos::default(), "", format!("cannot read file: {e}"));
            PolicyReport {
                policy: None,
                diagnostics: diags.items,
            }
        }
    }
}

const TOP_KEYS: &[&str] = &["pin", "warm", "tagTTL", "gc"];
const WARM_KEYS: &[&str] = &["copies", "images"];
const RULE_KEYS: &[&str] = &["match", "ttl"];
const GC_KEYS: &[&str] = &["maxUnusedAge"];

/// Parses and checks policy text, collecting every problem.
pub fn check_str(text: &str, path: &Path) -> PolicyReport {
    let mut diags = Diagnostics::new(path);
    let root = match yaml::parse(text) {
        Ok(root) => root,
        Err(e) => {
            diags.error(e.pos, "", format!("YAML syntax error: {}", e.message));
            return PolicyReport {
                policy: None,
                diagnostics: diags.items,
            };
        }
    };
    let mut policy = Policy {
        source: path.to_path_buf(),
        ..Policy::default()
    };
    if let Some(root) = root.as_ref().filter(|r| !r.is_null())
        && let Some(entries) = mapping(root, "", &mut diags)
    {
        for (k, v) in entries {
            let Some(key) = key_str(k, "", &mut diags) else {
                continue;
            };
            match key {
                "pin" => policy.pin = images(v, "pin", &mut diags),
                "warm" => policy.warm = warm(v, &mut diags),
                "tagTTL" => policy.tag_ttl = tag_ttl(v, &mut diags),
                "gc" => policy.gc = gc(v, &mut diags),
                other => unknown_key(k.pos, "", other, TOP_KEYS, &mut diags),
            }
        }
    }
    let ok = !diags.has_errors();
    diags.items.sort_by_key(|d| (d.line, d.column));
    PolicyReport {
        policy: ok.then_some(policy),
        diagnostics: diags.items,
    }
}

/// A list of image references; duplicates are warned about.
fn images(node: &Node, path: &str, diags: &mut Diagnostics) -> Vec<Reference> {
    let mut out: Vec<Reference> = Vec::new();
    if node.is_null() {
        return out;
    }
    let NodeKind::Seq(items) = &node.kind else {
        type_error(node, path, "a list of image references", diags);
        return out;
    };
    for (i, item) in items.iter().enumerate() {
        let ipath = format!("{path}[{i}]");
        let Some(text) = scalar(item, &ipath, diags) else {
            continue;
        };
        match Reference::parse(text) {
            Ok(r) => {
                if out.contains(&r) {
                    diags.warning(item.pos, &ipath, format!("{text:?} is listed twice"));
                } else {
                    out.push(r);
                }
            }
            Err(e) => {
                diags
                    .error(item.pos, &ipath, e.to_string())
                    .hint("write registry/repository:tag or registry/repository@sha256:<hex>");
            }
        }
    }
    out
}

fn warm(node: &Node, diags: &mut Diagnostics) -> Warm {
    let mut w = Warm::default();
    for (k, v, path) in fields(node, "warm", WARM_KEYS, diags) {
        match k {
            "copies" => {
                if v.is_null() {
                    continue;
                }
                let Some(text) = scalar(v, &path, diags) else {
                    continue;
                };
                match text.parse::<u32>() {
                    Ok(0) => {
                        diags
                            .error(v.pos, &path, "copies must be at least 1")
                            .hint("leave copies out to warm the images on every node");
                    }
                    Ok(n) => w.copies = Some(n),
                    Err(_) => {
                        diags.error(
                            v.pos,
                            &path,
                            format!("expected a whole number of nodes (1 or more), found {text:?}"),
                        );
                    }
                }
            }
            _ => w.images = images(v, &path, diags),
        }
    }
    w
}

fn tag_ttl(node: &Node, diags: &mut Diagnostics) -> Vec<TagTtlRule> {
    let mut out = Vec::new();
    if node.is_null() {
        return out;
    }
    let NodeKind::Seq(items) = &node.kind else {
        type_error(node, "tagTTL", "a list of {match, ttl} rules", diags);
        return out;
    };
    for (i, item) in items.iter().enumerate() {
        let ipath = format!("tagTTL[{i}]");
        let mut pattern: Option<(String, Pos, String)> = None;
        let mut ttl: Option<Duration> = None;
        let mut bad = false;
        for (k, v, path) in fields(item, &ipath, RULE_KEYS, diags) {
            let Some(text) = scalar(v, &path, diags) else {
                bad = true;
                continue;
            };
            if k == "match" {
                pattern = Some((text.to_string(), v.pos, path));
            } else {
                match parse_duration(text) {
                    Ok(d) => ttl = Some(d),
                    Err(e) => {
                        bad = true;
                        duration_error(v.pos, &path, text, &e, diags);
                    }
                }
            }
        }
        let Some((pattern, pos, path)) = pattern else {
            diags
                .error(
                    item.pos,
                    &ipath,
                    "a tagTTL rule needs match (a glob over registry/repository)",
                )
                .hint("add e.g. match: \"docker.io/library/*\" beside ttl");
            continue;
        };
        if ttl.is_none() && !bad {
            diags.error(
                item.pos,
                &ipath,
                "a tagTTL rule needs ttl (a duration such as 10m; 0s revalidates every pull)",
            );
            continue;
        }
        let first = pattern.split('/').next().unwrap_or("");
        if !(first.contains('.')
            || first.contains(':')
            || first == "localhost"
            || first.contains('*'))
        {
            diags
                .warning(pos, &path, format!("{pattern:?} does not start with a registry name, so it matches nothing"))
                .hint(format!("patterns match the full name, e.g. docker.io/library/nginx; write \"docker.io/{pattern}\" for Docker Hub"));
        }
        match (TagTtlRule::new(&pattern, Duration::ZERO), ttl) {
            (Ok(mut rule), Some(ttl)) => {
                rule.ttl = ttl;
                out.push(rule);
            }
            (Ok(_), None) => {}
            (Err(e), _) => {
                diags
                    .error(pos, &path, format!("invalid glob {pattern:?}: {e}"))
                    .hint("* matches within one path segment, ** across segments; nothing else is special");
            }
        }
    }
    out
}

fn gc(node: &Node, diags: &mut Diagnostics) -> Gc {
    let mut g = Gc::default();
    for (_, v, path) in fields(node, "gc", GC_KEYS, diags) {
        if v.is_null() {
            continue;
        }
        let Some(text) = scalar(v, &path, diags) else {
            continue;
        };
        match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                diags
                    .error(v.pos, &path, "maxUnusedAge must be more than 0")
                    .hint("leave it out to keep blobs regardless of age");
            }
            Ok(d) => g.max_unused_age = Some(d),
            Err(e) => duration_error(v.pos, &path, text, &e, diags),
        }
    }
    g
}

fn duration_error(pos: Pos, path: &str, text: &str, why: &str, diags: &mut Diagnostics) {
    let d = diags.error(pos, path, format!("invalid duration {text:?}: {why}"));
    if text.ends_with('d') {
        d.hint("Go durations have no days; write 720h for 30 days");
    } else {
        d.hint("write a Go duration such as 90s, 10m, 1h30m or 0s");
    }
}

/// The known fields of a fixed-key mapping, with their key paths; unknown keys are reported.
fn fields<'a>(
    node: &'a Node,
    path: &str,
    known: &[&'static str],
    diags: &mut Diagnostics,
) -> Vec<(&'static str, &'a Node, String)> {
    let mut out = Vec::new();
    if node.is_null() {
        return out;
    }
    let Some(entries) = mapping(node, path, diags) else {
        return out;
    };
    for (k, v) in entries {
        let Some(key) = key_str(k, path, diags) else {
            continue;
        };
        match known.iter().find(|c| **c == key) {
            Some(c) => out.push((*c, v, format!("{path}.{key}"))),
            None => unknown_key(k.pos, path, key, known, diags),
        }
    }
    out
}

fn unknown_key(pos: Pos, parent: &str, key: &str, known: &[&str], diags: &mut Diagnostics) {
    let d = unknown_key_error(pos, parent, key, diags);
    // Compared case-insensitively: `tagTtl` and `maxunusedage` are typos of case.
    let lower: Vec<String> = known.iter().map(|k| k.to_ascii_lowercase()).collect();
    let refs: Vec<&str> = lower.iter().map(String::as_str).collect();
    let norm = key.to_ascii_lowercase().replace(['_', '-'], "");
    match crate::diag::did_you_mean(&norm, &refs).and_then(|s| lower.iter().position(|l| l == s)) {
        Some(i) => d.hint(format!("did you mean {:?}?", known[i])),
        None => d.hint(format!("known keys here: {}", known.join(", "))),
    };
}

/// A glob over `registry/repository` as an anchored regex: `*` is any run of characters
/// but `/`, `**` any run at all; every other character is literal.
fn glob_regex(pattern: &str) -> Result<Regex, String> {
    if pattern.is_empty() {
        return Err("it is empty".into());
    }
    if pattern.starts_with('/') || pattern.ends_with('/') || pattern.contains("//") {
        return Err("a path segment is empty".into());
    }
    if pattern.contains("***") {
        return Err("*** is not a wildcard: use * or **".into());
    }
    if let Some(c) = pattern
        .chars()
        .find(|c| matches!(c, '?' | '[' | ']' | '{' | '}' | '\\' | '@') || c.is_whitespace())
    {
        return Err(format!(
            "{c:?} is not allowed: only * and ** are wildcards, and a pattern names no tag or digest"
        ));
    }
    let mut re = String::from("^");
    let mut rest = pattern;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("**") {
            re.push_str(".*");
            rest = r;
        } else if let Some(r) = rest.strip_prefix('*') {
            re.push_str("[^/]*");
            rest = r;
        } else {
            let c = rest.chars().next().expect("not empty");
            re.push_str(&regex::escape(&c.to_string()));
            rest = &rest[c.len_utf8()..];
        }
    }
    re.push('$');
    Regex::new(&re).map_err(|e| e.to_string())
}

/// Parses a Go duration (`time.ParseDuration`): a sequence of decimal numbers each with a
/// unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), e.g. `1h30m`, `1.5h`, `0s`; a lone `0` is
/// allowed. No sign.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.starts_with(['-', '+']) {
        return Err("a duration here has no sign".into());
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        if num.is_empty() || num == "." {
            return Err(format!("expected a number at {rest:?}"));
        }
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{num:?} is not a number"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("{num} has no unit (s, m or h)")),
            u => return Err(format!("unknown unit {u:?} (use ns, us, ms, s, m or h)")),
        };
        total += n * secs;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|_| "too large".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> PolicyReport {
        check_str(text, Path::new("policy.yaml"))
    }

    fn render(text: &str) -> String {
        check(text)
            .diagnostics
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    const EXAMPLE: &str = "\
pin:
  - registry.k8s.io/pause:3.10
  - coredns/coredns@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
warm:
  copies: 2
  images: [nginx:1.27]
tagTTL:
  - match: \"docker.io/library/*\"
    ttl: 10m
  - match: \"ghcr.io/**\"
    ttl: 0s
gc:
  maxUnusedAge: 720h
";

    #[test]
    fn example_parses() {
        let r = check(EXAMPLE);
        assert!(r.diagnostics.is_empty(), "{:?}", r.diagnostics);
        let p = r.policy.unwrap();
        assert_eq!(p.pin.len(), 2);
        assert_eq!(p.pin[1].name(), "docker.io/coredns/coredns");
        assert!(p.pin[1].digest.is_some());
        assert_eq!(p.warm.copies, Some(2));
        assert_eq!(p.warm.images[0].name(), "docker.io/library/nginx");
        assert_eq!(p.gc.max_unused_age, Some(Duration::from_secs(720 * 3600)));
        assert_eq!(
            p.tag_ttl_for("docker.io", "library/nginx"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(p.tag_ttl_for("docker.io", "bitnami/nginx"), None);
        assert_eq!(p.tag_ttl_for("ghcr.io", "a/b/c"), Some(Duration::ZERO));
        assert!(!p.is_empty());
    }

    #[test]
    fn empty_file_is_an_empty_policy() {
        let r = check("# nothing yet\n");
        assert!(r.policy.unwrap().is_empty());
    }

    #[test]
    fn first_matching_rule_wins() {
        let p = check(
            "tagTTL:\n  - match: \"docker.io/library/nginx\"\n    ttl: 1s\n  - match: \"docker.io/**\"\n    ttl: 1h\n",
        )
        .policy
        .unwrap();
        assert_eq!(
            p.tag_ttl_for("docker.io", "library/nginx"),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            p.tag_ttl_for("docker.io", "library/redis"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(p.tag_ttl_for("quay.io", "library/redis"), None);
    }

    #[test]
    fn globs() {
        let m = |g: &str, name: &str| {
            let (reg, repo) = name.split_once('/').unwrap();
            TagTtlRule::new(g, Duration::ZERO)
                .unwrap()
                .matches(reg, repo)
        };
        assert!(m("docker.io/library/*", "docker.io/library/nginx"));
        assert!(!m("docker.io/library/*", "docker.io/library/a/b"));
        assert!(m("docker.io/**", "docker.io/library/a/b"));
        assert!(m("*/team/*", "127.0.0.1:5000/team/app"));
        assert!(!m("docker.io/library/ngin", "docker.io/library/nginx"));
        assert!(m("docker.io/library/ngin*", "docker.io/library/nginx"));
        assert!(!m("docker.io/library/nginx.", "docker.io/library/nginxx"));
        for bad in ["", "a//b", "/a", "a/***", "a/b?", "a/[ab]", "a/b:1@sha256"] {
            assert!(TagTtlRule::new(bad, Duration::ZERO).is_err(), "{bad}");
        }
    }

    #[test]
    fn go_durations() {
        let d = |s: &str| parse_duration(s);
        assert_eq!(d("0"), Ok(Duration::ZERO));
        assert_eq!(d("0s"), Ok(Duration::ZERO));
        assert_eq!(d("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "10", "5d", "-1s", "1x", "m", "1h 2m"] {
            assert!(d(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_have_positions() {
        insta::assert_snapshot!(
            "policy_errors",
            render(
                "\
pin:
  - registry.k8s.io/pause:3.10
  - Docker.io/BAD
  - registry.k8s.io/pause:3.10
warm:
  copies: 0
  image: [nginx]
tagTtl:
  - match: x
tagTTL:
  - match: \"docker.io/[ab]/*\"
    ttl: 10m
  - match: \"library/*\"
    ttl: 5d
  - ttl: 1m
gc:
  maxUnusedAge: soon
"
            )
        );
    }

    #[test]
    fn wrong_types_and_syntax() {
        insta::assert_snapshot!(
            "policy_wrong_types",
            render("pin: registry.k8s.io/pause:3.10\nwarm: [a]\ngc:\n  maxUnusedAge: 0s\n")
        );
        insta::assert_snapshot!("policy_syntax", render("pin:\n  - a\n b: [\n"));
        assert!(check("pin:\n  - a\n b: [\n").policy.is_none());
    }

    #[test]
    fn load_refuses_a_file_with_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(POLICY_FILE);
        std::fs::write(&path, "warm:\n  copies: 0\n").unwrap();
        let e = Policy::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("policy.yaml:2:11") && e.contains("at least 1"),
            "{e}"
        );
        std::fs::write(&path, "pin: [alpine]\n").unwrap();
        let (p, warnings) = Policy::load(&path).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(p.pin[0].to_string(), "docker.io/library/alpine:latest");
    }
}
