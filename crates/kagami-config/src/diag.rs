//! Diagnostics: what `kagami check` prints, each with file, line, column and key.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::yaml::Pos;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

/// One problem found in a registries.yaml file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the key the problem is about, e.g. `mirrors."docker.io".endpoint[1]`.
    pub key: String,
    pub message: String,
    /// What to do about it, when there is something to say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(
            f,
            "{}:{}:{}: {sev}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )?;
        if !self.key.is_empty() {
            write!(f, " (at {})", self.key)?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Collects diagnostics while a file is decoded and checked.
#[derive(Debug)]
pub struct Diagnostics {
    file: PathBuf,
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn new(file: &Path) -> Self {
        Self {
            file: file.to_path_buf(),
            items: Vec::new(),
        }
    }

    pub fn error(&mut self, pos: Pos, key: &str, message: impl Into<String>) -> &mut Diagnostic {
        self.push(Severity::Error, pos, key, message.into())
    }

    pub fn warning(&mut self, pos: Pos, key: &str, message: impl Into<String>) -> &mut Diagnostic {
        self.push(Severity::Warning, pos, key, message.into())
    }

    fn push(
        &mut self,
        severity: Severity,
        pos: Pos,
        key: &str,
        message: String,
    ) -> &mut Diagnostic {
        self.items.push(Diagnostic {
            severity,
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            key: key.to_string(),
            message,
            hint: None,
        });
        self.items.last_mut().expect("just pushed")
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }
}

impl Diagnostic {
    pub fn hint(&mut self, hint: impl Into<String>) -> &mut Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Formats a key path component, quoting it when it is not a bare identifier.
pub fn key_part(name: &str) -> String {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        name.to_string()
    } else {
        format!("{name:?}")
    }
}

/// The closest candidate to `word`, if one is close enough to be a plausible typo.
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let lower = word.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(&lower, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3) || c.starts_with(&lower) || lower.starts_with(c))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
