//! `meshgate check`: load, validate, analyze, report.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use meshgate_config::diag::DiagnosticJson;
use meshgate_config::{Level, LoadError, Loaded, analyze, load_paths};

use crate::{CheckArgs, EXIT_ANALYSIS_ERROR, EXIT_BAD_INPUT, Output, Threshold};

pub(crate) fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let loaded = match load(&args.paths) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
    };
    // Nothing at all (an empty file, /dev/null): as an empty folder.
    if loaded.config.metas().next().is_none() && loaded.diagnostics.is_empty() {
        let paths: Vec<String> = args.paths.iter().map(|p| p.display().to_string()).collect();
        eprintln!("error: {}: no objects to check", paths.join(", "));
        return Ok(ExitCode::from(EXIT_BAD_INPUT));
    }
    let mesh = args.mesh.load()?;
    // What the files hold, before the defaults analysis assumes.
    let summary = loaded.config.summary();
    let mut loaded = loaded;
    add_default_ingress(&mut loaded, &mesh);
    let mut diagnostics = loaded.diagnostics.clone();
    diagnostics.extend(analyze::analyze(&loaded.config, &mesh));
    let fails = |level: Level| match args.failure_threshold {
        Threshold::Error => level == Level::Error,
        Threshold::Warning => level != Level::Info,
        Threshold::Info => true,
    };
    let failed = diagnostics.iter().any(|d| fails(d.level));

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.output {
        Output::Json => {
            let json: Vec<DiagnosticJson> = diagnostics.iter().map(DiagnosticJson::from).collect();
            serde_json::to_writer_pretty(&mut out, &json).context("writing JSON")?;
            writeln!(out)?;
            eprintln!("Loaded {summary}.");
        }
        Output::Text => {
            for d in &diagnostics {
                writeln!(out, "{d}")?;
            }
            if diagnostics.is_empty() {
                writeln!(out, "✔ No validation issues found.")?;
            }
            writeln!(out, "Loaded {summary}.")?;
        }
    }
    // The process exits next: freeing the model one allocation at a time
    // would only delay it (~25 ms at 10,000 hosts).
    std::mem::forget(loaded);
    std::mem::forget(diagnostics);
    Ok(if failed {
        ExitCode::from(EXIT_ANALYSIS_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

/// What istioctl analyze assumes of a cluster when it reads only files: the
/// default ingress gateway (a pod labelled `istio: ingressgateway` and its
/// Service, ports 80, 443, 31400 and 15443, in the root namespace), so that
/// Gateways selecting it are not reported as selecting nothing. Added only
/// for analysis, and only when the files do not define that Service.
fn add_default_ingress(loaded: &mut meshgate_config::Loaded, mesh: &meshgate_config::MeshSettings) {
    let ns = &mesh.root_namespace;
    let defined = loaded
        .config
        .services
        .iter()
        .any(|s| s.meta.namespace == *ns && s.meta.name == "istio-ingressgateway");
    if defined {
        return;
    }
    let text = format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: istio-ingressgateway-default
  namespace: {ns}
  labels: {{istio: ingressgateway}}
spec:
  containers: [{{name: istio-proxy}}]
---
apiVersion: v1
kind: Service
metadata:
  name: istio-ingressgateway
  namespace: {ns}
spec:
  selector: {{istio: ingressgateway}}
  ports:
  - {{name: http2, port: 80, targetPort: 80}}
  - {{name: https, port: 443, targetPort: 443}}
  - {{name: tcp, port: 31400, targetPort: 31400}}
  - {{name: tls, port: 15443, targetPort: 15443}}
"
    );
    // Our own text: it reads, or it is a bug the tests catch.
    let _ = meshgate_config::load::load_str("(default ingress gateway)", &text, loaded);
}

/// The paths, `-` being standard input (shown as `stdin`).
fn load(paths: &[std::path::PathBuf]) -> Result<Loaded, LoadError> {
    let (stdin, files): (Vec<_>, Vec<_>) = paths.iter().partition(|p| p.as_os_str() == "-");
    let mut loaded = if files.is_empty() {
        Loaded::default()
    } else {
        load_paths(&files)?
    };
    if !stdin.is_empty() {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|error| {
            LoadError::Io {
                path: "stdin".into(),
                error,
            }
        })?;
        meshgate_config::load::load_str("stdin", &text, &mut loaded)?;
    }
    Ok(loaded)
}
