//! A YAML tree that remembers where every node came from, and a serde
//! `Deserializer` over it.
//!
//! Why not deserialize straight from the text: an operator needs the file,
//! line and column of the exact field that is wrong (an unknown field, a bad
//! enum value), and analyzers need the line of the field they complain about.
//! serde loses positions inside buffered content, so we parse once into
//! [`Node`]s with the event parser that serde-saphyr is built on, and then
//! drive typed deserialization from the tree, attaching positions and the
//! field path to every error on the way out.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::granit_parser::{Event, Options, Parser, ScalarStyle};

mod fast;

/// Upper bound on nodes per document, aliases expanded, so that an alias
/// bomb is a clear error rather than an exhausted machine. Per document: a
/// file of many resources may be as large as it likes.
const MAX_NODES: usize = 1_000_000;

/// Maps with more keys than this find duplicates by a set, not a scan.
const KEYS_SCANNED: usize = 16;

/// A position in a source file, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// `plain` is false for quoted and block scalars, which are always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// One YAML document of a multi-document stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub root: Node,
}

/// A syntax error in the YAML text itself.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{pos}: {message}")]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses a multi-document YAML stream. Empty documents (only comments, or a
/// trailing `---`) are returned with a `Null` root; callers skip them.
pub fn parse_documents(src: &str) -> Result<Vec<Document>, SyntaxError> {
    parse_documents_at(src, 0)
}

/// `parse_documents` of a part of a file that starts after `lines_before`
/// lines of it (`document_parts`): positions are the file's.
pub fn parse_documents_at(src: &str, lines_before: u32) -> Result<Vec<Document>, SyntaxError> {
    match fast::parse(src, lines_before) {
        Ok(docs) => Ok(docs),
        Err(fast::GiveUp) => parse_events_at(src, lines_before),
    }
}

/// Whether the fast path reads `src` itself, for tests: the configs the
/// scale benchmark generates must not fall back to the event parser.
#[doc(hidden)]
pub fn fast_path_reads(src: &str) -> bool {
    fast::parse(src, 0).is_ok()
}

/// `parse_documents_at` by the event parser alone, for any YAML: what the
/// fast path must agree with where it reads the text at all.
#[doc(hidden)]
pub fn parse_events_at(src: &str, lines_before: u32) -> Result<Vec<Document>, SyntaxError> {
    let at = |line: usize, col: usize| Pos {
        line: to_u32(line).saturating_add(lines_before),
        col: to_u32(col + 1),
    };
    // Comments are not kept: emitted, a run of 96 of them inside a
    // collection failed the parse ("too many buffered comments").
    let mut options = Options::default();
    options.emit_comments = false;
    let mut builder = TreeBuilder::default();
    for item in Parser::new_from_str_with_options(src, options) {
        let (event, span) = item.map_err(|e| SyntaxError {
            pos: at(e.marker().line(), e.marker().col()),
            message: e.info(),
        })?;
        builder.event(event, at(span.start.line(), span.start.col()))?;
    }
    Ok(builder.docs)
}

/// Splits a multi-document stream into parts of about `target` bytes or
/// more, each a whole number of documents, to parse on threads of their
/// own: (byte range, lines before it). A part begins at a `---` line: in
/// YAML such a line starts a document wherever it is (no scalar, block or
/// quoted, may hold one), so each part parses as the stream would. A
/// stream with a directive (`%YAML`, `%TAG`: it belongs to the document
/// after it), or with a carriage return that ends a line on its own (lines
/// are counted by line feeds), stays whole; a part ends only after a line
/// of plain content (`is_plain_content`), so that every node keeps the
/// position it has in the whole stream.
pub fn document_parts(src: &str, target: usize) -> Vec<(std::ops::Range<usize>, u32)> {
    let lone_cr = src
        .match_indices('\r')
        .any(|(i, _)| src.as_bytes().get(i + 1) != Some(&b'\n'));
    if lone_cr {
        return vec![(0..src.len(), 0)];
    }
    let mut parts = Vec::new();
    let (mut start, mut start_lines) = (0, 0u32);
    let (mut offset, mut lines) = (0, 0u32);
    let mut after_content = false;
    for line in src.split_inclusive('\n') {
        if line.starts_with('%') {
            return vec![(0..src.len(), 0)];
        }
        if offset - start >= target && after_content && is_document_start(line) {
            parts.push((start..offset, start_lines));
            (start, start_lines) = (offset, lines);
        }
        after_content = is_plain_content(line);
        offset += line.len();
        lines += 1;
    }
    parts.push((start..src.len(), start_lines));
    parts
}

/// A line a part may end with: neither blank nor a comment, and without
/// `|` or `>` (an empty block scalar cut off by the marker is placed
/// where the marker is, not where its header is).
fn is_plain_content(line: &str) -> bool {
    let trimmed = line.trim();
    !trimmed.is_empty() && !trimmed.starts_with('#') && !trimmed.contains(['|', '>'])
}

/// `---` alone or before a space, a tab or the line's end.
fn is_document_start(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Builds nodes from parser events with an explicit stack (no recursion, so
/// deeply nested input cannot overflow the call stack).
#[derive(Default)]
struct TreeBuilder {
    docs: Vec<Document>,
    stack: Vec<Open>,
    anchors: HashMap<usize, Node>,
    /// Nodes of the current document so far, aliases expanded.
    nodes: usize,
    pending_key: Vec<Option<Node>>,
}

struct Open {
    node: Node,
    anchor: usize,
    /// A large map's keys, for its duplicate check.
    keys: Option<std::collections::HashSet<String>>,
}

impl TreeBuilder {
    fn event(&mut self, event: Event<'_>, pos: Pos) -> Result<(), SyntaxError> {
        match event {
            Event::DocumentStart(..) => {
                self.anchors.clear();
                self.nodes = 0;
            }
            Event::Scalar(text, style, anchor, tag) => {
                let plain = matches!(style, ScalarStyle::Plain) && tag.is_none();
                let value = if plain && is_null(&text) {
                    Value::Null
                } else {
                    Value::Scalar {
                        text: text.into_owned(),
                        plain,
                    }
                };
                self.count(1, pos)?;
                self.finish(Node { value, pos }, anchor)?;
            }
            Event::SequenceStart(_, anchor, _) => self.open(Value::Seq(Vec::new()), pos, anchor)?,
            Event::MappingStart(_, anchor, _) => {
                self.open(Value::Map(Vec::new()), pos, anchor)?;
                self.pending_key.push(None);
            }
            Event::SequenceEnd => self.close()?,
            Event::MappingEnd => {
                self.pending_key.pop();
                self.close()?;
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().ok_or_else(|| SyntaxError {
                    pos,
                    message: "alias refers to an unknown anchor".into(),
                })?;
                // An alias is a copy: its nodes count again.
                self.count(count(&node), pos)?;
                self.finish(node, 0)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn open(&mut self, value: Value, pos: Pos, anchor: usize) -> Result<(), SyntaxError> {
        self.count(1, pos)?;
        self.stack.push(Open {
            node: Node { value, pos },
            anchor,
            keys: None,
        });
        Ok(())
    }

    fn count(&mut self, n: usize, pos: Pos) -> Result<(), SyntaxError> {
        self.nodes += n;
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                pos,
                message: format!(
                    "YAML document too large: more than {MAX_NODES} nodes, aliases expanded \
                     (the limit is per document; split the resources into documents with `---`)"
                ),
            });
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), SyntaxError> {
        if let Some(open) = self.stack.pop() {
            self.finish(open.node, open.anchor)?;
        }
        Ok(())
    }

    fn finish(&mut self, node: Node, anchor: usize) -> Result<(), SyntaxError> {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let Some(parent) = self.stack.last_mut() else {
            self.docs.push(Document { root: node });
            return Ok(());
        };
        match &mut parent.node.value {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => {
                let slot = self.pending_key.last_mut().expect("a map has a key slot");
                match slot.take() {
                    None => *slot = Some(node),
                    Some(key) => {
                        if let Some(k) = key.as_str()
                            && is_duplicate(entries, &mut parent.keys, k)
                        {
                            return Err(SyntaxError {
                                pos: key.pos,
                                message: format!("duplicate key `{k}`"),
                            });
                        }
                        entries.push((key, node));
                    }
                }
            }
            _ => unreachable!("only collections are pushed on the stack"),
        }
        Ok(())
    }
}

/// Whether a map already has key `k` (and records it): a scan while the
/// map is small, a set once it is large, so a map of n keys costs O(n).
fn is_duplicate(
    entries: &[(Node, Node)],
    keys: &mut Option<std::collections::HashSet<String>>,
    k: &str,
) -> bool {
    if keys.is_none() && entries.len() < KEYS_SCANNED {
        return entries.iter().any(|(other, _)| other.as_str() == Some(k));
    }
    let set = keys.get_or_insert_with(|| {
        entries
            .iter()
            .filter_map(|(key, _)| key.as_str().map(str::to_owned))
            .collect()
    });
    !set.insert(k.to_owned())
}

/// A node and everything under it.
fn count(node: &Node) -> usize {
    match &node.value {
        Value::Seq(items) => 1 + items.iter().map(count).sum::<usize>(),
        Value::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| count(k) + count(v))
                .sum::<usize>()
        }
        _ => 1,
    }
}

fn is_null(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

impl Node {
    /// The scalar text, for any scalar style.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// Looks up a map entry by key.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Follows a dotted path with `[i]` indices, as printed in errors:
    /// `spec.http[0].route[0].destination.host`. Returns the deepest node found,
    /// so a missing leaf still points at its parent.
    pub fn locate(&self, path: &str) -> &Node {
        let mut node = self;
        for seg in path.split('.').filter(|s| !s.is_empty()) {
            let (name, indices) = match seg.find('[') {
                Some(i) => (&seg[..i], &seg[i..]),
                None => (seg, ""),
            };
            if !name.is_empty() {
                match node.get(name) {
                    Some(n) => node = n,
                    None => return node,
                }
            }
            for idx in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
                let next = idx.parse::<usize>().ok().and_then(|i| match &node.value {
                    Value::Seq(items) => items.get(i),
                    _ => None,
                });
                match next {
                    Some(n) => node = n,
                    None => return node,
                }
            }
        }
        node
    }

    fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Scalar { plain: false, .. } => "string",
            Value::Scalar { text, .. } => match classify_plain(text) {
                Plain::Bool(_) => "boolean",
                Plain::Int(_) | Plain::UInt(_) => "integer",
                Plain::Float(_) => "number",
                Plain::Str => "string",
            },
            Value::Seq(_) => "list",
            Value::Map(_) => "object",
        }
    }
}

enum Plain {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str,
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn classify_plain(s: &str) -> Plain {
    match s {
        "true" | "True" | "TRUE" => return Plain::Bool(true),
        "false" | "False" | "FALSE" => return Plain::Bool(false),
        _ => {}
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(u) = s.trim_start_matches('+').parse::<u64>() {
            return Plain::UInt(u);
        }
        if let Ok(i) = s.parse::<i64>() {
            return Plain::Int(i);
        }
    }
    if let Some(hex) = s.strip_prefix("0x")
        && let Ok(u) = u64::from_str_radix(hex, 16)
    {
        return Plain::UInt(u);
    }
    let looks_numeric = s.bytes().any(|b| b.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
    if looks_numeric && let Ok(f) = s.parse::<f64>() {
        return Plain::Float(f);
    }
    match s {
        ".inf" | ".Inf" | ".INF" | "+.inf" => Plain::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => Plain::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => Plain::Float(f64::NAN),
        _ => Plain::Str,
    }
}

// === Deserialization ===

/// A typed-deserialization error with the position and field path where it
/// happened.
#[derive(Debug, Clone, PartialEq)]
pub struct DeError {
    pub pos: Option<Pos>,
    /// Path segments, outermost first once complete (`spec`, `http[0]`, ...).
    segments: Vec<String>,
    pub message: String,
}

impl DeError {
    /// The field path, e.g. `spec.http[0].route`.
    pub fn path(&self) -> String {
        let mut out = String::new();
        for seg in self.segments.iter().rev() {
            if !seg.starts_with('[') && !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
        out
    }

    fn at(mut self, pos: Pos) -> Self {
        self.pos.get_or_insert(pos);
        self
    }

    fn within(mut self, seg: String) -> Self {
        self.segments.push(seg);
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path();
        if path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{path}: {}", self.message)
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            pos: None,
            segments: Vec::new(),
            message: msg.to_string(),
        }
    }

    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        // Kubernetes strict validation says `unknown field "x"`; the list of
        // expected fields is long and not what an operator needs first.
        de::Error::custom(format_args!("unknown field \"{field}\""))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        de::Error::custom(format_args!(
            "unsupported value \"{variant}\": supported values: {}",
            expected
                .iter()
                .map(|v| format!("\"{v}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    fn missing_field(field: &'static str) -> Self {
        de::Error::custom(format_args!("required field \"{field}\" is missing"))
    }
}

/// Deserializes a typed value from a node.
pub fn from_node<'de, T: serde::Deserialize<'de>>(node: &'de Node) -> Result<T, DeError> {
    T::deserialize(node).map_err(|e| e.at(node.pos))
}

impl<'de> Node {
    fn invalid_type(&self, expected: &str) -> DeError {
        de::Error::custom(format_args!(
            "invalid type: expected {expected}, found {}",
            self.kind_name()
        ))
    }

    fn scalar_for(&'de self, expected: &str) -> Result<(&'de str, bool), DeError> {
        match &self.value {
            Value::Scalar { text, plain } => Ok((text, *plain)),
            _ => Err(self.invalid_type(expected).at(self.pos)),
        }
    }
}

macro_rules! deserialize_number {
    ($method:ident, $visit:ident, $ty:ty, $what:literal) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let (text, plain) = self.scalar_for($what)?;
            let parsed = if plain {
                text.trim_start_matches('+').parse::<$ty>().ok()
            } else {
                None
            };
            match parsed {
                Some(n) => visitor.$visit(n),
                None if !plain || matches!(classify_plain(text), Plain::Str | Plain::Bool(_)) => {
                    Err(self.invalid_type($what).at(self.pos))
                }
                None => Err(de::Error::custom(format_args!(
                    "{text} is out of range for {}",
                    $what
                ))),
            }
            .map_err(|e: DeError| e.at(self.pos))
        }
    };
}

impl<'de> de::Deserializer<'de> for &'de Node {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.value {
            Value::Null => visitor.visit_unit(),
            Value::Scalar { text, plain: false } => visitor.visit_borrowed_str(text),
            Value::Scalar { text, plain: true } => match classify_plain(text) {
                Plain::Bool(b) => visitor.visit_bool(b),
                Plain::Int(i) => visitor.visit_i64(i),
                Plain::UInt(u) => visitor.visit_u64(u),
                Plain::Float(f) => visitor.visit_f64(f),
                Plain::Str => visitor.visit_borrowed_str(text),
            },
            Value::Seq(items) => visitor.visit_seq(Seq {
                items: items.iter(),
                index: 0,
            }),
            Value::Map(entries) => visitor.visit_map(Map::new(entries)),
        };
        r.map_err(|e| e.at(self.pos))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let (text, plain) = self.scalar_for("boolean")?;
        match (plain, classify_plain(text)) {
            (true, Plain::Bool(b)) => visitor.visit_bool(b),
            _ => Err(self.invalid_type("boolean")),
        }
        .map_err(|e| e.at(self.pos))
    }

    deserialize_number!(deserialize_i8, visit_i8, i8, "integer");
    deserialize_number!(deserialize_i16, visit_i16, i16, "integer");
    deserialize_number!(deserialize_i32, visit_i32, i32, "integer");
    deserialize_number!(deserialize_i64, visit_i64, i64, "integer");
    deserialize_number!(deserialize_u8, visit_u8, u8, "integer");
    deserialize_number!(deserialize_u16, visit_u16, u16, "integer");
    deserialize_number!(deserialize_u32, visit_u32, u32, "integer");
    deserialize_number!(deserialize_u64, visit_u64, u64, "integer");
    deserialize_number!(deserialize_f32, visit_f32, f32, "number");
    deserialize_number!(deserialize_f64, visit_f64, f64, "number");

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // Plain scalars that look like numbers or booleans are accepted as
        // strings: `ports: [8080]` means "8080" to every operator.
        let (text, _) = self.scalar_for("string")?;
        visitor
            .visit_borrowed_str(text)
            .map_err(|e: DeError| e.at(self.pos))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            _ => Err(self.invalid_type("null").at(self.pos)),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.value {
            // Kubernetes treats `field:` (null) like an absent list.
            Value::Null => visitor.visit_seq(Seq {
                items: [].iter(),
                index: 0,
            }),
            Value::Seq(items) => visitor.visit_seq(Seq {
                items: items.iter(),
                index: 0,
            }),
            _ => Err(self.invalid_type("list")),
        }
        .map_err(|e| e.at(self.pos))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.value {
            Value::Null => visitor.visit_map(Map::new(&[])),
            Value::Map(entries) => visitor.visit_map(Map::new(entries)),
            _ => Err(self.invalid_type("object")),
        }
        .map_err(|e| e.at(self.pos))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.value {
            Value::Scalar { text, .. } => visitor.visit_enum(text.as_str().into_deserializer()),
            _ => Err(self.invalid_type("string")),
        }
        .map_err(|e: DeError| e.at(self.pos))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct Seq<'de> {
    items: std::slice::Iter<'de, Node>,
    index: usize,
}

impl<'de> SeqAccess<'de> for Seq<'de> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.next() else {
            return Ok(None);
        };
        let index = self.index;
        self.index += 1;
        seed.deserialize(node)
            .map(Some)
            .map_err(|e| e.at(node.pos).within(format!("[{index}]")))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Map<'de> {
    entries: std::slice::Iter<'de, (Node, Node)>,
    value: Option<&'de Node>,
    key: Cow<'de, str>,
}

impl<'de> Map<'de> {
    fn new(entries: &'de [(Node, Node)]) -> Self {
        Map {
            entries: entries.iter(),
            value: None,
            key: Cow::Borrowed(""),
        }
    }
}

impl<'de> MapAccess<'de> for Map<'de> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some(value);
        self.key = match &key.value {
            Value::Scalar { text, .. } => Cow::Borrowed(text.as_str()),
            _ => Cow::Owned(String::from("?")),
        };
        seed.deserialize(key)
            .map(Some)
            .map_err(|e| e.at(key.pos).within(self.key.to_string()))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let node = self.value.take().expect("next_value after next_key");
        seed.deserialize(node)
            .map_err(|e| e.at(node.pos).within(self.key.to_string()))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Port {
        number: u32,
        #[serde(default)]
        name: Option<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Spec {
        hosts: Vec<String>,
        #[serde(default)]
        ports: Vec<Port>,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    }

    fn parse_one(src: &str) -> Node {
        let mut docs = parse_documents(src).unwrap();
        docs.remove(0).root
    }

    #[test]
    fn documents_and_positions() {
        let src = "# c\na: 1\n---\nb:\n  c: [x, y]\n---\n";
        let docs = parse_documents(src).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0].root.pos, Pos { line: 2, col: 1 });
        assert_eq!(docs[1].root.pos.line, 4);
        assert_eq!(docs[1].root.locate("b.c[1]").as_str(), Some("y"));
        assert_eq!(docs[1].root.locate("b.c[1]").pos, Pos { line: 5, col: 10 });
        assert_eq!(docs[2].root.value, Value::Null);
    }

    #[test]
    fn typed_values_and_strings() {
        let node = parse_one(
            "hosts: [a, 80, 'b']\nports:\n- number: 80\n  name: http\nlabels: {x: \"1\"}\n",
        );
        let spec: Spec = from_node(&node).unwrap();
        assert_eq!(spec.hosts, vec!["a", "80", "b"]);
        assert_eq!(
            spec.ports[0],
            Port {
                number: 80,
                name: Some("http".into())
            }
        );
    }

    #[test]
    fn unknown_field_has_path_and_position() {
        let node = parse_one("hosts: []\nports:\n- number: 80\n  nmae: http\n");
        let err = from_node::<Spec>(&node).unwrap_err();
        assert_eq!(err.to_string(), "ports[0].nmae: unknown field \"nmae\"");
        assert_eq!(err.pos, Some(Pos { line: 4, col: 3 }));
    }

    #[test]
    fn wrong_type_is_reported_at_value() {
        let node = parse_one("hosts: []\nports:\n- number: eighty\n");
        let err = from_node::<Spec>(&node).unwrap_err();
        assert_eq!(err.path(), "ports[0].number");
        assert_eq!(err.message, "invalid type: expected integer, found string");
        assert_eq!(err.pos, Some(Pos { line: 3, col: 11 }));
        let node = parse_one("hosts: []\nports:\n- number: \"80\"\n");
        assert!(
            from_node::<Spec>(&node).is_err(),
            "a quoted number is a string"
        );
    }

    #[test]
    fn missing_field() {
        let node = parse_one("ports: []\n");
        let err = from_node::<Spec>(&node).unwrap_err();
        assert_eq!(err.to_string(), "required field \"hosts\" is missing");
        assert_eq!(err.pos, Some(Pos { line: 1, col: 1 }));
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let err = parse_documents("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.pos.line >= 2, "{err}");
        let err = parse_documents("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.to_string(), "2:1: duplicate key `a`");
    }

    #[test]
    fn anchors_and_aliases() {
        let node = parse_one("x: &a {number: 1}\ny: *a\n");
        assert_eq!(
            node.get("y")
                .and_then(|n| n.get("number"))
                .and_then(Node::as_str),
            Some("1")
        );
    }

    #[test]
    fn the_node_limit_is_per_document() {
        // Three documents of 400k nodes each: 1.2M in the file, fine.
        let doc = "- x\n".repeat(400_000);
        let src = format!("{doc}---\n{doc}---\n{doc}");
        assert_eq!(parse_documents(&src).unwrap().len(), 3);
        // One document of 1.2M nodes: refused, saying why.
        let err = parse_documents(&"- x\n".repeat(1_200_000)).unwrap_err();
        assert!(err.message.contains("per document"), "{err}");
    }

    #[test]
    fn a_large_map_still_finds_a_duplicate_key() {
        let mut src: String = (0..5000).map(|i| format!("k{i}: {i}\n")).collect();
        src.push_str("k4321: again\n");
        let err = parse_documents(&src).unwrap_err();
        assert_eq!(err.to_string(), "5001:1: duplicate key `k4321`");
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut src = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            src.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
        }
        let err = parse_documents(&src).unwrap_err();
        assert!(err.message.contains("too large"), "{err}");
    }

    /// Every part on its own, the documents in order.
    fn parse_in_parts(src: &str, target: usize) -> Result<Vec<Node>, SyntaxError> {
        let mut roots = Vec::new();
        for (range, lines) in document_parts(src, target) {
            roots.extend(
                parse_documents_at(&src[range], lines)?
                    .into_iter()
                    .map(|d| d.root),
            );
        }
        Ok(roots)
    }

    fn whole(src: &str) -> Result<Vec<Node>, SyntaxError> {
        Ok(parse_documents(src)?.into_iter().map(|d| d.root).collect())
    }

    #[test]
    fn a_stream_parses_in_parts_as_it_parses_whole() {
        let mut streams = seed_files(|_| true);
        streams.extend(
            [
                // Block scalars that keep their trailing lines end at the
                // next `---`; content on a marker's line; `...` ends.
                "a: |+\n  kept\n\n---\nb: >-\n  folded\n  text\n...\n--- |\n  top\n---\n# only a comment\n---\n",
                // A first document without a marker, an empty one, CRLF.
                "x: 1\r\n---\r\n---\r\ny: [1, 2]\r\n--- \t\nz: {k: v}\n",
                // `---` at a line's start inside a top-level block scalar
                // ends it; `----` and `--- x` are not parts of the same kind.
                "--- |\nline\n---\nk: ----\n--- x\n---\n----\n",
                // Keep chomping with only empty lines before the marker.
                "t: |+\n\n---\nv\n",
                // A carriage return alone ends a line too: no parts.
                "a: 1\rb: 2\n---\nc: 3\n",
                // Anchors stay within their document.
                "a: &n {x: 1}\nb: *n\n---\nc: &n [2]\nd: *n\n",
                "",
            ]
            .map(str::to_owned),
        );
        for src in &streams {
            let want = whole(src).unwrap();
            for target in [0, 1, 16, usize::MAX] {
                assert_eq!(
                    parse_in_parts(src, target).unwrap(),
                    want,
                    "{target}: {src}"
                );
            }
        }
        // A part per marker at target 0 (the first has no marker).
        assert_eq!(document_parts("a: 1\n---\nb: 2\n--- \nc: 3\n", 0).len(), 3);
        // A directive belongs to the document after it: no parts.
        let directive = "a: 1\n---\n%YAML 1.2\n---\nb: 2\n";
        assert_eq!(document_parts(directive, 0), [(0..directive.len(), 0)]);
    }

    #[test]
    fn an_error_in_a_later_part_names_the_line_in_the_file() {
        let src = "a: 1\n---\nb: 2\n---\nc: [1\nd: 2\n";
        let whole = whole(src).unwrap_err();
        let parts = parse_in_parts(src, 0).unwrap_err();
        assert_eq!((parts.pos, &parts.message), (whole.pos, &whole.message));
        assert_eq!(parts.pos.line, 6, "{parts}");
        let node = &parse_in_parts("a: 1\n---\nb:\n  c: 2\n", 0).unwrap()[1];
        assert_eq!(
            node.get("b").and_then(|b| b.get("c")).unwrap().pos,
            Pos { line: 4, col: 6 }
        );
    }

    /// The seed's YAML files whose names `keep` keeps.
    fn seed_files(keep: impl Fn(&str) -> bool) -> Vec<String> {
        let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed");
        std::fs::read_dir(seed)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .filter(|p| p.file_name().is_some_and(|n| keep(&n.to_string_lossy())))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }

    /// The fast path reads configs as written (the seed, the Kubernetes
    /// style of lists and flow collections) and builds what the event
    /// parser builds, positions included; it leaves all else to it.
    #[test]
    fn the_fast_path_builds_what_the_event_parser_builds() {
        // Every seed file but the Deployments (block scalars: the event
        // parser reads those).
        let mut taken = seed_files(|name| !name.starts_with("deployment"));
        assert!(taken.len() >= 7);
        taken.extend(
            [
                // Lists at their key's column or under it, a mapping per
                // item, flow collections, quotes, comments, empty values.
                "a: 1\nb:\n  c: x # note\n  d: \"q\"\ne:\n- f: 1\n  g: [1, {h: i}]\n- k\nl:\nm: \n",
                "---\na: 1\n---\n# only\n---\nn: 's' # c\n---\n",
                "# c\n---\n- a:\n  - x\n  b: 1\n-   d\n- e: [ ]\n  f: {}\n",
                "a:   # c\n\n  b: [x,y]\n  c:\n    - z: \"*.e\"\n      w: ['.']\n",
                "k.io/name-x: v:w b[0] a#b\nn: ~\n",
                // More comments in a row than the event parser once buffered.
                &format!("a:\n{}  b: 1\n", "  # c\n".repeat(150)),
                "",
                "# nothing\n",
            ]
            .map(str::to_owned),
        );
        for src in &taken {
            let fast = fast::parse(src, 7).unwrap_or_else(|_| panic!("gave up on {src}"));
            assert_eq!(fast, parse_events_at(src, 7).unwrap(), "{src}");
        }
        let left = [
            "a: &x 1\nb: *x\n",
            "a: !t x\n",
            "a: |\n  x\n",
            "a: x\n  y\n",
            "a: \"x\\ny\"\n",
            "a: 'it''s'\n",
            "a: [1,\n  2]\n",
            "a: 1\na: 2\n",
            "a:\tb\n",
            "a: b: c\n",
            "- - x\n",
            "--- x\n",
            "a: 1\n...\n",
            "%YAML 1.2\n---\na: 1\n",
            "a: caf\u{e9}\n",
            "a: 1\r\n",
            "\"a\": 1\n",
            "a: [x, ]\n",
            "a: 1\n b: 2\n",
            "scalar\n",
            "null: 1\n",
            // Longer than the 1024 characters YAML looks ahead for a key.
            &format!("{}: 1\n", "k".repeat(1100)),
        ];
        for src in left {
            assert!(fast::parse(src, 0).is_err(), "took {src}");
        }
    }
}
