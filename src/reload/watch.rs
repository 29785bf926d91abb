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
    let names = Names::of(&path);
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !ev.kind.is_access() && names.concern(&ev) {
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

/// The file names in the watched directories whose changes mean the config may
/// have changed: the config file, its symlink target, and a ConfigMap volume's
/// `..data` swap. Other files there (another daemon's config, certificates,
/// an etcd data directory) do not trigger a reload.
struct Names(Vec<std::ffi::OsString>);

impl Names {
    fn of(path: &Path) -> Self {
        let mut names: Vec<std::ffi::OsString> =
            path.file_name().into_iter().map(Into::into).collect();
        if let Some(n) = std::fs::canonicalize(path)
            .ok()
            .as_deref()
            .and_then(Path::file_name)
        {
            if !names.iter().any(|m| m == n) {
                names.push(n.into());
            }
        }
        Names(names)
    }

    /// Whether an event touches one of the names; an event without paths (the
    /// kernel's queue overflowed) counts, since anything may have changed.
    fn concern(&self, ev: &notify::Event) -> bool {
        ev.need_rescan()
            || ev.paths.is_empty()
            || ev
                .paths
                .iter()
                .filter_map(|p| p.file_name())
                .any(|n| self.0.iter().any(|m| m == n) || n.to_string_lossy().starts_with("..data"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, EventKind};

    fn event(path: &str) -> notify::Event {
        notify::Event::new(EventKind::Create(CreateKind::File)).add_path(PathBuf::from(path))
    }

    #[test]
    fn only_the_config_and_a_configmap_swap_concern_the_watch() {
        let names = Names::of(Path::new("/nonexistent/apilb/apilb.yaml"));
        assert!(names.concern(&event("/nonexistent/apilb/apilb.yaml")));
        assert!(names.concern(&event("/nonexistent/apilb/..data")));
        assert!(names.concern(&event("/nonexistent/apilb/..data_tmp")));
        assert!(!names.concern(&event("/nonexistent/apilb/other.yaml")));
        assert!(!names.concern(&event("/nonexistent/apilb/server.crt")));
        let overflow = notify::Event::new(EventKind::Other);
        assert!(names.concern(&overflow));
    }
}
