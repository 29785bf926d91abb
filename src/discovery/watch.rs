//! The list/watch loop of one pool: list, watch from the list's
//! resourceVersion with bookmarks, relist on 410 Gone, back off with jitter
//! on errors; every wait also selects on the task's cancellation token.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::Api;
use tracing::{info, warn};

use super::{cache, client, servers_of, DiscoveryError, Task, Update};
use crate::balancer::unix_now;

/// First and longest pause after an error (doubling in between, ±50%).
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The server ends a watch after this long; it is then resumed.
const WATCH_TIMEOUT_SECS: u32 = 290;
/// Bound on one list request, and on a watch's silence (bookmarks arrive
/// about every minute): past it the connection is taken as dead.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);
const WATCH_SILENCE: Duration = Duration::from_secs(WATCH_TIMEOUT_SECS as u64 + 30);
/// A watch that ends with no event sooner than this counts as an error.
const WATCH_MIN_LIFE: Duration = Duration::from_secs(1);

/// Carried across sessions.
struct Progress {
    backoff: Duration,
    /// A set was reported since the task started: the first one found is
    /// reported even when it equals `known` (it may have come from the cache).
    reported: bool,
}

pub(super) async fn run(mut t: Task) {
    let mut p = Progress {
        backoff: BACKOFF_MIN,
        reported: false,
    };
    let cancel = t.cancel.clone();
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = session(&mut t, &mut p) => r,
        };
        if let Err(e) = r {
            t.metrics.error(e.reason());
            warn!(pool = %t.pool, error = %e, known = t.known.len(), "discovery failed; the last known set stays");
        }
        let pause = p.backoff.mul_f64(0.5 + fastrand::f64());
        p.backoff = (p.backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// One client: lists and watches until an error ends it.
async fn session(t: &mut Task, p: &mut Progress) -> Result<(), DiscoveryError> {
    let cfg = client::kube_config(&t.config).await?;
    let c = client::client(&cfg, &t.server_name, t.connect_timeout, t.backends.clone())?;
    let api: Api<EndpointSlice> = Api::namespaced(c, &t.config.namespace);
    let selector = format!("kubernetes.io/service-name={}", t.config.service);
    loop {
        let lp = ListParams::default().labels(&selector);
        let list = tokio::time::timeout(LIST_TIMEOUT, api.list(&lp))
            .await
            .map_err(|_| DiscoveryError::List("timed out".into()))?
            .map_err(|e| DiscoveryError::List(e.to_string()))?;
        let mut rv = list.metadata.resource_version.clone().unwrap_or_default();
        let mut slices: BTreeMap<String, EndpointSlice> = list
            .items
            .into_iter()
            .map(|s| (s.metadata.name.clone().unwrap_or_default(), s))
            .collect();
        p.backoff = BACKOFF_MIN;
        publish(t, p, &slices).await;
        if watch(t, p, &api, &selector, &mut rv, &mut slices).await? {
            info!(pool = %t.pool, "watch expired (410 Gone); relisting");
            t.metrics.error("gone");
        }
    }
}

/// Watches from `rv` until the history is gone (`Ok(true)`: relist) or an error.
async fn watch(
    t: &mut Task,
    p: &mut Progress,
    api: &Api<EndpointSlice>,
    selector: &str,
    rv: &mut String,
    slices: &mut BTreeMap<String, EndpointSlice>,
) -> Result<bool, DiscoveryError> {
    let wp = WatchParams::default()
        .labels(selector)
        .timeout(WATCH_TIMEOUT_SECS);
    debug_assert!(wp.bookmarks, "allowWatchBookmarks is kube's default");
    loop {
        let stream = match api.watch(&wp, rv).await {
            Ok(s) => s,
            Err(kube::Error::Api(e)) if e.code == 410 => return Ok(true),
            Err(e) => return Err(DiscoveryError::Watch(e.to_string())),
        };
        let mut stream = stream.boxed();
        let (opened, mut events) = (Instant::now(), 0usize);
        loop {
            let next = tokio::time::timeout(WATCH_SILENCE, stream.try_next())
                .await
                .map_err(|_| DiscoveryError::Watch("no event or bookmark in time".into()))?
                .map_err(|e| DiscoveryError::Watch(e.to_string()))?;
            let Some(ev) = next else { break };
            events += 1;
            if event(t, p, ev, rv, slices).await? {
                return Ok(true);
            }
        }
        // A server that ends every watch at once must not make this spin.
        if events == 0 && opened.elapsed() < WATCH_MIN_LIFE {
            return Err(DiscoveryError::Watch("the watch ended at once".into()));
        }
    }
}

/// Applies one watch event; `Ok(true)`: the history is gone (relist).
async fn event(
    t: &mut Task,
    p: &mut Progress,
    ev: WatchEvent<EndpointSlice>,
    rv: &mut String,
    slices: &mut BTreeMap<String, EndpointSlice>,
) -> Result<bool, DiscoveryError> {
    match ev {
        WatchEvent::Added(s) | WatchEvent::Modified(s) => {
            *rv = s.metadata.resource_version.clone().unwrap_or_default();
            slices.insert(s.metadata.name.clone().unwrap_or_default(), s);
            publish(t, p, slices).await;
        }
        WatchEvent::Deleted(s) => {
            *rv = s.metadata.resource_version.clone().unwrap_or_default();
            slices.remove(s.metadata.name.as_deref().unwrap_or_default());
            publish(t, p, slices).await;
        }
        WatchEvent::Bookmark(b) => {
            *rv = b.metadata.resource_version;
            t.metrics.last_sync.set(unix_now() as f64);
        }
        WatchEvent::Error(e) if e.code == 410 => return Ok(true),
        WatchEvent::Error(e) => {
            return Err(DiscoveryError::Watch(format!("{} ({})", e.message, e.code)))
        }
    }
    Ok(false)
}

/// Reports the set when it changed; an empty one keeps the last known set.
async fn publish(t: &mut Task, p: &mut Progress, slices: &BTreeMap<String, EndpointSlice>) {
    t.metrics.last_sync.set(unix_now() as f64);
    let servers = servers_of(slices.values(), &t.config.port_name);
    if servers.is_empty() {
        t.metrics.error("empty");
        warn!(pool = %t.pool, known = t.known.len(), "discovery found no ready server; the last known set stays");
        return;
    }
    t.metrics.endpoints.set(servers.len() as i64);
    if servers == t.known && p.reported {
        return;
    }
    p.reported = true;
    info!(pool = %t.pool, servers = ?servers, "discovered servers changed");
    t.known = servers.clone();
    save(t, &servers).await;
    let update = Update {
        pool: t.pool.clone(),
        servers,
    };
    let _ = t.updates.send(update).await;
}

async fn save(t: &Task, servers: &[SocketAddr]) {
    let Some(path) = t.config.cache_file.clone() else {
        return;
    };
    let (pool, set) = (t.pool.clone(), servers.to_vec());
    let r = tokio::task::spawn_blocking(move || cache::write(&path, &pool, &set)).await;
    if let Ok(Err(e)) = r {
        t.metrics.error("cache");
        warn!(pool = %t.pool, error = %e, "cannot write the discovery cache");
    }
}
