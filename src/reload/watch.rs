//! Watching the config file: its directory and the directory of its symlink
//! target, debounced, so editors' write-and-rename and a ConfigMap's `..data`
//! swap each give one "changed" signal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How long file events are collected before one reload (editors write in bursts).
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// Watches the config file's directory (and the directory of the file a
/// symlink points to) so editors' write-and-rename and a ConfigMap's `..data`
/// swap are both seen; sends one reload per burst of events.
pub fn watch_file(path: PathBuf, changed: mpsc::Sender<()>, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut dirs: Vec<PathBuf> = Vec::new();
    let parent = |p: &Path| {
        p.parent().map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d.to_path_buf()
            }
        })
    };
    dirs.extend(parent(&path));
    if let Ok(real) = std::fs::canonicalize(&path) {
        if let Some(d) = parent(&real) {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !ev.kind.is_access() {
                let _ = tx.send(());
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
            return;
        }
    };
    for d in &dirs {
        if let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive) {
            warn!(dir = %d.display(), error = %e, "cannot watch config directory; reload with SIGHUP");
        }
    }
    tokio::spawn(async move {
        let _watcher = watcher; // dropped (and unwatched) when this task ends
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                ev = rx.recv() => if ev.is_none() { return },
            }
            // Debounce: wait until the burst is over.
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                    ev = rx.recv() => if ev.is_none() { return },
                }
            }
            if changed.send(()).await.is_err() {
                return;
            }
        }
    });
}
