//! The election state machine: candidate (watch the key, campaign when it is gone) and
//! holder (renew every `retry_period`, drop the address when `renew_deadline` passes
//! without a successful renewal). Generic over `Store` and `Address` for unit tests.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::etcd::{Campaign, Client, EtcdError, KeyState, LeaseId};
use super::{arp, netlink, VipError, VipMetrics, VipStatus};
use crate::config::VipConfig;

/// The etcd operations the election needs.
pub(crate) trait Store: Send {
    async fn get(&mut self, key: &str) -> Result<KeyState, EtcdError>;
    async fn grant(&mut self, ttl: Duration) -> Result<(LeaseId, i64), EtcdError>;
    async fn campaign(
        &mut self,
        key: &str,
        value: &str,
        lease: LeaseId,
    ) -> Result<Campaign, EtcdError>;
    async fn keepalive(&mut self, lease: LeaseId) -> Result<i64, EtcdError>;
    async fn revoke(&mut self, lease: LeaseId) -> Result<(), EtcdError>;
    async fn wait_deleted(&mut self, key: &str, revision: i64) -> Result<(), EtcdError>;
}

impl Store for Client {
    async fn get(&mut self, key: &str) -> Result<KeyState, EtcdError> {
        Client::get(self, key).await
    }
    async fn grant(&mut self, ttl: Duration) -> Result<(LeaseId, i64), EtcdError> {
        Client::grant(self, ttl).await
    }
    async fn campaign(
        &mut self,
        key: &str,
        value: &str,
        lease: LeaseId,
    ) -> Result<Campaign, EtcdError> {
        Client::campaign(self, key, value, lease).await
    }
    async fn keepalive(&mut self, lease: LeaseId) -> Result<i64, EtcdError> {
        Client::keepalive(self, lease).await
    }
    async fn revoke(&mut self, lease: LeaseId) -> Result<(), EtcdError> {
        Client::revoke(self, lease).await
    }
    async fn wait_deleted(&mut self, key: &str, revision: i64) -> Result<(), EtcdError> {
        Client::wait_deleted(self, key, revision).await
    }
}

/// The address on the interface.
pub(crate) trait Address: Send {
    fn add(&mut self) -> Result<(), VipError>;
    /// Whether it was there.
    fn remove(&mut self) -> Result<bool, VipError>;
    /// Starts announcing the address (gratuitous ARP) until `stop`.
    fn announce(&self, stop: CancellationToken);
}

pub(crate) struct NetAddress {
    pub ifname: String,
    pub ifindex: u32,
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Address for NetAddress {
    fn add(&mut self) -> Result<(), VipError> {
        netlink::add_address(self.ifindex, self.addr, self.prefix)
    }
    fn remove(&mut self) -> Result<bool, VipError> {
        netlink::remove_address(self.ifindex, self.addr, self.prefix)
    }
    fn announce(&self, stop: CancellationToken) {
        tokio::spawn(arp::announce(
            self.ifname.clone(),
            self.ifindex,
            self.addr,
            stop,
        ));
    }
}

/// Why holding ended.
#[derive(Debug, PartialEq, Eq)]
enum HoldEnd {
    /// Release or hand-over asked for.
    Quit,
    /// `require_ready` and this node has no up backend.
    Resign,
    /// The deadline passed, the lease is gone, or the key is not ours any more.
    Lost(&'static str),
}

/// One renewal's failure.
enum RenewError {
    LeaseGone,
    KeyTaken,
    Etcd(EtcdError),
}

pub(crate) struct Election<S, A> {
    pub cfg: VipConfig,
    pub store: S,
    pub address: A,
    pub metrics: VipMetrics,
    pub status: watch::Sender<VipStatus>,
    pub ready: watch::Receiver<bool>,
    pub quit: CancellationToken,
    pub hand_over: Arc<AtomicBool>,
}

/// Waits until `ready` equals `want`; never returns once the sender is gone.
async fn until(ready: &mut watch::Receiver<bool>, want: bool) {
    if ready.wait_for(|r| *r == want).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl<S: Store, A: Address> Election<S, A> {
    /// Runs until `quit`; returns the lease when it was handed over while holding.
    pub async fn run(mut self, inherit: Option<LeaseId>) -> Option<LeaseId> {
        // Every series exists from the start: 0 on the nodes that do not hold.
        let ip = self.cfg.address.to_string();
        self.metrics.leader.with_label_values(&[&ip]).set(0);
        for event in ["acquired", "released", "lost"] {
            self.metrics.transitions.with_label_values(&[&ip, event]);
        }
        let mut held = match inherit {
            Some(lease) => self.resume(lease).await,
            None => None,
        };
        if held.is_none() {
            self.remove_stale();
        }
        loop {
            let (lease, sent) = match held.take() {
                Some(h) => h,
                None => match self.candidate().await {
                    Some(h) => h,
                    None => return None,
                },
            };
            let end = self.hold(lease, sent).await;
            if end == HoldEnd::Quit && self.hand_over.load(Ordering::SeqCst) {
                info!(vip = %self.cfg.cidr(), lease, "handing the VIP over to the successor");
                return Some(lease);
            }
            self.drop_address(&end);
            self.release_lease(lease).await;
            if end == HoldEnd::Quit {
                return None;
            }
        }
    }

    /// Takes over a lease from the predecessor if it still holds the key.
    async fn resume(&mut self, lease: LeaseId) -> Option<(LeaseId, Instant)> {
        let sent = Instant::now();
        let alive = matches!(self.store.keepalive(lease).await, Ok(ttl) if ttl > 0);
        let ours = matches!(self.store.get(&self.cfg.etcd.key).await,
            Ok(KeyState { holder: Some((_, l)), .. }) if l == lease);
        if alive && ours {
            info!(vip = %self.cfg.cidr(), lease, "took over the VIP lease from the previous process");
            Some((lease, sent))
        } else {
            warn!(vip = %self.cfg.cidr(), lease, "the handed-over lease no longer holds the VIP");
            None
        }
    }

    /// A crashed earlier run may have left the address behind.
    fn remove_stale(&mut self) {
        match self.address.remove() {
            Ok(true) => {
                warn!(vip = %self.cfg.cidr(), interface = %self.cfg.interface, "removed a stale VIP left by an earlier run")
            }
            Ok(false) => {}
            Err(e) => warn!(vip = %self.cfg.cidr(), error = %e, "cannot remove a stale VIP"),
        }
    }

    fn set_status(&self, leader: bool, holder: Option<String>) {
        self.status.send_if_modified(|s| {
            if s.leader == leader && s.holder == holder {
                return false;
            }
            s.leader = leader;
            s.holder = holder;
            s.since = SystemTime::now();
            true
        });
    }

    fn error(&self, what: &str, e: &EtcdError, first: &mut bool) {
        self.metrics.errors.inc();
        if *first {
            warn!(vip = %self.cfg.cidr(), error = %e, "{what}");
            *first = false;
        } else {
            debug!(vip = %self.cfg.cidr(), error = %e, "{what}");
        }
    }

    /// A retry period with up to 50% jitter, so candidates do not move in step.
    fn backoff(&self) -> Duration {
        self.cfg.retry_period.mul_f64(1.0 + fastrand::f64() / 2.0)
    }

    /// Campaigns until this node wins (lease, when its grant was sent) or `quit`.
    async fn candidate(&mut self) -> Option<(LeaseId, Instant)> {
        let mut first_error = true;
        loop {
            if self.cfg.require_ready && !*self.ready.borrow() {
                debug!(vip = %self.cfg.cidr(), "not campaigning: no pool has an up backend");
                tokio::select! {
                    _ = self.quit.cancelled() => return None,
                    _ = until(&mut self.ready, true) => {}
                }
            }
            let quit = self.quit.clone();
            let step = tokio::select! {
                _ = quit.cancelled() => return None,
                s = self.campaign_once() => s,
            };
            match step {
                Ok(Some(won)) => return Some(won),
                Ok(None) => first_error = true,
                Err(e) => {
                    self.error("VIP election: etcd call failed", &e, &mut first_error);
                    tokio::select! {
                        _ = self.quit.cancelled() => return None,
                        _ = sleep(self.backoff()) => {}
                    }
                }
            }
        }
    }

    /// Reads the key; waits for it to go when held, else tries to create it.
    async fn campaign_once(&mut self) -> Result<Option<(LeaseId, Instant)>, EtcdError> {
        let key = self.cfg.etcd.key.clone();
        let state = self.store.get(&key).await?;
        if let Some((holder, _)) = state.holder {
            self.set_status(false, Some(holder));
            // Bounded, so a watch on a silently dead connection is re-armed.
            debug!(vip = %self.cfg.cidr(), holder = ?self.status.borrow().holder, revision = state.revision, "watching the election key");
            let watch = self.store.wait_deleted(&key, state.revision + 1);
            match timeout(self.cfg.lease_duration, watch).await {
                Ok(result) => {
                    result?;
                    debug!(vip = %self.cfg.cidr(), "the election key was deleted");
                }
                Err(_) => {
                    debug!(vip = %self.cfg.cidr(), "no change to the election key; reading it again")
                }
            }
            return Ok(None);
        }
        let sent = Instant::now();
        let (lease, ttl) = self.store.grant(self.cfg.lease_duration).await?;
        if ttl < self.cfg.lease_duration.as_secs() as i64 {
            warn!(vip = %self.cfg.cidr(), granted = ttl, "etcd granted a shorter lease than lease_duration");
            let _ = self.store.revoke(lease).await;
            return Ok(None);
        }
        match self.store.campaign(&key, &self.cfg.identity, lease).await {
            Ok(Campaign::Won) => Ok(Some((lease, sent))),
            Ok(Campaign::Lost { holder, .. }) => {
                self.set_status(false, Some(holder));
                let _ = self.store.revoke(lease).await;
                Ok(None)
            }
            Err(e) => {
                // The transaction may have succeeded: revoking deletes the key if so.
                let _ = self.store.revoke(lease).await;
                Err(e)
            }
        }
    }

    /// Holds the VIP until quit, resignation or loss. `renewed` is when the last
    /// successful renewal (or the grant) was sent: etcd's lease runs from no earlier.
    async fn hold(&mut self, lease: LeaseId, renewed: Instant) -> HoldEnd {
        let cidr = self.cfg.cidr();
        if let Err(e) = self.address.add() {
            warn!(vip = %cidr, error = %e, "won the election but cannot add the VIP; resigning");
            return HoldEnd::Lost("cannot add the address");
        }
        let announce = self.quit.child_token();
        self.address.announce(announce.clone());
        let _stop_announcing = announce.drop_guard();
        let ip = self.cfg.address.to_string();
        self.metrics.leader.with_label_values(&[&ip]).set(1);
        self.metrics
            .transitions
            .with_label_values(&[&ip, "acquired"])
            .inc();
        self.set_status(true, Some(self.cfg.identity.clone()));
        info!(vip = %cidr, interface = %self.cfg.interface, lease, "acquired the VIP");

        let mut last_ok = renewed;
        let mut next = Instant::now() + self.cfg.retry_period;
        let mut first_error = true;
        let key = self.cfg.etcd.key.clone();
        loop {
            let deadline = last_ok + self.cfg.renew_deadline;
            let require_ready = self.cfg.require_ready;
            let renew = renew(&mut self.store, &key, lease, next);
            let result = tokio::select! {
                biased;
                _ = self.quit.cancelled() => return HoldEnd::Quit,
                _ = sleep_until(deadline) => return HoldEnd::Lost("no successful renewal within renew_deadline"),
                _ = until(&mut self.ready, false), if require_ready => return HoldEnd::Resign,
                r = renew => r,
            };
            match result {
                Ok(sent) => {
                    last_ok = sent;
                    next = sent + self.cfg.retry_period;
                    first_error = true;
                }
                Err(RenewError::LeaseGone) => return HoldEnd::Lost("the lease expired"),
                Err(RenewError::KeyTaken) => return HoldEnd::Lost("the election key is not ours"),
                Err(RenewError::Etcd(e)) => {
                    self.metrics.errors.inc();
                    if first_error {
                        warn!(vip = %cidr, error = %e, "VIP lease renewal failed; retrying");
                        first_error = false;
                    }
                    next = Instant::now() + self.cfg.retry_period / 2;
                }
            }
        }
    }

    /// Removes the address after holding ended, and says why once.
    fn drop_address(&mut self, end: &HoldEnd) {
        let cidr = self.cfg.cidr();
        if let Err(e) = self.address.remove() {
            warn!(vip = %cidr, error = %e, "cannot remove the VIP");
        }
        let ip = self.cfg.address.to_string();
        self.metrics.leader.with_label_values(&[&ip]).set(0);
        let event = match end {
            HoldEnd::Lost(why) => {
                warn!(vip = %cidr, reason = why, "lost the VIP; removed the address");
                "lost"
            }
            HoldEnd::Resign => {
                info!(vip = %cidr, "released the VIP: no pool has an up backend");
                "released"
            }
            HoldEnd::Quit => {
                info!(vip = %cidr, "released the VIP on shutdown");
                "released"
            }
        };
        self.metrics
            .transitions
            .with_label_values(&[&ip, event])
            .inc();
        self.set_status(false, None);
    }

    /// Revokes the lease so another node need not wait for it to expire (best effort).
    async fn release_lease(&mut self, lease: LeaseId) {
        if let Err(e) = self.store.revoke(lease).await {
            self.metrics.errors.inc();
            debug!(vip = %self.cfg.cidr(), lease, error = %e, "cannot revoke the VIP lease; it will expire");
        }
    }
}

/// At `at`: renew the lease, then check the key is still bound to it. Returns when the
/// successful renewal was sent.
async fn renew<S: Store>(
    store: &mut S,
    key: &str,
    lease: LeaseId,
    at: Instant,
) -> Result<Instant, RenewError> {
    sleep_until(at).await;
    let sent = Instant::now();
    let ttl = store.keepalive(lease).await.map_err(RenewError::Etcd)?;
    if ttl <= 0 {
        return Err(RenewError::LeaseGone);
    }
    match store.get(key).await.map_err(RenewError::Etcd)? {
        KeyState {
            holder: Some((_, l)),
            ..
        } if l == lease => Ok(sent),
        _ => Err(RenewError::KeyTaken),
    }
}

#[cfg(test)]
mod tests;
