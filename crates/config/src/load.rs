//! Reads files and folders of multi-document YAML into a [`Config`].
//!
//! Three outcomes, kept apart because operators act on them differently:
//! unreadable input or broken YAML is a [`LoadError`] (nothing is loaded);
//! a resource that breaks its schema is an IST0106 diagnostic and is left out;
//! a kind we do not read is a warning and is skipped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::diag::{Diagnostic, Level, Origin};
use crate::model::common::Opaque;
use crate::model::kube::{
    DeploymentSpec, EndpointSliceFields, NamespaceSpec, ObjectMeta, PodSpec, ServiceSpec,
};
use crate::model::{Config, Kind, Meta, Resource, SourceRef, WorkloadTemplate};
use crate::model::{networking, security};
use crate::validate;
use crate::yaml::{self, Node, Pos, Value};

/// meshgate's code for an object of a kind it does not read (skipped).
pub const SKIPPED_KIND: &str = "MG0003";

/// Input that cannot be read or parsed at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // The I/O error is part of the message, not a separate cause: shown
    // once whichever way the error is printed.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{file}:{pos}: YAML syntax error: {message}")]
    Syntax {
        file: String,
        pos: Pos,
        message: String,
    },
    #[error("{path}: no .yaml or .yml files found")]
    Empty { path: PathBuf },
}

/// The loaded config plus what was found wrong on the way.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every resource that could be read, also those with errors (for the
    /// analyzers): run it only when `has_errors` is false.
    pub config: Config,
    pub diagnostics: Vec<Diagnostic>,
    /// Where each resource loaded so far was defined, to find duplicates
    /// without scanning everything (a scan per resource is quadratic).
    defined: std::collections::HashMap<(Kind, String, String), (Arc<str>, u32)>,
}

impl Loaded {
    /// True when a resource was refused (schema error): a running proxy must
    /// not start from, or switch to, such a config.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(|d| d.level == Level::Error)
    }

    /// The errors, as `meshgate check` prints them.
    pub fn error_messages(&self) -> Vec<String> {
        self.diagnostics
            .iter()
            .filter(|d| d.level == Level::Error)
            .map(ToString::to_string)
            .collect()
    }
}

/// Loads files and folders (recursively, `.yaml`/`.yml`, in name order).
/// Files are parsed and decoded in parallel ([`decode_files`]) and added
/// in order, so the result (and the first error) is what a file-by-file
/// load gives.
pub fn load_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Loaded, LoadError> {
    let files = files_to_load(paths)?;
    let mut loaded = Loaded::default();
    for objects in decode_files(&files) {
        for object in objects? {
            add(object, &mut loaded);
        }
    }
    Ok(loaded)
}

/// The files `load_paths` reads, in order, each with the name its
/// messages show.
fn files_to_load<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<(PathBuf, String)>, LoadError> {
    let mut out = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|error| LoadError::Io {
            path: path.to_owned(),
            error,
        })?;
        if !meta.is_dir() {
            out.push((path.to_owned(), path.display().to_string()));
            continue;
        }
        let mut files = Vec::new();
        collect_yaml(path, &mut files)?;
        if files.is_empty() {
            return Err(LoadError::Empty {
                path: path.to_owned(),
            });
        }
        for file in files {
            // Shown relative to the folder the user named, as istioctl
            // does; with several paths, with that folder in front, so
            // that two folders' `a.yaml` stay apart.
            let shown = if paths.len() > 1 {
                file.display().to_string()
            } else {
                file.strip_prefix(path)
                    .unwrap_or(&file)
                    .display()
                    .to_string()
            };
            out.push((file, shown));
        }
    }
    Ok(out)
}

/// Reads, parses and decodes every file, on as many threads as there are
/// cores (YAML parsing is most of a large config's load time, and files
/// parse independently); a large file in parts of whole documents, so one
/// file is not one thread's work. Results come back in file order.
fn decode_files(files: &[(PathBuf, String)]) -> Vec<Result<Vec<Decoded>, LoadError>> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut out: Vec<Result<Vec<Decoded>, LoadError>> = Vec::with_capacity(files.len());
    let mut texts = Vec::with_capacity(files.len());
    for (path, _) in files {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                out.push(Ok(Vec::new()));
                texts.push(text);
            }
            Err(error) => {
                let path = path.to_owned();
                out.push(Err(LoadError::Io { path, error }));
                texts.push(String::new());
            }
        }
    }
    // (file, part of its text, lines before the part).
    let mut items = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        if out[i].is_err() {
            continue;
        }
        if cores > 1 {
            let parts = yaml::document_parts(text, PART_BYTES);
            items.extend(parts.into_iter().map(|(range, lines)| (i, range, lines)));
        } else {
            items.push((i, 0..text.len(), 0));
        }
    }
    let decoded = on_threads(cores.min(items.len()), &items, |(i, range, lines)| {
        decode_part(&files[*i].1, &texts[*i][range.clone()], *lines)
    });
    // Each file's parts in order. A part that does not parse sends its
    // file to the parser whole: whatever a parser makes of YAML that puts
    // a `---` line where the spec forbids one, the file's outcome is the
    // one it has parsed whole.
    let mut failed = vec![false; files.len()];
    for ((i, _, _), part) in items.iter().zip(decoded) {
        match (&mut out[*i], part) {
            (Ok(objects), Ok(more)) => objects.extend(more),
            (slot @ Ok(_), Err(e)) => {
                *slot = Err(e);
                failed[*i] = true;
            }
            (Err(_), _) => {}
        }
    }
    for (i, _) in failed.iter().enumerate().filter(|(_, f)| **f) {
        out[i] = decode_str(&files[i].1, &texts[i]);
    }
    out
}

/// Parts of about this size parse on threads of their own.
const PART_BYTES: usize = 256 * 1024;

/// `f` of every item, on `threads` threads (the calling one too), in the
/// items' order.
fn on_threads<T: Sync, R: Send + Sync>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let slots: Vec<OnceLock<R>> = items.iter().map(|_| OnceLock::new()).collect();
    let work = || {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let (Some(item), Some(slot)) = (items.get(i), slots.get(i)) else {
                break;
            };
            let _ = slot.set(f(item));
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            // A thread that cannot start leaves its share to the others.
            let _ = std::thread::Builder::new()
                .name("meshgate-parse".into())
                .spawn_scoped(scope, work);
        }
        work();
    });
    slots
        .into_iter()
        .map(|slot| slot.into_inner().expect("every item was done"))
        .collect()
}

/// A hash of what `load_paths` would read: file names and contents. A
/// running proxy polls it to notice edits (including ones that keep the
/// size and modification time, as `kubectl cp` or a fast editor may).
pub fn fingerprint<P: AsRef<Path>>(paths: &[P]) -> Result<u64, LoadError> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for path in paths {
        let path = path.as_ref();
        let mut files = Vec::new();
        if path.is_dir() {
            collect_yaml(path, &mut files)?;
        } else {
            files.push(path.to_owned());
        }
        for file in files {
            let bytes = std::fs::read(&file).map_err(|error| LoadError::Io {
                path: file.clone(),
                error,
            })?;
            file.hash(&mut h);
            bytes.hash(&mut h);
        }
    }
    Ok(h.finish())
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let io = |error| LoadError::Io {
        path: dir.to_owned(),
        error,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            collect_yaml(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

/// Loads one file's text; `file` is the name used in messages.
pub fn load_str(file: &str, text: &str, loaded: &mut Loaded) -> Result<(), LoadError> {
    for object in decode_str(file, text)? {
        add(object, loaded);
    }
    Ok(())
}

/// One file's objects, in order.
fn decode_str(file: &str, text: &str) -> Result<Vec<Decoded>, LoadError> {
    decode_part(file, text, 0)
}

/// The objects of a part of a file that starts after `lines_before` of its
/// lines, in order.
fn decode_part(file: &str, text: &str, lines_before: u32) -> Result<Vec<Decoded>, LoadError> {
    let docs = yaml::parse_documents_at(text, lines_before).map_err(|e| LoadError::Syntax {
        file: file.to_owned(),
        pos: e.pos,
        message: e.message,
    })?;
    let file: Arc<str> = Arc::from(file);
    let mut objects = Vec::with_capacity(docs.len());
    for doc in docs {
        match &doc.root.value {
            Value::Null => {}
            _ if doc.root.get("kind").and_then(Node::as_str) == Some("List") => {
                // `kubectl get -o yaml` output: a v1 List of objects.
                if let Some(Value::Seq(items)) = doc.root.get("items").map(|n| &n.value) {
                    for item in items {
                        objects.push(decode(&file, Arc::new(item.clone())));
                    }
                }
            }
            _ => objects.push(decode(&file, Arc::new(doc.root))),
        }
    }
    Ok(objects)
}

/// The envelope every namespaced object shares. `spec` defaults to empty, as
/// the API server treats an absent spec.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    bound(deserialize = "S: DeserializeOwned + Default")
)]
struct Envelope<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: S,
    /// Read for a ServiceEntry's allocated addresses; otherwise ignored.
    #[serde(default)]
    status: Option<StatusDoc>,
}

/// A resource's `status`: only `addresses` is read (a ServiceEntry's,
/// allocated by Istio).
#[derive(Debug, Default, Deserialize)]
struct StatusDoc {
    #[serde(default)]
    addresses: Vec<StatusAddress>,
}

#[derive(Debug, Default, Deserialize)]
struct StatusAddress {
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceAccountEnvelope {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[allow(dead_code)]
    #[serde(default)]
    secrets: Option<Opaque>,
    #[allow(dead_code)]
    #[serde(default)]
    image_pull_secrets: Option<Opaque>,
    #[allow(dead_code)]
    #[serde(default)]
    automount_service_account_token: Option<bool>,
}

/// An EndpointSlice: its fields sit beside `metadata`, not under `spec`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EndpointSliceEnvelope {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    address_type: String,
    #[serde(default)]
    endpoints: Vec<crate::model::kube::SliceEndpoint>,
    #[serde(default)]
    ports: Vec<crate::model::kube::SlicePort>,
}

/// An object as its YAML decodes, before it joins the config. Decoding
/// reads nothing loaded before it, so files decode in parallel; joining
/// (duplicates, validation) goes in file order.
enum Decoded {
    /// Left out, as the diagnostic says.
    Refused(Diagnostic),
    /// Boxed: some specs are over a kilobyte, most objects far less.
    Object(Meta, Box<Spec>),
}

/// A decoded object's kind-specific part.
#[expect(
    clippy::large_enum_variant,
    reason = "boxed whole in `Decoded`, for the moment between decoding and adding"
)]
enum Spec {
    Namespace,
    ServiceAccount,
    EndpointSlice(EndpointSliceFields),
    Service(ServiceSpec),
    Workload(WorkloadTemplate),
    ServiceEntry(networking::ServiceEntry),
    VirtualService(networking::VirtualService),
    DestinationRule(networking::DestinationRule),
    Gateway(networking::Gateway),
    Sidecar(networking::Sidecar),
    AuthorizationPolicy(security::AuthorizationPolicy),
    PeerAuthentication(security::PeerAuthentication),
    RequestAuthentication(security::RequestAuthentication),
}

/// IST0106, Istio's schema validation error.
fn schema_error(
    kind: &str,
    name: String,
    file: &Arc<str>,
    line: u32,
    message: String,
) -> Diagnostic {
    Diagnostic::new(
        Level::Error,
        "IST0106",
        Origin {
            kind: kind.to_owned(),
            name,
            file: file.clone(),
            line,
        },
        format!("Schema validation error: {message}"),
    )
}

fn decode(file: &Arc<str>, node: Arc<Node>) -> Decoded {
    let text_of = |path: &str| node.locate(path).as_str().unwrap_or("").to_owned();
    let api_version = text_of("apiVersion");
    let kind_name = text_of("kind");
    let name = text_of("metadata.name");
    let declared_ns = text_of("metadata.namespace");
    let source = SourceRef {
        file: file.clone(),
        line: node.pos.line,
        node: node.clone(),
    };
    let refused = |kind: &str, name: String, line: u32, message: String| {
        Decoded::Refused(schema_error(kind, name, file, line, message))
    };

    if !matches!(node.value, Value::Map(_)) || api_version.is_empty() || kind_name.is_empty() {
        let kind = if kind_name.is_empty() {
            "<unknown kind>"
        } else {
            &kind_name
        };
        let missing = if api_version.is_empty() {
            "apiVersion"
        } else {
            "kind"
        };
        return refused(
            kind,
            name,
            node.pos.line,
            format!("not a Kubernetes object: required field \"{missing}\" is missing"),
        );
    }
    let kind = match Kind::resolve(&api_version, &kind_name) {
        Ok(Some(kind)) => kind,
        Ok(None) => {
            // A typo in a kind must not silently drop the object (a
            // mistyped VirtualService would let traffic past the gateway).
            if let Some(message) = Kind::unknown_in_known_group(&api_version, &kind_name) {
                let full_name = match declared_ns.as_str() {
                    "" => name,
                    ns => format!("{ns}/{name}"),
                };
                return refused(&kind_name, full_name, source.line_of("kind"), message);
            }
            return Decoded::Refused(Diagnostic {
                level: Level::Warning,
                code: Some(SKIPPED_KIND),
                origin: Origin {
                    kind: kind_name.clone(),
                    name,
                    file: file.clone(),
                    line: node.pos.line,
                },
                message: format!("skipped: meshgate does not read {kind_name} ({api_version})"),
            });
        }
        Err(message) => {
            return refused(&kind_name, name, source.line_of("apiVersion"), message);
        }
    };
    let namespace = match (kind.namespaced(), declared_ns.is_empty()) {
        (false, _) => String::new(),
        (true, true) => "default".to_owned(),
        (true, false) => declared_ns,
    };
    let full_name = if namespace.is_empty() {
        name.clone()
    } else {
        format!("{namespace}/{name}")
    };

    let meta = |m: ObjectMeta| Meta {
        kind,
        api_version: api_version.clone(),
        name: m.name,
        namespace: namespace.clone(),
        labels: m.labels,
        annotations: m.annotations,
        source: source.clone(),
    };
    let decoded = match kind {
        Kind::Namespace => {
            typed::<NamespaceSpec>(&node).map(|e| (meta(e.metadata), Spec::Namespace))
        }
        Kind::ServiceAccount => yaml::from_node::<ServiceAccountEnvelope>(&node)
            .map(|e| (meta(e.metadata), Spec::ServiceAccount)),
        Kind::EndpointSlice => yaml::from_node::<EndpointSliceEnvelope>(&node).map(|e| {
            let fields = EndpointSliceFields {
                address_type: e.address_type,
                endpoints: e.endpoints,
                ports: e.ports,
            };
            (meta(e.metadata), Spec::EndpointSlice(fields))
        }),
        Kind::Service => {
            typed::<ServiceSpec>(&node).map(|e| (meta(e.metadata), Spec::Service(e.spec)))
        }
        Kind::Pod => typed::<PodSpec>(&node).map(|e| {
            let template = WorkloadTemplate {
                pod_labels: e.metadata.labels.clone(),
                pod_annotations: e.metadata.annotations.clone(),
                selector: e.metadata.labels.clone(),
                pod: e.spec,
            };
            (meta(e.metadata), Spec::Workload(template))
        }),
        Kind::Deployment => typed::<DeploymentSpec>(&node).map(|e| {
            let template = WorkloadTemplate {
                pod_labels: e.spec.template.metadata.labels,
                pod_annotations: e.spec.template.metadata.annotations,
                selector: e.spec.selector.map(|s| s.match_labels).unwrap_or_default(),
                pod: e.spec.template.spec,
            };
            (meta(e.metadata), Spec::Workload(template))
        }),
        Kind::ServiceEntry => typed(&node).map(|e| {
            let mut spec: networking::ServiceEntry = e.spec;
            spec.allocated_addresses = e
                .status
                .map(|s| s.addresses.into_iter().map(|a| a.value).collect())
                .unwrap_or_default();
            (meta(e.metadata), Spec::ServiceEntry(spec))
        }),
        Kind::VirtualService => {
            typed(&node).map(|e| (meta(e.metadata), Spec::VirtualService(e.spec)))
        }
        Kind::DestinationRule => {
            typed(&node).map(|e| (meta(e.metadata), Spec::DestinationRule(e.spec)))
        }
        Kind::Gateway => typed(&node).map(|e| (meta(e.metadata), Spec::Gateway(e.spec))),
        Kind::Sidecar => typed(&node).map(|e| (meta(e.metadata), Spec::Sidecar(e.spec))),
        Kind::AuthorizationPolicy => {
            typed(&node).map(|e| (meta(e.metadata), Spec::AuthorizationPolicy(e.spec)))
        }
        Kind::PeerAuthentication => {
            typed(&node).map(|e| (meta(e.metadata), Spec::PeerAuthentication(e.spec)))
        }
        Kind::RequestAuthentication => {
            typed(&node).map(|e| (meta(e.metadata), Spec::RequestAuthentication(e.spec)))
        }
    };
    match decoded {
        Ok((meta, spec)) => Decoded::Object(meta, Box::new(spec)),
        Err(e) => {
            let line = e.pos.map_or(node.pos.line, |p| p.line);
            let col = e.pos.map_or(node.pos.col, |p| p.col);
            refused(
                kind.as_str(),
                full_name,
                line,
                format!("{e} (column {col})"),
            )
        }
    }
}

/// Adds a decoded object to the config, in file order: a second definition
/// of an object is refused, and what is added is validated.
fn add(decoded: Decoded, loaded: &mut Loaded) {
    let (meta, spec) = match decoded {
        Decoded::Refused(diagnostic) => return loaded.diagnostics.push(diagnostic),
        Decoded::Object(meta, spec) => (meta, spec),
    };
    let (kind, full_name, source) = (meta.kind, meta.full_name(), meta.source.clone());
    let error = |line: u32, message: String| {
        schema_error(
            kind.as_str(),
            full_name.clone(),
            &source.file,
            line,
            message,
        )
    };
    let key = (kind, meta.namespace.clone(), meta.name.clone());
    if let Some((file, line)) = loaded.defined.get(&key) {
        let message = format!("duplicate {kind} {full_name}: also defined at {file}:{line}");
        loaded.diagnostics.push(error(source.line, message));
        return;
    }
    loaded
        .defined
        .insert(key, (source.file.clone(), source.line));
    let c = &mut loaded.config;
    match *spec {
        Spec::Namespace => push(&mut c.namespaces, meta, ()),
        Spec::ServiceAccount => push(&mut c.service_accounts, meta, ()),
        Spec::EndpointSlice(s) => push(&mut c.endpoint_slices, meta, s),
        Spec::Service(s) => push(&mut c.services, meta, s),
        Spec::Workload(s) => push(&mut c.workloads, meta, s),
        Spec::ServiceEntry(s) => push(&mut c.service_entries, meta, s),
        Spec::VirtualService(s) => push(&mut c.virtual_services, meta, s),
        Spec::DestinationRule(s) => push(&mut c.destination_rules, meta, s),
        Spec::Gateway(s) => push(&mut c.gateways, meta, s),
        Spec::Sidecar(s) => push(&mut c.sidecars, meta, s),
        Spec::AuthorizationPolicy(s) => push(&mut c.authorization_policies, meta, s),
        Spec::PeerAuthentication(s) => push(&mut c.peer_authentications, meta, s),
        Spec::RequestAuthentication(s) => push(&mut c.request_authentications, meta, s),
    }
    // Semantic validation of what was just added. A resource with errors
    // stays for the analyzers (istioctl analyze reports IST0106 and still
    // analyses it), and its errors keep every proxy from running the config
    // (`Loaded::has_errors`): nothing acts on it.
    for (path, message) in validate::last_added(&loaded.config, kind) {
        let message = if path.is_empty() {
            message
        } else {
            format!("{path}: {message}")
        };
        loaded
            .diagnostics
            .push(error(source.line_of(&path), message));
    }
}

fn typed<S: DeserializeOwned + Default>(node: &Node) -> Result<Envelope<S>, yaml::DeError> {
    yaml::from_node(node)
}

fn push<T>(list: &mut Vec<Resource<T>>, meta: Meta, spec: T) {
    list.push(Resource { meta, spec });
}

#[cfg(test)]
mod tests;
