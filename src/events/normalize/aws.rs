//! AWS KMS events as EventBridge delivers them (`source: "aws.kms"`): the three KMS service
//! events and CloudTrail records of KMS API calls (`detail-type: "AWS API Call via CloudTrail"`).
//!
//! The key is always named by its ARN, because that is what tenants register and what the KMS
//! API takes; a bare key id from an old CloudTrail record is turned into the ARN from the
//! record's region and account. Alias names cannot be resolved without a KMS call, so a record
//! naming a key only by alias is refused rather than guessed.
//!
//! Rotation versions: `current-key-material-id` (service event) or `currentKeyMaterialId`
//! (CloudTrail) when present, as that is the name AWS itself gives the new material, so the
//! service event and the CloudTrail record of one rotation agree on the version and the second
//! is a no-op. Older events carry no material id; then the version is `rotated@<event time>`.
//! byokd's re-wrap job targets the version it is given, and with AWS a re-wrap can only ever
//! land on the key's *current* material (Encrypt/ReEncrypt cannot pick material), so the label
//! just has to be new for each rotation and the same for redeliveries of one rotation: the time
//! of the event is both, and unlike the event id it also collapses the duplicate service events
//! AWS may emit for a single rotation.

use super::{NormalizeError, Parsed, rfc3339, str_at};
use crate::domain::{EventKind, LifecycleEvent, Origin, Provider};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

const FORMAT: &str = "AWS EventBridge";
/// The EventBridge `source` of every KMS event.
pub const SOURCE: &str = "aws.kms";
const CLOUDTRAIL: &str = "AWS API Call via CloudTrail";

fn schema(detail: impl Into<String>) -> NormalizeError {
    NormalizeError::Schema {
        format: FORMAT,
        detail: detail.into(),
    }
}

/// Parses one EventBridge event.
pub fn parse(object: &Map<String, Value>) -> Result<Parsed, NormalizeError> {
    let envelope = Value::Object(object.clone());
    let source = str_at(&envelope, &["source"]).ok_or_else(|| schema("source is missing"))?;
    if source != SOURCE {
        // A rule that routes another service's events here is a misconfiguration worth seeing.
        return Err(schema(format!(
            "source {source:?} is not {SOURCE:?}; only KMS events are accepted"
        )));
    }
    let detail_type =
        str_at(&envelope, &["detail-type"]).ok_or_else(|| schema("detail-type is missing"))?;
    let detail = match envelope.get("detail") {
        Some(d @ Value::Object(_)) => d,
        _ => return Err(schema("detail is missing or not an object")),
    };
    if detail_type == CLOUDTRAIL {
        return cloudtrail(&envelope, detail);
    }
    let kind = match detail_type {
        "KMS CMK Rotation" => EventKind::Rotated,
        "KMS CMK Deletion" => EventKind::Destroyed,
        "KMS Imported Key Material Expiration" => EventKind::Expired,
        other => {
            return Ok(Parsed::Ignored(format!(
                "KMS event {other:?} does not change a key's lifecycle"
            )));
        }
    };
    let event_id = str_at(&envelope, &["id"]).ok_or_else(|| schema("id is missing"))?;
    let time = rfc3339(
        FORMAT,
        "time",
        str_at(&envelope, &["time"]).ok_or_else(|| schema("time is missing"))?,
    )?;
    let key_ref = key_arn(&envelope, detail, &[&["key-id"]])?;
    let version = (kind == EventKind::Rotated).then(|| {
        str_at(detail, &["current-key-material-id"])
            .map_or_else(|| fallback_version(time), str::to_owned)
    });
    Ok(Parsed::Event(LifecycleEvent {
        provider: Provider::Aws,
        event_id: event_id.to_owned(),
        kind,
        key_ref,
        version,
        expires_at: None,
        time,
        source: SOURCE.to_owned(),
        origin: Origin::Event,
    }))
}

/// The version label of a rotation that names no key material (see the module docs).
fn fallback_version(time: DateTime<Utc>) -> String {
    format!("rotated@{}", time.format("%Y-%m-%dT%H:%M:%SZ"))
}

/// A CloudTrail record of a KMS API call (or a KMS service event logged to CloudTrail).
fn cloudtrail(envelope: &Value, detail: &Value) -> Result<Parsed, NormalizeError> {
    let event_source =
        str_at(detail, &["eventSource"]).ok_or_else(|| schema("detail.eventSource is missing"))?;
    if event_source != "kms.amazonaws.com" {
        return Err(schema(format!(
            "detail.eventSource {event_source:?} is not \"kms.amazonaws.com\""
        )));
    }
    let name =
        str_at(detail, &["eventName"]).ok_or_else(|| schema("detail.eventName is missing"))?;
    // A failed call changed nothing at the KMS; checked before the name so a failed DisableKey
    // is never mistaken for a disable.
    if let Some(code) = str_at(detail, &["errorCode"]) {
        return Ok(Parsed::Ignored(format!(
            "{name} failed with {code}; the key did not change"
        )));
    }
    let kind = match name {
        "DisableKey" => EventKind::Disabled,
        "EnableKey" => EventKind::Enabled,
        "ScheduleKeyDeletion" => EventKind::DeletionScheduled,
        "CancelKeyDeletion" => EventKind::DeletionCancelled,
        "RotateKeyOnDemand" | "RotateKey" => EventKind::Rotated,
        "ImportKeyMaterial" => EventKind::ExpiryChanged,
        "DeleteImportedKeyMaterial" | "DeleteExpiredKeyMaterial" => EventKind::Expired,
        "DeleteKey" => EventKind::Destroyed,
        other => {
            return Ok(Parsed::Ignored(format!(
                "KMS API call {other} does not change a key's lifecycle"
            )));
        }
    };
    // CloudTrail's own id identifies the API call; EventBridge's `id` is only the envelope's.
    let event_id = str_at(detail, &["eventID"])
        .or_else(|| str_at(envelope, &["id"]))
        .ok_or_else(|| schema("detail.eventID and id are both missing"))?;
    // eventTime is when the KMS changed; the envelope time is when EventBridge saw the record.
    let time = match str_at(detail, &["eventTime"]) {
        Some(t) => rfc3339(FORMAT, "detail.eventTime", t)?,
        None => rfc3339(
            FORMAT,
            "time",
            str_at(envelope, &["time"]).ok_or_else(|| schema("detail.eventTime is missing"))?,
        )?,
    };
    let key_ref = key_arn(
        envelope,
        detail,
        &[
            &["responseElements", "keyId"],
            &["serviceEventDetails", "keyId"],
            &["requestParameters", "keyId"],
        ],
    )?;
    let version = (kind == EventKind::Rotated).then(|| {
        str_at(detail, &["serviceEventDetails", "currentKeyMaterialId"])
            .or_else(|| str_at(detail, &["responseElements", "currentKeyMaterialId"]))
            .map_or_else(|| fallback_version(time), str::to_owned)
    });
    let expires_at = if kind == EventKind::ExpiryChanged {
        import_valid_to(detail)?
    } else {
        None
    };
    Ok(Parsed::Event(LifecycleEvent {
        provider: Provider::Aws,
        event_id: event_id.to_owned(),
        kind,
        key_ref,
        version,
        expires_at,
        time,
        source: SOURCE.to_owned(),
        origin: Origin::Event,
    }))
}

/// The expiry ImportKeyMaterial set. No `validTo` means the material does not expire
/// (`KEY_MATERIAL_DOES_NOT_EXPIRE`), which clears the expiry. A `validTo` byokd cannot read is
/// refused: guessing "no expiry" would silently drop a real deadline, and the expiry sweep and
/// key probe read the true date from the KMS anyway.
fn import_valid_to(detail: &Value) -> Result<Option<DateTime<Utc>>, NormalizeError> {
    if str_at(detail, &["requestParameters", "expirationModel"])
        == Some("KEY_MATERIAL_DOES_NOT_EXPIRE")
    {
        return Ok(None);
    }
    let Some(raw) = super::path(detail, &["requestParameters", "validTo"]) else {
        return Ok(None);
    };
    if let Some(secs) = raw.as_i64() {
        return DateTime::from_timestamp(secs, 0).map(Some).ok_or_else(|| {
            schema(format!(
                "detail.requestParameters.validTo {secs} is out of range"
            ))
        });
    }
    let text = raw.as_str().map(str::trim).unwrap_or_default();
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    // CloudTrail renders the request's date for humans, in UTC: "May 21, 2025, 5:47:45 AM".
    for format in ["%b %d, %Y, %I:%M:%S %p", "%b %d, %Y %I:%M:%S %p"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(Some(t.and_utc()));
        }
    }
    Err(schema(format!(
        "detail.requestParameters.validTo {text:?} is not a date byokd can read \
         (expected RFC 3339 or \"May 21, 2025, 5:47:45 AM\")"
    )))
}

/// The key's ARN: an ARN in the envelope's or the record's `resources`, else in one of
/// `id_fields`, else built from a bare key id there plus the region and account.
fn key_arn(
    envelope: &Value,
    detail: &Value,
    id_fields: &[&[&str]],
) -> Result<String, NormalizeError> {
    let resource_arns = [envelope.get("resources"), detail.get("resources")]
        .into_iter()
        .flatten()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|r| r.as_str().or_else(|| r.get("ARN").and_then(Value::as_str)));
    for arn in resource_arns {
        if is_key_arn(arn) {
            return Ok(arn.trim().to_owned());
        }
    }
    let ids: Vec<&str> = id_fields.iter().filter_map(|f| str_at(detail, f)).collect();
    if let Some(arn) = ids.iter().find(|id| is_key_arn(id)) {
        return Ok((*arn).to_owned());
    }
    let names = id_fields
        .iter()
        .map(|f| format!("detail.{}", f.join(".")))
        .collect::<Vec<_>>()
        .join(", ");
    let Some(id) = ids.iter().find(|id| is_bare_key_id(id)) else {
        return Err(schema(match ids.first() {
            Some(other) => format!(
                "no key ARN in resources and {other:?} in {names} is not a key id or key ARN \
                 (aliases cannot be resolved)"
            ),
            None => format!("no key ARN in resources[] or detail.resources[].ARN, and no {names}"),
        }));
    };
    let region = str_at(detail, &["awsRegion"])
        .or_else(|| str_at(envelope, &["region"]))
        .ok_or_else(|| schema(format!("key id {id:?} without an ARN needs region")))?;
    let account = str_at(detail, &["recipientAccountId"])
        .or_else(|| str_at(envelope, &["account"]))
        .or_else(|| str_at(detail, &["userIdentity", "accountId"]))
        .ok_or_else(|| schema(format!("key id {id:?} without an ARN needs account")))?;
    let partition = if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    };
    Ok(format!("arn:{partition}:kms:{region}:{account}:key/{id}"))
}

fn is_key_arn(s: &str) -> bool {
    let parts: Vec<&str> = s.trim().splitn(6, ':').collect();
    matches!(parts.as_slice(), ["arn", _, "kms", region, account, resource]
        if !region.is_empty() && !account.is_empty()
            && resource.strip_prefix("key/").is_some_and(is_bare_key_id))
}

/// A key id (`1234abcd-…` or a multi-Region `mrk-…`), not an alias.
fn is_bare_key_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::super::tests::{err, never_panics, one};
    use super::*;

    const ARN: &str = "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    const KEY_ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
    const MATERIAL: &str = "4b5f2a4e6d3c1b0a9f8e7d6c5b4a39281706f5e4d3c2b1a0998877665544332211";

    fn rotation_2025() -> String {
        format!(
            r#"{{"version":"0","id":"6a7e8feb-b491-4cf7-a9f1-bf3703467718","detail-type":"KMS CMK Rotation",
            "source":"aws.kms","account":"111122223333","time":"2025-05-23T03:11:54Z","region":"us-west-2",
            "resources":["{ARN}"],
            "detail":{{"key-id":"{KEY_ID}","key-origin":"AWS_KMS","rotation-type":"ON_DEMAND",
            "previous-key-material-id":"00{}","current-key-material-id":"{MATERIAL}"}}}}"#,
            &MATERIAL[2..]
        )
    }

    fn service(detail_type: &str, id: &str) -> String {
        format!(
            r#"{{"version":"0","id":"{id}","detail-type":"{detail_type}","source":"aws.kms",
            "account":"111122223333","time":"2022-08-10T16:37:50Z","region":"us-west-2",
            "resources":["{ARN}"],"detail":{{"key-id":"{KEY_ID}"}}}}"#
        )
    }

    /// A CloudTrail record in its EventBridge envelope (`resources: []`, as AWS samples show).
    fn cloudtrail(name: &str, extra: &str) -> String {
        format!(
            r#"{{"version":"0","id":"eb-{name}","detail-type":"AWS API Call via CloudTrail","source":"aws.kms",
            "account":"111122223333","time":"2014-11-04T00:52:45Z","region":"us-west-2","resources":[],
            "detail":{{"eventVersion":"1.02","userIdentity":{{"type":"IAMUser","accountId":"111122223333"}},
            "eventTime":"2014-11-04T00:52:43Z","eventSource":"kms.amazonaws.com","eventName":"{name}",
            "awsRegion":"us-west-2","sourceIPAddress":"192.0.2.0","userAgent":"AWS Internal",
            "requestParameters":{{"keyId":"{KEY_ID}"}},
            "responseElements":{{"keyId":"{ARN}"}},
            "requestID":"req-1","eventID":"ct-{name}","readOnly":false,
            "resources":[{{"ARN":"{ARN}","accountId":"111122223333"}}],
            "eventType":"AwsApiCall","recipientAccountId":"111122223333"{extra}}}}}"#
        )
    }

    #[test]
    fn service_events_map_to_kinds() {
        let e = one(&rotation_2025());
        assert_eq!(e.kind, EventKind::Rotated);
        assert_eq!(e.provider, Provider::Aws);
        assert_eq!(e.key_ref, ARN);
        assert_eq!(e.event_id, "6a7e8feb-b491-4cf7-a9f1-bf3703467718");
        assert_eq!(e.version.as_deref(), Some(MATERIAL));
        assert_eq!(e.time.to_rfc3339(), "2025-05-23T03:11:54+00:00");

        // 2022 shape: key-id only, so the version is derived from the event time.
        let e = one(&service("KMS CMK Rotation", "r-2022"));
        assert_eq!(e.version.as_deref(), Some("rotated@2022-08-10T16:37:50Z"));

        let e = one(&service(
            "KMS CMK Deletion",
            "e9ce3425-7d22-412a-a699-e7a5fc3fbc9a",
        ));
        assert_eq!(e.kind, EventKind::Destroyed);
        assert_eq!(e.version, None);
        let e = one(&service(
            "KMS Imported Key Material Expiration",
            "9da9af57-9253-4406-87cb-7cc400e43465",
        ));
        assert_eq!(e.kind, EventKind::Expired);
    }

    #[test]
    fn duplicate_rotation_events_agree_on_the_version() {
        // AWS may emit one change twice with different ids; the same time gives the same
        // version, so the second rotation is a no-op rather than a second re-wrap.
        let a = one(&service("KMS CMK Rotation", "a"));
        let b = one(&service("KMS CMK Rotation", "b"));
        assert_ne!(a.event_id, b.event_id);
        assert_eq!(a.version, b.version);
    }

    #[test]
    fn service_event_key_arn_is_built_from_a_bare_id() {
        let body = service("KMS CMK Deletion", "x").replace(&format!("\"{ARN}\""), "");
        assert_eq!(one(&body).key_ref, ARN);
        let cn = body.replace("us-west-2", "cn-north-1");
        assert_eq!(
            one(&cn).key_ref,
            format!("arn:aws-cn:kms:cn-north-1:111122223333:key/{KEY_ID}")
        );
    }

    #[test]
    fn cloudtrail_calls_map_to_kinds() {
        let cases = [
            ("DisableKey", EventKind::Disabled),
            ("EnableKey", EventKind::Enabled),
            ("ScheduleKeyDeletion", EventKind::DeletionScheduled),
            ("CancelKeyDeletion", EventKind::DeletionCancelled),
            ("RotateKeyOnDemand", EventKind::Rotated),
            ("RotateKey", EventKind::Rotated),
            ("ImportKeyMaterial", EventKind::ExpiryChanged),
            ("DeleteImportedKeyMaterial", EventKind::Expired),
            ("DeleteExpiredKeyMaterial", EventKind::Expired),
            ("DeleteKey", EventKind::Destroyed),
        ];
        for (name, kind) in cases {
            let e = one(&cloudtrail(name, ""));
            assert_eq!(e.kind, kind, "{name}");
            assert_eq!(e.key_ref, ARN, "{name}");
            assert_eq!(e.event_id, format!("ct-{name}"), "{name}");
            assert_eq!(e.time.to_rfc3339(), "2014-11-04T00:52:43+00:00", "{name}");
        }
    }

    #[test]
    fn cloudtrail_key_arn_resolution() {
        // Pre-2022 record: responseElements null, no resources: built from region + account.
        let old = cloudtrail("DisableKey", "")
            .replace(
                &format!("\"responseElements\":{{\"keyId\":\"{ARN}\"}}"),
                "\"responseElements\":null",
            )
            .replace(
                &format!("[{{\"ARN\":\"{ARN}\",\"accountId\":\"111122223333\"}}]"),
                "[]",
            );
        assert!(!old.contains(ARN));
        assert_eq!(one(&old).key_ref, ARN);
        // Only responseElements.keyId has the ARN.
        let resp = cloudtrail("DisableKey", "").replace(
            &format!("[{{\"ARN\":\"{ARN}\",\"accountId\":\"111122223333\"}}]"),
            "[]",
        );
        assert_eq!(one(&resp).key_ref, ARN);
        // An alias cannot be resolved: refused, naming the fields.
        let alias = old.replace(
            &format!("\"keyId\":\"{KEY_ID}\""),
            "\"keyId\":\"alias/tenant-a\"",
        );
        let e = err(&alias).to_string();
        assert!(
            e.contains("alias/tenant-a") && e.contains("detail.requestParameters.keyId"),
            "{e}"
        );
    }

    #[test]
    fn service_event_rotation_via_cloudtrail_uses_the_material_id() {
        let body = cloudtrail(
            "RotateKey",
            &format!(
                r#","serviceEventDetails":{{"rotationType":"AUTOMATIC","keyId":"{KEY_ID}",
                "currentKeyMaterialId":"{MATERIAL}"}}"#
            ),
        )
        .replace("\"AwsApiCall\"", "\"AwsServiceEvent\"");
        assert_eq!(one(&body).version.as_deref(), Some(MATERIAL));
        let plain = one(&cloudtrail("RotateKeyOnDemand", ""));
        assert_eq!(
            plain.version.as_deref(),
            Some("rotated@2014-11-04T00:52:43Z")
        );
    }

    #[test]
    fn import_key_material_expiry() {
        let with = |params: &str| {
            cloudtrail("ImportKeyMaterial", "").replace(
                &format!("\"requestParameters\":{{\"keyId\":\"{KEY_ID}\"}}"),
                &format!("\"requestParameters\":{{\"keyId\":\"{KEY_ID}\"{params}}}"),
            )
        };
        let e = one(&with(
            r#","validTo":"May 21, 2025, 5:47:45 AM","expirationModel":"KEY_MATERIAL_EXPIRES","importType":"NEW_KEY_MATERIAL""#,
        ));
        assert_eq!(e.kind, EventKind::ExpiryChanged);
        assert_eq!(
            e.expires_at.map(|t| t.to_rfc3339()),
            Some("2025-05-21T05:47:45+00:00".to_owned())
        );
        let e = one(&with(r#","validTo":"2025-05-21T17:47:45Z""#));
        assert_eq!(
            e.expires_at.map(|t| t.to_rfc3339()),
            Some("2025-05-21T17:47:45+00:00".to_owned())
        );
        let e = one(&with(
            r#","expirationModel":"KEY_MATERIAL_DOES_NOT_EXPIRE""#,
        ));
        assert_eq!(e.expires_at, None);
        let e = err(&with(r#","validTo":"next spring""#)).to_string();
        assert!(e.contains("detail.requestParameters.validTo"), "{e}");
    }

    #[test]
    fn failed_and_unrelated_calls_are_ignored() {
        let failed = cloudtrail(
            "DisableKey",
            r#","errorCode":"AccessDeniedException","errorMessage":"not allowed""#,
        );
        let e = err(&failed);
        assert!(e.is_ignored(), "{e}");
        assert!(e.to_string().contains("AccessDeniedException"), "{e}");
        for name in ["Encrypt", "Decrypt", "PutKeyPolicy", "CreateGrant"] {
            let e = err(&cloudtrail(name, ""));
            assert!(e.is_ignored(), "{name}: {e}");
        }
        assert!(err(&service("KMS Something New", "n")).is_ignored());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                service("KMS CMK Deletion", "x").replace("aws.kms", "aws.s3"),
                "source \"aws.s3\"",
            ),
            (
                cloudtrail("DisableKey", "").replace("kms.amazonaws.com", "s3.amazonaws.com"),
                "detail.eventSource",
            ),
            (
                cloudtrail("DisableKey", "").replace("\"eventName\":\"DisableKey\",", ""),
                "detail.eventName",
            ),
            (
                service("KMS CMK Deletion", "x").replace("2022-08-10T16:37:50Z", "yesterday"),
                "time \"yesterday\"",
            ),
            (
                cloudtrail("DisableKey", "").replace("2014-11-04T00:52:43Z", "soon"),
                "detail.eventTime",
            ),
            (
                r#"{"source":"aws.kms","detail-type":"KMS CMK Deletion","id":"1"}"#.to_owned(),
                "detail is missing",
            ),
            (
                r#"{"source":"aws.kms","detail-type":"KMS CMK Deletion","time":"2022-08-10T16:37:50Z","detail":{}}"#.to_owned(),
                "id is missing",
            ),
            (
                r#"{"source":"aws.kms","detail-type":"KMS CMK Deletion","id":"1","time":"2022-08-10T16:37:50Z","detail":{}}"#.to_owned(),
                "no key ARN",
            ),
        ];
        for (body, expected) in cases {
            let e = err(&body).to_string();
            assert!(e.contains(expected), "{expected}: {e}");
            assert!(e.starts_with("invalid AWS EventBridge event"), "{e}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        never_panics(&rotation_2025());
        never_panics(&service("KMS CMK Deletion", "x"));
        never_panics(&cloudtrail(
            "ImportKeyMaterial",
            r#","errorCode":null,"validTo":"May 21, 2025, 5:47:45 AM""#,
        ));
    }
}
