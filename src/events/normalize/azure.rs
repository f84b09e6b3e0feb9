//! Azure Key Vault events from Event Grid, in the Event Grid schema (`eventType`, `eventTime`,
//! `topic`) and the CloudEvents 1.0 schema (`type`, `time`, `source`), one event or an array.
//!
//! Key Vault only reports new versions, near-expiry and expiry; there is no event for a
//! disabled or deleted key, which the key probe finds instead. The `data` properties changed
//! case between doc revisions (`VaultName` / `vaultName`, even `"ObjectName "` with a stray
//! space) and `NBF`/`EXP` arrive as numbers or numeric strings, so both are read tolerantly.
//! The key is named by its versionless id (`https://<vault>.vault.azure.net/keys/<name>`),
//! because a rotation is a new version of the same key.

use super::{NormalizeError, Parsed, rfc3339};
use crate::domain::{EventKind, LifecycleEvent, Origin, Provider};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

const FORMAT: &str = "Azure Event Grid";
/// Every Key Vault event type starts with this.
pub const TYPE_PREFIX: &str = "Microsoft.KeyVault.";
/// Event Grid's own event types (subscription validation and deletion) start with this.
pub const EVENT_GRID_PREFIX: &str = "Microsoft.EventGrid.";
/// The Event Grid schema's subscription validation event.
pub const SUBSCRIPTION_VALIDATION: &str = "Microsoft.EventGrid.SubscriptionValidationEvent";

/// The `validationCode` of an Event Grid schema delivery that is a subscription validation
/// handshake (an array holding one `Microsoft.EventGrid.SubscriptionValidationEvent`), to be
/// echoed as `{"validationResponse": code}`. `None` for any other body; `Some(Err)` for a
/// validation event without a usable code.
///
/// Format: "Event Grid security and authentication: endpoint validation with Event Grid
/// events" (learn.microsoft.com/azure/event-grid/end-point-validation-event-grid-events-schema),
/// `data.validationCode` and `data.validationUrl`.
pub fn validation_code(body: &Value) -> Option<Result<String, NormalizeError>> {
    let items = body.as_array()?;
    let is_validation = |v: &Value| {
        v.get("eventType").and_then(Value::as_str).map(str::trim) == Some(SUBSCRIPTION_VALIDATION)
    };
    if !items.iter().any(is_validation) {
        return None;
    }
    let [event] = items.as_slice() else {
        return Some(Err(schema(
            "a subscription validation delivery holds exactly one event",
        )));
    };
    let code = event
        .get("data")
        .and_then(Value::as_object)
        .and_then(|d| data_str(d, "validationCode"));
    Some(match code {
        // A code is an opaque token Event Grid generated (a GUID); anything longer or with
        // control characters is not one, and is not echoed back.
        Some(c) if c.len() <= 256 && !c.chars().any(char::is_control) => Ok(c.to_owned()),
        _ => Err(schema(
            "data.validationCode of the subscription validation event is missing or not a code",
        )),
    })
}

fn schema(detail: impl Into<String>) -> NormalizeError {
    NormalizeError::Schema {
        format: FORMAT,
        detail: detail.into(),
    }
}

/// Parses an Event Grid delivery: every element must be an event of either schema. One bad
/// element rejects the whole array (the message is applied whole or not at all).
pub fn parse_array(items: &[Value]) -> Result<Vec<Parsed>, NormalizeError> {
    if items.is_empty() {
        return Err(schema("the event array is empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let object = item.as_object().filter(|o| {
                o.contains_key("eventType") || o.contains_key("specversion")
            });
            let Some(object) = object else {
                return Err(NormalizeError::UnknownFormat(format!(
                    "array element [{i}] is not an Event Grid event (no \"eventType\" or \"specversion\")"
                )));
            };
            parse_one(object).map_err(|e| match e {
                NormalizeError::Schema { format, detail } => NormalizeError::Schema {
                    format,
                    detail: format!("[{i}].{detail}"),
                },
                other => other,
            })
        })
        .collect()
}

/// Parses one event of either schema.
pub fn parse_one(object: &Map<String, Value>) -> Result<Parsed, NormalizeError> {
    let cloudevents = object.contains_key("specversion");
    let (type_field, time_field, source_field) = if cloudevents {
        ("type", "time", "source")
    } else {
        ("eventType", "eventTime", "topic")
    };
    let text = |field: &str| {
        object
            .get(field)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let event_type = text(type_field).ok_or_else(|| schema(format!("{type_field} is missing")))?;
    if event_type.starts_with(EVENT_GRID_PREFIX) {
        // Event Grid's own events (subscription validation, deletion) concern the
        // subscription, not a key; `POST /v1/events` answers the validation handshake itself.
        return Ok(Parsed::Ignored(format!(
            "{event_type} is Event Grid's own event, not a key's"
        )));
    }
    let Some(name) = event_type.strip_prefix(TYPE_PREFIX) else {
        // Another Azure service's events on this queue are a routing mistake worth seeing.
        return Err(schema(format!(
            "{type_field} {event_type:?} is not a Key Vault event ({TYPE_PREFIX}*)"
        )));
    };
    let kind = match name {
        "KeyNewVersionCreated" => EventKind::Rotated,
        "KeyNearExpiry" => EventKind::Expiring,
        "KeyExpired" => EventKind::Expired,
        other => {
            return Ok(Parsed::Ignored(format!(
                "Key Vault event {other} does not concern a key's lifecycle"
            )));
        }
    };
    let event_id = text("id").ok_or_else(|| schema("id is missing"))?;
    let time = rfc3339(
        FORMAT,
        time_field,
        text(time_field).ok_or_else(|| schema(format!("{time_field} is missing")))?,
    )?;
    let source = text(source_field)
        .unwrap_or("Microsoft.KeyVault")
        .to_owned();
    let data = object
        .get("data")
        .and_then(Value::as_object)
        .ok_or_else(|| schema("data is missing or not an object"))?;
    let (key_ref, id_version) = key_id(data)?;
    let version = match kind {
        EventKind::Rotated => Some(
            data_str(data, "Version")
                .map(str::to_owned)
                .or(id_version)
                .ok_or_else(|| schema("data.Version is missing"))?,
        ),
        _ => None,
    };
    let exp = unix_seconds(data, "EXP")?;
    let expires_at = match kind {
        EventKind::Expiring => {
            Some(exp.ok_or_else(|| schema("data.EXP is required for KeyNearExpiry"))?)
        }
        // The new version's own expiry (none when absent: a version without `exp` never
        // expires). Key Vault holds expiry, so the rotation is confirmed by reading the key,
        // and this date is what the event claims until then (audited with the event).
        EventKind::Expired | EventKind::Rotated => exp,
        _ => None,
    };
    // NBF is not used, but a malformed one means the payload is not what we think it is.
    unix_seconds(data, "NBF")?;
    Ok(Parsed::Event(LifecycleEvent {
        provider: Provider::Azure,
        event_id: event_id.to_owned(),
        kind,
        key_ref,
        version,
        expires_at,
        time,
        source,
        origin: Origin::Event,
    }))
}

/// A `data` property looked up case-insensitively, ignoring stray spaces in the name.
fn data_value<'a>(data: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    data.iter()
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

fn data_str<'a>(data: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    data_value(data, name)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// `NBF`/`EXP`: seconds since the epoch, as a number or a numeric string.
fn unix_seconds(
    data: &Map<String, Value>,
    name: &str,
) -> Result<Option<DateTime<Utc>>, NormalizeError> {
    let Some(value) = data_value(data, name) else {
        return Ok(None);
    };
    let secs = match value {
        Value::Number(n) => n
            .as_i64()
            // Whole seconds are what Key Vault sends; a fraction is truncated, not refused.
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    secs.and_then(|s| DateTime::from_timestamp(s, 0))
        .map(Some)
        .ok_or_else(|| {
            schema(format!(
                "data.{name} {value} is not seconds since the epoch (number or numeric string)"
            ))
        })
}

/// The versionless key id and, if `data.Id` had one, the version from it.
fn key_id(data: &Map<String, Value>) -> Result<(String, Option<String>), NormalizeError> {
    if let Some(id) = data_str(data, "Id") {
        let url =
            url::Url::parse(id).map_err(|e| schema(format!("data.Id {id:?} is not a URL: {e}")))?;
        let host = url.host_str().unwrap_or_default();
        let segments: Vec<&str> = url
            .path_segments()
            .map(|s| s.filter(|p| !p.is_empty()).collect())
            .unwrap_or_default();
        return match segments.as_slice() {
            ["keys", name, rest @ ..]
                if url.scheme() == "https" && !host.is_empty() && rest.len() <= 1 =>
            {
                // Lower-cased as byokd stores Key Vault keys (names are case-insensitive).
                Ok((
                    format!("https://{host}/keys/{}", name.to_ascii_lowercase()),
                    rest.first().map(|v| (*v).to_owned()),
                ))
            }
            _ => Err(schema(format!(
                "data.Id {id:?} is not a key id (https://<vault>/keys/<name>[/<version>])"
            ))),
        };
    }
    // No Id: fall back to the public-cloud vault DNS name.
    let vault = data_str(data, "VaultName").ok_or_else(|| schema("data.Id is missing"))?;
    let name = data_str(data, "ObjectName")
        .ok_or_else(|| schema("data.Id and data.ObjectName are missing"))?;
    let valid = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !valid(vault) || !valid(name) {
        return Err(schema(format!(
            "data.VaultName {vault:?} / data.ObjectName {name:?} are not vault and key names"
        )));
    }
    Ok((
        format!(
            "https://{}.vault.azure.net/keys/{}",
            vault.to_ascii_lowercase(),
            name.to_ascii_lowercase()
        ),
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::super::normalize;
    use super::super::tests::{err, never_panics};
    use super::*;

    const KEY: &str = "https://sample-kv.vault.azure.net/keys/tenant-kek";
    const VERSION: &str = "ee059b2bb5bc48398a53b168c6cdcb10";
    const TOPIC: &str = "/subscriptions/0000/resourceGroups/sample-rg/providers/Microsoft.KeyVault/vaults/sample-kv";

    /// An Event Grid schema event (doc example, PascalCase data).
    fn grid(event_type: &str, id: &str) -> String {
        format!(
            r#"{{"id":"{id}","topic":"{TOPIC}","subject":"tenant-kek","eventType":"Microsoft.KeyVault.{event_type}",
            "eventTime":"2019-07-25T01:08:33.1036736Z",
            "data":{{"Id":"{KEY}/{VERSION}","VaultName":"sample-kv","ObjectType":"Key","ObjectName":"tenant-kek",
            "Version":"{VERSION}","NBF":1559081980,"EXP":1559082102}},"dataVersion":"1","metadataVersion":"1"}}"#
        )
    }

    /// The same event in the CloudEvents schema.
    fn cloud(event_type: &str, id: &str) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"{TOPIC}","subject":"tenant-kek",
            "type":"Microsoft.KeyVault.{event_type}","time":"2019-07-25T01:08:33.1036736Z",
            "data":{{"Id":"{KEY}/{VERSION}","VaultName":"sample-kv","ObjectType":"Key",
            "ObjectName":"tenant-kek","Version":"{VERSION}","NBF":1559081980,"EXP":1559082102}}}}"#
        )
    }

    fn all(body: &str) -> Vec<LifecycleEvent> {
        normalize(body.as_bytes(), 1 << 20).expect(body)
    }

    #[test]
    fn both_schemas_map_key_events() {
        for make in [grid, cloud] {
            let cases = [
                ("KeyNewVersionCreated", EventKind::Rotated),
                ("KeyNearExpiry", EventKind::Expiring),
                ("KeyExpired", EventKind::Expired),
            ];
            for (t, kind) in cases {
                let events = all(&make(t, "00eccf70-95a7-4e7c-8299-2eb17ee9ad64"));
                let [e] = events.as_slice() else {
                    panic!("one event expected")
                };
                assert_eq!(e.kind, kind, "{t}");
                assert_eq!(e.provider, Provider::Azure);
                assert_eq!(e.key_ref, KEY);
                assert_eq!(e.event_id, "00eccf70-95a7-4e7c-8299-2eb17ee9ad64");
                assert_eq!(e.source, TOPIC);
                assert_eq!(e.time.to_rfc3339(), "2019-07-25T01:08:33.103673600+00:00");
                let version = (kind == EventKind::Rotated).then_some(VERSION);
                assert_eq!(e.version.as_deref(), version, "{t}");
                assert_eq!(
                    e.expires_at.map(|t| t.timestamp()),
                    Some(1_559_082_102),
                    "{t}"
                );
            }
        }
    }

    #[test]
    fn an_array_yields_every_event_in_order() {
        let body = format!(
            "[{},{}]",
            grid("KeyNewVersionCreated", "a"),
            grid("KeyNearExpiry", "b")
        );
        let events = all(&body);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].kind, EventKind::Rotated);
        assert_eq!(events[1].kind, EventKind::Expiring);
        // CloudEvents batch mode is an array too.
        assert_eq!(all(&format!("[{}]", cloud("KeyExpired", "c"))).len(), 1);
    }

    #[test]
    fn ignorable_events_in_an_array_are_dropped_and_all_ignorable_is_ignored() {
        let mixed = format!(
            "[{},{}]",
            grid("SecretNearExpiry", "s"),
            grid("KeyExpired", "k")
        );
        let events = all(&mixed);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_id, "k");
        for t in [
            "SecretNewVersionCreated",
            "CertificateNearExpiry",
            "VaultAccessPolicyChanged",
        ] {
            let e = err(&format!("[{}]", grid(t, "x")));
            assert!(e.is_ignored(), "{t}: {e}");
            assert!(e.to_string().contains(t), "{e}");
        }
    }

    #[test]
    fn one_bad_element_rejects_the_array_naming_it() {
        let body = format!(
            "[{},{}]",
            grid("KeyExpired", "a"),
            grid("KeyNearExpiry", "b").replace("\"EXP\":1559082102", "\"EXP\":\"soon\"")
        );
        let e = err(&body).to_string();
        assert!(e.contains("[1].data.EXP"), "{e}");
        let e = err(&format!("[{},42]", grid("KeyExpired", "a"))).to_string();
        assert!(e.contains("element [1]"), "{e}");
        assert!(err("[]").to_string().contains("empty"));
    }

    #[test]
    fn data_is_read_case_insensitively_with_numbers_or_strings() {
        // 2020 doc revision: camelCase, NBF/EXP as strings, stray spaces in names and values.
        let body = format!(
            r#"[{{"id":"c1","topic":"{TOPIC}","subject":"tenant-kek","eventType":"Microsoft.KeyVault.KeyNewVersionCreated",
            "eventTime":"2019-07-25T01:08:33Z",
            "data":{{"Id":"{KEY}/{VERSION}","vaultName":"sample-kv","objectType":"Key","ObjectName ":"tenant-kek",
            "version":" {VERSION}","nbf":"1559081980","exp":"1559082102"}}}}]"#
        );
        let events = all(&body);
        assert_eq!(events[0].version.as_deref(), Some(VERSION));
        let near = body.replace("KeyNewVersionCreated", "KeyNearExpiry");
        assert_eq!(
            all(&near)[0].expires_at.map(|t| t.timestamp()),
            Some(1_559_082_102)
        );
        // No Id: built from the vault and object names.
        let no_id = body.replace(&format!("\"Id\":\"{KEY}/{VERSION}\","), "");
        assert_eq!(all(&no_id)[0].key_ref, KEY);
        // Names in another case name the same key, as byokd stores it.
        let upper = body.replace("/keys/tenant-kek", "/keys/Tenant-KEK");
        assert_eq!(all(&upper)[0].key_ref, KEY);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                grid("KeyNearExpiry", "a").replace(",\"EXP\":1559082102", ""),
                "data.EXP is required",
            ),
            (
                grid("KeyExpired", "a").replace("\"NBF\":1559081980", "\"NBF\":true"),
                "data.NBF",
            ),
            (
                grid("KeyExpired", "a").replace(&format!("{KEY}/{VERSION}"), "not a url"),
                "data.Id",
            ),
            (
                grid("KeyExpired", "a").replace("/keys/", "/secrets/"),
                "is not a key id",
            ),
            (
                grid("KeyExpired", "a").replace("2019-07-25T01:08:33.1036736Z", "July"),
                "eventTime",
            ),
            (
                cloud("KeyExpired", "a").replace("2019-07-25T01:08:33.1036736Z", "July"),
                "time \"July\"",
            ),
            (
                grid("KeyExpired", "a").replace("\"id\":\"a\",", ""),
                "id is missing",
            ),
            (
                grid("KeyExpired", "a").replace(
                    "Microsoft.KeyVault.KeyExpired",
                    "Microsoft.Storage.BlobCreated",
                ),
                "eventType \"Microsoft.Storage.BlobCreated\"",
            ),
        ];
        for (body, expected) in cases {
            let e = err(&body).to_string();
            assert!(e.contains(expected), "{expected}: {e}");
        }
    }

    #[test]
    fn a_new_version_carries_its_expiry() {
        let e = &all(&grid("KeyNewVersionCreated", "r"))[0];
        assert_eq!(e.kind, EventKind::Rotated);
        assert_eq!(e.expires_at.map(|t| t.timestamp()), Some(1_559_082_102));
        let no_exp = grid("KeyNewVersionCreated", "r").replace(",\"EXP\":1559082102", "");
        assert_eq!(all(&no_exp)[0].expires_at, None);
    }

    /// The documented validation delivery (Event Grid schema).
    const VALIDATION: &str = r#"[{"id":"2d1781af-3a4c-4d7c-bd0c-e34b19da4e66",
        "topic":"/subscriptions/xx/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv",
        "subject":"","data":{"validationCode":"512d38b6-c7b8-40c8-89fe-f46f9e9622b6",
        "validationUrl":"https://rp-eastus2.eventgrid.azure.net:553/eventsubscriptions/s/validate?id=512d38b6-c7b8-40c8-89fe-f46f9e9622b6&t=2018-04-26T20:30:54.4538837Z&apiVersion=2018-05-01-preview&token=1A1A1A1A"},
        "eventType":"Microsoft.EventGrid.SubscriptionValidationEvent",
        "eventTime":"2018-01-25T22:12:19.4556811Z","metadataVersion":"1","dataVersion":"1"}]"#;

    #[test]
    fn the_validation_handshake_yields_its_code_and_is_no_key_event() {
        let body: Value = serde_json::from_str(VALIDATION).expect("json");
        assert_eq!(
            validation_code(&body)
                .expect("a validation")
                .expect("a code"),
            "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"
        );
        let e = err(VALIDATION);
        assert!(e.is_ignored(), "{e}");
        let key_event: Value =
            serde_json::from_str(&format!("[{}]", grid("KeyExpired", "a"))).expect("json");
        assert!(validation_code(&key_event).is_none());
        for bad in [
            VALIDATION.replace(
                "\"validationCode\":\"512d38b6-c7b8-40c8-89fe-f46f9e9622b6\",",
                "",
            ),
            VALIDATION.replace("512d38b6-c7b8-40c8-89fe-f46f9e9622b6\",", "a\\u0000b\","),
            format!(
                "{},{}]",
                VALIDATION.trim_end_matches(']'),
                grid("KeyExpired", "a")
            ),
        ] {
            let body: Value = serde_json::from_str(&bad).expect(&bad);
            assert!(matches!(validation_code(&body), Some(Err(_))), "{bad}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        never_panics(&format!(
            "[{},{}]",
            grid("KeyNewVersionCreated", "a"),
            grid("KeyNearExpiry", "b")
        ));
        never_panics(&cloud("KeyExpired", "c"));
    }
}
