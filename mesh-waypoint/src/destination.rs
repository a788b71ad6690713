//! What the waypoint keeps per backend Service for its DestinationRule: the connection pool's
//! limits (circuit breaking: a request past them answers 503 `UO`), outlier detection (an
//! endpoint that keeps failing is ejected, receives nothing until its ejection ends, and
//! returns), and the round-robin cursor. State is kept per Service and rebuilt when its rule
//! changes; a Service without a rule has none of it and costs one map lookup per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferrymesh_route::destination::{DestinationRule, OutlierDetection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The state of every DestinationRule in use, by `namespace/name`.
#[derive(Debug, Default)]
pub struct Destinations {
    by_rule: Mutex<HashMap<String, Arc<Destination>>>,
}

impl Destinations {
    /// The state for `rule`, kept while the rule is unchanged (a changed rule starts afresh:
    /// its limits and thresholds are new). Each rule has its own: the rules of two client
    /// namespaces for one Service never share limits.
    pub fn of(&self, rule: &Arc<DestinationRule>) -> Arc<Destination> {
        let mut all = self.by_rule.lock().expect("destinations lock");
        let key = rule.key();
        match all.get(&key) {
            Some(d) if d.rule == *rule => d.clone(),
            _ => {
                let d = Arc::new(Destination::new(rule.clone()));
                all.insert(key, d.clone());
                d
            }
        }
    }
}

/// One backend Service's state.
#[derive(Debug)]
pub struct Destination {
    /// The rule it was built for.
    pub rule: Arc<DestinationRule>,
    /// Requests in progress.
    requests: Arc<AtomicU32>,
    /// HTTP/1.1 connections in use, when limited.
    connections: Option<Arc<Semaphore>>,
    /// Requests waiting for a connection.
    pending: Arc<AtomicU32>,
    /// Retries in progress.
    retries: Arc<AtomicU32>,
    /// The round-robin cursor.
    cursor: AtomicUsize,
    /// Outlier detection, by endpoint.
    outliers: Mutex<HashMap<IpAddr, Health>>,
}

/// Which limit a request was refused by.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{limit} of {service} reached ({max})")]
pub struct Overflow {
    /// `namespace/name`.
    pub service: String,
    /// The DestinationRule field.
    pub limit: &'static str,
    /// Its value.
    pub max: u32,
}

/// A request's place within the limits, held until its response ends.
#[derive(Debug)]
pub struct Admission {
    _request: Counted,
    _connection: Option<OwnedSemaphorePermit>,
}

/// A retry's place within `maxRetries`, until dropped.
#[derive(Debug)]
pub struct RetryPlace {
    _counted: Counted,
}

/// Counts one in `counter` until dropped.
#[derive(Debug)]
struct Counted(Arc<AtomicU32>);

impl Counted {
    /// Counts one more, unless `max` are counted already.
    fn within(counter: &Arc<AtomicU32>, max: Option<u32>) -> Option<Counted> {
        let max = max.unwrap_or(u32::MAX);
        counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Counted(counter.clone()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What an attempt at an endpoint came to, for outlier detection.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// The endpoint could not be reached, or its connection failed (Envoy counts these as 5xx
    /// and as gateway errors).
    LocalFailure,
}

/// One endpoint's outlier state.
#[derive(Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Ejected until then.
    ejected_until: Option<Instant>,
    /// Ejections that still count towards the next one's length.
    times: u32,
    /// When `times` last changed or the last ejection ended.
    since: Option<Instant>,
}

impl Destination {
    fn new(rule: Arc<DestinationRule>) -> Self {
        let connections = rule.policy.pool.max_connections.map(|n| Arc::new(Semaphore::new(n as usize)));
        Self {
            rule,
            requests: Arc::default(),
            connections,
            pending: Arc::default(),
            retries: Arc::default(),
            cursor: AtomicUsize::new(0),
            outliers: Mutex::default(),
        }
    }

    fn overflow(&self, limit: &'static str, max: Option<u32>) -> Overflow {
        Overflow { service: self.rule.service.clone(), limit, max: max.unwrap_or(u32::MAX) }
    }

    /// Admits a request within `http2MaxRequests`, and an HTTP/1.1 one (`http1`) to a
    /// connection within `maxConnections`, waiting as one of at most `http1MaxPendingRequests`
    /// when every connection is busy.
    pub async fn admit(&self, http1: bool) -> Result<Admission, Overflow> {
        let pool = &self.rule.policy.pool;
        let request = Counted::within(&self.requests, pool.max_requests)
            .ok_or_else(|| self.overflow("http2MaxRequests", pool.max_requests))?;
        let connection = match (&self.connections, http1) {
            (Some(connections), true) => Some(match connections.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let _pending = Counted::within(&self.pending, pool.max_pending_requests)
                        .ok_or_else(|| self.overflow("http1MaxPendingRequests", pool.max_pending_requests))?;
                    connections.clone().acquire_owned().await.expect("the semaphore is never closed")
                }
            }),
            _ => None,
        };
        Ok(Admission { _request: request, _connection: connection })
    }

    /// A retry's place within `maxRetries`, held while it is tried; None past the limit.
    pub fn retry(&self) -> Option<RetryPlace> {
        Counted::within(&self.retries, self.rule.policy.pool.max_retries)
            .map(|counted| RetryPlace { _counted: counted })
    }

    /// The next round-robin position.
    pub fn next_turn(&self) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether each endpoint of `ips` is ejected now.
    pub fn ejected(&self, ips: impl Iterator<Item = IpAddr>) -> Vec<bool> {
        let Some(rule) = &self.rule.policy.outliers else { return ips.map(|_| false).collect() };
        let now = Instant::now();
        let mut outliers = self.outliers.lock().expect("outliers lock");
        ips.map(|ip| outliers.get_mut(&ip).is_some_and(|h| h.ejected(rule, now))).collect()
    }

    /// Counts `outcome` of an attempt at `ip`, one of `endpoints` ready ones; whether it
    /// ejected the endpoint.
    pub fn report(&self, ip: IpAddr, outcome: Outcome, endpoints: usize) -> bool {
        let Some(rule) = &self.rule.policy.outliers else { return false };
        let now = Instant::now();
        let mut outliers = self.outliers.lock().expect("outliers lock");
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Status(s) => (s >= 500, (502..=504).contains(&s)),
            Outcome::LocalFailure => (true, true),
        };
        let health = outliers.entry(ip).or_default();
        health.consecutive_5xx = if is_5xx { health.consecutive_5xx + 1 } else { 0 };
        health.consecutive_gateway = if is_gateway { health.consecutive_gateway + 1 } else { 0 };
        let tripped = rule.consecutive_5xx.is_some_and(|n| health.consecutive_5xx >= n)
            || rule.consecutive_gateway.is_some_and(|n| health.consecutive_gateway >= n);
        if !tripped || health.ejected(rule, now) {
            return false;
        }
        let ejected_now = outliers.values_mut().filter(|h| h.ejected_until.is_some_and(|until| now < until)).count();
        if ejected_now >= rule.max_ejected(endpoints) {
            return false;
        }
        let health = outliers.get_mut(&ip).expect("counted above");
        health.times += 1;
        health.ejected_until = Some(now + rule.ejection_time(health.times));
        health.since = Some(now);
        health.consecutive_5xx = 0;
        health.consecutive_gateway = 0;
        true
    }
}

impl Health {
    /// Whether the endpoint is ejected at `now`; an ejection that has ended is cleared, and
    /// each `interval` it then stays healthy takes one ejection off its count (Envoy's decay).
    fn ejected(&mut self, rule: &OutlierDetection, now: Instant) -> bool {
        if let Some(until) = self.ejected_until {
            if now < until {
                return true;
            }
            self.ejected_until = None;
            self.since = Some(until);
        }
        if let Some(since) = self.since.filter(|_| self.times > 0) {
            let intervals = now.saturating_duration_since(since).as_nanos() / rule.interval.as_nanos().max(1);
            if intervals > 0 {
                self.times = self.times.saturating_sub(u32::try_from(intervals).unwrap_or(u32::MAX));
                self.since = Some(now);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrymesh_route::destination::spec::DestinationRuleSpec;

    fn destination(yaml: &str) -> Destination {
        let spec: DestinationRuleSpec = serde_yaml::from_str(yaml).unwrap();
        Destination::new(Arc::new(spec.validate("shop", "dr").unwrap()))
    }

    #[tokio::test]
    async fn requests_past_the_limits_overflow_and_pending_ones_wait_for_a_connection() {
        let d = destination(
            "host: web\ntrafficPolicy:\n  connectionPool:\n    tcp:\n      maxConnections: 1\n    http:\n      http1MaxPendingRequests: 1\n      http2MaxRequests: 3\n",
        );
        let first = d.admit(true).await.unwrap();
        // The second waits for the first's connection: it is pending.
        let waiting = tokio::spawn({
            let d = Arc::new(destination("host: web\n"));
            async move { d.admit(true).await.is_ok() }
        });
        assert!(waiting.await.unwrap(), "no limit: admitted at once");
        let d = Arc::new(d);
        let pending = tokio::spawn({
            let d = d.clone();
            async move { d.admit(true).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        while d.pending.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        // A third finds the connection busy and the pending queue full.
        let third = d.admit(true).await.unwrap_err();
        assert_eq!((third.limit, third.max), ("http1MaxPendingRequests", 1));
        // HTTP/2 takes no connection permit, only a request's place: one left of 3.
        let h2 = d.admit(false).await.unwrap();
        let over = d.admit(false).await.unwrap_err();
        assert_eq!(over.limit, "http2MaxRequests");
        drop((first, h2));
        assert!(pending.await.unwrap().is_ok(), "the pending request got the connection");
        assert_eq!(d.requests.load(Ordering::Acquire), 0, "every place was given back");
    }

    #[test]
    fn consecutive_failures_eject_an_endpoint_for_a_while_and_never_too_many() {
        let d = destination(
            "host: web\ntrafficPolicy:\n  outlierDetection:\n    consecutive5xxErrors: 3\n    consecutiveGatewayErrors: 2\n    baseEjectionTime: 1s\n    maxEjectionPercent: 50\n",
        );
        let (a, b, c) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 0, 3]));
        // 500s: the third in a row ejects; a success in between starts the count again.
        assert!(!d.report(a, Outcome::Status(500), 3));
        assert!(!d.report(a, Outcome::Status(200), 3));
        assert!(!d.report(a, Outcome::Status(500), 3));
        assert!(!d.report(a, Outcome::Status(500), 3));
        assert!(d.report(a, Outcome::Status(500), 3), "the third 5xx in a row");
        assert_eq!(d.ejected([a, b].into_iter()), [true, false]);
        // Two gateway errors (a failed connection counts) would eject b, but 50% of 3 is 1.
        assert!(!d.report(b, Outcome::LocalFailure, 3));
        assert!(!d.report(b, Outcome::Status(503), 3), "at most one of three ejected");
        assert!(!d.report(c, Outcome::Status(404), 3));
        // Its ejection ends: it returns.
        let health = |ip| d.outliers.lock().unwrap().get(&ip).map(|h| (h.times, h.ejected_until.is_some()));
        assert_eq!(health(a), Some((1, true)));
        d.outliers.lock().unwrap().get_mut(&a).unwrap().ejected_until = Some(Instant::now());
        assert_eq!(d.ejected([a].into_iter()), [false]);
        // The next ejection is twice as long.
        for _ in 0..3 {
            d.report(a, Outcome::Status(500), 3);
        }
        let until = d.outliers.lock().unwrap()[&a].ejected_until.unwrap();
        assert!(until > Instant::now() + std::time::Duration::from_millis(1500), "2 x 1s");
    }

    #[test]
    fn retries_in_progress_are_bounded() {
        let d = destination("host: web\ntrafficPolicy:\n  connectionPool:\n    http:\n      maxRetries: 2\n");
        let (one, two) = (d.retry(), d.retry());
        assert!(one.is_some() && two.is_some() && d.retry().is_none());
        drop(one);
        assert!(d.retry().is_some());
    }
}
