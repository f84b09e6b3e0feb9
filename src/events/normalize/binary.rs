//! CloudEvents in binary content mode: the attributes travel as transport metadata (HTTP
//! `ce-*` headers, AMQP application properties `cloudEvents:*`) and the message body is the
//! event's `data`. [`to_structured`] rebuilds the structured-mode JSON of the same event, so
//! both modes go through one parser and give the same normalised event (and the same dedupe
//! key, `source` + `id`); the transports only collect the attributes.
//!
//! Refused, with the reason: a missing `specversion`, `id`, `source` or `type`, a
//! specversion other than 1.0, an attribute given twice with different values (under two
//! prefixes, or as `datacontenttype` against the content type), a structured-mode content
//! type alongside binary-mode attributes, and data that is not JSON.

use super::NormalizeError;
use serde_json::{Map, Value};

const FORMAT: &str = "CloudEvents binary-mode";

/// The structured-mode media type: it says the body is the whole event, not its data.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

fn schema(detail: impl Into<String>) -> NormalizeError {
    NormalizeError::Schema {
        format: FORMAT,
        detail: detail.into(),
    }
}

/// Whether `name` is a CloudEvents attribute name (lower-case letters and digits; the
/// specification recommends at most 20 characters, byokd takes up to 64).
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether a data content type says JSON (`application/json`, `text/json`, `*/*+json`).
fn is_json(content_type: &str) -> bool {
    let t = media_type(content_type);
    t == "application/json" || t == "text/json" || t.ends_with("+json")
}

/// The structured-mode JSON of a binary-mode event.
///
/// `attributes` are (name, value) pairs as the transport carried them, prefix removed, in
/// order; `prefix` is how the transport spells them (`ce-`, `cloudEvents:`), for error
/// messages; `content_type` is the message's content type (the event's `datacontenttype`).
///
/// # Errors
///
/// [`NormalizeError::Schema`] naming what is missing, malformed or conflicting;
/// [`NormalizeError::TooLarge`] when the body exceeds `limit`.
pub fn to_structured(
    attributes: &[(String, String)],
    prefix: &str,
    content_type: Option<&str>,
    body: &[u8],
    limit: usize,
) -> Result<Vec<u8>, NormalizeError> {
    if body.len() > limit {
        return Err(NormalizeError::TooLarge {
            size: body.len(),
            limit,
        });
    }
    let mut event = Map::new();
    for (name, value) in attributes {
        if !valid_name(name) {
            return Err(schema(format!(
                "{prefix}{name:?} is not a CloudEvents attribute name (lower-case letters and digits)"
            )));
        }
        if matches!(name.as_str(), "data" | "data_base64") {
            return Err(schema(format!(
                "{prefix}{name} is not an attribute: in binary mode the body is the data"
            )));
        }
        match event.get(name) {
            Some(Value::String(seen)) if seen != value => {
                return Err(schema(format!(
                    "conflicting values for attribute {name}: {seen:?} and {value:?}"
                )));
            }
            _ => {
                event.insert(name.clone(), Value::String(value.clone()));
            }
        }
    }
    match event.get("specversion").and_then(Value::as_str) {
        None => {
            return Err(schema(format!(
                "missing {prefix}specversion: binary mode needs specversion, id, source and type"
            )));
        }
        Some("1.0") => {}
        Some(other) => {
            return Err(schema(format!(
                "{prefix}specversion {other:?} is not supported (expected \"1.0\")"
            )));
        }
    }
    for required in ["id", "source", "type"] {
        if event
            .get(required)
            .and_then(Value::as_str)
            .is_none_or(|v| v.trim().is_empty())
        {
            return Err(schema(format!(
                "missing {prefix}{required}: binary mode needs specversion, id, source and type"
            )));
        }
    }
    if let Some(ct) = content_type.filter(|c| !c.trim().is_empty()) {
        if media_type(ct) == STRUCTURED_CONTENT_TYPE {
            return Err(schema(format!(
                "content type {ct:?} says structured mode, but {prefix}* attributes say binary \
                 mode; send one or the other"
            )));
        }
        match event.get("datacontenttype").and_then(Value::as_str) {
            Some(declared) if media_type(declared) != media_type(ct) => {
                return Err(schema(format!(
                    "conflicting data content types: {prefix}datacontenttype {declared:?} and \
                     content type {ct:?}"
                )));
            }
            _ => {
                event.insert("datacontenttype".to_owned(), Value::String(ct.to_owned()));
            }
        }
    }
    if let Some(ct) = event.get("datacontenttype").and_then(Value::as_str)
        && !is_json(ct)
    {
        return Err(schema(format!(
            "data content type {ct:?} is not JSON; lifecycle events carry JSON data"
        )));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(schema("the body (the event's data) is empty"));
    }
    let data: Value = serde_json::from_slice(body)
        .map_err(|e| schema(format!("the body (the event's data) is not JSON: {e}")))?;
    event.insert("data".to_owned(), data);
    serde_json::to_vec(&Value::Object(event)).map_err(|e| schema(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::normalize::normalize;

    fn attrs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const DATA: &str = r#"{"provider":"local","key_ref":"k1"}"#;

    fn base() -> Vec<(String, String)> {
        attrs(&[
            ("specversion", "1.0"),
            ("id", "e-1"),
            ("source", "kms://test"),
            ("type", "byok.key.disabled"),
            ("time", "2026-11-29T10:00:00Z"),
            ("subject", "k1"),
        ])
    }

    #[test]
    fn binary_and_structured_give_the_same_event() {
        let binary = to_structured(
            &base(),
            "ce-",
            Some("application/json"),
            DATA.as_bytes(),
            4096,
        )
        .expect("binary");
        let structured = format!(
            r#"{{"specversion":"1.0","id":"e-1","source":"kms://test","type":"byok.key.disabled",
                "time":"2026-11-29T10:00:00Z","subject":"k1","data":{DATA}}}"#
        );
        assert_eq!(
            normalize(&binary, 4096).expect("binary normalizes"),
            normalize(structured.as_bytes(), 4096).expect("structured normalizes")
        );
    }

    #[test]
    fn refuses_missing_bad_and_conflicting_attributes() {
        // (attributes, content type, body, what the error says)
        type Case<'a> = (Vec<(String, String)>, Option<&'a str>, &'a str, &'a str);
        let cases: Vec<Case> = vec![
            (
                base().into_iter().filter(|(k, _)| k != "id").collect(),
                None,
                DATA,
                "missing ce-id",
            ),
            (
                base()
                    .into_iter()
                    .filter(|(k, _)| k != "specversion")
                    .collect(),
                None,
                DATA,
                "missing ce-specversion",
            ),
            (
                [attrs(&[("specversion", "0.3")]), base()].concat(),
                None,
                DATA,
                "conflicting values for attribute specversion",
            ),
            (
                base()
                    .into_iter()
                    .map(|(k, v)| {
                        if k == "specversion" {
                            (k, "2.0".to_owned())
                        } else {
                            (k, v)
                        }
                    })
                    .collect(),
                None,
                DATA,
                "specversion \"2.0\" is not supported",
            ),
            (
                base(),
                Some(STRUCTURED_CONTENT_TYPE),
                DATA,
                "says structured mode",
            ),
            (
                [base(), attrs(&[("datacontenttype", "application/json")])].concat(),
                Some("text/plain"),
                DATA,
                "conflicting data content types",
            ),
            (base(), Some("text/plain"), DATA, "is not JSON"),
            (base(), None, "not json", "is not JSON"),
            (base(), None, "  ", "is empty"),
            (
                [base(), attrs(&[("Bad-Name", "x")])].concat(),
                None,
                DATA,
                "attribute name",
            ),
            (
                [base(), attrs(&[("data", "x")])].concat(),
                None,
                DATA,
                "body is the data",
            ),
        ];
        for (attributes, ct, body, expected) in cases {
            let err = to_structured(&attributes, "ce-", ct, body.as_bytes(), 4096)
                .expect_err(expected)
                .to_string();
            assert!(err.contains(expected), "{err:?} should say {expected:?}");
        }
        assert!(matches!(
            to_structured(&base(), "ce-", None, DATA.as_bytes(), 8),
            Err(NormalizeError::TooLarge { .. })
        ));
    }

    #[test]
    fn same_value_under_two_prefixes_is_one_attribute() {
        let twice = [base(), attrs(&[("id", "e-1")])].concat();
        assert!(to_structured(&twice, "ce-", None, DATA.as_bytes(), 4096).is_ok());
    }
}
