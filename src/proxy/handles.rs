//! Metric handles of the L7 hot path, resolved on first use and kept with a
//! frontend's route: a request then counts itself without hashing label
//! values or taking the metric family's lock.

use std::sync::OnceLock;

use prometheus::{Histogram, IntCounter};

use crate::metrics::{Metrics, HTTP_METHODS};

/// Status codes whose request counters are kept resolved; others are looked
/// up by label each time (they are rare on a healthy control plane).
const STATUSES: [u16; 10] = [200, 201, 204, 304, 400, 403, 404, 409, 422, 503];
const METHODS: usize = HTTP_METHODS.len();

/// `apilb_http_requests_total` handles per backend, and
/// `apilb_http_request_duration_seconds` handles per method, of one route.
pub struct Handles {
    duration: [OnceLock<Histogram>; METHODS],
    requests: Vec<[OnceLock<IntCounter>; METHODS * STATUSES.len()]>,
}

/// The labels of one request count.
pub struct Labels<'a> {
    pub frontend: &'a str,
    pub pool: &'a str,
    pub server: &'a str,
    pub method: &'static str,
    pub status: http::StatusCode,
}

impl Handles {
    /// Handles for a route whose pool has `backends` servers.
    pub fn new(backends: usize) -> Self {
        Handles {
            duration: std::array::from_fn(|_| OnceLock::new()),
            requests: (0..backends)
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect(),
        }
    }

    /// The duration histogram of `frontend`'s requests with `method`.
    pub fn duration(&self, m: &Metrics, frontend: &str, method: &'static str) -> Histogram {
        let resolve = || m.http_duration.with_label_values(&[frontend, method]);
        match method_index(method) {
            Some(i) => self.duration[i].get_or_init(resolve).clone(),
            None => resolve(),
        }
    }

    /// Counts one answered request to backend `i` of the route's pool.
    pub fn count(&self, m: &Metrics, i: usize, l: &Labels<'_>) {
        let resolve = || {
            m.http_requests.with_label_values(&[
                l.frontend,
                l.pool,
                l.server,
                l.method,
                l.status.as_str(),
            ])
        };
        let slot =
            method_index(l.method).zip(STATUSES.iter().position(|s| *s == l.status.as_u16()));
        match (self.requests.get(i), slot) {
            (Some(cells), Some((mi, si))) => {
                cells[mi * STATUSES.len() + si].get_or_init(resolve).inc()
            }
            _ => resolve().inc(),
        }
    }
}

fn method_index(method: &str) -> Option<usize> {
    HTTP_METHODS.iter().position(|k| *k == method)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_and_uncached_counts_land_in_the_same_series() {
        let m = Metrics::new();
        let h = Handles::new(2);
        let labels = |status: u16| Labels {
            frontend: "fe",
            pool: "p",
            server: "10.0.0.1:6443",
            method: "GET",
            status: http::StatusCode::from_u16(status).unwrap(),
        };
        for status in [200, 200, 418] {
            h.count(&m, 1, &labels(status));
        }
        let get = |status: &str| {
            m.http_requests
                .with_label_values(&["fe", "p", "10.0.0.1:6443", "GET", status])
                .get()
        };
        assert_eq!((get("200"), get("418")), (2, 1));
        h.duration(&m, "fe", "GET").observe(0.1);
        h.duration(&m, "fe", "GET").observe(0.2);
        let d = m.http_duration.with_label_values(&["fe", "GET"]);
        assert_eq!(d.get_sample_count(), 2);
    }
}
