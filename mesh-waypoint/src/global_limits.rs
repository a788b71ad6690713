//! Global rate limits of TrafficPolicies: counted by a rate-limit service that speaks Envoy's
//! protocol (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, gRPC), such as
//! envoyproxy/ratelimit backed by Redis, so that every waypoint replica draws on the same
//! counts. A request that a local limit let by asks the service once about every global limit
//! that applies, each a descriptor:
//!
//! - `traffic_policy`: the policy's `namespace/name`; `limit`: the limit's index in it;
//! - `destination_service`: the Service addressed (`namespace/name`), each its own count;
//! - the key's value, when the limit has one: `<header name>` = the header's value (requests
//!   without it share one count), or `source_principal` = the client's SPIFFE ID;
//!
//! with the limit itself as the descriptor's override (`requests_per_unit`, `unit`), so the
//! service needs no limits of its own, only the domain (envoyproxy/ratelimit: a config file
//! with `domain: ferrymesh` and no descriptors). Over the limit is a 429 with `retry-after`
//! (the service's `duration_until_reset`, else the unit) and the service's
//! `response_headers_to_add`. A service that does not answer within the timeout, or is not
//! configured, lets the request by, unless the policy says `failureModeDeny`: then a 500
//! flagged `RLSE`, as Envoy answers.

use std::time::Duration;

use ferrymesh_api::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
use ferrymesh_api::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use ferrymesh_api::ratelimit::rate_limit_response::Code;
use ferrymesh_api::ratelimit::rate_limit_service_client::RateLimitServiceClient;
use ferrymesh_api::ratelimit::{RateLimitRequest, RateLimitResponse};
use ferrymesh_route::traffic::{Applied, LimitKey, RateLimit};
use http::{HeaderMap, HeaderName, HeaderValue};
use tonic::transport::{Channel, Endpoint};

/// The rate-limit service the waypoint asks, if it was given one.
#[derive(Debug)]
pub struct RateLimitService {
    client: Option<RateLimitServiceClient<Channel>>,
    /// The domain its limits are kept under.
    domain: String,
    /// How long a request waits for its answer.
    timeout: Duration,
}

/// Why a request was refused.
#[derive(Debug)]
pub enum Refused {
    /// Over a limit: a 429.
    OverLimit {
        /// How long until the count starts again.
        retry_after: Duration,
        /// `rate limited by TrafficPolicy namespace/name global[i]: ...`.
        reason: String,
        /// Headers the service asks to add to the answer.
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// The service gave no answer and the policy says `failureModeDeny`: a 500.
    Unanswered {
        /// What went wrong, naming the policy.
        reason: String,
    },
}

impl RateLimitService {
    /// The service at `url` (`http://host:port`, connected on first use), or none.
    pub fn new(url: Option<&str>, domain: String, timeout: Duration) -> anyhow::Result<Self> {
        let client = match url {
            None => None,
            Some(url) => {
                let endpoint = Endpoint::from_shared(url.to_string())
                    .map_err(|e| anyhow::anyhow!("--rate-limit-service {url:?}: {e}"))?
                    .connect_timeout(timeout)
                    .tcp_nodelay(true);
                Some(RateLimitServiceClient::new(endpoint.connect_lazy()))
            }
        };
        Ok(Self { client, domain, timeout })
    }

    /// Asks about a request to `service` under the global limits of `limits` (from the client
    /// `principal`, with `headers`); lets it by or says why not.
    pub async fn check(
        &self,
        limits: Applied<'_, RateLimit>,
        service: &str,
        headers: &HeaderMap,
        principal: Option<&str>,
    ) -> Result<(), Refused> {
        let policy = limits.policy.key();
        let request = RateLimitRequest {
            domain: self.domain.clone(),
            descriptors: descriptors(&policy, limits.feature, service, headers, principal),
            hits_addend: 0,
        };
        let answer = match &self.client {
            None => Err("no rate-limit service is configured (mesh-waypoint --rate-limit-service)".to_string()),
            Some(client) => {
                let mut client = client.clone();
                match tokio::time::timeout(self.timeout, client.should_rate_limit(request)).await {
                    Ok(Ok(answer)) => Ok(answer.into_inner()),
                    Ok(Err(status)) => Err(format!("the rate-limit service failed: {}", status.message())),
                    Err(_) => {
                        Err(format!("the rate-limit service did not answer within {}ms", self.timeout.as_millis()))
                    }
                }
            }
        };
        let result = match answer {
            Ok(answer) => judge(&policy, limits.feature, answer).map_err(|over| ("over_limit", over)),
            Err(error) if limits.feature.failure_mode_deny => {
                let reason = format!("{error}; TrafficPolicy {policy} has failureModeDeny");
                Err(("error", Refused::Unanswered { reason }))
            }
            Err(error) => {
                tracing::debug!(%policy, "global rate limit not checked, request let by: {error}");
                metrics::counter!("ferrymesh_rate_limit_service_calls_total", "result" => "error").increment(1);
                return Ok(());
            }
        };
        let label = match &result {
            Ok(()) => "ok",
            Err((label, _)) => label,
        };
        metrics::counter!("ferrymesh_rate_limit_service_calls_total", "result" => label).increment(1);
        result.map_err(|(_, refused)| refused)
    }
}

/// One descriptor per global limit of `limits` (module docs), in their order.
fn descriptors(
    policy: &str,
    limits: &RateLimit,
    service: &str,
    headers: &HeaderMap,
    principal: Option<&str>,
) -> Vec<RateLimitDescriptor> {
    let entry = |key: &str, value: &str| Entry { key: key.into(), value: value.into() };
    limits
        .global
        .iter()
        .enumerate()
        .map(|(i, limit)| {
            let mut entries = vec![
                entry("traffic_policy", policy),
                entry("limit", &i.to_string()),
                entry("destination_service", service),
            ];
            let key = match &limit.key {
                LimitKey::Shared => None,
                LimitKey::Header(name) => Some(name.as_str()),
                LimitKey::SourcePrincipal => Some("source_principal"),
            };
            if let Some(key) = key {
                entries.push(entry(key, limit.key.value_in(headers, principal)));
            }
            RateLimitDescriptor {
                entries,
                limit: Some(RateLimitOverride { requests_per_unit: limit.requests, unit: limit.unit as i32 }),
                hits_addend: None,
            }
        })
        .collect()
}

/// The service's answer about `limits`, as a refusal naming the first limit it found over.
fn judge(policy: &str, limits: &RateLimit, answer: RateLimitResponse) -> Result<(), Refused> {
    if answer.overall_code() != Code::OverLimit {
        return Ok(());
    }
    let over = answer.statuses.iter().position(|s| s.code() == Code::OverLimit).unwrap_or(0);
    let limit = limits.global.get(over).or(limits.global.first());
    let until_reset = answer.statuses.get(over).and_then(|s| s.duration_until_reset);
    let retry_after = match until_reset.and_then(|d| Duration::try_from(d).ok()) {
        Some(d) => d,
        None => limit.map(|l| l.unit.duration()).unwrap_or(Duration::from_secs(1)),
    };
    let reason = match limit {
        Some(l) => format!("rate limited by TrafficPolicy {policy} global[{over}]: {l}"),
        None => format!("rate limited by TrafficPolicy {policy} (the rate-limit service)"),
    };
    let mut headers = Vec::new();
    for h in &answer.response_headers_to_add {
        let value =
            if h.value.is_empty() { HeaderValue::from_bytes(&h.raw_value) } else { HeaderValue::try_from(&h.value) };
        match (HeaderName::try_from(&h.key), value) {
            (Ok(name), Ok(value)) => headers.push((name, value)),
            _ => tracing::debug!(header = %h.key, "the rate-limit service asked for a header that is not one"),
        }
    }
    Err(Refused::OverLimit { retry_after, reason, headers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrymesh_api::envoy::config::core::v3::HeaderValue as EnvoyHeader;
    use ferrymesh_api::ratelimit::rate_limit_response::DescriptorStatus;
    use ferrymesh_route::traffic::{GlobalLimit, LimitUnit, Target, TrafficPolicy};

    fn limits() -> RateLimit {
        RateLimit {
            local: vec![],
            global: vec![
                GlobalLimit { requests: 100, unit: LimitUnit::Hour, key: LimitKey::Shared },
                GlobalLimit { requests: 10, unit: LimitUnit::Minute, key: LimitKey::Header("x-user".into()) },
                GlobalLimit { requests: 5, unit: LimitUnit::Second, key: LimitKey::SourcePrincipal },
            ],
            failure_mode_deny: false,
        }
    }

    #[test]
    fn each_global_limit_is_a_descriptor_keyed_by_policy_service_and_value_with_its_limit() {
        let mut headers = HeaderMap::new();
        headers.insert("x-user", "alice".parse().unwrap());
        let sent = descriptors("shop/limits", &limits(), "shop/web", &headers, Some("spiffe://td/ns/shop/sa/a"));
        let entries = |d: &RateLimitDescriptor| -> Vec<(String, String)> {
            d.entries.iter().map(|e| (e.key.clone(), e.value.clone())).collect()
        };
        let common = |i: &str| {
            vec![
                ("traffic_policy".to_string(), "shop/limits".to_string()),
                ("limit".into(), i.into()),
                ("destination_service".into(), "shop/web".into()),
            ]
        };
        assert_eq!(entries(&sent[0]), common("0"));
        assert_eq!(entries(&sent[1]), [common("1"), vec![("x-user".into(), "alice".into())]].concat());
        assert_eq!(
            entries(&sent[2]),
            [common("2"), vec![("source_principal".into(), "spiffe://td/ns/shop/sa/a".into())]].concat()
        );
        // Envoy's numbers: 2 a minute, 1 a second.
        assert_eq!(sent[1].limit, Some(RateLimitOverride { requests_per_unit: 10, unit: 2 }));
        assert_eq!(sent[2].limit, Some(RateLimitOverride { requests_per_unit: 5, unit: 1 }));
        // A request without the header shares the count of those without it.
        let bare = descriptors("shop/limits", &limits(), "shop/web", &HeaderMap::new(), None);
        assert_eq!(bare[1].entries[3].value, "");
    }

    #[test]
    fn an_over_limit_answer_names_the_limit_and_carries_the_reset_and_the_services_headers() {
        let ok = RateLimitResponse { overall_code: Code::Ok as i32, ..Default::default() };
        assert!(judge("shop/limits", &limits(), ok).is_ok());
        let status = |code: Code, reset: Option<i64>| DescriptorStatus {
            code: code as i32,
            duration_until_reset: reset.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
            ..Default::default()
        };
        let over = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![status(Code::Ok, None), status(Code::OverLimit, Some(42)), status(Code::Ok, None)],
            response_headers_to_add: vec![EnvoyHeader {
                key: "x-ratelimit-remaining".into(),
                value: "0".into(),
                raw_value: vec![],
            }],
            ..Default::default()
        };
        let Err(Refused::OverLimit { retry_after, reason, headers }) = judge("shop/limits", &limits(), over) else {
            panic!("over the limit")
        };
        assert_eq!(retry_after, Duration::from_secs(42));
        assert_eq!(reason, "rate limited by TrafficPolicy shop/limits global[1]: 10/Minute global per x-user");
        assert_eq!(headers, [(HeaderName::from_static("x-ratelimit-remaining"), HeaderValue::from_static("0"))]);
        // Without a reset time, the limit's unit.
        let bare = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![status(Code::OverLimit, None)],
            ..Default::default()
        };
        let Err(Refused::OverLimit { retry_after, .. }) = judge("shop/limits", &limits(), bare) else { panic!() };
        assert_eq!(retry_after, Duration::from_secs(3600));
    }

    #[tokio::test]
    async fn without_a_service_a_request_is_let_by_unless_the_policy_denies_on_failure() {
        let service = RateLimitService::new(None, "ferrymesh".into(), Duration::from_millis(50)).unwrap();
        let mut policy = TrafficPolicy {
            namespace: "shop".into(),
            name: "limits".into(),
            targets: vec![Target::Service("web".into())],
            fault: None,
            rate_limit: Some(limits()),
        };
        async fn check(service: &RateLimitService, p: &TrafficPolicy) -> Result<(), Refused> {
            let applied = Applied { policy: p, feature: p.rate_limit.as_ref().unwrap() };
            service.check(applied, "shop/web", &HeaderMap::new(), None).await
        }
        assert!(check(&service, &policy).await.is_ok());
        policy.rate_limit.as_mut().unwrap().failure_mode_deny = true;
        let Err(Refused::Unanswered { reason }) = check(&service, &policy).await else { panic!("refused") };
        assert!(reason.contains("no rate-limit service is configured") && reason.contains("shop/limits"), "{reason}");
        assert!(RateLimitService::new(Some("not a url"), "d".into(), Duration::from_millis(50)).is_err());
    }
}
