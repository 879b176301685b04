//! A tiny YAML document tree with source positions.
//!
//! `registries.yaml` is decoded by hand from this tree rather than through serde so that
//! every key and value keeps its line and column, unknown keys can be reported with a
//! suggestion, and scalars keep their original text: K3s parses the file with Go's
//! yaml.v2 (YAML 1.1), so `yes`/`on` are booleans there, and we resolve scalars ourselves.

use saphyr_parser::{Event, Parser, ScalarStyle};

/// A position in the source text: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// A scalar with its text exactly as written; `quoted` is false for plain scalars.
    Scalar {
        text: String,
        quoted: bool,
    },
    Map(Vec<(Node, Node)>),
    Seq(Vec<Node>),
    /// An alias (`*name`): K3s resolves these; we keep the file readable by refusing them.
    Alias,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub pos: Pos,
}

impl Node {
    /// A plain scalar that YAML resolves to null (`~`, `null`, empty).
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar { text, quoted: false }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            NodeKind::Scalar { .. } if self.is_null() => "null",
            NodeKind::Scalar { .. } => "a scalar",
            NodeKind::Map(_) => "a mapping",
            NodeKind::Seq(_) => "a list",
            NodeKind::Alias => "an alias",
        }
    }
}

/// A YAML syntax error with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses the first document of `text`. An empty file yields `None`.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Builder> = Vec::new();
    let mut root: Option<Node> = None;
    let mut documents = 0;
    loop {
        let (event, span) = match parser.next_event() {
            None => break,
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                return Err(SyntaxError {
                    pos: Pos {
                        line: e.marker().line(),
                        column: e.marker().col() + 1,
                    },
                    message: e.info().to_string(),
                });
            }
        };
        let pos = Pos {
            line: span.start.line(),
            column: span.start.col() + 1,
        };
        let done = match event {
            Event::StreamEnd => break,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(SyntaxError {
                        pos,
                        message: "more than one YAML document; registries.yaml holds exactly one"
                            .into(),
                    });
                }
                None
            }
            Event::Scalar(text, style, _, _) => Some(Node {
                kind: NodeKind::Scalar {
                    text: text.into_owned(),
                    quoted: !matches!(style, ScalarStyle::Plain),
                },
                pos,
            }),
            Event::Alias(_) => Some(Node {
                kind: NodeKind::Alias,
                pos,
            }),
            Event::MappingStart(..) => {
                stack.push(Builder::Map(pos, Vec::new(), None));
                None
            }
            Event::SequenceStart(..) => {
                stack.push(Builder::Seq(pos, Vec::new()));
                None
            }
            Event::MappingEnd => match stack.pop() {
                Some(Builder::Map(pos, entries, _)) => Some(Node {
                    kind: NodeKind::Map(entries),
                    pos,
                }),
                _ => unreachable!("parser emits balanced mapping events"),
            },
            Event::SequenceEnd => match stack.pop() {
                Some(Builder::Seq(pos, items)) => Some(Node {
                    kind: NodeKind::Seq(items),
                    pos,
                }),
                _ => unreachable!("parser emits balanced sequence events"),
            },
            _ => None,
        };
        if let Some(node) = done {
            match stack.last_mut() {
                None => root = Some(node),
                Some(Builder::Seq(_, items)) => items.push(node),
                Some(Builder::Map(_, entries, pending)) => match pending.take() {
                    None => *pending = Some(node),
                    Some(key) => entries.push((key, node)),
                },
            }
        }
    }
    Ok(root)
}

enum Builder {
    Map(Pos, Vec<(Node, Node)>, Option<Node>),
    Seq(Pos, Vec<Node>),
}

/// Go yaml.v2 (YAML 1.1) boolean resolution for a plain scalar.
pub fn yaml11_bool(text: &str) -> Option<bool> {
    match text {
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => {
            Some(true)
        }
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE" => {
            Some(false)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let n = parse("a:\n  b: [x, 'y']\n").unwrap().unwrap();
        let NodeKind::Map(entries) = &n.kind else {
            panic!()
        };
        assert_eq!(entries[0].0.pos, Pos { line: 1, column: 1 });
        let NodeKind::Map(inner) = &entries[0].1.kind else {
            panic!()
        };
        assert_eq!(inner[0].0.pos, Pos { line: 2, column: 3 });
        let NodeKind::Seq(items) = &inner[0].1.kind else {
            panic!()
        };
        assert_eq!(
            items[1].kind,
            NodeKind::Scalar {
                text: "y".into(),
                quoted: true
            }
        );
    }

    #[test]
    fn empty_is_none() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("# only a comment\n").unwrap(), None);
    }

    #[test]
    fn unquoted_star_is_a_syntax_error() {
        let e = parse("mirrors:\n  *:\n    endpoint: [a]\n").unwrap_err();
        assert_eq!(e.pos.line, 2);
    }
}
