//! Access logs in Istio's default format (text or JSON), with one addition:
//! the downstream peer's SPIFFE ID (Envoy's `%DOWNSTREAM_PEER_URI_SAN%`)
//! as the last field, so every line names the workload that made the call.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::ResponseFlags;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    Text,
    Json,
    /// No access log.
    Off,
}

/// One request (or TCP connection), as Envoy's command operators see it.
/// `None` prints as `-`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogEntry {
    #[serde(serialize_with = "rfc3339")]
    pub start_time: Option<SystemTime>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub protocol: Option<&'static str>,
    pub response_code: u16,
    pub response_flags: ResponseFlags,
    pub response_code_details: Option<String>,
    pub connection_termination_details: Option<String>,
    pub upstream_transport_failure_reason: Option<String>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: u64,
    pub upstream_service_time: Option<u64>,
    pub x_forwarded_for: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub authority: Option<String>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<String>,
    pub upstream_local_address: Option<SocketAddr>,
    pub downstream_local_address: Option<SocketAddr>,
    pub downstream_remote_address: Option<SocketAddr>,
    pub requested_server_name: Option<String>,
    pub route_name: Option<String>,
    pub downstream_peer_uri_san: Option<String>,
}

fn rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_time(*t)),
        None => s.serialize_none(),
    }
}

/// RFC 3339 with milliseconds, as Envoy writes times.
pub fn format_time(t: SystemTime) -> String {
    let dt = OffsetDateTime::from(t);
    let ms = dt.millisecond();
    let dt = dt.replace_nanosecond(0).unwrap_or(dt);
    let base = dt.format(&Rfc3339).unwrap_or_default();
    // Envoy prints milliseconds: 2026-11-30T09:00:00.123Z
    format!("{}.{ms:03}Z", base.trim_end_matches('Z'))
}

fn dash<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string)
}

impl LogEntry {
    /// Istio's default TEXT format plus the peer SPIFFE ID.
    pub fn to_text(&self) -> String {
        let request = match (&self.method, &self.path, self.protocol) {
            (None, None, _) => "- - -".to_owned(),
            (m, p, proto) => format!("{} {} {}", dash(m), dash(p), proto.unwrap_or("-")),
        };
        format!(
            "[{}] \"{}\" {} {} {} {} \"{}\" {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} {} {} {} {} {} {}",
            self.start_time.map_or_else(|| "-".to_owned(), format_time),
            request,
            self.response_code,
            self.response_flags,
            dash(&self.response_code_details),
            dash(&self.connection_termination_details),
            dash(&self.upstream_transport_failure_reason),
            self.bytes_received,
            self.bytes_sent,
            self.duration,
            dash(&self.upstream_service_time),
            dash(&self.x_forwarded_for),
            dash(&self.user_agent),
            dash(&self.request_id),
            dash(&self.authority),
            dash(&self.upstream_host),
            dash(&self.upstream_cluster),
            dash(&self.upstream_local_address),
            dash(&self.downstream_local_address),
            dash(&self.downstream_remote_address),
            dash(&self.requested_server_name),
            dash(&self.route_name),
            dash(&self.downstream_peer_uri_san),
        )
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Where access-log lines go (stdout by default), one line per entry.
pub struct AccessLog {
    format: AccessLogFormat,
    out: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    pub fn new(format: AccessLogFormat, out: Box<dyn Write + Send>) -> Self {
        AccessLog {
            format,
            out: Mutex::new(out),
        }
    }

    pub fn stdout(format: AccessLogFormat) -> Self {
        Self::new(format, Box::new(std::io::stdout()))
    }

    pub fn enabled(&self) -> bool {
        self.format != AccessLogFormat::Off
    }

    pub fn write(&self, entry: &LogEntry) {
        let line = match self.format {
            AccessLogFormat::Text => entry.to_text(),
            AccessLogFormat::Json => entry.to_json(),
            AccessLogFormat::Off => return,
        };
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_matches_istio_default() {
        let e = LogEntry {
            start_time: Some(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_123),
            ),
            method: Some("GET".into()),
            path: Some("/todos/1".into()),
            protocol: Some("HTTP/1.1"),
            response_code: 200,
            response_flags: ResponseFlags::NONE,
            response_code_details: Some("via_upstream".into()),
            bytes_received: 0,
            bytes_sent: 83,
            duration: 12,
            upstream_service_time: Some(11),
            user_agent: Some("curl/8.5.0".into()),
            request_id: Some("abc".into()),
            authority: Some("jsonplaceholder.typicode.com".into()),
            upstream_host: Some("127.0.0.1:8443".parse().unwrap()),
            upstream_cluster: Some("outbound|443||jsonplaceholder.typicode.com".into()),
            downstream_local_address: Some("127.0.0.1:8080".parse().unwrap()),
            downstream_remote_address: Some("127.0.0.1:40000".parse().unwrap()),
            route_name: Some("#0".into()),
            downstream_peer_uri_san: Some(
                "spiffe://cluster.local/ns/curl-external-tst/sa/default".into(),
            ),
            ..LogEntry::default()
        };
        assert_eq!(
            e.to_text(),
            "[2026-11-18T11:06:40.123Z] \"GET /todos/1 HTTP/1.1\" 200 - via_upstream - \"-\" 0 83 12 11 \"-\" \"curl/8.5.0\" \"abc\" \"jsonplaceholder.typicode.com\" \"127.0.0.1:8443\" outbound|443||jsonplaceholder.typicode.com - 127.0.0.1:8080 127.0.0.1:40000 - #0 spiffe://cluster.local/ns/curl-external-tst/sa/default"
        );
        let json: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(json["response_code"], 200);
        assert_eq!(json["start_time"], "2026-11-18T11:06:40.123Z");
        assert_eq!(
            json["downstream_peer_uri_san"],
            "spiffe://cluster.local/ns/curl-external-tst/sa/default"
        );
    }

    #[test]
    fn tcp_entry_prints_dashes() {
        let e = LogEntry {
            response_flags: ResponseFlags::NO_HEALTHY_UPSTREAM,
            ..LogEntry::default()
        };
        assert!(
            e.to_text().starts_with("[-] \"- - -\" 0 UH "),
            "{}",
            e.to_text()
        );
    }
}
