//! The K3s `registries.yaml` schema, field for field (rancher/wharfie's types), with the
//! position of every key and value. Decoding reports structural problems (unknown keys,
//! wrong types, duplicate keys); meaning is checked later, in `config`.

use crate::diag::{Diagnostic, Diagnostics, did_you_mean, key_part};
use crate::yaml::{Node, NodeKind, Pos, yaml11_bool};

/// A value with the position of its key and of the value itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    pub value: T,
    pub key_pos: Pos,
    pub pos: Pos,
    /// The dotted key path, for messages.
    pub path: String,
}

#[derive(Debug, Default)]
pub struct RawRegistries {
    pub mirrors: Vec<(Spanned<String>, RawMirror)>,
    pub configs: Vec<(Spanned<String>, RawRegistryConfig)>,
}

#[derive(Debug, Default)]
pub struct RawMirror {
    pub endpoint: Vec<Spanned<String>>,
    /// Rewrite rules in file order: (pattern, replacement).
    pub rewrite: Vec<(Spanned<String>, Spanned<String>)>,
}

#[derive(Debug, Default)]
pub struct RawRegistryConfig {
    pub auth: Option<Spanned<RawAuth>>,
    pub tls: Option<Spanned<RawTls>>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct RawAuth {
    pub username: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
    pub auth: Option<Spanned<String>>,
    pub identity_token: Option<Spanned<String>>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct RawTls {
    pub ca_file: Option<Spanned<String>>,
    pub cert_file: Option<Spanned<String>>,
    pub key_file: Option<Spanned<String>>,
    pub insecure_skip_verify: Option<Spanned<bool>>,
}

const TOP_KEYS: &[&str] = &["mirrors", "configs"];
const MIRROR_KEYS: &[&str] = &["endpoint", "rewrite"];
const CONFIG_KEYS: &[&str] = &["auth", "tls"];
const AUTH_KEYS: &[&str] = &["username", "password", "auth", "identity_token"];
const TLS_KEYS: &[&str] = &["ca_file", "cert_file", "key_file", "insecure_skip_verify"];

/// Decodes the document root. Problems go to `diags`; what can be decoded is returned.
pub fn decode(root: Option<&Node>, diags: &mut Diagnostics) -> RawRegistries {
    let mut out = RawRegistries::default();
    let Some(root) = root else { return out };
    if root.is_null() {
        return out;
    }
    let Some(entries) = mapping(root, "", diags) else {
        return out;
    };
    for (k, v) in entries {
        let Some(key) = key_str(k, "", diags) else {
            continue;
        };
        match key {
            "mirrors" => {
                for (name, value, path) in named_entries(v, "mirrors", diags) {
                    let mirror = decode_mirror(value, &path, diags);
                    out.mirrors.push((name, mirror));
                }
            }
            "configs" => {
                for (name, value, path) in named_entries(v, "configs", diags) {
                    let cfg = decode_config(value, &path, diags);
                    out.configs.push((name, cfg));
                }
            }
            other => unknown_key(k.pos, "", other, TOP_KEYS, diags),
        }
    }
    out
}

/// The entries of a map keyed by registry or host name, with duplicate detection.
fn named_entries<'a>(
    node: &'a Node,
    parent: &str,
    diags: &mut Diagnostics,
) -> Vec<(Spanned<String>, &'a Node, String)> {
    let mut out: Vec<(Spanned<String>, &Node, String)> = Vec::new();
    if node.is_null() {
        return out;
    }
    let Some(entries) = mapping(node, parent, diags) else {
        return out;
    };
    for (k, v) in entries {
        let Some(name) = key_str(k, parent, diags) else {
            continue;
        };
        let path = format!("{parent}.{}", key_part(name));
        out.push((
            Spanned {
                value: name.to_string(),
                key_pos: k.pos,
                pos: k.pos,
                path: path.clone(),
            },
            v,
            path,
        ));
    }
    out
}

fn decode_mirror(node: &Node, path: &str, diags: &mut Diagnostics) -> RawMirror {
    let mut m = RawMirror::default();
    if node.is_null() {
        return m;
    }
    let Some(entries) = mapping(node, path, diags) else {
        return m;
    };
    for (k, v) in entries {
        let Some(key) = key_str(k, path, diags) else {
            continue;
        };
        let kpath = format!("{path}.{key}");
        match key {
            "endpoint" => {
                if v.is_null() {
                    continue;
                }
                match &v.kind {
                    NodeKind::Seq(items) => {
                        for (i, item) in items.iter().enumerate() {
                            let ipath = format!("{kpath}[{i}]");
                            if let Some(s) = scalar(item, &ipath, diags) {
                                m.endpoint.push(Spanned {
                                    value: s.to_string(),
                                    key_pos: k.pos,
                                    pos: item.pos,
                                    path: ipath,
                                });
                            }
                        }
                    }
                    NodeKind::Scalar { text, .. } => {
                        diags
                            .error(
                                v.pos,
                                &kpath,
                                "endpoint must be a list of URLs, not a single string",
                            )
                            .hint(format!("write endpoint: [\"{text}\"]"));
                    }
                    _ => type_error(v, &kpath, "a list of URLs", diags),
                }
            }
            "rewrite" => {
                if v.is_null() {
                    continue;
                }
                let Some(rules) = mapping(v, &kpath, diags) else {
                    continue;
                };
                for (pk, rv) in rules {
                    let Some(pattern) = key_str(pk, &kpath, diags) else {
                        continue;
                    };
                    let rpath = format!("{kpath}.{}", key_part(pattern));
                    let replacement = if rv.is_null() {
                        Some("")
                    } else {
                        scalar(rv, &rpath, diags)
                    };
                    if let Some(replacement) = replacement {
                        m.rewrite.push((
                            Spanned {
                                value: pattern.to_string(),
                                key_pos: pk.pos,
                                pos: pk.pos,
                                path: rpath.clone(),
                            },
                            Spanned {
                                value: replacement.to_string(),
                                key_pos: pk.pos,
                                pos: rv.pos,
                                path: rpath,
                            },
                        ));
                    }
                }
            }
            other => unknown_key(k.pos, path, other, MIRROR_KEYS, diags),
        }
    }
    m
}

fn decode_config(node: &Node, path: &str, diags: &mut Diagnostics) -> RawRegistryConfig {
    let mut c = RawRegistryConfig::default();
    if node.is_null() {
        return c;
    }
    let Some(entries) = mapping(node, path, diags) else {
        return c;
    };
    for (k, v) in entries {
        let Some(key) = key_str(k, path, diags) else {
            continue;
        };
        let kpath = format!("{path}.{key}");
        match key {
            "auth" => {
                let mut a = RawAuth::default();
                for (field, value) in fields(v, &kpath, AUTH_KEYS, diags) {
                    let Some(s) = value_string(&field, value, diags) else {
                        continue;
                    };
                    match field.value.as_str() {
                        "username" => a.username = Some(s),
                        "password" => a.password = Some(s),
                        "auth" => a.auth = Some(s),
                        _ => a.identity_token = Some(s),
                    }
                }
                c.auth = Some(spanned(a, k.pos, v.pos, &kpath));
            }
            "tls" => {
                let mut t = RawTls::default();
                for (field, value) in fields(v, &kpath, TLS_KEYS, diags) {
                    if field.value == "insecure_skip_verify" {
                        t.insecure_skip_verify = decode_bool(&field, value, diags);
                        continue;
                    }
                    let Some(s) = value_string(&field, value, diags) else {
                        continue;
                    };
                    match field.value.as_str() {
                        "ca_file" => t.ca_file = Some(s),
                        "cert_file" => t.cert_file = Some(s),
                        _ => t.key_file = Some(s),
                    }
                }
                c.tls = Some(spanned(t, k.pos, v.pos, &kpath));
            }
            other => unknown_key(k.pos, path, other, CONFIG_KEYS, diags),
        }
    }
    c
}

/// The known fields of a small fixed-key mapping; unknown keys are reported.
fn fields<'a>(
    node: &'a Node,
    path: &str,
    known: &[&str],
    diags: &mut Diagnostics,
) -> Vec<(Spanned<String>, &'a Node)> {
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
        if known.contains(&key) {
            out.push((
                spanned(key.to_string(), k.pos, v.pos, &format!("{path}.{key}")),
                v,
            ));
        } else {
            unknown_key(k.pos, path, key, known, diags);
        }
    }
    out
}

fn value_string(
    field: &Spanned<String>,
    v: &Node,
    diags: &mut Diagnostics,
) -> Option<Spanned<String>> {
    if v.is_null() {
        return None;
    }
    let s = scalar(v, &field.path, diags)?;
    Some(Spanned {
        value: s.to_string(),
        key_pos: field.key_pos,
        pos: v.pos,
        path: field.path.clone(),
    })
}

fn decode_bool(
    field: &Spanned<String>,
    v: &Node,
    diags: &mut Diagnostics,
) -> Option<Spanned<bool>> {
    if v.is_null() {
        return None;
    }
    let (text, quoted) = match &v.kind {
        NodeKind::Scalar { text, quoted } => (text.as_str(), *quoted),
        _ => {
            type_error(v, &field.path, "true or false", diags);
            return None;
        }
    };
    let Some(b) = yaml11_bool(text) else {
        diags
            .error(
                v.pos,
                &field.path,
                format!("expected true or false, found {text:?}"),
            )
            .hint("write insecure_skip_verify: true");
        return None;
    };
    if quoted {
        diags
            .warning(v.pos, &field.path, format!("quoted boolean {text:?}"))
            .hint(format!(
                "K3s rejects the whole registries.yaml for a quoted boolean; write {text} without quotes"
            ));
    }
    Some(Spanned {
        value: b,
        key_pos: field.key_pos,
        pos: v.pos,
        path: field.path.clone(),
    })
}

fn spanned<T>(value: T, key_pos: Pos, pos: Pos, path: &str) -> Spanned<T> {
    Spanned {
        value,
        key_pos,
        pos,
        path: path.to_string(),
    }
}

/// A mapping's entries, reporting duplicate keys and a wrong node type.
pub(crate) fn mapping<'a>(
    node: &'a Node,
    path: &str,
    diags: &mut Diagnostics,
) -> Option<&'a [(Node, Node)]> {
    match &node.kind {
        NodeKind::Map(entries) => {
            for (i, (k, _)) in entries.iter().enumerate() {
                if let Some(name) = k.as_str()
                    && let Some((first, _)) =
                        entries[..i].iter().find(|(p, _)| p.as_str() == Some(name))
                {
                    diags
                        .error(k.pos, path, format!("duplicate key {name:?}"))
                        .hint(format!(
                            "it is already defined on line {}; K3s rejects the whole file",
                            first.pos.line
                        ));
                }
            }
            Some(entries)
        }
        NodeKind::Alias => {
            diags.error(
                node.pos,
                path,
                "YAML aliases are not supported in registries.yaml",
            );
            None
        }
        _ => {
            type_error(node, path, "a mapping", diags);
            None
        }
    }
}

pub(crate) fn key_str<'a>(k: &'a Node, path: &str, diags: &mut Diagnostics) -> Option<&'a str> {
    match &k.kind {
        NodeKind::Scalar { text, .. } => Some(text),
        _ => {
            diags.error(
                k.pos,
                path,
                format!("keys must be strings, found {}", k.type_name()),
            );
            None
        }
    }
}

pub(crate) fn scalar<'a>(node: &'a Node, path: &str, diags: &mut Diagnostics) -> Option<&'a str> {
    match &node.kind {
        NodeKind::Scalar { text, .. } => Some(text),
        _ => {
            type_error(node, path, "a string", diags);
            None
        }
    }
}

pub(crate) fn type_error(node: &Node, path: &str, expected: &str, diags: &mut Diagnostics) {
    diags.error(
        node.pos,
        path,
        format!("expected {expected}, found {}", node.type_name()),
    );
}

/// The error for a key nobody reads, at `parent` (`""` for the top level); the caller adds
/// its hint. Shared by registries.yaml and the policy file.
pub(crate) fn unknown_key_error<'d>(
    pos: Pos,
    parent: &str,
    key: &str,
    diags: &'d mut Diagnostics,
) -> &'d mut Diagnostic {
    let path = if parent.is_empty() {
        key_part(key)
    } else {
        format!("{parent}.{}", key_part(key))
    };
    let where_ = if parent.is_empty() {
        "at the top level".to_string()
    } else {
        format!("under {parent}")
    };
    diags.error(pos, &path, format!("unknown key {key:?} {where_}"))
}

fn unknown_key(pos: Pos, parent: &str, key: &str, known: &[&str], diags: &mut Diagnostics) {
    let d = unknown_key_error(pos, parent, key, diags);
    // `token` is the classic mistake: the K3s field is identity_token.
    let suggestion = if key == "token" && known.contains(&"identity_token") {
        Some("identity_token")
    } else {
        did_you_mean(key, known)
    };
    match suggestion {
        Some(s) => d.hint(format!(
            "did you mean {s:?}? K3s silently ignores unknown keys, so this setting would have no effect"
        )),
        None => d.hint(format!("known keys here: {}", known.join(", "))),
    };
}
