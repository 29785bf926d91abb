//! `cache_file`: the last known set, written atomically (temp file + rename)
//! and read at start so apilb starts from it when the API cannot be reached.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Cached {
    pool: String,
    servers: Vec<SocketAddr>,
}

/// The set in `path`, if it holds a non-empty one for `pool`.
pub fn read(path: &Path, pool: &str) -> Result<Option<Vec<SocketAddr>>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let c: Cached = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not a discovery cache: {e}", path.display()))?;
    if c.pool != pool {
        return Err(format!(
            "{}: holds pool {:?}, not {pool:?}",
            path.display(),
            c.pool
        ));
    }
    Ok((!c.servers.is_empty()).then_some(c.servers))
}

/// Replaces `path` with `servers` in one rename: a crash leaves the old or
/// the new file, never half of one.
pub fn write(path: &Path, pool: &str, servers: &[SocketAddr]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    let c = Cached {
        pool: pool.to_string(),
        servers: servers.to_vec(),
    };
    serde_json::to_writer_pretty(&mut tmp, &c)?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        assert_eq!(read(&p, "api").unwrap(), None, "missing file: no set");
        let set: Vec<SocketAddr> = vec![
            "10.0.0.1:6443".parse().unwrap(),
            "[fd00::1]:6443".parse().unwrap(),
        ];
        write(&p, "api", &set).unwrap();
        assert_eq!(read(&p, "api").unwrap(), Some(set));
        assert!(
            read(&p, "other").is_err(),
            "another pool's cache is refused"
        );
        write(&p, "api", &[]).unwrap();
        assert_eq!(read(&p, "api").unwrap(), None, "an empty set is no set");
        std::fs::write(&p, b"{garbage").unwrap();
        assert!(read(&p, "api").is_err());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
