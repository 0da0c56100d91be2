//! The egress gateway's memory per external host, counted (issue:
//! performance, "at most 2 KiB of gateway RSS per host"): the heap a
//! compiled snapshot keeps for the seed plus 1 and plus 10,000 generated
//! hosts (ServiceEntry + VirtualService + DestinationRule each), and its
//! clusters' and listeners' (routes') shares. The view is made first and
//! the loaded model dropped, as a proxy does. Exact and steady where RSS
//! (`crates/cli/benches/scale.rs`) also holds the allocator's overhead;
//! the resident growth after `malloc_trim` shows that overhead here.
//!
//!   cargo bench -p meshgate-proxy --bench heap
#![allow(clippy::unwrap_used, unreachable_pub, missing_docs, unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use meshgate_config::{MeshSettings, view};
use meshgate_proxy::testing::{GATEWAY, ScaleShape, scale_config, snapshot_of};

/// The system allocator, counting live bytes and blocks.
struct Counting;

static BYTES: AtomicIsize = AtomicIsize::new(0);
static BLOCKS: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; the counters
// are only read.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        BLOCKS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        BLOCKS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: a block this allocator gave, with its layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: a block this allocator gave, with its layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Live (bytes, blocks).
fn live() -> (isize, isize) {
    (
        BYTES.load(Ordering::Relaxed),
        BLOCKS.load(Ordering::Relaxed),
    )
}

/// What a snapshot keeps: all of it, its clusters, its listeners.
#[derive(Clone, Copy)]
struct Kept {
    all: (isize, isize),
    clusters: (isize, isize),
    listeners: (isize, isize),
}

/// Resident bytes after freed heap is handed back, as a proxy does after
/// each load (glibc's `malloc_trim`); none elsewhere.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn resident_trimmed() -> Option<f64> {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> i32;
    }
    // SAFETY: takes no pointers; glibc walks its own free lists.
    unsafe { malloc_trim(0) };
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn resident_trimmed() -> Option<f64> {
    None
}

fn measure(hosts: usize, rt: &tokio::runtime::Runtime) -> Kept {
    let resident_before = resident_trimmed();
    let config = scale_config(hosts, ScaleShape::PerHost);
    let view = view::build(&config, &MeshSettings::default(), GATEWAY).unwrap();
    drop(config);
    let started = Instant::now();
    let mut snap = rt.block_on(snapshot_of(view));
    let took = started.elapsed();
    let built = live();
    if let (Some(a), Some(b)) = (resident_before, resident_trimmed()) {
        // Allocator overhead included: what the goal of 2 KiB per host
        // limits (the first size also pays the runtime's start).
        let per_host = (b - a) / hosts as f64;
        println!("{hosts} hosts: resident heap grew by {per_host:.0} bytes per host");
    }
    let diff = |a: (isize, isize), b: (isize, isize)| (a.0 - b.0, a.1 - b.1);
    drop(std::mem::take(&mut snap.clusters));
    let after_clusters = live();
    drop(std::mem::take(&mut snap.listeners));
    let after_listeners = live();
    println!("{hosts} hosts: snapshot built in {took:.1?}");
    // Measured as it is freed: building also frees the view's clusters
    // and routes.
    drop(snap);
    Kept {
        all: diff(built, live()),
        clusters: diff(built, after_clusters),
        listeners: diff(after_clusters, after_listeners),
    }
}

fn main() {
    // `cargo test --all-targets` builds benches and runs them without
    // `--bench`: nothing to do then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (few, many) = (1, 10_000);
    let (a, b) = (measure(few, &rt), measure(many, &rt));
    let per_host = |a: (isize, isize), b: (isize, isize)| {
        let n = (many - few) as f64;
        ((b.0 - a.0) as f64 / n, (b.1 - a.1) as f64 / n)
    };
    for (what, a, b) in [
        ("snapshot", a.all, b.all),
        ("clusters", a.clusters, b.clusters),
        ("listeners (routes)", a.listeners, b.listeners),
    ] {
        let (bytes, blocks) = per_host(a, b);
        println!("per external host, {what}: {bytes:.0} bytes in {blocks:.1} allocations");
    }
}
