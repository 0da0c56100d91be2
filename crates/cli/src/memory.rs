//! Handing freed heap back to the operating system after a config is
//! loaded. Loading holds the parsed YAML, the model, the view and the new
//! snapshot at once; glibc keeps what they freed in its free lists, so a
//! proxy that loaded 10,000 hosts stayed at its load-time peak. Envoy's
//! tcmalloc releases such memory in the background; this does it once per
//! load, when it is known to be free.

/// Returns freed heap pages to the operating system (glibc: `malloc_trim`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub(crate) fn release_freed() {
    // SAFETY: malloc_trim takes no pointers; it walks glibc's own free
    // lists under their locks and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators and platforms: nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn release_freed() {}
