//! The allocator, and giving memory back after a config is loaded.
//!
//! The binary allocates with mimalloc (`main.rs`): a request's allocations
//! and frees, tens per request, cost about half of glibc's (Envoy is built
//! with tcmalloc for the same reason). Its arenas are committed as they are
//! used (`tune_allocator`, run as the binary is loaded), so memory it
//! purges leaves the RSS.
//!
//! Loading holds the parsed YAML, the model, the view and the new snapshot
//! at once; an allocator keeps what they freed for reuse, so a proxy that
//! loaded 10,000 hosts stayed at its load-time peak. Envoy's tcmalloc
//! releases such memory in the background; this does it once per load,
//! when it is known to be free.
//!
//! Loading also runs code the data path never does (YAML, validation, the
//! view, the command line): its pages of the binary stayed mapped, most of
//! a proxy's RSS. After each load the proxy drops its mappings of clean,
//! read-only file pages (code and constants, never written); the pages
//! stay in the page cache, shared with every process of the binary, and
//! what the data path runs is mapped again on its first use.

/// Returns freed heap and unused file-page mappings to the operating
/// system. Call when a load is done.
pub(crate) fn release_after_load() {
    release_freed();
    release_clean_file_mappings();
}

/// How often a running proxy drops its mappings of the binary's code and
/// constants (`keep_code_to_working_set`).
pub(crate) const CODE_RELEASE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Drops this proxy's mappings of the binary's code and constants every
/// `CODE_RELEASE_EVERY`, so what stays mapped is what it ran since: its
/// working set. A first connection's handshake, the ready file and the
/// first log lines run once, and the kernel maps the code around each
/// function that runs (64 KiB at a time), so after the first requests a
/// proxy held five times the code its requests run. What runs again is
/// mapped again from the page cache (a minor fault per 64 KiB, a few dozen
/// per period); the heap is left alone (trimming it takes the allocator's
/// lock, which requests wait on).
pub(crate) async fn keep_code_to_working_set() {
    every_period(CODE_RELEASE_EVERY, release_clean_file_mappings).await;
}

/// Runs `release` off the proxy's threads once every `period`, the first
/// time one period from now.
async fn every_period(period: std::time::Duration, release: fn()) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // It reads /proc/self/smaps and walks the mappings.
        let _ = tokio::task::spawn_blocking(release).await;
    }
}

/// mimalloc as the global allocator, asked for an alignment only when a
/// type needs more than every block already has. mimalloc's own Rust
/// binding calls `mi_malloc_aligned` for every allocation, whose fast path
/// takes only blocks of up to 1 KiB that happen to be free: a larger one
/// (buffers, boxed futures) went through its generic aligned path, about
/// twice the instructions of `mi_malloc` (docs/BENCHMARKS.md, stop 30).
pub(crate) struct Allocator;

/// Every block of at least this many bytes is aligned to it (mimalloc's
/// `MI_MAX_ALIGN_SIZE`), and smaller blocks to their size.
const MI_MAX_ALIGN_SIZE: usize = 16;

/// Whether `mi_malloc` alone meets `layout`'s alignment. A layout's size
/// is a multiple of its alignment, so an alignment of at most 16 bytes is
/// at most the size, and mimalloc's blocks meet it.
fn plain(layout: std::alloc::Layout) -> bool {
    layout.align() <= MI_MAX_ALIGN_SIZE && layout.align() <= layout.size()
}

// SAFETY: each method hands mimalloc a layout's size and, where it must,
// its alignment; every block is freed by `mi_free` and resized by
// mimalloc's realloc of the same kind, as mimalloc requires. A null
// pointer is returned as mimalloc returns it (allocation failure).
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if plain(layout) {
                libmimalloc_sys::mi_malloc(layout.size()).cast()
            } else {
                libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if plain(layout) {
                libmimalloc_sys::mi_zalloc(layout.size()).cast()
            } else {
                libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: see the impl; `ptr` came from this allocator.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl; `ptr` came from this allocator with
        // `layout`, and the block keeps its alignment at the new size.
        unsafe {
            let grown = std::alloc::Layout::from_size_align_unchecked(new_size, layout.align());
            if plain(grown) {
                libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

// mimalloc's options `arena_eager_commit` and `purge_delay` (mimalloc.h,
// `mi_option_e`, v3; the crate names no constant for them).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Runs `tune_allocator` as the binary is loaded: Rust's runtime
/// allocates before `main`, and mimalloc reserves its first arena then.
#[cfg(target_os = "linux")]
#[used]
#[allow(unsafe_code)]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR_AT_LOAD: extern "C" fn() = tune_allocator;

/// Sets mimalloc's options before anything is allocated, for a proxy's
/// RSS (docs/BENCHMARKS.md, stop 29):
/// - arenas committed as used: committed eagerly (its default on Linux),
///   a proxy kept its load-time peak in its RSS (~10 MiB of heap instead
///   of ~2);
/// - freed pages purged after 10 ms, not 1 s: what loading 10,000 hosts
///   freed stayed resident (35 MiB of heap instead of 19). Under load it
///   costs a page fault per ~30 requests; purged at once, one per request.
#[allow(unsafe_code)]
extern "C" fn tune_allocator() {
    // SAFETY: sets global options without allocating; it runs once, as
    // the binary is loaded, before any other thread exists (mimalloc's
    // option setters are not thread safe).
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10);
    }
}

/// Returns freed heap pages to the operating system: mimalloc's, and
/// glibc's (TLS and C libraries allocate there).
#[allow(unsafe_code)]
fn release_freed() {
    // SAFETY: takes no pointers; collects this thread's heap and purges
    // what is free, under mimalloc's own locks.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    glibc_trim();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn glibc_trim() {
    // SAFETY: malloc_trim takes no pointers; it walks glibc's own free
    // lists under their locks and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_trim() {}

/// Drops this process's page-table entries for clean, read-only, private
/// file mappings (`madvise(MADV_DONTNEED)`).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn release_clean_file_mappings() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    for (start, len) in clean_file_mappings(&smaps) {
        // SAFETY: the range is a whole mapping that is private, not
        // writable and has no page of its own (no anonymous page: nothing
        // was ever written through it), so its contents are the file's; MADV_DONTNEED only unmaps its pages, and the next access
        // maps the same file page again. Nothing is freed that any Rust
        // value owns.
        unsafe {
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn release_clean_file_mappings() {}

/// (start, length) of each mapping in `smaps` that is backed by a file,
/// private, not writable, and has no anonymous page.
fn clean_file_mappings(smaps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    let mut clean = false;
    let mut finish = |current: &mut Option<(usize, usize)>, clean: bool| {
        if let Some(m) = current.take().filter(|_| clean) {
            out.push(m);
        }
    };
    for line in smaps.lines() {
        if let Some(range) = mapping(line) {
            finish(&mut current, clean);
            current = range;
            clean = true;
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(key), Some(value)) = (fields.next(), fields.next()) else {
            continue;
        };
        // A page written through a private mapping is a copy of its own,
        // anonymous. (Dirty file pages are the file's: a binary just
        // written, not yet on disk.)
        if key == "Anonymous:" && value != "0" {
            clean = false;
        }
    }
    finish(&mut current, clean);
    out
}

/// A mapping's header line: `Some(Some(range))` for a private, read-only
/// file mapping, `Some(None)` for any other mapping, `None` for a field.
fn mapping(line: &str) -> Option<Option<(usize, usize)>> {
    let mut parts = line.split_whitespace();
    let (start, end) = parts.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = parts.next()?;
    let inode = parts.nth(2)?;
    let path = parts.next().unwrap_or("");
    let wanted = perms.len() == 4
        && perms.starts_with('r')
        && !perms.contains('w')
        && perms.ends_with('p')
        && inode != "0"
        && path.starts_with('/');
    Some(wanted.then_some((start, end - start)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
556631ad3000-556631eed000 r--p 00000000 fe:00 5367001    /usr/bin/meshgate
Rss:                1908 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
556631eed000-5566330c5000 r-xp 00419000 fe:00 5367001    /usr/bin/meshgate
Rss:               12500 kB
Shared_Dirty:      12096 kB
Private_Dirty:       404 kB
Anonymous:             0 kB
5566330c5000-556633133000 r--p 015f0000 fe:00 5367001    /usr/bin/meshgate
Rss:                 440 kB
Private_Dirty:       440 kB
Anonymous:           440 kB
556633133000-556633139000 rw-p 0165d000 fe:00 5367001    /usr/bin/meshgate
Anonymous:            24 kB
556634000000-556634100000 rw-p 00000000 00:00 0          [heap]
Anonymous:          1024 kB
7f0000000000-7f0000001000 r--s 00000000 fe:00 42         /dev/shm/x
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0          [vdso]
";

    /// Code and constants go (dirty in the page cache too: a binary just
    /// written); what was written through the mapping (relocations,
    /// data), the heap, shared mappings and the vDSO stay.
    #[test]
    fn only_clean_private_read_only_file_mappings_are_released() {
        assert_eq!(
            clean_file_mappings(SMAPS),
            vec![
                (0x556631ad3000, 0x556631eed000 - 0x556631ad3000),
                (0x556631eed000, 0x5566330c5000 - 0x556631eed000),
            ]
        );
    }

    /// A `/proc/self/status` field in kB (`RssFile:`, `RssAnon:`).
    fn status_kib(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn rss_file_kib() -> u64 {
        status_kib("RssFile:")
    }

    fn rss_anon_kib() -> u64 {
        status_kib("RssAnon:")
    }

    /// What a load frees leaves the RSS once released.
    #[test]
    fn freed_heap_leaves_the_rss_once_released() {
        let before = rss_anon_kib();
        // ~50 MiB in small blocks, as a loaded config is made of, made on
        // a thread that is gone when they are freed (a load's thread).
        let blocks = std::thread::spawn(|| {
            (0..200_000)
                .map(|i| Box::new([i as u8; 256]))
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap_or_default();
        let held = rss_anon_kib();
        assert!(held > before + 40_000, "RssAnon {before} kB -> {held} kB");
        drop(blocks);
        release_freed();
        let after = rss_anon_kib();
        assert!(
            after < before + 10_000,
            "RssAnon {before} kB, {held} kB held, {after} kB after release"
        );
    }

    /// Every block meets its layout's alignment, small and large, plain
    /// and over-aligned, allocated, zeroed and resized, and keeps its
    /// bytes when resized.
    #[test]
    #[allow(unsafe_code)]
    fn blocks_meet_their_alignment_and_keep_their_bytes() {
        use std::alloc::{GlobalAlloc, Layout};
        for align in [1, 2, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 7, 8, 24, 48, 100, 1000, 1024, 1100, 5000, 70_000] {
                let size = size.max(align) / align * align;
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; every block is freed with its layout.
                unsafe {
                    let zeroed = Allocator.alloc_zeroed(layout);
                    assert_eq!(zeroed as usize % align, 0, "{layout:?} zeroed");
                    assert!(
                        std::slice::from_raw_parts(zeroed, size)
                            .iter()
                            .all(|&b| b == 0)
                    );
                    Allocator.dealloc(zeroed, layout);
                    let p = Allocator.alloc(layout);
                    assert_eq!(p as usize % align, 0, "{layout:?}");
                    for i in 0..size {
                        *p.add(i) = i as u8;
                    }
                    let grown = Allocator.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "{layout:?} grown");
                    assert!(
                        (0..size).all(|i| *grown.add(i) == i as u8),
                        "{layout:?} grown"
                    );
                    let half = (size / 2).max(align);
                    let grown_layout = Layout::from_size_align(size * 3, align).unwrap();
                    let shrunk = Allocator.realloc(grown, grown_layout, half);
                    assert_eq!(shrunk as usize % align, 0, "{layout:?} shrunk");
                    assert!(
                        (0..half).all(|i| *shrunk.add(i) == i as u8),
                        "{layout:?} shrunk"
                    );
                    Allocator.dealloc(shrunk, Layout::from_size_align(half, align).unwrap());
                }
            }
        }
    }

    /// The option is set as the binary is loaded, before `main` (and this
    /// test binary's harness) allocates.
    #[test]
    #[allow(unsafe_code)]
    fn the_allocator_is_tuned_before_main() {
        // SAFETY: reads global options.
        let (eager, delay) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
            )
        };
        assert_eq!((eager, delay), (0, 10));
    }

    static RELEASES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    fn count_release() {
        RELEASES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// None at start, then one per period (the clock is tokio's, paused
    /// and advanced by the test).
    #[tokio::test(start_paused = true)]
    async fn mappings_are_released_once_a_period_from_one_period_on() {
        let period = CODE_RELEASE_EVERY;
        let task = tokio::spawn(every_period(period, count_release));
        let released = || RELEASES.load(std::sync::atomic::Ordering::SeqCst);
        let until = |n: u32| async move {
            // The release runs on the blocking pool, on real time: wait for
            // it by yielding, a bounded number of times.
            for _ in 0..100_000 {
                if released() >= n {
                    break;
                }
                tokio::task::yield_now().await;
            }
        };
        // The task starts (and its clock with it) before time moves.
        tokio::task::yield_now().await;
        tokio::time::advance(period - std::time::Duration::from_millis(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(released(), 0, "nothing before the first period");
        tokio::time::advance(std::time::Duration::from_millis(1)).await;
        until(1).await;
        assert_eq!(released(), 1);
        tokio::time::advance(period).await;
        until(2).await;
        assert_eq!(released(), 2);
        task.abort();
    }

    /// This process's own mappings: releasing them lowers its file-backed
    /// RSS, and it goes on running (this test's code was in one of them).
    #[test]
    fn releasing_this_process_lowers_its_rss_and_keeps_it_running() {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        assert!(!clean_file_mappings(&smaps).is_empty());
        let before = rss_file_kib();
        release_after_load();
        let after = rss_file_kib();
        assert!(after < before, "RssFile {before} kB -> {after} kB");
    }
}
