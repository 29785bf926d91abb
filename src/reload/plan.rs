//! The pure half of a reload: what changes between the running config and
//! the next one. No sockets, no tasks; unit-tested on configs alone.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;

use crate::config::{Config, ServerConfig};

/// What a reload adds, keeps and removes.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Frontends that need a socket of their own: (index in the new config,
    /// name, address). A frontend whose address changed is here too.
    pub bind: Vec<(usize, String, SocketAddr)>,
    /// (new name, old name): a renamed frontend on the same address keeps
    /// the old one's socket and accept loop.
    pub renames: Vec<(String, String)>,
    /// Frontends that are gone (not renamed): their listeners stop.
    pub removed_frontends: Vec<String>,
    /// The admin server (re)binds at this address.
    pub admin_bind: Option<SocketAddr>,
    /// Per pool of the new config: servers kept (with their health), added.
    pub pools: BTreeMap<String, PoolPlan>,
    /// Servers that leave, by pool (including every server of a removed pool).
    pub removed_servers: BTreeMap<String, Vec<ServerConfig>>,
    /// Pools that are gone.
    pub removed_pools: Vec<String>,
    /// The `vip` section changed (or appeared, or went): the running election
    /// releases and, if there is a new section, a new one starts.
    pub vip_changed: bool,
}

#[derive(Debug, Default, PartialEq)]
pub struct PoolPlan {
    pub keep: Vec<ServerConfig>,
    pub add: Vec<ServerConfig>,
}

/// Compares the running config (`None` at process start) with the next.
pub fn plan(old: Option<&Config>, new: &Config) -> Plan {
    let empty = Config::empty();
    let old_cfg = old.unwrap_or(&empty);
    let mut p = Plan {
        admin_bind: (old.map(|o| o.admin.listen) != Some(new.admin.listen))
            .then_some(new.admin.listen),
        ..Plan::default()
    };
    plan_frontends(old_cfg, new, &mut p);
    plan_pools(old_cfg, new, &mut p);
    p.vip_changed = old_cfg.vip != new.vip;
    p
}

fn plan_frontends(old: &Config, new: &Config, p: &mut Plan) {
    let new_names: HashSet<&str> = new.frontends.iter().map(|f| f.name.as_str()).collect();
    let mut taken: HashSet<&str> = HashSet::new();
    for (i, fe) in new.frontends.iter().enumerate() {
        if old
            .frontends
            .iter()
            .any(|o| o.name == fe.name && o.listen == fe.listen)
        {
            continue;
        }
        // A renamed frontend on the same (fixed) address keeps its socket.
        let renamed = (fe.listen.port() != 0)
            .then(|| {
                old.frontends.iter().find(|o| {
                    o.listen == fe.listen
                        && !new_names.contains(o.name.as_str())
                        && !taken.contains(o.name.as_str())
                })
            })
            .flatten();
        match renamed {
            Some(o) => {
                taken.insert(o.name.as_str());
                p.renames.push((fe.name.clone(), o.name.clone()));
            }
            None => p.bind.push((i, fe.name.clone(), fe.listen)),
        }
    }
    p.removed_frontends = old
        .frontends
        .iter()
        .filter(|o| !new_names.contains(o.name.as_str()) && !taken.contains(o.name.as_str()))
        .map(|o| o.name.clone())
        .collect();
}

fn plan_pools(old: &Config, new: &Config, p: &mut Plan) {
    for pc in &new.pools {
        let old_servers = old.pool(&pc.name).map(|o| &o.servers[..]).unwrap_or(&[]);
        let (keep, add) = pc
            .servers
            .iter()
            .cloned()
            .partition(|s| old_servers.contains(s));
        p.pools.insert(pc.name.clone(), PoolPlan { keep, add });
    }
    for op in &old.pools {
        let new_pool = new.pool(&op.name);
        let gone: Vec<ServerConfig> = op
            .servers
            .iter()
            .filter(|s| !new_pool.is_some_and(|np| np.servers.contains(s)))
            .cloned()
            .collect();
        if !gone.is_empty() {
            p.removed_servers.insert(op.name.clone(), gone);
        }
        if new_pool.is_none() {
            p.removed_pools.push(op.name.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn cfg(frontends: &str, pools: &str, admin: &str) -> Config {
        config::parse(&format!(
            "admin: {{listen: '{admin}'}}\nfrontends: [{frontends}]\npools: [{pools}]\n"
        ))
        .unwrap()
    }

    const FE_A: &str = "{name: a, listen: '127.0.0.1:7001', pool: p}";
    const P3: &str = "{name: p, servers: ['127.0.0.1:1', '127.0.0.1:2', '127.0.0.1:3']}";

    #[test]
    fn first_apply_binds_everything() {
        let c = cfg(FE_A, P3, "127.0.0.1:0");
        let p = plan(None, &c);
        assert_eq!(
            p.bind,
            vec![(0, "a".into(), "127.0.0.1:7001".parse().unwrap())]
        );
        assert_eq!(p.admin_bind, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(p.pools["p"].add.len(), 3);
        assert!(p.pools["p"].keep.is_empty());
        assert!(p.removed_frontends.is_empty() && p.removed_servers.is_empty());
    }

    #[test]
    fn unchanged_config_changes_nothing() {
        let c = cfg(FE_A, P3, "127.0.0.1:0");
        let p = plan(Some(&c), &c);
        assert!(p.bind.is_empty() && p.renames.is_empty() && p.admin_bind.is_none());
        assert_eq!(p.pools["p"].keep.len(), 3);
        assert!(p.pools["p"].add.is_empty());
        assert!(p.removed_servers.is_empty() && p.removed_pools.is_empty());
    }

    #[test]
    fn servers_are_kept_added_and_removed_by_address() {
        let old = cfg(FE_A, P3, "127.0.0.1:0");
        let new = cfg(
            FE_A,
            "{name: p, servers: ['127.0.0.1:2', '127.0.0.1:3', '127.0.0.1:4']}",
            "127.0.0.1:0",
        );
        let p = plan(Some(&old), &new);
        let keys = |v: &[ServerConfig]| v.iter().map(|s| s.key.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&p.pools["p"].keep), ["127.0.0.1:2", "127.0.0.1:3"]);
        assert_eq!(keys(&p.pools["p"].add), ["127.0.0.1:4"]);
        assert_eq!(keys(&p.removed_servers["p"]), ["127.0.0.1:1"]);
    }

    #[test]
    fn renamed_frontend_keeps_its_socket_and_moved_one_rebinds() {
        let old = cfg(
            &format!("{FE_A}, {{name: b, listen: '127.0.0.1:7002', pool: p}}"),
            P3,
            "127.0.0.1:0",
        );
        let new = cfg(
            "{name: a2, listen: '127.0.0.1:7001', pool: p}, {name: b, listen: '127.0.0.1:7003', pool: p}",
            P3,
            "127.0.0.1:0",
        );
        let p = plan(Some(&old), &new);
        assert_eq!(p.renames, vec![("a2".into(), "a".into())]);
        assert_eq!(
            p.bind,
            vec![(1, "b".into(), "127.0.0.1:7003".parse().unwrap())]
        );
        assert!(p.removed_frontends.is_empty(), "{:?}", p.removed_frontends);
    }

    #[test]
    fn removed_pool_and_frontend_and_moved_admin() {
        let old = cfg(
            &format!("{FE_A}, {{name: q, listen: '127.0.0.1:7009', pool: q}}"),
            &format!("{P3}, {{name: q, servers: ['127.0.0.1:9']}}"),
            "127.0.0.1:0",
        );
        let new = cfg(FE_A, P3, "127.0.0.1:8405");
        let p = plan(Some(&old), &new);
        assert_eq!(p.removed_frontends, ["q"]);
        assert_eq!(p.removed_pools, ["q"]);
        assert_eq!(p.removed_servers["q"].len(), 1);
        assert_eq!(p.admin_bind, Some("127.0.0.1:8405".parse().unwrap()));
    }
}
