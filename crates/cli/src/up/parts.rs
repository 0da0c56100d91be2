//! The processes `up` starts: each in its own process group, its output
//! prefixed with its name, its exit watched.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::netns::Cleanup;

/// A process `up` started; its lines are prefixed with `name |`.
struct Part {
    name: String,
    child: Child,
    /// Proxies: their exit stops everything.
    essential: bool,
}

/// One line from a part, or its exit.
pub(super) enum Event {
    Line(String, String),
    Exited(String, bool, String),
}

/// Starts the parts and collects their output.
pub(super) struct Runner {
    tx: mpsc::UnboundedSender<Event>,
    parts: Vec<Part>,
}

impl Runner {
    pub(super) fn new(tx: mpsc::UnboundedSender<Event>) -> Runner {
        Runner {
            tx,
            parts: Vec::new(),
        }
    }

    /// From now on a part's exit is an event (an essential part's exit
    /// stops `up`).
    pub(super) fn watch_exits(&mut self) {
        for mut p in self.parts.drain(..) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let status = p
                    .child
                    .wait()
                    .await
                    .map_or_else(|e| e.to_string(), |s| s.to_string());
                let _ = tx.send(Event::Exited(p.name, p.essential, status));
            });
        }
    }

    /// Starts a part in its own process group and forwards its output.
    pub(super) fn spawn(
        &mut self,
        name: &str,
        argv: &[String],
        env: &[(&str, String)],
        essential: bool,
        cleanup: &mut Cleanup,
    ) -> anyhow::Result<()> {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // Marks every process `up` starts, so leftovers can be found.
            .env("MESHGATE_UP", std::process::id().to_string())
            .process_group(0)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {}", argv[0]))?;
        if let Some(pid) = child.id() {
            cleanup.pgids.push(pid);
        }
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (tx, name) = (self.tx.clone(), name.to_owned());
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send(Event::Line(name.clone(), line)).is_err() {
                        return;
                    }
                }
            });
        }
        self.parts.push(Part {
            name: name.to_owned(),
            child,
            essential,
        });
        Ok(())
    }
}

/// Waits until a part logs `needle`, printing everything meanwhile.
pub(super) async fn wait_ready(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    width: usize,
    part: &str,
    needle: &str,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("{part} did not become ready within 30s"))?;
        match ev {
            Some(Event::Line(name, line)) => {
                println!("{name:<width$} | {line}");
                if name == part && line.contains(needle) {
                    return Ok(());
                }
            }
            Some(Event::Exited(name, _, status)) if name == part => {
                bail!("{part} exited while starting ({status})")
            }
            Some(Event::Exited(name, _, status)) => println!("{name:<width$} | exited ({status})"),
            None => bail!("output channel closed"),
        }
    }
}
