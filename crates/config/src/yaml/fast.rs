//! A fast path for the YAML that configs are written in: block mappings
//! and sequences, one-line plain and quoted scalars, one-line flow
//! collections, comments and `---` lines, in ASCII without tabs. It builds
//! the same nodes at the same positions as the event parser does (the
//! `yaml_loader` fuzz target checks it) in a third of the time, and gives
//! up on anything else (anchors, tags, block scalars, escapes, multi-line
//! scalars, duplicate keys, errors of any kind), which the event parser
//! then reads, errors and all.

use super::{Document, MAX_NODES, Node, Pos, Value, is_duplicate, is_null};

/// Not in the subset: the event parser decides.
#[derive(Debug)]
pub(super) struct GiveUp;

type Fast<T> = Result<T, GiveUp>;

/// Nesting beyond this is left to the event parser (whose builder keeps
/// its own stack): the fast path recurses.
const MAX_DEPTH: usize = 64;

/// Longer keys are left to the event parser, which refuses those past its
/// look-ahead for a key's `:`.
const MAX_KEY: usize = 512;

/// The documents of `src`, or `GiveUp` when it is not all in the subset.
pub(super) fn parse(src: &str, lines_before: u32) -> Fast<Vec<Document>> {
    if !src
        .bytes()
        .all(|b| b == b'\n' || (b' '..=b'~').contains(&b))
    {
        return Err(GiveUp);
    }
    let mut p = FastParser {
        lines: lines(src, lines_before)?,
        at: 0,
        nodes: 0,
        depth: 0,
    };
    p.documents()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Empty, spaces only, or a comment.
    Blank,
    /// `---` alone.
    DocumentStart,
    Content,
}

struct Line<'a> {
    /// 1-based, in the file.
    number: u32,
    indent: usize,
    /// The line after its indentation, without the line feed.
    content: &'a str,
    kind: Kind,
}

fn lines(src: &str, lines_before: u32) -> Fast<Vec<Line<'_>>> {
    let mut out = Vec::with_capacity(src.len() / 16);
    for (i, text) in src.split('\n').enumerate() {
        let number = u32::try_from(i)
            .ok()
            .and_then(|i| i.checked_add(lines_before)?.checked_add(1))
            .ok_or(GiveUp)?;
        let content = text.trim_start_matches(' ');
        let indent = text.len() - content.len();
        let kind = if content.is_empty() || content.starts_with('#') {
            Kind::Blank
        } else if indent == 0 && content == "---" {
            Kind::DocumentStart
        } else if indent == 0 && (content.starts_with("---") || content.starts_with("...")) {
            // A marker with something after it, or a document end.
            return Err(GiveUp);
        } else if indent == 0 && content.starts_with('%') {
            return Err(GiveUp);
        } else {
            Kind::Content
        };
        out.push(Line {
            number,
            indent,
            content,
            kind,
        });
    }
    Ok(out)
}

struct FastParser<'a> {
    lines: Vec<Line<'a>>,
    /// The next line to read.
    at: usize,
    /// Nodes of the current document.
    nodes: usize,
    depth: usize,
}

impl<'a> FastParser<'a> {
    fn documents(&mut self) -> Fast<Vec<Document>> {
        let mut docs = Vec::new();
        // The implicit first document exists only if it has content.
        let mut marker: Option<Pos> = None;
        loop {
            self.nodes = 0;
            let next = self.next_line();
            match next {
                None => {
                    if let Some(pos) = marker {
                        docs.push(empty_document(pos));
                    }
                    return Ok(docs);
                }
                Some(i) if self.lines[i].kind == Kind::DocumentStart => {
                    if let Some(pos) = marker {
                        docs.push(empty_document(pos));
                    }
                    marker = Some(Pos {
                        line: self.lines[i].number,
                        col: 4,
                    });
                    self.at = i + 1;
                }
                Some(i) => {
                    if self.lines[i].indent != 0 {
                        return Err(GiveUp);
                    }
                    self.at = i;
                    let root = self.block_node(0, false)?;
                    docs.push(Document { root });
                    marker = None;
                    match self.next_line() {
                        None => return Ok(docs),
                        Some(j) if self.lines[j].kind == Kind::DocumentStart => {}
                        Some(_) => return Err(GiveUp),
                    }
                }
            }
        }
    }

    /// The index of the next line that is not blank, from `at` on.
    fn next_line(&self) -> Option<usize> {
        (self.at..self.lines.len()).find(|&i| self.lines[i].kind != Kind::Blank)
    }

    fn count(&mut self) -> Fast<()> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(GiveUp);
        }
        Ok(())
    }

    fn enter(&mut self) -> Fast<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(GiveUp);
        }
        Ok(())
    }

    /// A block mapping or sequence whose first line is `at`, at column
    /// `indent`. `indentless`: a sequence at its parent key's column, which
    /// starts where its first item does. Leaves `at` after its last line.
    fn block_node(&mut self, indent: usize, indentless: bool) -> Fast<Node> {
        if is_item(self.lines[self.at].content) {
            self.block_sequence(indent, indentless)
        } else if !indentless {
            self.block_mapping(indent, 0)
        } else {
            Err(GiveUp)
        }
    }

    /// Entries whose keys are at column `indent`; the first starts `skip`
    /// bytes into line `at`'s content (the first entry of a sequence item).
    fn block_mapping(&mut self, indent: usize, skip: usize) -> Fast<Node> {
        self.enter()?;
        self.count()?;
        let first = &self.lines[self.at];
        let pos = Pos {
            line: first.number,
            col: col(first.indent + skip),
        };
        let mut entries: Vec<(Node, Node)> = Vec::new();
        let mut keys = None;
        let mut skip = skip;
        loop {
            let line = &self.lines[self.at];
            let (number, content) = (line.number, &line.content[skip..]);
            let key_col = line.indent + skip;
            let key_len = key_length(content).ok_or(GiveUp)?;
            let key_text = &content[..key_len];
            // A null key has no text to compare; the event parser's builder
            // skips its duplicate check.
            if is_null(key_text) || is_duplicate(&entries, &mut keys, key_text) {
                return Err(GiveUp);
            }
            self.count()?;
            let key = Node {
                value: scalar(key_text, true),
                pos: Pos {
                    line: number,
                    col: col(key_col),
                },
            };
            let rest = &content[key_len + 1..];
            let value = self.entry_value(indent, number, rest, key_col + key_len + 1)?;
            entries.push((key, value));
            skip = 0;
            match self.next_line() {
                Some(i) if self.lines[i].kind == Kind::Content => {
                    let l = &self.lines[i];
                    if l.indent < indent {
                        break;
                    }
                    if l.indent > indent || is_item(l.content) {
                        return Err(GiveUp);
                    }
                    self.at = i;
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Ok(Node {
            value: Value::Map(entries),
            pos,
        })
    }

    /// What follows `key:` on line `at` (`rest`, from column `rest_col`),
    /// and under it: a node, or null at the colon. Leaves `at` after it.
    fn entry_value(
        &mut self,
        indent: usize,
        number: u32,
        rest: &str,
        rest_col: usize,
    ) -> Fast<Node> {
        let trimmed = rest.trim_start_matches(' ');
        if trimmed.is_empty() || (trimmed.starts_with('#') && trimmed.len() < rest.len()) {
            self.at += 1;
            let below = self.next_line().filter(|&i| {
                let l = &self.lines[i];
                l.kind == Kind::Content
                    && (l.indent > indent || (l.indent == indent && is_item(l.content)))
            });
            let Some(i) = below else {
                self.count()?;
                return Ok(Node {
                    value: Value::Null,
                    pos: Pos {
                        line: number,
                        col: col(rest_col - 1),
                    },
                });
            };
            self.at = i;
            let l = &self.lines[i];
            return self.block_node(l.indent, l.indent == indent);
        }
        if trimmed.len() == rest.len() {
            return Err(GiveUp);
        }
        let start = rest_col + (rest.len() - trimmed.len());
        let node = self.inline_value(number, trimmed, start)?;
        self.at += 1;
        Ok(node)
    }

    /// A value that is all on line `number` from column `at`.
    fn inline_value(&mut self, number: u32, text: &str, at: usize) -> Fast<Node> {
        let mut cursor = Cursor {
            text,
            at: 0,
            line: number,
            col0: at,
        };
        let node = match text.as_bytes()[0] {
            b'[' | b'{' => self.flow(&mut cursor)?,
            b'"' | b'\'' => {
                self.count()?;
                cursor.quoted()?
            }
            _ => {
                self.count()?;
                let plain = block_plain(text)?;
                cursor.at = plain.len();
                Node {
                    value: scalar(plain, true),
                    pos: cursor.pos(0),
                }
            }
        };
        cursor.end_of_line()?;
        Ok(node)
    }

    /// Items whose dashes are at column `indent`: `- ` and a scalar, a
    /// flow collection or the first entry of a mapping. Leaves `at` after
    /// its last line.
    fn block_sequence(&mut self, indent: usize, indentless: bool) -> Fast<Node> {
        self.enter()?;
        self.count()?;
        let mut items = Vec::new();
        let mut pos = None;
        loop {
            let line = &self.lines[self.at];
            let number = line.number;
            let after_dash = &line.content[1..];
            let item = after_dash.trim_start_matches(' ');
            if item.is_empty() || item.starts_with('#') || item.starts_with('-') {
                return Err(GiveUp);
            }
            let skip = 1 + after_dash.len() - item.len();
            let item_col = indent + skip;
            pos.get_or_insert(Pos {
                line: number,
                col: col(if indentless { item_col } else { indent }),
            });
            if key_length(item).is_some() {
                items.push(self.block_mapping(item_col, skip)?);
            } else {
                items.push(self.inline_value(number, item, item_col)?);
                self.at += 1;
            }
            match self.next_line() {
                Some(i) if self.lines[i].kind == Kind::Content => {
                    let l = &self.lines[i];
                    if l.indent < indent || (l.indent == indent && !is_item(l.content)) {
                        break;
                    }
                    if l.indent > indent {
                        return Err(GiveUp);
                    }
                    self.at = i;
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Ok(Node {
            value: Value::Seq(items),
            pos: pos.ok_or(GiveUp)?,
        })
    }

    /// A one-line flow collection at the cursor.
    fn flow(&mut self, c: &mut Cursor<'_>) -> Fast<Node> {
        self.enter()?;
        self.count()?;
        let pos = c.pos(c.at);
        let open = c.bump();
        let close = if open == b'[' { b']' } else { b'}' };
        let mut children = Vec::new();
        let mut entries = Vec::new();
        let mut keys = None;
        c.spaces();
        if c.peek() == Some(close) {
            c.bump();
        } else {
            loop {
                if open == b'[' {
                    children.push(self.flow_node(c)?);
                } else {
                    let key_at = c.at;
                    let len = key_length(c.rest()).ok_or(GiveUp)?;
                    let k = &c.text[key_at..key_at + len];
                    if is_null(k) || is_duplicate(&entries, &mut keys, k) {
                        return Err(GiveUp);
                    }
                    self.count()?;
                    let key = Node {
                        value: scalar(k, true),
                        pos: c.pos(key_at),
                    };
                    c.at += len + 1;
                    if c.peek() != Some(b' ') {
                        return Err(GiveUp);
                    }
                    c.spaces();
                    entries.push((key, self.flow_node(c)?));
                }
                c.spaces();
                match c.peek() {
                    Some(b',') => {
                        c.bump();
                        c.spaces();
                        // A trailing comma, or a comma at the line's end.
                        if matches!(c.peek(), None | Some(b']' | b'}' | b',')) {
                            return Err(GiveUp);
                        }
                    }
                    Some(b) if b == close => {
                        c.bump();
                        break;
                    }
                    _ => return Err(GiveUp),
                }
            }
        }
        self.depth -= 1;
        let value = if open == b'[' {
            Value::Seq(children)
        } else {
            Value::Map(entries)
        };
        Ok(Node { value, pos })
    }

    fn flow_node(&mut self, c: &mut Cursor<'_>) -> Fast<Node> {
        match c.peek() {
            Some(b'[' | b'{') => self.flow(c),
            Some(b'"' | b'\'') => {
                self.count()?;
                c.quoted()
            }
            Some(_) => {
                self.count()?;
                let start = c.at;
                let len = flow_plain_length(c.rest()).ok_or(GiveUp)?;
                c.at += len;
                Ok(Node {
                    value: scalar(&c.text[start..start + len], true),
                    pos: c.pos(start),
                })
            }
            None => Err(GiveUp),
        }
    }
}

fn empty_document(pos: Pos) -> Document {
    Document {
        root: Node {
            value: Value::Null,
            pos,
        },
    }
}

/// A 0-based column as a position's 1-based one.
fn col(c: usize) -> u32 {
    u32::try_from(c + 1).unwrap_or(u32::MAX)
}

fn scalar(text: &str, plain: bool) -> Value {
    if plain && is_null(text) {
        Value::Null
    } else {
        Value::Scalar {
            text: text.to_owned(),
            plain,
        }
    }
}

/// `- ` or a lone `-`: a block sequence item.
fn is_item(content: &str) -> bool {
    content == "-" || content.starts_with("- ")
}

/// A mapping key in the subset: a name of letters, digits and `_ . / -`
/// (not first), then `:` and a space or the end. Its length.
fn key_length(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let first = *b.first()?;
    if !(first.is_ascii_alphanumeric() || first == b'_' || first == b'.' || first == b'/') {
        return None;
    }
    let len = b
        .iter()
        .position(|&c| !(c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'/' | b'-')))
        .unwrap_or(b.len());
    // YAML looks no further than 1024 characters for an implicit key's `:`.
    let key = b.get(len) == Some(&b':') && matches!(b.get(len + 1), None | Some(b' '));
    (key && len <= MAX_KEY).then_some(len)
}

/// A plain scalar that is a block value: up to a comment or the line's
/// end, without trailing spaces; it may not start with an indicator nor
/// hold `: ` or end with `:`.
fn block_plain(s: &str) -> Fast<&str> {
    let b = s.as_bytes();
    if b"-?:,[]{}#&*!|>'\"%@`".contains(&b[0]) {
        // `-` and `:` may start one when not followed by a space; leave
        // those to the event parser too.
        return Err(GiveUp);
    }
    let end = s.find(" #").unwrap_or(s.len());
    let text = s[..end].trim_end_matches(' ');
    if text.contains(": ") || text.ends_with(':') {
        return Err(GiveUp);
    }
    Ok(text)
}

/// A plain scalar in a flow collection: letters, digits and `_ . / - *`
/// after a first letter, digit, `_`, `.` or `/`. Its length.
fn flow_plain_length(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let first = *b.first()?;
    if !(first.is_ascii_alphanumeric() || matches!(first, b'_' | b'.' | b'/')) {
        return None;
    }
    let len = b
        .iter()
        .position(|&c| {
            !(c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'/' | b'-' | b'*'))
        })
        .unwrap_or(b.len());
    // Followed by what ends a flow node, not by more of a longer scalar.
    matches!(b.get(len), None | Some(b',' | b']' | b'}' | b' ')).then_some(len)
}

/// Reads one line's value from `text`, which starts at column `col0`.
struct Cursor<'a> {
    text: &'a str,
    at: usize,
    line: u32,
    col0: usize,
}

impl Cursor<'_> {
    fn pos(&self, at: usize) -> Pos {
        Pos {
            line: self.line,
            col: col(self.col0 + at),
        }
    }

    fn rest(&self) -> &str {
        &self.text[self.at..]
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn bump(&mut self) -> u8 {
        let b = self.text.as_bytes()[self.at];
        self.at += 1;
        b
    }

    fn spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.at += 1;
        }
    }

    /// A quoted scalar without escapes that ends on its line.
    fn quoted(&mut self) -> Fast<Node> {
        let start = self.at;
        let quote = self.bump();
        let len = self.rest().find(quote as char).ok_or(GiveUp)?;
        let text = &self.text[self.at..self.at + len];
        if quote == b'"' && text.contains('\\') {
            return Err(GiveUp);
        }
        self.at += len + 1;
        if quote == b'\'' && self.peek() == Some(b'\'') {
            return Err(GiveUp);
        }
        Ok(Node {
            value: scalar(text, false),
            pos: self.pos(start),
        })
    }

    /// Only spaces and a comment may follow a value on its line.
    fn end_of_line(&mut self) -> Fast<()> {
        let before = self.at;
        self.spaces();
        match self.peek() {
            None => Ok(()),
            Some(b'#') if self.at > before => Ok(()),
            _ => Err(GiveUp),
        }
    }
}
