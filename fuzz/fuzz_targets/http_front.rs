//! Any bytes as a client's connection to the egress gateway's HTTP server
//! port (the seed's, without its AuthorizationPolicy, so requests are
//! routed and forwarded to an HTTPS stand-in): the connection ends within a
//! bound and serving it never panics.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshgate_proxy::conn::Conn;
use meshgate_proxy::listener::Timeouts;
use meshgate_proxy::proxy::Proxy;
use meshgate_proxy::testing::{External, HOST, Mesh, SeedChain, TestProxy, seed_config_except};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct World {
    rt: tokio::runtime::Runtime,
    proxy: Arc<Proxy>,
    // Kept running for the whole run.
    _gateway: TestProxy,
    _external: External,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        // libFuzzer's main, unlike a Rust binary's, leaves SIGPIPE fatal;
        // hyper's vectored writes to a socket the peer closed raise it.
        // SAFETY: setting a signal's disposition to ignore, before any
        // thread of ours runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (gateway, external) = rt.block_on(async {
            let external = External::start(&[HOST]).await;
            let config = seed_config_except(&["authorization-policy.yaml"], &[]);
            let mut spec = SeedChain::gateway_spec(config, &external);
            spec.timeouts = Timeouts {
                first_byte: Duration::from_millis(50),
                handshake: Duration::from_millis(50),
                stream_idle: Duration::from_millis(200),
                idle: Duration::from_millis(200),
                request_headers: Duration::from_millis(200),
            };
            (TestProxy::start(&Mesh::default(), spec).await, external)
        });
        assert_eq!(
            gateway.app.proxy.role,
            meshgate_proxy::snapshot::Role::Gateway
        );
        let proxy = gateway.app.proxy.clone();
        World {
            rt,
            proxy,
            _gateway: gateway,
            _external: external,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    w.rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let local = "127.0.0.1:80".parse().expect("address");
        let conn = Conn::accepted("127.0.0.2:40000".parse().expect("address"), local, 80);
        let served = tokio::spawn(meshgate_proxy::connection::serve(
            w.proxy.clone(),
            conn,
            server,
        ));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut sink)).await;
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(5), served).await;
        assert!(ended.is_ok(), "the connection outlived every timeout");
        assert!(
            !ended.expect("ended").is_err_and(|e| e.is_panic()),
            "the proxy panicked"
        );
    });
});
