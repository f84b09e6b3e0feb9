//! Email content: subject, text and HTML of a notification, from the minijinja templates in
//! `templates/email/` (compiled into the binary, so a deployment cannot lose them).
//!
//! Each notification type has a `<type>.txt` / `<type>.html` pair; the first line of the text
//! template is `Subject: ...`. Types without a pair (new ones added by other features) fall
//! back to `default.*`, which lists the notification's fields, so nothing is ever unsendable
//! for want of a template.

use chrono::{DateTime, Utc};
use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Value, json};
use std::sync::OnceLock;
use uuid::Uuid;

macro_rules! templates {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../templates/email/", $name)))),*]
    };
}

const TEMPLATES: &[(&str, &str)] = templates![
    "layout.html",
    "default.txt",
    "default.html",
    "key.expiring.txt",
    "key.expiring.html",
    "key.expired.txt",
    "key.expired.html",
    "key.rotated.txt",
    "key.rotated.html",
    "tenant.inaccessible.txt",
    "tenant.inaccessible.html",
    "tenant.restored.txt",
    "tenant.restored.html",
    "endpoint.disabled.txt",
    "endpoint.disabled.html",
];

/// A rendered email.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// One line.
    pub subject: String,
    /// Plain-text part.
    pub text: String,
    /// HTML part.
    pub html: String,
}

/// A template failed to render (a bug in a template, caught by the tests).
#[derive(Debug, thiserror::Error)]
#[error("email template {template} failed: {message}")]
pub struct RenderError {
    template: String,
    message: String,
}

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        // A missing field renders empty instead of failing the whole notification.
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        for (name, source) in TEMPLATES {
            if let Err(e) = env.add_template(name, source) {
                // Templates are compiled in and parsed by the unit tests; this cannot happen
                // in a released binary, and a render of the broken one reports it.
                tracing::error!(template = name, error = %e, "email template does not parse");
            }
        }
        env
    })
}

/// Renders the email for notification `id` of type `kind` with webhook body `payload`.
pub fn render(id: Uuid, kind: &str, payload: &Value) -> Result<Rendered, RenderError> {
    let env = environment();
    let data = payload.get("data").cloned().unwrap_or_else(|| json!({}));
    let mut context = match &data {
        Value::Object(map) => map.clone(),
        _ => serde_json::Map::new(),
    };
    let field = |name: &str| data.get(name).and_then(Value::as_str).unwrap_or_default();
    context.insert("kind".into(), json!(kind));
    context.insert("notification_id".into(), json!(id));
    context.insert(
        "timestamp".into(),
        payload.get("timestamp").cloned().unwrap_or(Value::Null),
    );
    context.insert(
        "key".into(),
        json!(format!("{} {}", field("provider"), field("key_ref")).trim()),
    );
    if let Some(at) = data
        .get("expires_at")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<DateTime<Utc>>().ok())
    {
        context.insert(
            "expires_on".into(),
            json!(at.format("%A %-d %B %Y, %H:%M UTC").to_string()),
        );
    }
    context.insert("data".into(), data.clone());
    let context = Value::Object(context);

    let pick = |ext: &str| {
        let own = format!("{kind}.{ext}");
        if env.get_template(&own).is_ok() {
            own
        } else {
            format!("default.{ext}")
        }
    };
    let render_one = |name: String| {
        env.get_template(&name)
            .and_then(|t| t.render(&context))
            .map_err(|e| RenderError {
                template: name.clone(),
                message: e.to_string(),
            })
    };
    let text = render_one(pick("txt"))?;
    let html = render_one(pick("html"))?;
    let (first, body) = text.split_once('\n').unwrap_or((&text, ""));
    let subject = first
        .strip_prefix("Subject:")
        .unwrap_or(first)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    Ok(Rendered {
        subject,
        text: body.trim_start().to_owned(),
        html,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(kind: &str, data: Value) -> Value {
        json!({ "type": kind, "timestamp": "2026-11-28T12:00:00Z", "data": data })
    }

    #[test]
    fn every_template_parses() {
        let mut env = Environment::new();
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn expiring_says_which_key_when_and_how_to_recover() {
        let r = render(
            Uuid::nil(),
            "key.expiring",
            &payload(
                "key.expiring",
                json!({ "tenant_id": "acme", "provider": "aws", "key_ref": "alias/acme",
                        "expires_at": "2026-12-12T09:30:00Z", "days_left": 14 }),
            ),
        )
        .expect("renders");
        assert_eq!(
            r.subject,
            "Action needed: key alias/acme for tenant acme expires in 14 days"
        );
        for part in [&r.text, &r.html] {
            assert!(
                part.contains("Saturday 12 December 2026, 09:30 UTC"),
                "{part}"
            );
            assert!(part.contains("Extend the key's expiry"), "{part}");
            assert!(part.contains("Provide a new key"), "{part}");
            assert!(part.contains("acme"), "{part}");
        }
    }

    #[test]
    fn html_is_escaped_text_is_not() {
        let r = render(
            Uuid::nil(),
            "tenant.inaccessible",
            &payload(
                "tenant.inaccessible",
                json!({ "tenant_id": "t<1>", "provider": "local", "key_ref": "k&1",
                        "reason": "key_disabled", "previous": "accessible" }),
            ),
        )
        .expect("renders");
        assert!(r.html.contains("t&lt;1&gt;") && !r.html.contains("t<1>"));
        assert!(r.text.contains("k&1") && r.subject.contains("t<1>"));
    }

    #[test]
    fn unknown_kinds_fall_back_to_the_default_template() {
        let r = render(
            Uuid::nil(),
            "key.unreachable",
            &payload(
                "key.unreachable",
                json!({ "tenant_id": "acme", "provider": "vault", "key_ref": "transit/acme",
                        "since": "2026-11-28T10:00:00Z" }),
            ),
        )
        .expect("renders");
        assert_eq!(r.subject, "key.unreachable: key transit/acme (tenant acme)");
        assert!(r.text.contains("since: 2026-11-28T10:00:00Z"), "{}", r.text);
        // minijinja escapes `/` in HTML.
        assert!(r.html.contains("transit&#x2f;acme"), "{}", r.html);
    }

    #[test]
    fn every_kind_renders_its_own_template() {
        for kind in [
            "key.expiring",
            "key.expired",
            "key.rotated",
            "tenant.inaccessible",
            "tenant.restored",
            "endpoint.disabled",
        ] {
            let r = render(
                Uuid::nil(),
                kind,
                &payload(kind, json!({ "tenant_id": "acme", "key_ref": "k1" })),
            )
            .expect("renders");
            assert!(
                !r.subject.starts_with(kind),
                "{kind} fell back: {}",
                r.subject
            );
            assert!(r.html.contains("<html"), "{kind}");
        }
    }
}
