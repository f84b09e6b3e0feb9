//! Normalization of every supported event format into [`LifecycleEvent`]s.
//!
//! Formats: byokd's canonical CloudEvents ([`canonical`]; in binary content mode through
//! [`binary`]), AWS EventBridge incl. CloudTrail API
//! calls ([`aws`]), Azure Event Grid in both schemas ([`azure`]) and GCP Cloud Audit Log entries,
//! bare or in a Pub/Sub push envelope ([`gcp`]). One message may hold several events (Event Grid
//! delivers arrays), so [`normalize`] returns all of them; they stand or fall together.
//!
//! Every error here is permanent: the same bytes will never parse, so the consumer
//! dead-letters the message with [`NormalizeError`]'s text as the reason. The one exception is
//! [`NormalizeError::Ignored`]: a well-formed provider event that changes nothing for byokd
//! (a failed API call, `Encrypt`, a secret's expiry). The consumer acks those, because
//! dead-lettering every routine KMS call would bury the messages that do need a look.

pub mod aws;
pub mod azure;
pub mod binary;
pub mod canonical;
pub mod gcp;

use crate::domain::LifecycleEvent;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// Why a message is not a lifecycle event byokd can apply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NormalizeError {
    /// Larger than the configured limit; not even parsed.
    #[error("message of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// The message size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// Not valid JSON.
    #[error("message is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but of no format byokd knows.
    #[error("unknown event format: {0}")]
    UnknownFormat(String),
    /// A known format with a missing or invalid field.
    #[error("invalid {format} event: {detail}")]
    Schema {
        /// The format it was recognized as.
        format: &'static str,
        /// What is wrong, naming the field.
        detail: String,
    },
    /// A valid provider event that changes nothing byokd tracks (failed call, unrelated API,
    /// certificate or secret event). Acked, not dead-lettered.
    #[error("ignored: {0}")]
    Ignored(String),
    /// Dated further ahead of byokd's clock than the allowed skew: a forged or broken clock.
    /// Believed, it would not order anything (events are hints), but it is refused so the
    /// sender hears of it.
    #[error(
        "event {id:?} is dated {time}, {ahead_secs} s ahead of byokd's clock (at most {max_secs} s allowed)"
    )]
    FromTheFuture {
        /// The event id.
        id: String,
        /// Its claimed time.
        time: DateTime<Utc>,
        /// How far ahead.
        ahead_secs: i64,
        /// The allowed skew.
        max_secs: i64,
    },
}

/// Refuses a message any of whose events lies more than `max_skew` ahead of `now`.
///
/// # Errors
///
/// [`NormalizeError::FromTheFuture`] naming the first such event.
pub fn check_times(
    events: &[LifecycleEvent],
    now: DateTime<Utc>,
    max_skew: chrono::Duration,
) -> Result<(), NormalizeError> {
    match events.iter().find(|e| e.time > now + max_skew) {
        Some(e) => Err(NormalizeError::FromTheFuture {
            id: e.event_id.clone(),
            time: e.time,
            ahead_secs: (e.time - now).num_seconds(),
            max_secs: max_skew.num_seconds(),
        }),
        None => Ok(()),
    }
}

impl NormalizeError {
    /// Whether the message should be acked and counted rather than dead-lettered.
    pub fn is_ignored(&self) -> bool {
        matches!(self, NormalizeError::Ignored(_))
    }
}

/// What one provider record turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A lifecycle event to apply.
    Event(LifecycleEvent),
    /// Valid, but nothing to do; the reason is logged and returned to HTTP callers.
    Ignored(String),
}

/// Parses `body` in whichever supported format it is in.
///
/// # Errors
///
/// [`NormalizeError::Ignored`] when every record in the message is ignorable; any other
/// variant when the message (or any one record of an array) cannot be used: a message is
/// applied whole or not at all, so a half-understood batch is never half-applied.
pub fn normalize(body: &[u8], limit: usize) -> Result<Vec<LifecycleEvent>, NormalizeError> {
    if body.len() > limit {
        return Err(NormalizeError::TooLarge {
            size: body.len(),
            limit,
        });
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| NormalizeError::NotJson(e.to_string()))?;
    let parsed = match &value {
        Value::Array(items) => azure::parse_array(items)?,
        Value::Object(object) => vec![parse_object(object)?],
        _ => {
            return Err(NormalizeError::UnknownFormat(
                "expected a JSON object or an Event Grid array".to_owned(),
            ));
        }
    };
    let mut events = Vec::with_capacity(parsed.len());
    let mut ignored = Vec::new();
    for p in parsed {
        match p {
            Parsed::Event(e) => events.push(e),
            Parsed::Ignored(reason) => ignored.push(reason),
        }
    }
    if events.is_empty() {
        return Err(NormalizeError::Ignored(if ignored.is_empty() {
            "no events in the message".to_owned()
        } else {
            ignored.join("; ")
        }));
    }
    Ok(events)
}

/// Detects the format of one JSON object by the fields only that format has.
fn parse_object(object: &Map<String, Value>) -> Result<Parsed, NormalizeError> {
    let type_ = object.get("type").and_then(Value::as_str).unwrap_or("");
    if object.contains_key("specversion") {
        if type_.starts_with(azure::TYPE_PREFIX) {
            return azure::parse_one(object);
        }
        if type_.starts_with(gcp::EVENTARC_TYPE_PREFIX) {
            return gcp::parse_eventarc(object);
        }
        return canonical::parse(Value::Object(object.clone())).map(Parsed::Event);
    }
    if object.contains_key("eventType") {
        return azure::parse_one(object);
    }
    if object.get("source").and_then(Value::as_str) == Some(aws::SOURCE)
        || object.contains_key("detail-type")
    {
        return aws::parse(object);
    }
    if object.contains_key("protoPayload") || gcp::is_push_envelope(object) {
        return gcp::parse(object);
    }
    Err(NormalizeError::UnknownFormat(
        "no \"specversion\" (CloudEvents), \"eventType\" (Event Grid), \"detail-type\" \
         (EventBridge), \"protoPayload\" (audit log) or \"message.data\" (Pub/Sub push)"
            .to_owned(),
    ))
}

/// Follows a dotted path of object keys.
pub(crate) fn path<'a>(value: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(value, |v, k| v.get(k))
}

/// A non-empty, trimmed string at `keys`, or `None`.
pub(crate) fn str_at<'a>(value: &'a Value, keys: &[&str]) -> Option<&'a str> {
    path(value, keys)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Parses an RFC 3339 timestamp, naming `field` on failure.
pub(crate) fn rfc3339(
    format: &'static str,
    field: &str,
    value: &str,
) -> Result<DateTime<Utc>, NormalizeError> {
    DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| NormalizeError::Schema {
            format,
            detail: format!("{field} {value:?} is not an RFC 3339 timestamp: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Normalizes a fixture that must hold exactly one event.
    pub(crate) fn one(body: &str) -> LifecycleEvent {
        let mut events = normalize(body.as_bytes(), 1 << 20).expect(body);
        assert_eq!(events.len(), 1);
        events.remove(0)
    }

    /// The error a fixture must produce.
    pub(crate) fn err(body: &str) -> NormalizeError {
        normalize(body.as_bytes(), 1 << 20).expect_err(body)
    }

    /// Feeds every prefix and a few byte-mangled variants of each fixture to [`normalize`]:
    /// whatever comes in, the answer is a value, never a panic.
    pub(crate) fn never_panics(fixture: &str) {
        let bytes = fixture.as_bytes();
        let step = (bytes.len() / 200).max(1);
        for end in (0..bytes.len()).step_by(step) {
            let _ = normalize(&bytes[..end], 1 << 20);
        }
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200 {
            let mut mangled = bytes.to_vec();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = usize::try_from(seed % bytes.len().max(1) as u64).unwrap_or(0);
                let replacement = [b'"', b'{', b']', b'0', b'-', b' ', b'\\', b'x'];
                if let Some(b) = mangled.get_mut(at) {
                    *b = replacement[usize::try_from(seed % 8).unwrap_or(0)];
                }
            }
            let _ = normalize(&mangled, 1 << 20);
        }
        // Well-formed JSON with every string and number replaced by the other types.
        if let Ok(value) = serde_json::from_str::<Value>(fixture) {
            for swap in [
                Value::Null,
                Value::Bool(true),
                7.into(),
                "x".into(),
                Value::Array(vec![]),
            ] {
                let _ = normalize(swap_leaves(&value, &swap).to_string().as_bytes(), 1 << 20);
            }
        }
    }

    fn swap_leaves(value: &Value, with: &Value) -> Value {
        match value {
            Value::Object(m) => Value::Object(
                m.iter()
                    // Keep the keys detection relies on, so the provider parser itself runs.
                    .map(|(k, v)| match k.as_str() {
                        "specversion" | "type" | "eventType" | "source" | "detail-type"
                        | "eventName" | "eventSource" | "methodName" | "serviceName" => {
                            (k.clone(), v.clone())
                        }
                        _ => (k.clone(), swap_leaves(v, with)),
                    })
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(|v| swap_leaves(v, with)).collect()),
            _ => with.clone(),
        }
    }

    #[test]
    fn ignored_is_not_dead_lettered_and_says_why() {
        let err = NormalizeError::Ignored("Encrypt changes nothing".to_owned());
        assert!(err.is_ignored());
        assert_eq!(err.to_string(), "ignored: Encrypt changes nothing");
        assert!(!NormalizeError::NotJson("x".to_owned()).is_ignored());
    }

    #[test]
    fn scalars_and_unknown_objects_are_unknown_formats() {
        for body in ["1", "\"s\"", "null", r#"{"hello":"world"}"#] {
            let err = normalize(body.as_bytes(), 1024).expect_err(body);
            assert!(
                matches!(err, NormalizeError::UnknownFormat(_)),
                "{body}: {err}"
            );
        }
        never_panics(r#"{"hello":["world",1,{"a":null}]}"#);
    }
}
