//! Email content: subject, text and HTML of a notification, from the minijinja templates in
//! `templates/email/` (compiled into the binary, so a deployment cannot lose them).
//!
//! Each type of the [`catalog`](super::catalog) has a `<type>.txt` / `<type>.html` pair; the
//! first line of the text template is `Subject: ...`. The facts come from the stored body;
//! the advice (`next_steps`) from the catalog, so email and webhook say the same. A body
//! the catalog cannot read (queued by an older version) falls back to `default.*`, which
//! lists its fields, so nothing is ever unsendable for want of a template.

use super::catalog::{self, Notification};
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
    "steps.txt",
    "steps.html",
    "default.txt",
    "default.html",
    "key.expiring.txt",
    "key.expiring.html",
    "key.expired.txt",
    "key.expired.html",
    "key.rotated.txt",
    "key.rotated.html",
    "key.replaced.txt",
    "key.replaced.html",
    "key.rewrap_failed.txt",
    "key.rewrap_failed.html",
    "key.unreachable.txt",
    "key.unreachable.html",
    "key.destroyed_with_deks.txt",
    "key.destroyed_with_deks.html",
    "tenant.inaccessible.txt",
    "tenant.inaccessible.html",
    "tenant.restored.txt",
    "tenant.restored.html",
    "endpoint.disabled.txt",
    "endpoint.disabled.html",
    "operator.revocation_unconfirmed.txt",
    "operator.revocation_unconfirmed.html",
    "operator.schedule_failed.txt",
    "operator.schedule_failed.html",
    "operator.access_anomaly.txt",
    "operator.access_anomaly.html",
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

/// `{{ at|date }}`: an RFC 3339 time as a readable UTC date.
fn date(value: String) -> String {
    value
        .parse::<DateTime<Utc>>()
        .map(|at| at.format("%A %-d %B %Y, %H:%M UTC").to_string())
        .unwrap_or(value)
}

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        // A missing field renders empty instead of failing the whole notification.
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        env.add_filter("date", date);
        env.add_filter("sentence", catalog::sentence_start);
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

/// Parses every email template compiled into the binary (for `check-config`): the number of
/// templates, or one line per template that does not parse.
pub fn check_templates() -> Result<usize, Vec<String>> {
    let mut env = Environment::new();
    let mut errors = Vec::new();
    for (name, source) in TEMPLATES {
        if let Err(e) = env.add_template(name, source) {
            errors.push(format!("template {name}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(TEMPLATES.len())
    } else {
        Err(errors)
    }
}

/// Renders the email for notification `id` of type `kind` with stored body `payload`, in the
/// name of `platform`.
pub fn render(
    id: Uuid,
    kind: &str,
    payload: &Value,
    platform: &str,
) -> Result<Rendered, RenderError> {
    let env = environment();
    let data = payload.get("data").cloned().unwrap_or_else(|| json!({}));
    let mut context = match &data {
        Value::Object(map) => map.clone(),
        _ => serde_json::Map::new(),
    };
    let field = |name: &str| data.get(name).and_then(Value::as_str).unwrap_or_default();
    let operator = catalog::is_for_operators(payload);
    let known = Notification::from_body(payload).filter(|n| n.kind() == kind);
    if let Some(n) = &known {
        context.insert("next_steps".into(), json!(n.next_steps(platform, operator)));
    }
    context.insert("kind".into(), json!(kind));
    context.insert("platform".into(), json!(platform));
    context.insert("operator".into(), json!(operator));
    context.insert("notification_id".into(), json!(id));
    context.insert(
        "timestamp".into(),
        payload.get("timestamp").cloned().unwrap_or(Value::Null),
    );
    context.insert(
        "key".into(),
        json!(format!("{} {}", field("provider"), field("key_ref")).trim()),
    );
    context.insert("data".into(), data.clone());
    let context = Value::Object(context);

    let pick = |ext: &str| match &known {
        Some(n) => format!("{}.{ext}", n.kind()),
        None => format!("default.{ext}"),
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

    #[test]
    fn every_template_parses() {
        let mut env = Environment::new();
        env.add_filter("date", date);
        env.add_filter("sentence", catalog::sentence_start);
        env.add_filter("sentence", catalog::sentence_start);
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn every_kind_of_the_catalog_has_its_pair() {
        for kind in Notification::KINDS {
            for ext in ["txt", "html"] {
                let name = format!("{kind}.{ext}");
                assert!(
                    TEMPLATES.iter().any(|(n, _)| *n == name),
                    "{name} is missing"
                );
            }
        }
    }

    #[test]
    fn html_is_escaped_text_is_not() {
        let body = json!({ "type": "tenant.restored", "timestamp": "2026-11-28T12:00:00Z",
            "data": { "tenant_id": "t<1>", "provider": "local", "key_ref": "k&1",
                      "previous": "inaccessible", "access": "accessible",
                      "trigger": { "kind": "event", "id": "e1" } } });
        let r = render(Uuid::nil(), "tenant.restored", &body, "Acme").expect("renders");
        assert!(
            r.html.contains("t&lt;1&gt;") && !r.html.contains("t<1>"),
            "{}",
            r.html
        );
        assert!(r.text.contains("k&1") && r.subject.contains("t<1>"));
    }

    #[test]
    fn unknown_bodies_fall_back_to_the_default_template() {
        let body = json!({ "type": "key.something_new", "timestamp": "2026-11-28T12:00:00Z",
            "data": { "tenant_id": "acme", "provider": "vault", "key_ref": "transit/acme",
                      "since": "2026-11-28T10:00:00Z" } });
        let r = render(Uuid::nil(), "key.something_new", &body, "Acme").expect("renders");
        assert_eq!(
            r.subject,
            "key.something_new: key transit/acme (tenant acme)"
        );
        assert!(r.text.contains("since: 2026-11-28T10:00:00Z"), "{}", r.text);
        assert!(r.text.contains("contact Acme's support"), "{}", r.text);
    }
}
