//! Bounded reads of the files apilb is told to read (config, certificates, keys, CAs).
//!
//! Every such file must be a regular file (a symlink to one is fine: Kubernetes
//! Secret and ConfigMap mounts are symlinks) of at most [`MAX_FILE_BYTES`]. The
//! file is opened with `O_NONBLOCK` and checked with `fstat` before any read, so
//! a FIFO, a socket or a device such as `/dev/zero` is refused at once instead
//! of blocking `check` or wedging a reload, or reading until memory runs out.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Largest file apilb reads: a config or a PEM bundle is a few KiB; a CA
/// bundle with every public root is about 200 KiB.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: it is a {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("cannot read {path}: larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
}

/// Reads a whole regular file of at most [`MAX_FILE_BYTES`]. Blocking, but
/// never for longer than a regular file's read takes.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, ReadError> {
    read_limited(path, MAX_FILE_BYTES)
}

/// [`read_bounded`] with another limit.
pub fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let io = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            "directory"
        } else if ft.is_fifo() {
            "FIFO"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_char_device() {
            "character device"
        } else if ft.is_block_device() {
            "block device"
        } else {
            "special file"
        };
        return Err(ReadError::NotRegular {
            path: path.to_path_buf(),
            kind,
        });
    }
    let too_large = || ReadError::TooLarge {
        path: path.to_path_buf(),
        max,
    };
    if meta.len() > max {
        return Err(too_large());
    }
    // The file may grow between fstat and read: read one byte past the limit.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn regular_files_and_symlinks_to_them_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.pem");
        std::fs::write(&f, b"hello").unwrap();
        let l = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert_eq!(read_bounded(&f).unwrap(), b"hello");
        assert_eq!(read_bounded(&l).unwrap(), b"hello");
    }

    #[test]
    fn fifos_devices_directories_and_big_files_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let t = Instant::now();
        for (p, want) in [
            (fifo.as_path(), "FIFO"),
            (Path::new("/dev/zero"), "character device"),
            (dir.path(), "directory"),
            (big.as_path(), "larger than 1048576 bytes"),
        ] {
            let e = read_bounded(p).unwrap_err().to_string();
            assert!(e.contains(want), "{}: {e}", p.display());
        }
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
