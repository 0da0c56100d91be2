//! Diagnostics in `istioctl analyze`'s shape: a level, an IST code, the
//! resource it is about with file and line, and a message.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::model::Meta;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    Error,
    Warning,
    Info,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "Error",
            Level::Warning => "Warning",
            Level::Info => "Info",
        }
    }
}

/// The resource a diagnostic is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub kind: String,
    /// `namespace/name` (or `name` for cluster-scoped kinds).
    pub name: String,
    pub file: Arc<str>,
    pub line: u32,
}

impl Origin {
    pub fn of(meta: &Meta) -> Self {
        Origin {
            kind: meta.kind.to_string(),
            name: meta.full_name(),
            file: meta.source.file.clone(),
            line: meta.source.line,
        }
    }

    /// The same resource, pointing at the line of one of its fields.
    pub fn at_field(meta: &Meta, path: &str) -> Self {
        Origin {
            line: meta.source.line_of(path),
            ..Origin::of(meta)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub level: Level,
    /// An istioctl analysis code; `None` for meshgate's own notices (such as a
    /// skipped unknown kind), which have no istioctl equivalent.
    pub code: Option<&'static str>,
    pub origin: Origin,
    pub message: String,
}

impl Diagnostic {
    pub fn new(
        level: Level,
        code: &'static str,
        origin: Origin,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            level,
            code: Some(code),
            origin,
            message: message.into(),
        }
    }

    pub fn documentation_url(&self) -> Option<String> {
        self.code.map(|c| {
            format!(
                "https://istio.io/latest/docs/reference/config/analysis/{}/",
                c.to_ascii_lowercase()
            )
        })
    }
}

impl fmt::Display for Diagnostic {
    /// `Warning [IST0128] (DestinationRule ns/name file.yaml:1) message`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.level.as_str())?;
        if let Some(code) = self.code {
            write!(f, " [{code}]")?;
        }
        let o = &self.origin;
        write!(
            f,
            " ({} {} {}:{}) {}",
            o.kind, o.name, o.file, o.line, self.message
        )
    }
}

/// JSON shape of `istioctl analyze -o json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiagnosticJson {
    pub code: String,
    pub level: &'static str,
    pub origin: String,
    pub reference: String,
    pub message: String,
    pub documentation_url: String,
}

impl From<&Diagnostic> for DiagnosticJson {
    fn from(d: &Diagnostic) -> Self {
        DiagnosticJson {
            code: d.code.unwrap_or("").to_owned(),
            level: d.level.as_str(),
            origin: format!("{} {}", d.origin.kind, d.origin.name),
            reference: format!("{}:{}", d.origin.file, d.origin.line),
            message: d.message.clone(),
            documentation_url: d.documentation_url().unwrap_or_default(),
        }
    }
}
