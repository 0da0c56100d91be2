//! Outlier detection (a DestinationRule's `outlierDetection`) as Istio
//! configures Envoy's. Each attempt's result is counted against its
//! endpoint; consecutive errors eject it for `baseEjectionTime` times its
//! ejection backoff (at most `max(300s, baseEjectionTime)`), until the next
//! `interval` tick after that; the backoff shrinks by one for each interval
//! the endpoint stays in. At most `maxEjectionPercent` of the endpoints are
//! out at once, and below `minHealthPercent` healthy (Istio's panic
//! threshold, 0 unless set) requests go to all of them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshgate_config::model::networking::OutlierDetection;

/// Envoy's `max_ejection_time` default, which Istio raises to
/// `baseEjectionTime` when that is longer.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What an attempt at an endpoint came to, as Envoy's router reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Report {
    /// A response head with this status (a gRPC answer's: the status its
    /// `grpc-status` maps to).
    Status(u16),
    /// No connection: refused, unreachable, TLS, the connect timeout.
    ConnectFailed,
    /// The connection or stream ended before the response.
    Reset,
    /// A per-try or route timeout before the response.
    TimedOut,
    /// A TCP connection made (and its TLS, if any): all a TCP route learns
    /// of its upstream, as Envoy's TCP proxy reports it (a 200 unsplit).
    Connected,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Report::Status(status) => write!(f, "status {status}"),
            Report::ConnectFailed => f.write_str("connect failure"),
            Report::Reset => f.write_str("reset"),
            Report::TimedOut => f.write_str("timeout"),
            Report::Connected => f.write_str("connected"),
        }
    }
}

/// A compiled `outlierDetection`.
#[derive(Debug, Clone)]
pub struct Outlier {
    consecutive_5xx: Option<u32>,
    consecutive_gateway: Option<u32>,
    /// `splitExternalLocalOriginErrors`: connect failures, resets and
    /// timeouts count here (`consecutiveLocalOriginFailures`), not as 5xx.
    consecutive_local_origin: Option<u32>,
    interval: Duration,
    base_ejection: Duration,
    max_ejection: Duration,
    max_ejection_percent: u32,
    min_health_percent: u32,
}

/// One endpoint's outlier state.
#[derive(Debug, Default)]
pub(super) struct Health {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local_origin: u32,
    /// When its latest ejection ends (an interval tick).
    ejected_until: Option<Instant>,
    /// That end has been acted on: counters reset, as Envoy unejects.
    returned: bool,
    /// Envoy's ejection time backoff: the latest ejection lasted
    /// `baseEjectionTime` times this.
    backoff: u32,
    pub times_ejected: u32,
}

impl Health {
    pub(super) fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }

    /// Back from an ejection: the counts start again.
    fn come_back(&mut self, now: Instant) {
        if !self.returned && self.ejected_until.is_some_and(|t| t <= now) {
            self.returned = true;
            self.reset_counts();
        }
    }

    fn reset_counts(&mut self) {
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        self.consecutive_local_origin = 0;
    }
}

impl Outlier {
    pub fn compile(od: &OutlierDetection) -> Outlier {
        let base_ejection = od
            .base_ejection_time
            .map_or(Duration::from_secs(30), |d| d.as_std());
        let split = od.split_external_local_origin_errors == Some(true);
        Outlier {
            // consecutiveErrors is the deprecated name of consecutive5xxErrors... of gateway errors.
            consecutive_5xx: match od.consecutive_5xx_errors.or(od.consecutive_errors) {
                Some(0) => None,
                Some(n) => Some(n),
                None => Some(5),
            },
            consecutive_gateway: od.consecutive_gateway_errors.filter(|n| *n > 0),
            // Envoy's default when Istio sets none.
            consecutive_local_origin: split.then(|| {
                od.consecutive_local_origin_failures
                    .filter(|n| *n > 0)
                    .unwrap_or(5)
            }),
            interval: od
                .interval
                .map_or(Duration::from_secs(10), |d| d.as_std())
                .max(Duration::from_millis(1)),
            base_ejection,
            max_ejection: MAX_EJECTION.max(base_ejection),
            max_ejection_percent: od.max_ejection_percent.unwrap_or(10),
            min_health_percent: od.min_health_percent.unwrap_or(0),
        }
    }

    /// Counts what an attempt came to; true when a count reached its
    /// threshold (which starts it again): the endpoint is to be ejected,
    /// if `may_eject` allows. Unsplit (Envoy's default), a connect failure
    /// or reset counts as a 503 and a timeout as a 504; split, each
    /// attempt that got a connection restarts the local-origin count
    /// before its own result (Envoy's router reports the connection).
    pub(super) fn count(&self, h: &mut Health, report: Report, now: Instant) -> bool {
        h.come_back(now);
        let status = match (report, self.consecutive_local_origin) {
            (Report::Status(status), split) => {
                if split.is_some() {
                    h.consecutive_local_origin = 0;
                }
                status
            }
            (Report::ConnectFailed | Report::Reset, None) => 503,
            (Report::TimedOut, None) => 504,
            (Report::Connected, None) => 200,
            (Report::Connected, Some(_)) => {
                h.consecutive_local_origin = 0;
                return false;
            }
            (Report::ConnectFailed, Some(n)) => {
                h.consecutive_local_origin += 1;
                return reached(&mut h.consecutive_local_origin, Some(n));
            }
            (Report::Reset | Report::TimedOut, Some(n)) => {
                h.consecutive_local_origin = 1;
                return reached(&mut h.consecutive_local_origin, Some(n));
            }
        };
        if !(500..600).contains(&status) {
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            return false;
        }
        // A 5xx that is not a gateway error ends a run of those.
        if (502..=504).contains(&status) {
            h.consecutive_gateway += 1;
        } else {
            h.consecutive_gateway = 0;
        }
        h.consecutive_5xx += 1;
        let gateway = reached(&mut h.consecutive_gateway, self.consecutive_gateway);
        reached(&mut h.consecutive_5xx, self.consecutive_5xx) || gateway
    }

    /// Whether one more endpoint may be ejected with `ejected` of `total`
    /// out: `maxEjectionPercent` counts the one to be ejected too, as
    /// Envoy has since 1.27 (Istio sets no `always_eject_one_host`: under
    /// the default 10 %, a cluster of fewer than ten endpoints ejects none).
    pub(super) fn may_eject(&self, ejected: usize, total: usize) -> bool {
        (ejected + 1) * 100 <= total * self.max_ejection_percent as usize
    }

    /// Ejects the endpoint at `now`, with interval ticks counted from
    /// `born` (the cluster's start).
    pub(super) fn eject(&self, h: &mut Health, now: Instant, born: Instant) {
        // One step back for each interval tick it spent wholly in.
        if let Some(back) = h.ejected_until.filter(|t| *t <= now) {
            let ticks = now.duration_since(back).as_nanos() / self.interval.as_nanos();
            h.backoff = h
                .backoff
                .saturating_sub(u32::try_from(ticks).unwrap_or(u32::MAX));
        }
        if self.ejection(h.backoff) < self.max_ejection.saturating_add(self.base_ejection) {
            h.backoff += 1;
        }
        // At most 136 years: an Instant that far ahead is still one.
        let lasts = self
            .ejection(h.backoff)
            .min(self.max_ejection)
            .min(Duration::from_secs(u64::from(u32::MAX)));
        h.ejected_until = Some(self.next_tick(born, now + lasts));
        h.returned = false;
        h.times_ejected += 1;
        h.reset_counts();
    }

    /// The endpoints a pick is made among: those not ejected, or all of
    /// them when fewer than `minHealthPercent` are healthy (Envoy's panic
    /// mode); none when all are out and Istio's threshold of 0 leaves
    /// panic off (503 UH, no healthy upstream).
    pub(super) fn eligible(
        &self,
        addrs: &[SocketAddr],
        ejected: impl Fn(&SocketAddr) -> bool,
    ) -> Vec<SocketAddr> {
        let healthy: Vec<SocketAddr> = addrs.iter().copied().filter(|a| !ejected(a)).collect();
        if healthy.len() * 100 < addrs.len() * self.min_health_percent as usize {
            addrs.to_vec()
        } else {
            healthy
        }
    }

    /// `baseEjectionTime` × `backoff`, saturating.
    fn ejection(&self, backoff: u32) -> Duration {
        self.base_ejection
            .checked_mul(backoff)
            .unwrap_or(Duration::MAX)
    }

    /// The first interval tick (from `born`) at or after `at`: Envoy
    /// returns ejected endpoints when its interval timer fires.
    fn next_tick(&self, born: Instant, at: Instant) -> Instant {
        let interval = self.interval.as_nanos();
        let ticks = at
            .saturating_duration_since(born)
            .as_nanos()
            .div_ceil(interval);
        let since = u64::try_from(ticks * interval).unwrap_or(u64::MAX);
        born.checked_add(Duration::from_nanos(since)).unwrap_or(at)
    }
}

/// The status an answer counts as: a gRPC answer's `grpc-status` (in its
/// headers: a trailers-only answer) as Envoy maps it to HTTP, else its own.
pub(super) fn status_of(status: http::StatusCode, headers: &http::HeaderMap) -> u16 {
    let grpc = headers
        .get(crate::http::GRPC_STATUS)
        .filter(|_| crate::http::is_grpc(headers))
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse::<u32>().ok());
    match grpc {
        None => status.as_u16(),
        Some(0) => 200,
        Some(1) => 499,          // CANCELLED
        Some(3 | 9 | 11) => 400, // INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE
        Some(4) => 504,          // DEADLINE_EXCEEDED
        Some(5) => 404,          // NOT_FOUND
        Some(6 | 10) => 409,     // ALREADY_EXISTS, ABORTED
        Some(7) => 403,          // PERMISSION_DENIED
        Some(8) => 429,          // RESOURCE_EXHAUSTED
        Some(12) => 501,         // UNIMPLEMENTED
        Some(14) => 503,         // UNAVAILABLE
        Some(16) => 401,         // UNAUTHENTICATED
        Some(_) => 500,          // UNKNOWN, INTERNAL, DATA_LOSS, and any other
    }
}

/// Whether `count` reached `threshold`; if so it starts again.
fn reached(count: &mut u32, threshold: Option<u32>) -> bool {
    let reached = threshold.is_some_and(|n| *count >= n);
    if reached {
        *count = 0;
    }
    reached
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_config::model::common;

    fn outlier(f: impl FnOnce(&mut OutlierDetection)) -> Outlier {
        let mut od = OutlierDetection::default();
        f(&mut od);
        Outlier::compile(&od)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn an_ejection_grows_with_its_backoff_up_to_300s_and_ends_at_a_tick() {
        // Istio's defaults: base 30 s, interval 10 s.
        let od = outlier(|_| {});
        let born = Instant::now();
        let mut h = Health::default();
        od.eject(&mut h, born + secs(5), born);
        assert_eq!(
            h.ejected_until,
            Some(born + secs(40)),
            "35 s: the tick after"
        );
        // Ejected again as soon as it is back: twice as long.
        od.eject(&mut h, born + secs(40), born);
        assert_eq!(h.ejected_until, Some(born + secs(100)));
        let mut at = secs(100);
        for _ in 0..20 {
            od.eject(&mut h, born + at, born);
            at = h.ejected_until.unwrap() - born;
        }
        od.eject(&mut h, born + at, born);
        assert_eq!(
            h.ejected_until,
            Some(born + at + secs(300)),
            "at most 300 s"
        );
        assert_eq!(h.times_ejected, 23);
    }

    #[test]
    fn the_backoff_shrinks_by_one_for_each_interval_back_in() {
        let od = outlier(|_| {});
        let born = Instant::now();
        let mut h = Health::default();
        for at in [0, 30, 90] {
            od.eject(&mut h, born + secs(at), born);
        }
        // Backoff 3 (90 s), back at 180 s; two intervals later it is 1.
        assert_eq!(h.ejected_until, Some(born + secs(180)));
        od.eject(&mut h, born + secs(205), born);
        assert_eq!(
            h.ejected_until,
            Some(born + secs(270)),
            "205 + 2 × 30, the tick after"
        );
        // A base longer than 300 s is its own maximum.
        let od = outlier(|od| od.base_ejection_time = Some(common::Duration(secs(600))));
        let mut h = Health::default();
        od.eject(&mut h, born, born);
        od.eject(&mut h, born + secs(600), born);
        assert_eq!(h.ejected_until, Some(born + secs(1200)));
    }

    #[test]
    fn unsplit_a_reset_is_a_503_and_a_timeout_a_504() {
        let od = outlier(|od| {
            od.consecutive_5xx_errors = Some(5);
            od.consecutive_gateway_errors = Some(2);
        });
        let now = Instant::now();
        let mut h = Health::default();
        assert!(!od.count(&mut h, Report::Reset, now));
        assert!(
            od.count(&mut h, Report::TimedOut, now),
            "two gateway errors"
        );
        assert_eq!((h.consecutive_gateway, h.consecutive_5xx), (0, 2));
        assert!(
            !od.count(&mut h, Report::Status(500), now),
            "ends the gateway run"
        );
        assert!(!od.count(&mut h, Report::Status(502), now));
        assert!(
            od.count(&mut h, Report::ConnectFailed, now),
            "five 5xx in a row"
        );
        assert!(!od.count(&mut h, Report::Status(404), now));
        assert_eq!((h.consecutive_gateway, h.consecutive_5xx), (0, 0));
    }

    #[test]
    fn split_local_origin_failures_count_on_their_own() {
        let od = outlier(|od| {
            od.split_external_local_origin_errors = Some(true);
            od.consecutive_local_origin_failures = Some(3);
            od.consecutive_5xx_errors = Some(1);
        });
        let now = Instant::now();
        let mut h = Health::default();
        assert!(!od.count(&mut h, Report::ConnectFailed, now));
        assert!(!od.count(&mut h, Report::ConnectFailed, now));
        assert_eq!(h.consecutive_5xx, 0, "not a 5xx");
        // A reset comes after a connection, which starts the count again.
        assert!(!od.count(&mut h, Report::Reset, now));
        assert_eq!(h.consecutive_local_origin, 1);
        assert!(!od.count(&mut h, Report::ConnectFailed, now));
        assert!(
            od.count(&mut h, Report::ConnectFailed, now),
            "three in a row"
        );
        assert!(
            od.count(&mut h, Report::Status(500), now),
            "answers count as ever"
        );
        // Unset, Envoy's default: five.
        let od = outlier(|od| od.split_external_local_origin_errors = Some(true));
        let mut h = Health::default();
        let tripped: Vec<bool> = (0..5)
            .map(|_| od.count(&mut h, Report::ConnectFailed, now))
            .collect();
        assert_eq!(tripped, [false, false, false, false, true]);
    }

    #[test]
    fn a_tcp_connection_made_ends_a_run_of_failures() {
        let now = Instant::now();
        for split in [false, true] {
            let od = outlier(|od| {
                od.split_external_local_origin_errors = Some(split);
                od.consecutive_5xx_errors = Some(2);
                od.consecutive_local_origin_failures = split.then_some(2);
            });
            let mut h = Health::default();
            assert!(!od.count(&mut h, Report::ConnectFailed, now));
            assert!(!od.count(&mut h, Report::Connected, now));
            assert!(
                !od.count(&mut h, Report::ConnectFailed, now),
                "split: {split}"
            );
            assert!(
                od.count(&mut h, Report::ConnectFailed, now),
                "split: {split}"
            );
        }
    }

    #[test]
    fn coming_back_starts_the_counts_again() {
        let od = outlier(|od| od.consecutive_5xx_errors = Some(2));
        let born = Instant::now();
        let mut h = Health::default();
        od.eject(&mut h, born, born);
        // An attempt that was out when it was ejected answers 500.
        assert!(!od.count(&mut h, Report::Status(500), born + secs(1)));
        assert!(
            !od.count(&mut h, Report::Status(500), born + secs(31)),
            "back at 30 s"
        );
    }

    #[test]
    fn a_grpc_answer_counts_as_its_status_maps_to_http() {
        let mut headers = http::HeaderMap::new();
        headers.insert(crate::http::GRPC_STATUS, "14".parse().unwrap());
        assert_eq!(status_of(http::StatusCode::OK, &headers), 200, "not gRPC");
        headers.insert(
            http::header::CONTENT_TYPE,
            "application/grpc".parse().unwrap(),
        );
        assert_eq!(status_of(http::StatusCode::OK, &headers), 503);
        headers.insert(crate::http::GRPC_STATUS, "13".parse().unwrap());
        assert_eq!(status_of(http::StatusCode::OK, &headers), 500);
        headers.insert(crate::http::GRPC_STATUS, "5".parse().unwrap());
        assert_eq!(status_of(http::StatusCode::OK, &headers), 404);
    }
}
