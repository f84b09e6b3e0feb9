//! Google Cloud KMS changes as Cloud Audit Log entries (`protoPayload.serviceName ==
//! "cloudkms.googleapis.com"`): bare (log sink to Pub/Sub, pulled), inside a Pub/Sub push
//! envelope (`message.data`, base64), or as an Eventarc CloudEvent whose `data` is the entry.
//!
//! Cloud KMS has no lifecycle notifications of its own, so the audit log is the only event
//! source. Methods are matched on the last dotted segment because some routes log the short
//! name (`DestroyCryptoKeyVersion`) and others the qualified one
//! (`google.cloud.kms.v1.KeyManagementService.DestroyCryptoKeyVersion`).
//!
//! What is mapped and why:
//! - `UpdateCryptoKeyVersion` to state `DISABLED`/`ENABLED`: disabled/enabled; other updates
//!   (labels, ...) are ignored.
//! - `DestroyCryptoKeyVersion`: deletion_scheduled (the version goes `DESTROY_SCHEDULED`);
//!   `RestoreCryptoKeyVersion`: deletion_cancelled. GCP keeps state per *version*, so every
//!   event names its version: the state model applies one about the primary to the key and
//!   one about another version only to the DEKs still under it, as the KMS reports it
//!   ([`crate::domain::kek::is_about_another_version`]).
//! - `UpdateCryptoKeyPrimaryVersion`: rotated to the new primary's version number.
//!   `CreateCryptoKeyVersion` is rotated only when the entry shows the new version is primary
//!   (`response.primary`, as a rotation logs it); a plain create does not change what Encrypt
//!   uses, so there is nothing to re-wrap to yet, and the primary switch logs its own entry.
//! - `SetIamPolicy`: ignored. Whether the new policy still lets byokd's service account use the
//!   key cannot be told from the entry alone (it needs the account and the role semantics); the
//!   key probe finds a revocation by trying the key.
//! - Failed calls (`protoPayload.status.code` non-zero) changed nothing and are ignored.
//!
//! The event id is the entry's `insertId`, unique per log entry and kept on redelivery.

use super::{NormalizeError, Parsed, path, rfc3339, str_at};
use crate::domain::{EventKind, LifecycleEvent, Origin, Provider};
use base64::Engine;
use serde_json::{Map, Value};

const FORMAT: &str = "GCP audit log";
const SERVICE: &str = "cloudkms.googleapis.com";
/// Eventarc's CloudEvents type for audit log entries.
pub const EVENTARC_TYPE_PREFIX: &str = "google.cloud.audit.log.";

fn schema(detail: impl Into<String>) -> NormalizeError {
    NormalizeError::Schema {
        format: FORMAT,
        detail: detail.into(),
    }
}

/// Whether `object` is a Pub/Sub push envelope (`{"message": {"data": ...}}`).
pub fn is_push_envelope(object: &Map<String, Value>) -> bool {
    object.get("message").and_then(|m| m.get("data")).is_some()
}

/// Parses a log entry, or a Pub/Sub push envelope around one.
pub fn parse(object: &Map<String, Value>) -> Result<Parsed, NormalizeError> {
    if object.contains_key("protoPayload") {
        return entry(&Value::Object(object.clone()));
    }
    let data = object
        .get("message")
        .and_then(|m| m.get("data"))
        .and_then(Value::as_str)
        .ok_or_else(|| schema("message.data is not a string"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(data.trim()))
        .map_err(|e| schema(format!("message.data is not base64: {e}")))?;
    let inner: Value = serde_json::from_slice(&bytes)
        .map_err(|e| schema(format!("message.data is not a JSON log entry: {e}")))?;
    if inner.get("protoPayload").is_none() {
        return Err(schema(
            "message.data holds no protoPayload (not an audit log entry)",
        ));
    }
    entry(&inner)
}

/// Parses an Eventarc CloudEvent (`type: google.cloud.audit.log.v1.written`).
pub fn parse_eventarc(object: &Map<String, Value>) -> Result<Parsed, NormalizeError> {
    match object.get("data") {
        Some(data) if data.get("protoPayload").is_some() => entry(data),
        _ => Err(schema(
            "data holds no protoPayload (not an audit log entry)",
        )),
    }
}

fn entry(entry: &Value) -> Result<Parsed, NormalizeError> {
    let payload = entry
        .get("protoPayload")
        .filter(|p| p.is_object())
        .ok_or_else(|| schema("protoPayload is not an object"))?;
    let service = str_at(payload, &["serviceName"])
        .ok_or_else(|| schema("protoPayload.serviceName is missing"))?;
    if service != SERVICE {
        return Err(schema(format!(
            "protoPayload.serviceName {service:?} is not {SERVICE:?}"
        )));
    }
    let method = str_at(payload, &["methodName"])
        .ok_or_else(|| schema("protoPayload.methodName is missing"))?;
    let short = method.rsplit('.').next().unwrap_or(method);
    let code = path(payload, &["status", "code"])
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if code != 0 {
        return Ok(Parsed::Ignored(format!(
            "{short} failed with status {code}; the key did not change"
        )));
    }
    let state = || {
        str_at(payload, &["response", "state"])
            .or_else(|| str_at(payload, &["request", "cryptoKeyVersion", "state"]))
            .or_else(|| str_at(payload, &["request", "state"]))
    };
    let kind = match short {
        "UpdateCryptoKeyVersion" => match state() {
            Some("DISABLED") => EventKind::Disabled,
            Some("ENABLED") => EventKind::Enabled,
            other => {
                return Ok(Parsed::Ignored(format!(
                    "UpdateCryptoKeyVersion to state {} changes nothing byokd tracks",
                    other.unwrap_or("(unchanged)")
                )));
            }
        },
        "DestroyCryptoKeyVersion" => EventKind::DeletionScheduled,
        "RestoreCryptoKeyVersion" => EventKind::DeletionCancelled,
        "UpdateCryptoKeyPrimaryVersion" => EventKind::Rotated,
        "CreateCryptoKeyVersion" if path(payload, &["response", "primary"]).is_some() => {
            EventKind::Rotated
        }
        "CreateCryptoKeyVersion" => {
            return Ok(Parsed::Ignored(
                "CreateCryptoKeyVersion without a new primary: Encrypt still uses the old one"
                    .to_owned(),
            ));
        }
        "SetIamPolicy" => {
            return Ok(Parsed::Ignored(
                "SetIamPolicy: a revocation cannot be told from the entry; the key probe checks access"
                    .to_owned(),
            ));
        }
        other => {
            return Ok(Parsed::Ignored(format!(
                "Cloud KMS method {other} does not change a key's lifecycle"
            )));
        }
    };
    let event_id = str_at(entry, &["insertId"]).ok_or_else(|| schema("insertId is missing"))?;
    let time = rfc3339(
        FORMAT,
        "timestamp",
        str_at(entry, &["timestamp"]).ok_or_else(|| schema("timestamp is missing"))?,
    )?;
    let resource = str_at(payload, &["resourceName"])
        .ok_or_else(|| schema("protoPayload.resourceName is missing"))?;
    let (key_ref, resource_version) = split_resource(resource)?;
    let version = if kind == EventKind::Rotated {
        Some(rotated_version(payload, short, resource_version)?)
    } else {
        resource_version
    };
    Ok(Parsed::Event(LifecycleEvent {
        provider: Provider::Gcp,
        event_id: event_id.to_owned(),
        kind,
        key_ref,
        version,
        expires_at: None,
        time,
        source: str_at(entry, &["logName"]).unwrap_or(SERVICE).to_owned(),
        origin: Origin::Event,
    }))
}

/// `projects/P/locations/L/keyRings/R/cryptoKeys/K[/cryptoKeyVersions/N]` -> (key, N).
fn split_resource(resource: &str) -> Result<(String, Option<String>), NormalizeError> {
    let trimmed = resource.trim_start_matches("//cloudkms.googleapis.com/");
    let parts: Vec<&str> = trimmed.split('/').collect();
    match parts.as_slice() {
        [
            "projects",
            p,
            "locations",
            l,
            "keyRings",
            r,
            "cryptoKeys",
            k,
            rest @ ..,
        ] if [p, l, r, k].iter().all(|s| !s.is_empty()) => {
            let key = format!("projects/{p}/locations/{l}/keyRings/{r}/cryptoKeys/{k}");
            match rest {
                [] => Ok((key, None)),
                ["cryptoKeyVersions", n] if !n.is_empty() => Ok((key, Some((*n).to_owned()))),
                _ => Err(schema(format!(
                    "protoPayload.resourceName {resource:?} has an unexpected suffix"
                ))),
            }
        }
        _ => Err(schema(format!(
            "protoPayload.resourceName {resource:?} is not projects/P/locations/L/keyRings/R/cryptoKeys/K"
        ))),
    }
}

/// The new primary's version number: from the request (`cryptoKeyVersionId`), the response's
/// `primary.name`, or the version in the resource name (a created version).
fn rotated_version(
    payload: &Value,
    method: &str,
    resource_version: Option<String>,
) -> Result<String, NormalizeError> {
    if let Some(id) = str_at(payload, &["request", "cryptoKeyVersionId"]) {
        return Ok(id.to_owned());
    }
    if let Some(name) = str_at(payload, &["response", "primary", "name"])
        && let Ok((_, Some(n))) = split_resource(name)
    {
        return Ok(n);
    }
    resource_version.ok_or_else(|| {
        schema(format!(
            "{method}: no protoPayload.request.cryptoKeyVersionId or response.primary.name"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{err, never_panics, one};
    use super::*;

    const KEY: &str =
        "projects/acme-prod/locations/europe-west1/keyRings/byok/cryptoKeys/tenant-kek";

    fn log(method: &str, resource: &str, request: &str, response: &str, status: &str) -> String {
        format!(
            r#"{{"logName":"projects/acme-prod/logs/cloudaudit.googleapis.com%2Factivity",
            "resource":{{"type":"cloudkms_cryptokeyversion","labels":{{"project_id":"acme-prod","location":"europe-west1",
              "key_ring_id":"byok","crypto_key_id":"tenant-kek","crypto_key_version_id":"3"}}}},
            "protoPayload":{{"@type":"type.googleapis.com/google.cloud.audit.AuditLog","serviceName":"cloudkms.googleapis.com",
              "methodName":"{method}","resourceName":"{resource}",
              "authenticationInfo":{{"principalEmail":"ops@acme.example"}},
              "request":{request},"response":{response},"status":{status}}},
            "insertId":"ins-{method}","timestamp":"2026-11-28T10:00:00.123456Z","severity":"NOTICE",
            "receiveTimestamp":"2026-11-28T10:00:01Z"}}"#
        )
    }

    fn version_log(method: &str, response: &str) -> String {
        log(
            method,
            &format!("{KEY}/cryptoKeyVersions/3"),
            "{}",
            response,
            "{}",
        )
    }

    #[test]
    fn methods_map_to_kinds() {
        let cases = [
            (
                version_log("UpdateCryptoKeyVersion", r#"{"state":"DISABLED"}"#),
                EventKind::Disabled,
            ),
            (
                version_log("UpdateCryptoKeyVersion", r#"{"state":"ENABLED"}"#),
                EventKind::Enabled,
            ),
            (
                version_log(
                    "DestroyCryptoKeyVersion",
                    r#"{"state":"DESTROY_SCHEDULED","destroyTime":"2026-12-28T10:00:00Z"}"#,
                ),
                EventKind::DeletionScheduled,
            ),
            (
                version_log(
                    "google.cloud.kms.v1.KeyManagementService.DestroyCryptoKeyVersion",
                    "{}",
                ),
                EventKind::DeletionScheduled,
            ),
            (
                version_log("RestoreCryptoKeyVersion", r#"{"state":"DISABLED"}"#),
                EventKind::DeletionCancelled,
            ),
        ];
        for (body, kind) in cases {
            let e = one(&body);
            assert_eq!(e.kind, kind);
            assert_eq!(e.provider, Provider::Gcp);
            assert_eq!(e.key_ref, KEY);
            assert_eq!(e.version.as_deref(), Some("3"));
            assert!(e.event_id.starts_with("ins-"));
            assert_eq!(e.time.to_rfc3339(), "2026-11-28T10:00:00.123456+00:00");
        }
        // The state may be in the request only (a patch of `state`).
        let req = log(
            "UpdateCryptoKeyVersion",
            &format!("{KEY}/cryptoKeyVersions/3"),
            r#"{"cryptoKeyVersion":{"state":"DISABLED"},"updateMask":"state"}"#,
            "{}",
            "{}",
        );
        assert_eq!(one(&req).kind, EventKind::Disabled);
    }

    #[test]
    fn rotation_versions() {
        let primary = log(
            "UpdateCryptoKeyPrimaryVersion",
            KEY,
            r#"{"name":"x","cryptoKeyVersionId":"4"}"#,
            "{}",
            "{}",
        );
        let e = one(&primary);
        assert_eq!(
            (e.kind, e.version.as_deref()),
            (EventKind::Rotated, Some("4"))
        );
        let from_response = log(
            "UpdateCryptoKeyPrimaryVersion",
            KEY,
            "{}",
            &format!(r#"{{"primary":{{"name":"{KEY}/cryptoKeyVersions/5"}}}}"#),
            "{}",
        );
        assert_eq!(one(&from_response).version.as_deref(), Some("5"));
        let created_primary = log(
            "CreateCryptoKeyVersion",
            &format!("{KEY}/cryptoKeyVersions/6"),
            "{}",
            &format!(r#"{{"primary":{{"name":"{KEY}/cryptoKeyVersions/6"}}}}"#),
            "{}",
        );
        assert_eq!(one(&created_primary).version.as_deref(), Some("6"));
        let created = version_log("CreateCryptoKeyVersion", r#"{"state":"ENABLED"}"#);
        assert!(err(&created).is_ignored());
        let nothing = log("UpdateCryptoKeyPrimaryVersion", KEY, "{}", "{}", "{}");
        assert!(
            err(&nothing)
                .to_string()
                .contains("protoPayload.request.cryptoKeyVersionId")
        );
    }

    #[test]
    fn pubsub_push_and_eventarc_envelopes() {
        let entry = version_log("UpdateCryptoKeyVersion", r#"{"state":"DISABLED"}"#);
        let data = base64::engine::general_purpose::STANDARD.encode(entry.as_bytes());
        let push = format!(
            r#"{{"message":{{"data":"{data}","messageId":"1","attributes":{{"logging.googleapis.com/timestamp":"x"}}}},
            "subscription":"projects/acme-prod/subscriptions/byokd"}}"#
        );
        assert_eq!(one(&push), one(&entry));
        let eventarc = format!(
            r#"{{"specversion":"1.0","id":"ea-1","source":"//cloudaudit.googleapis.com/projects/acme-prod",
            "type":"google.cloud.audit.log.v1.written","time":"2026-11-28T10:00:00Z","data":{entry}}}"#
        );
        assert_eq!(one(&eventarc), one(&entry));
        let bad = push.replace(&data, "!!!not base64!!!");
        assert!(err(&bad).to_string().contains("message.data is not base64"));
        let not_entry = push.replace(
            &data,
            &base64::engine::general_purpose::STANDARD.encode(b"{\"a\":1}"),
        );
        assert!(err(&not_entry).to_string().contains("no protoPayload"));
    }

    #[test]
    fn failed_iam_and_other_calls_are_ignored() {
        let failed = log(
            "DestroyCryptoKeyVersion",
            &format!("{KEY}/cryptoKeyVersions/3"),
            "{}",
            "{}",
            r#"{"code":7,"message":"Permission denied"}"#,
        );
        let e = err(&failed);
        assert!(e.is_ignored() && e.to_string().contains("status 7"), "{e}");
        let iam = log("SetIamPolicy", KEY, r#"{"policy":{}}"#, "{}", "{}");
        assert!(err(&iam).to_string().contains("key probe"));
        for m in ["Encrypt", "GetCryptoKey", "UpdateCryptoKey"] {
            assert!(err(&log(m, KEY, "{}", "{}", "{}")).is_ignored(), "{m}");
        }
        let labels = version_log("UpdateCryptoKeyVersion", r#"{"labels":{"a":"b"}}"#);
        assert!(err(&labels).is_ignored());
    }

    #[test]
    fn errors_name_the_field() {
        let base = version_log("UpdateCryptoKeyVersion", r#"{"state":"DISABLED"}"#);
        let cases = [
            (
                base.replace("cloudkms.googleapis.com\",", "storage.googleapis.com\","),
                "protoPayload.serviceName",
            ),
            (
                base.replace("\"insertId\"", "\"insertIdx\""),
                "insertId is missing",
            ),
            (
                base.replace("2026-11-28T10:00:00.123456Z", "noon"),
                "timestamp \"noon\"",
            ),
            (
                base.replace(
                    &format!("{KEY}/cryptoKeyVersions/3"),
                    "projects/acme-prod/keyRings/x",
                ),
                "protoPayload.resourceName",
            ),
            (
                base.replace("\"methodName\":\"UpdateCryptoKeyVersion\",", ""),
                "protoPayload.methodName",
            ),
        ];
        for (body, expected) in cases {
            let e = err(&body).to_string();
            assert!(e.contains(expected), "{expected}: {e}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let entry = version_log(
            "DestroyCryptoKeyVersion",
            r#"{"state":"DESTROY_SCHEDULED"}"#,
        );
        never_panics(&entry);
        let data = base64::engine::general_purpose::STANDARD.encode(entry.as_bytes());
        never_panics(&format!(r#"{{"message":{{"data":"{data}"}}}}"#));
    }
}
