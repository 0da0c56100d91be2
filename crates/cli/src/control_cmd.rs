//! `meshgate control`: the control plane on Kubernetes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use meshgate_control::run::State;

#[derive(Debug, clap::Args)]
pub(crate) struct ControlArgs {
    /// The kubeconfig to reach the API server; without it, the in-cluster
    /// service account (or $KUBECONFIG, ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Where `/ready` and `/debug/configz` are served (istiod's monitoring
    /// port is 15014).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15014")]
    monitoring_address: SocketAddr,
    /// The mesh CA (`meshgate ca init`; on a cluster, a mounted Secret):
    /// certificate requests on --ca-address, authenticated by the caller's
    /// service-account token (audience `istio-ca`) through TokenReview;
    /// the root published as ConfigMap `istio-ca-root-cert` in every
    /// namespace.
    #[arg(long, value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// Where certificate requests are served (istiod's 15012).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15012")]
    ca_address: SocketAddr,
    /// With --ca-dir: where the admission webhooks are served (istiod's
    /// 15017): `/inject` for Pods, `/validate` for Istio objects.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15017")]
    webhook_address: SocketAddr,
    /// The control plane Service's DNS names, in the certificates (signed
    /// by the mesh CA) of the webhooks (the API server calls them by these
    /// names) and of --ca-address for clients that ask for one by SNI
    /// (Istio's agents).
    #[arg(
        long,
        value_name = "NAME",
        value_delimiter = ',',
        default_value = "meshgate-control.meshgate-system.svc"
    )]
    webhook_names: Vec<String>,
    /// The image injected pods run (init and proxy containers).
    #[arg(long, default_value = concat!("meshgate:", env!("CARGO_PKG_VERSION")))]
    proxy_image: String,
    /// This control plane's port 15012 as injected pods reach it.
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "meshgate-control.meshgate-system.svc:15012"
    )]
    proxy_control_plane: String,
    /// Written once the first config is published: the monitoring address,
    /// the CA and webhook addresses and the version, as JSON.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
}

pub(crate) fn run(args: &ControlArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let client = client(args).await?;
        let listener = tokio::net::TcpListener::bind(args.monitoring_address)
            .await
            .with_context(|| format!("listening on {}", args.monitoring_address))?;
        let monitoring = listener.local_addr()?;
        tracing::info!(address = %monitoring, "monitoring port listening");
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(State::default()));
        let proxies = Arc::new(meshgate_control::push::Proxies::default());
        tokio::spawn(meshgate_control::debug::serve(
            listener,
            rx.clone(),
            proxies.clone(),
        ));
        let ca = match &args.ca_dir {
            Some(dir) => Some(start_ca(args, dir, &client, rx.clone(), proxies).await?),
            None => None,
        };
        let webhooks = match &args.ca_dir {
            Some(dir) => Some(start_webhooks(args, dir, &client, rx.clone()).await?),
            None => None,
        };
        if let Some(path) = args.ready_file.clone() {
            tokio::spawn(write_when_ready(path, monitoring, ca, webhooks, rx));
        }
        let changes = meshgate_control::watch::watch_all(client.clone());
        let reporter = meshgate_control::events::Reporter::new(client);
        tokio::select! {
            () = meshgate_control::run::run(changes, tx, reporter) => Ok(ExitCode::SUCCESS),
            _ = crate::shutdown_signal() => Ok(ExitCode::SUCCESS),
        }
    })
}

async fn client(args: &ControlArgs) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            // kube's message names the file and the cause already.
            let kubeconfig =
                kube::config::Kubeconfig::read_from(path).map_err(|e| anyhow::anyhow!("{e}"))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("{}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster service account or kubeconfig; give --kubeconfig")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Serves certificate requests and config streams on the CA's port, and
/// publishes the root to every namespace of each published config. Returns
/// the port's address.
async fn start_ca(
    args: &ControlArgs,
    dir: &std::path::Path,
    client: &kube::Client,
    mut state: tokio::sync::watch::Receiver<Arc<State>>,
    proxies: Arc<meshgate_control::push::Proxies>,
) -> anyhow::Result<SocketAddr> {
    use meshgate_control::ca::{RootPublisher, TokenReviewer};
    let ca = Arc::new(meshgate_identity::CertificateAuthority::load(dir)?);
    let listener = tokio::net::TcpListener::bind(args.ca_address)
        .await
        .with_context(|| format!("listening on {}", args.ca_address))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, trust_domain = ca.trust_domain(), "CA listening");
    let root = ca.root_pem().to_owned();
    let reviewer = TokenReviewer::new(client.clone());
    let streams = state.clone();
    let names = args.webhook_names.clone();
    tokio::spawn(async move {
        let served =
            meshgate_control::push::serve(listener, ca, reviewer, streams, proxies, &names);
        if let Err(e) = served.await {
            tracing::error!(error = %e, "the CA and config port stopped");
        }
    });
    let client = client.clone();
    tokio::spawn(async move {
        let mut publisher = RootPublisher::default();
        let mut tampered = meshgate_control::ca::tampered_roots(client.clone(), root.clone());
        loop {
            let namespaces: Vec<String> = state
                .borrow_and_update()
                .snapshot
                .as_ref()
                .map(|s| {
                    s.config
                        .namespaces
                        .iter()
                        .map(|n| n.meta.name.clone())
                        .collect()
                })
                .unwrap_or_default();
            publisher.publish(&client, &root, &namespaces).await;
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                Some(ns) = tampered.recv() => publisher.forget(&ns),
            }
        }
    });
    Ok(address)
}

/// Serves the admission webhooks with a certificate for --webhook-names
/// from the mesh CA, renewed in place at half its lifetime.
async fn start_webhooks(
    args: &ControlArgs,
    dir: &std::path::Path,
    client: &kube::Client,
    state: tokio::sync::watch::Receiver<Arc<State>>,
) -> anyhow::Result<SocketAddr> {
    let ca = Arc::new(meshgate_identity::CertificateAuthority::load(dir)?);
    let cert = meshgate_identity::source::DnsCert::start(
        ca.clone(),
        args.webhook_names.clone(),
        meshgate_control::push::SERVICE_CERT_TTL,
    )?;
    let tls = meshgate_identity::tls::dns_server_config(cert, &[b"http/1.1"])?;
    let listener = tokio::net::TcpListener::bind(args.webhook_address)
        .await
        .with_context(|| format!("listening on {}", args.webhook_address))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, names = args.webhook_names.join(","), "admission webhooks listening");
    let injector = meshgate_kube::inject::Injector {
        image: args.proxy_image.clone(),
        control_plane: args.proxy_control_plane.clone(),
    };
    tokio::spawn(meshgate_control::webhook::serve(
        listener, tls, injector, state,
    ));
    use meshgate_control::webhook::{CONFIGURATIONS, patch_ca_bundles};
    patch_ca_bundles(client, ca.root_pem(), &CONFIGURATIONS).await;
    Ok(address)
}

async fn write_when_ready(
    path: PathBuf,
    monitoring: SocketAddr,
    ca: Option<SocketAddr>,
    webhooks: Option<SocketAddr>,
    mut state: tokio::sync::watch::Receiver<Arc<State>>,
) {
    let Ok(state) = state.wait_for(|s| s.snapshot.is_some()).await else {
        return;
    };
    let version = state.snapshot.as_ref().map_or(0, |s| s.version);
    let body = serde_json::json!({
        "monitoring": monitoring.to_string(),
        "ca": ca.map(|a| a.to_string()),
        "webhooks": webhooks.map(|a| a.to_string()),
        "version": version,
    });
    if let Err(e) = std::fs::write(&path, format!("{body:#}\n")) {
        tracing::error!(file = %path.display(), error = %e, "cannot write the ready file");
    }
}
