//! Local rate limits of TrafficPolicies at the waypoint: each limit a token bucket (GCRA, the
//! `governor` crate) per Service it applies to and per key value (a header's, or the client's
//! identity), kept by this replica alone. A request must pass every limit that applies; one
//! that does not is answered 429 with `retry-after` (the seconds until a token is back, at least
//! 1). Buckets are rebuilt when their limit changes. A limit holds at most [`MAX_KEYS`] keys'
//! buckets: past that, the least recently used one is dropped (as Envoy's dynamic descriptors
//! are), counted in `ferrymesh_waypoint_rate_limit_evictions_total`, so that clients sending ever
//! new key values cannot grow the waypoint. A dropped key comes back with a full bucket, which
//! gives a client nothing a new key value would not.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymesh_route::traffic::{Applied, LocalLimit, RateLimit};
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::HeaderMap;
use lru::LruCache;

/// The most keys' buckets one limit holds (about 150 bytes each with its key).
pub const MAX_KEYS: usize = 10_000;

/// The buckets of every local limit, by policy and limit.
#[derive(Default)]
pub struct RateLimiters {
    by_limit: Mutex<HashMap<(String, usize), Arc<Limiter>>>,
}

impl std::fmt::Debug for RateLimiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiters").finish_non_exhaustive()
    }
}

/// One limit's buckets, by key, least recently used first out.
struct Limiter {
    limit: LocalLimit,
    quota: Quota,
    buckets: Mutex<LruCache<String, DefaultDirectRateLimiter>>,
}

/// Why a request was refused.
#[derive(Debug, Clone)]
pub struct Limited {
    /// How long until the bucket has a token again.
    pub retry_after: Duration,
    /// `TrafficPolicy namespace/name local[i]: ...`.
    pub reason: String,
}

impl Limiter {
    fn new(limit: &LocalLimit) -> Self {
        let period = limit.per / limit.requests;
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN));
        let keys = std::num::NonZeroUsize::new(MAX_KEYS).expect("MAX_KEYS is not 0");
        Self { limit: limit.clone(), quota, buckets: Mutex::new(LruCache::new(keys)) }
    }

    /// Takes a token from `key`'s bucket; how long until one is back when there is none.
    fn check(&self, key: String) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().expect("rate limit buckets lock");
        if !buckets.contains(&key) && buckets.push(key.clone(), RateLimiter::direct(self.quota)).is_some() {
            metrics::counter!("ferrymesh_waypoint_rate_limit_evictions_total").increment(1);
        }
        let bucket = buckets.get(&key).expect("the key's bucket was just put");
        bucket.check().map_err(|not_until| not_until.wait_time_from(bucket.clock().now()))
    }

    /// How many keys' buckets it holds.
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.buckets.lock().expect("rate limit buckets lock").len()
    }
}

impl RateLimiters {
    /// Lets a request to `service` by `limits` (from the client `principal`, with `headers`), or
    /// says which limit refused it.
    pub fn check(
        &self,
        limits: Applied<'_, RateLimit>,
        service: &str,
        headers: &HeaderMap,
        principal: Option<&str>,
    ) -> Result<(), Limited> {
        let policy = limits.policy.key();
        for (i, limit) in limits.feature.local.iter().enumerate() {
            let limiter = {
                let mut all = self.by_limit.lock().expect("rate limiters lock");
                let slot = all.entry((policy.clone(), i)).or_insert_with(|| Arc::new(Limiter::new(limit)));
                if slot.limit != *limit {
                    *slot = Arc::new(Limiter::new(limit));
                }
                slot.clone()
            };
            let value = limit.key.value_in(headers, principal);
            if let Err(wait) = limiter.check(format!("{service}\n{value}")) {
                let reason = format!("rate limited by TrafficPolicy {policy} local[{i}]: {limit}");
                return Err(Limited { retry_after: wait, reason });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrymesh_route::traffic::{LimitKey, Target, TrafficPolicy};

    fn policy(limits: Vec<LocalLimit>) -> TrafficPolicy {
        TrafficPolicy {
            namespace: "shop".into(),
            name: "limits".into(),
            targets: vec![Target::Service("web".into())],
            fault: None,
            rate_limit: Some(RateLimit { local: limits, global: vec![], failure_mode_deny: false }),
        }
    }

    fn applied(p: &TrafficPolicy) -> Applied<'_, RateLimit> {
        Applied { policy: p, feature: p.rate_limit.as_ref().unwrap() }
    }

    #[test]
    fn a_bucket_lets_its_burst_by_then_says_when_to_come_back_and_keys_have_their_own() {
        let per_minute = |burst, key| LocalLimit { requests: 5, per: Duration::from_secs(60), burst, key };
        let limiters = RateLimiters::default();
        let shared = policy(vec![per_minute(3, LimitKey::Shared)]);
        let headers = HeaderMap::new();
        let passed = (0..10).filter(|_| limiters.check(applied(&shared), "shop/web", &headers, None).is_ok()).count();
        assert_eq!(passed, 3, "the burst");
        let refused = limiters.check(applied(&shared), "shop/web", &headers, None).unwrap_err();
        // A token comes back every 12 s.
        assert!(refused.retry_after > Duration::from_secs(10) && refused.retry_after <= Duration::from_secs(12));
        assert!(refused.reason.contains("TrafficPolicy shop/limits local[0]: 5/60s burst 3"), "{}", refused.reason);
        // Another Service has its own bucket.
        assert!(limiters.check(applied(&shared), "shop/api", &headers, None).is_ok());

        let by_user = policy(vec![per_minute(2, LimitKey::Header("x-user".into()))]);
        let user = |name: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-user", name.parse().unwrap());
            h
        };
        let passes =
            |h: &HeaderMap| (0..5).filter(|_| limiters.check(applied(&by_user), "shop/web", h, None).is_ok()).count();
        assert_eq!((passes(&user("alice")), passes(&user("bob")), passes(&headers)), (2, 2, 2));
        let by_principal = policy(vec![per_minute(1, LimitKey::SourcePrincipal)]);
        let check = |p| limiters.check(applied(&by_principal), "shop/web", &headers, Some(p)).is_ok();
        assert!(
            check("spiffe://td/ns/shop/sa/a")
                && !check("spiffe://td/ns/shop/sa/a")
                && check("spiffe://td/ns/shop/sa/b")
        );
        // A changed limit starts afresh.
        let changed = policy(vec![per_minute(4, LimitKey::Shared)]);
        assert_eq!(
            (0..10).filter(|_| limiters.check(applied(&changed), "shop/web", &headers, None).is_ok()).count(),
            4
        );
    }

    #[test]
    fn a_limit_holds_at_most_its_cap_of_keys_and_drops_the_least_recently_used() {
        let per_hour = LocalLimit {
            requests: 1,
            per: Duration::from_secs(3600),
            burst: 1,
            key: LimitKey::Header("x-user".into()),
        };
        let limiter = Limiter::new(&per_hour);
        let key = |i: usize| format!("shop/web\nuser-{i}");
        // A user spent its token; then ten times the cap of new users each spend theirs.
        assert!(limiter.check(key(0)).is_ok() && limiter.check(key(0)).is_err());
        for i in 1..=MAX_KEYS * 10 {
            assert!(limiter.check(key(i)).is_ok(), "user {i}");
            // The recent ones are held: a second request from the last user is refused.
            if i % 10_007 == 0 {
                assert!(limiter.check(key(i)).is_err(), "user {i} again");
            }
        }
        assert_eq!(limiter.keys(), MAX_KEYS);
        // The first user was dropped long ago: it comes back with a full bucket.
        assert!(limiter.check(key(0)).is_ok());
        assert_eq!(limiter.keys(), MAX_KEYS);
    }
}
