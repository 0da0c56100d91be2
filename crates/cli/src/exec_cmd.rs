//! `meshgate exec WORKLOAD -- CMD...`: runs a command as a workload of a
//! running `meshgate up` does: in its network namespace (where its sidecar
//! captures it and Service names resolve as in a pod), or on loopback with
//! its sidecar as `http_proxy`.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;

#[derive(Debug, Clone, Args)]
pub(crate) struct ExecArgs {
    /// The workload, as `up` names it (`curl-test` or `curl-external-tst/curl-test`).
    workload: String,
    /// Which running `meshgate up` (its process id), when several run.
    #[arg(long, value_name = "PID")]
    up: Option<u32>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub(crate) fn run(args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let name = args.workload.rsplit('/').next().unwrap_or(&args.workload);
    let Some(reg) = crate::proxy_config::registration(&format!("workload-{name}"), args.up)? else {
        bail!(
            "{} is not a workload of a running `meshgate up`",
            args.workload
        );
    };
    let mut cmd = match reg["netns"].as_str() {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns]).args(&args.command);
            c
        }
        None => {
            let mut c = std::process::Command::new(&args.command[0]);
            c.args(&args.command[1..]);
            if let Some(proxy) = reg["httpProxy"].as_str() {
                c.env("http_proxy", proxy).env("HTTP_PROXY", proxy);
            }
            c
        }
    };
    let status = cmd
        .status()
        .with_context(|| format!("running {} (a namespace needs root)", args.command[0]))?;
    Ok(ExitCode::from(
        u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
    ))
}
