//! byokd's canonical format: CloudEvents 1.0 structured JSON with type `byok.key.<kind>`.

use super::NormalizeError;
use crate::domain::{EventKind, LifecycleEvent, Origin, Provider};
use chrono::{DateTime, Utc};
use serde::Deserialize;

const FORMAT: &str = "canonical";
/// Every canonical type starts with this; the rest is an [`EventKind`].
pub const TYPE_PREFIX: &str = "byok.key.";

#[derive(Deserialize)]
struct Envelope {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    kind: String,
    time: Option<String>,
    data: Data,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Data {
    provider: String,
    key_ref: String,
    version: Option<String>,
    expires_at: Option<String>,
}

fn schema(detail: impl Into<String>) -> NormalizeError {
    NormalizeError::Schema {
        format: FORMAT,
        detail: detail.into(),
    }
}

fn timestamp(field: &str, value: &str) -> Result<DateTime<Utc>, NormalizeError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            schema(format!(
                "{field} {value:?} is not an RFC 3339 timestamp: {e}"
            ))
        })
}

/// Parses a canonical event. A missing `time` means "now": CloudEvents makes it optional, and
/// the receipt time is the best order we have.
pub fn parse(value: serde_json::Value) -> Result<LifecycleEvent, NormalizeError> {
    let envelope: Envelope = serde_json::from_value(value).map_err(|e| schema(e.to_string()))?;
    if envelope.specversion != "1.0" {
        return Err(schema(format!(
            "specversion {:?} is not supported (expected \"1.0\")",
            envelope.specversion
        )));
    }
    for (field, value) in [("id", &envelope.id), ("source", &envelope.source)] {
        if value.trim().is_empty() {
            return Err(schema(format!("{field} must not be empty")));
        }
    }
    let kind = envelope
        .kind
        .strip_prefix(TYPE_PREFIX)
        .and_then(|k| k.parse::<EventKind>().ok())
        .ok_or_else(|| {
            schema(format!(
                "type {:?} is not one of byok.key.{{{}}}",
                envelope.kind,
                EventKind::ALL
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ))
        })?;
    let provider: Provider = envelope
        .data
        .provider
        .parse()
        .map_err(|e: crate::domain::UnknownName| schema(format!("data.provider: {e}")))?;
    if envelope.data.key_ref.trim().is_empty() {
        return Err(schema("data.key_ref must not be empty"));
    }
    let time = match &envelope.time {
        Some(t) => timestamp("time", t)?,
        None => Utc::now(),
    };
    let expires_at = envelope
        .data
        .expires_at
        .as_deref()
        .map(|t| timestamp("data.expires_at", t))
        .transpose()?;
    if kind == EventKind::Rotated && envelope.data.version.is_none() {
        return Err(schema("data.version is required for byok.key.rotated"));
    }
    Ok(LifecycleEvent {
        provider,
        event_id: envelope.id,
        kind,
        key_ref: envelope.data.key_ref,
        version: envelope.data.version,
        expires_at,
        time,
        source: envelope.source,
        origin: Origin::Event,
    })
}

/// Builds the canonical JSON for an event (the CLI and the local KMS publish these).
pub fn to_json(event: &LifecycleEvent) -> serde_json::Value {
    let mut data = serde_json::json!({
        "provider": event.provider,
        "key_ref": event.key_ref,
    });
    if let Some(v) = &event.version {
        data["version"] = v.clone().into();
    }
    if let Some(at) = event.expires_at {
        data["expires_at"] = at.to_rfc3339().into();
    }
    serde_json::json!({
        "specversion": "1.0",
        "id": event.event_id,
        "source": event.source,
        "type": format!("{TYPE_PREFIX}{}", event.kind),
        "time": event.time.to_rfc3339(),
        "datacontenttype": "application/json",
        "data": data,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{NormalizeError, normalize};
    use super::*;

    const LIMIT: usize = 64 * 1024;

    fn parse_str(s: &str) -> Result<LifecycleEvent, NormalizeError> {
        let mut events = normalize(s.as_bytes(), LIMIT)?;
        assert_eq!(events.len(), 1, "one canonical event per message");
        Ok(events.remove(0))
    }

    #[test]
    fn parses_every_kind_and_round_trips() {
        for kind in EventKind::ALL {
            let body = format!(
                r#"{{"specversion":"1.0","id":"ev-{kind}","source":"kms://test","type":"byok.key.{kind}",
                   "time":"2026-11-28T10:00:00Z","data":{{"provider":"local","key_ref":"tenant-a/kek",
                   "version":"7","expires_at":"2027-01-01T00:00:00+01:00"}}}}"#
            );
            let event = parse_str(&body).expect("valid event");
            assert_eq!(event.kind, *kind);
            assert_eq!(event.provider, Provider::Local);
            assert_eq!(event.version.as_deref(), Some("7"));
            assert_eq!(
                event.expires_at.map(|t| t.to_rfc3339()),
                Some("2026-12-31T23:00:00+00:00".to_owned())
            );
            let again = parse_str(&to_json(&event).to_string()).expect("round trip");
            assert_eq!(again, event);
        }
    }

    #[test]
    fn rejects_what_is_not_an_event_with_a_reason() {
        let cases = [
            ("not json", "not valid JSON"),
            ("[1,2]", "element [0]"),
            ("true", "expected a JSON object"),
            (r#"{"hello":"world"}"#, "no \"specversion\""),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"byok.key.melted","data":{"provider":"local","key_ref":"k"}}"#,
                "type \"byok.key.melted\"",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"byok.key.disabled","data":{"provider":"ibm","key_ref":"k"}}"#,
                "data.provider",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"byok.key.disabled","data":{"key_ref":"k"}}"#,
                "missing field `provider`",
            ),
            (
                r#"{"specversion":"1.0","id":"","source":"s","type":"byok.key.disabled","data":{"provider":"local","key_ref":"k"}}"#,
                "id must not be empty",
            ),
            (
                r#"{"specversion":"0.3","id":"1","source":"s","type":"byok.key.disabled","data":{"provider":"local","key_ref":"k"}}"#,
                "specversion",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"byok.key.disabled","time":"yesterday","data":{"provider":"local","key_ref":"k"}}"#,
                "RFC 3339",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"byok.key.rotated","data":{"provider":"local","key_ref":"k"}}"#,
                "data.version is required",
            ),
        ];
        for (body, expected) in cases {
            let err = parse_str(body).expect_err(body).to_string();
            assert!(err.contains(expected), "{body}: {err}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        super::super::tests::never_panics(
            r#"{"specversion":"1.0","id":"1","source":"s","type":"byok.key.rotated","time":"2026-11-28T10:00:00Z","data":{"provider":"local","key_ref":"k","version":"2","expires_at":"2027-01-01T00:00:00Z"}}"#,
        );
    }

    #[test]
    fn refuses_oversized_messages_before_parsing() {
        let err = normalize(&vec![b' '; LIMIT + 1], LIMIT).expect_err("too large");
        assert!(matches!(err, NormalizeError::TooLarge { .. }));
    }
}
