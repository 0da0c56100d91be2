//! The run folder: the binary and the config copied where the proxies
//! (uid 1337) can read them, tokens, endpoints files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

pub(super) fn me() -> anyhow::Result<String> {
    Ok(std::env::current_exe()?.to_string_lossy().into_owned())
}

pub(super) fn write_world_readable(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// 128 random bits from the kernel, as hex.
pub(super) fn random_token() -> anyhow::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Copies the YAML the user gave into one readable folder (names kept;
/// files from several folders get a numbered prefix only on a clash).
pub(super) fn copy_config(paths: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))?;
    let mut n = 0;
    let mut copy = |file: &Path| -> anyhow::Result<()> {
        let name = file
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut dest = out.join(&name);
        if dest.exists() {
            n += 1;
            dest = out.join(format!("{n}-{name}"));
        }
        std::fs::copy(file, &dest).with_context(|| format!("copying {}", file.display()))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o644))?;
        Ok(())
    };
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = walk(p)?;
            files.sort();
            for f in files {
                copy(&f)?;
            }
        } else {
            copy(p)?;
        }
    }
    Ok(())
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    Ok(out)
}
