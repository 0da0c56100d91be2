//! Commands for running meshgate on Kubernetes.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub(crate) struct KubeInjectArgs {
    /// The manifests (`-` for stdin): Pods, Deployments, StatefulSets,
    /// DaemonSets, ReplicaSets and Jobs are injected; the rest pass through.
    #[arg(short, long = "filename", value_name = "FILE")]
    file: PathBuf,
    /// The meshgate image for the init and proxy containers.
    #[arg(long, default_value = concat!("meshgate:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// `meshgate control`'s port 15012 as the pods reach it.
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "meshgate-control.meshgate-system.svc:15012"
    )]
    control_plane: String,
}

/// `meshgate kube-inject`: the manifests with the proxy injected, on stdout.
pub(crate) fn kube_inject(args: &KubeInjectArgs) -> anyhow::Result<ExitCode> {
    let mut input = String::new();
    if args.file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading stdin")?;
    } else {
        input = std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?;
    }
    let injector = meshgate_kube::inject::Injector {
        image: args.image.clone(),
        control_plane: args.control_plane.clone(),
    };
    let out = injector
        .inject_yaml(&input)
        .with_context(|| format!("{}", args.file.display()))?;
    write_stdout(&out)
}

fn write_stdout(text: &str) -> anyhow::Result<ExitCode> {
    match std::io::stdout().write_all(text.as_bytes()) {
        // `meshgate ... | head` is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        r => r.context("writing to stdout").map(|()| ExitCode::SUCCESS),
    }
}

/// `meshgate crds`: the CustomResourceDefinitions, as YAML on stdout.
pub(crate) fn crds() -> anyhow::Result<ExitCode> {
    let yaml = meshgate_kube::crds_yaml().map_err(anyhow::Error::msg)?;
    write_stdout(&yaml)
}
