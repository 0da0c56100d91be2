//! Commands for running meshgate on Kubernetes.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;

/// `meshgate crds`: the CustomResourceDefinitions, as YAML on stdout.
pub(crate) fn crds() -> anyhow::Result<ExitCode> {
    let yaml = meshgate_kube::crds_yaml().map_err(anyhow::Error::msg)?;
    match std::io::stdout().write_all(yaml.as_bytes()) {
        // `meshgate crds | head` is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        r => r.context("writing to stdout").map(|()| ExitCode::SUCCESS),
    }
}
