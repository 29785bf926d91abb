//! Micro-benchmarks of the accept path's lock-free steps: `Pool::pick()` and
//! loading the runtime snapshot (what every new connection does first).

use std::collections::HashMap;
use std::sync::Arc;

use apilb::balancer::{Backend, Pool};
use apilb::metrics::Metrics;
use arc_swap::ArcSwap;
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn pool(balance: &str, n: usize, m: &Metrics) -> Pool {
    let servers: Vec<String> = (0..n)
        .map(|i| format!("'127.0.0.1:{}'", 10000 + i))
        .collect();
    let yaml = format!(
        "frontends: [{{name: f, listen: '127.0.0.1:0', pool: p}}]\npools: [{{name: p, balance: {balance}, servers: [{}]}}]",
        servers.join(", ")
    );
    let cfg = apilb::config::parse(&yaml).unwrap();
    let pc = cfg.pools[0].clone();
    let backends = pc
        .servers
        .iter()
        .map(|s| {
            Arc::new(Backend::new(
                "p".into(),
                s.clone(),
                true,
                m.backend("p", &s.key),
            ))
        })
        .collect();
    Pool::new(pc, backends, Default::default())
}

fn bench_pick(c: &mut Criterion) {
    let m = Metrics::new();
    for (balance, n) in [
        ("round-robin", 3),
        ("round-robin", 16),
        ("least-connections", 3),
        ("least-connections", 16),
        ("round-robin", 1000),
        ("least-connections", 1000),
    ] {
        let p = pool(balance, n, &m);
        c.bench_function(&format!("pick {balance} {n} servers"), |b| {
            b.iter(|| black_box(p.pick(black_box(&[]))))
        });
    }
    let p = pool("round-robin", 3, &m);
    c.bench_function("pick round-robin 3 servers, one tried (failover)", |b| {
        b.iter(|| black_box(p.pick(black_box(&[0]))))
    });
}

fn bench_snapshot(c: &mut Criterion) {
    // What the accept loop does: load the snapshot, find its frontend by name.
    let mut map: HashMap<Arc<str>, Arc<u64>> = HashMap::new();
    for i in 0..4 {
        map.insert(format!("frontend-{i}").into(), Arc::new(i));
    }
    let snap = ArcSwap::from_pointee(map);
    let name = String::from("frontend-2");
    c.bench_function("snapshot load + frontend lookup", |b| {
        b.iter(|| {
            let s = snap.load();
            black_box(s.get(black_box(name.as_str())).cloned())
        })
    });
    c.bench_function("snapshot load_full (Arc clone)", |b| {
        b.iter(|| black_box(snap.load_full()))
    });
}

criterion_group!(benches, bench_pick, bench_snapshot);
criterion_main!(benches);
