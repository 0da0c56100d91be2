//! `meshgate check`: load, validate, analyze, report.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use meshgate_config::diag::DiagnosticJson;
use meshgate_config::{Level, analyze, load_paths};

use crate::{CheckArgs, EXIT_ANALYSIS_ERROR, EXIT_BAD_INPUT, Output};

pub(crate) fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let loaded = match load_paths(&args.paths) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
    };
    let mesh = args.mesh.load()?;
    let mut diagnostics = loaded.diagnostics.clone();
    diagnostics.extend(analyze::analyze(&loaded.config, &mesh));
    let failed = diagnostics.iter().any(|d| d.level == Level::Error);

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.output {
        Output::Json => {
            let json: Vec<DiagnosticJson> = diagnostics.iter().map(DiagnosticJson::from).collect();
            serde_json::to_writer_pretty(&mut out, &json).context("writing JSON")?;
            writeln!(out)?;
            eprintln!("Loaded {}.", loaded.config.summary());
        }
        Output::Text => {
            for d in &diagnostics {
                writeln!(out, "{d}")?;
            }
            if diagnostics.is_empty() {
                writeln!(out, "✔ No validation issues found.")?;
            }
            writeln!(out, "Loaded {}.", loaded.config.summary())?;
        }
    }
    Ok(if failed {
        ExitCode::from(EXIT_ANALYSIS_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}
