//! Every notification of the catalog rendered as tenants and operators get it (email subject,
//! text and HTML, and the webhook body), checked for its facts and its advice, and pinned by
//! a golden file per sample under `tests/golden/notifications/`, so every wording change is
//! visible in review. `BYOKD_UPDATE_GOLDEN=1` rewrites the files instead of comparing.

mod common;

use byokd::notify::catalog::{self, Notification, Operators};
use byokd::notify::render;
use common::catalog::{at, samples};
use serde_json::Value;
use std::path::PathBuf;
use uuid::Uuid;

const PLATFORM: &str = "Acme Cloud";

struct Rendered {
    subject: String,
    text: String,
    html: String,
    webhook: Value,
}

fn render_body(kind: &str, body: &Value) -> Rendered {
    let email = render::render(Uuid::nil(), kind, body, PLATFORM).expect("renders");
    Rendered {
        subject: email.subject,
        text: email.text,
        html: email.html,
        webhook: catalog::webhook_body(body, PLATFORM),
    }
}

/// The tenant's copy and, for notifications operators get, the operators' copy.
fn render_all(n: &Notification) -> Vec<(&'static str, Rendered)> {
    let body = n.body(at("2026-11-28T12:00:00Z"));
    let mut out = Vec::new();
    let audience = n.audience();
    if audience.contacts || audience.webhooks {
        out.push(("", render_body(n.kind(), &body)));
    }
    if audience.operators {
        let operators = Operators {
            emails: vec!["ops@platform.example".into()],
            webhooks: Vec::new(),
        };
        let rows = n.outbox_rows(None, at("2026-11-28T12:00:00Z"));
        let fanned = catalog::fan_out(
            &rows[0].kind,
            &rows[0].dedupe_key,
            rows[0].tenant_id.as_deref(),
            &rows[0].payload,
            &operators,
        );
        out.push((".operator", render_body(n.kind(), &fanned[0].payload)));
    }
    out
}

fn golden(name: &str, ext: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/notifications")
        .join(format!("{name}.{ext}"));
    if std::env::var_os("BYOKD_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing; run with BYOKD_UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs (rerun with BYOKD_UPDATE_GOLDEN=1 and review the diff):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

#[test]
fn every_notification_matches_its_golden_files() {
    let mut names = Vec::new();
    for (name, n) in samples("acme") {
        for (suffix, r) in render_all(&n) {
            let stem = format!("{name}{suffix}");
            golden(
                &stem,
                "txt",
                &format!("Subject: {}\n\n{}", r.subject, r.text),
            );
            golden(&stem, "html", &r.html);
            let json = serde_json::to_string_pretty(&r.webhook).expect("json") + "\n";
            golden(&stem, "json", &json);
            names.push(stem);
        }
    }
    // No stale golden file: each belongs to a sample.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/notifications");
    for entry in std::fs::read_dir(dir).expect("golden dir") {
        let file = entry.expect("entry").file_name();
        let file = file.to_string_lossy();
        let stem = file.rsplit_once('.').map_or(&*file, |(s, _)| s);
        assert!(
            names.iter().any(|n| n == stem),
            "{file} belongs to no sample"
        );
    }
}

#[test]
fn every_kind_of_the_catalog_has_a_sample() {
    let all = samples("acme");
    for kind in Notification::KINDS {
        assert!(
            all.iter().any(|(_, n)| n.kind() == *kind),
            "no sample of {kind}"
        );
    }
}

/// Text that must appear in every part (email text, HTML, webhook `next_steps`).
fn says(r: &Rendered, what: &str) {
    let steps = r.webhook["data"]["next_steps"].to_string();
    let html = strip_tags(&r.html)
        .replace("&#x27;", "'")
        .replace("&#x2f;", "/");
    for (part, text) in [("text", &r.text), ("html", &html)] {
        assert!(text.contains(what), "{part} lacks {what:?}:\n{text}");
    }
    assert!(
        steps.contains(what)
            || r.text
                .split("What to do:")
                .next()
                .is_some_and(|intro| intro.contains(what)),
        "webhook lacks {what:?}: {steps}"
    );
}

fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

fn never_says(r: &Rendered, what: &str) {
    for text in [&r.subject, &r.text, &r.html, &r.webhook.to_string()] {
        assert!(!text.contains(what), "says {what:?}:\n{text}");
    }
}

fn tenant_copy(name: &str) -> Rendered {
    let (_, n) = samples("acme")
        .into_iter()
        .find(|(s, _)| s == name)
        .expect("sample");
    render_all(&n).remove(0).1
}

#[test]
fn each_cause_of_inaccessibility_says_what_to_do() {
    let disabled = tenant_copy("tenant.inaccessible.disabled");
    says(&disabled, "Enable the key in your KMS (aws)");
    never_says(&disabled, "scheduled deletion");

    let deletion = tenant_copy("tenant.inaccessible.deletion_scheduled");
    says(&deletion, "Cancel the key's scheduled deletion");
    says(&deletion, "before the deletion date");
    says(
        &deletion,
        "Then enable the key: a cancelled deletion leaves the key disabled.",
    );

    let destroyed = tenant_copy("tenant.inaccessible.destroyed");
    says(&destroyed, "this is final");
    says(&destroyed, "can no longer be decrypted by anyone");
    says(&destroyed, "Register a new key with Acme Cloud");
    never_says(&destroyed, "nable the key");
    never_says(&destroyed, "returns");

    let revoked = tenant_copy("tenant.inaccessible.permission_revoked");
    says(&revoked, "Restore Acme Cloud's permission to use the key");
    assert!(
        revoked
            .subject
            .contains("can no longer be used by Acme Cloud"),
        "{}",
        revoked.subject
    );

    let unconfirmed = tenant_copy("tenant.inaccessible.disabled.unconfirmed");
    says(&unconfirmed, "is confirming with the KMS");

    let held = tenant_copy("tenant.inaccessible.replacement_held");
    says(
        &held,
        "This is the key being replaced: 7 data keys are still under it",
    );
    for cause in [
        "disabled",
        "deletion_scheduled",
        "destroyed",
        "permission_revoked",
        "expired",
    ] {
        let r = tenant_copy(&format!("tenant.inaccessible.{cause}"));
        assert_eq!(r.webhook["data"]["cause"], cause);
        assert_eq!(r.webhook["data"]["key_ref"], "key-acme");
        assert_eq!(r.webhook["type"], "tenant.inaccessible");
        assert!(
            r.subject
                .contains("Tenant acme is inaccessible: key key-acme"),
            "{}",
            r.subject
        );
    }
}

#[test]
fn facts_are_in_every_part() {
    let rotated = tenant_copy("key.rotated");
    says(&rotated, "from version 1 to 2");
    assert_eq!(rotated.webhook["data"]["dek_count"], 42);
    assert_eq!(rotated.webhook["data"]["from_version"], "1");
    assert_eq!(rotated.webhook["data"]["to_version"], "2");

    let replaced = tenant_copy("key.replaced");
    says(&replaced, "old-acme");
    says(&replaced, "key-acme");
    never_says(&replaced, "rotated");
    assert_eq!(replaced.webhook["data"]["previous_key_ref"], "old-acme");

    let expiring = tenant_copy("key.expiring");
    says(&expiring, "Saturday 12 December 2026, 09:30 UTC");
    says(
        &expiring,
        "Extend the key's expiry date in your KMS (azure)",
    );
    assert!(
        expiring.subject.ends_with("expires in 14 days"),
        "{}",
        expiring.subject
    );
    assert_eq!(expiring.webhook["data"]["days_left"], 14);
    assert_eq!(expiring.webhook["data"]["threshold_days"], 14);

    let failed = tenant_copy("key.rewrap_failed");
    says(
        &failed,
        "2 data keys that could not be re-wrapped (40 re-wrapped)",
    );
    says(
        &failed,
        "Keep the key key-acme and all its versions enabled",
    );

    let unreachable = tenant_copy("key.unreachable");
    says(&unreachable, "Saturday 28 November 2026, 10:00 UTC");
    says(&unreachable, "keeps using the key as last confirmed");
    says(
        &unreachable,
        "Check that your KMS (vault) is up and reachable",
    );

    let lost = tenant_copy("key.destroyed_with_deks");
    says(&lost, "42 data keys");
    says(&lost, "the data they protect is lost");
}

#[test]
fn operators_get_their_own_advice() {
    for (name, n) in samples("acme") {
        let copies = render_all(&n);
        let operator = copies.iter().find(|(s, _)| *s == ".operator");
        assert_eq!(operator.is_some(), n.audience().operators, "{name}");
        if let Some((_, r)) = operator {
            assert_eq!(r.webhook["audience"], "operators", "{name}");
            assert!(
                !r.webhook["data"]["next_steps"]
                    .as_array()
                    .expect("steps")
                    .is_empty()
            );
        }
    }
    let (_, n) = samples("acme")
        .into_iter()
        .find(|(s, _)| s == "key.rewrap_failed")
        .expect("sample");
    let copies = render_all(&n);
    let ops = &copies
        .iter()
        .find(|(s, _)| *s == ".operator")
        .expect("ops")
        .1;
    assert!(
        ops.subject.contains("Re-wrap job 9 of tenant acme failed"),
        "{}",
        ops.subject
    );
    says(ops, "GET /v1/rewrap-jobs?tenant=acme");
}

#[test]
fn tenants_read_the_platform_name_never_byokd() {
    for (name, n) in samples("acme") {
        for (suffix, r) in render_all(&n) {
            if suffix.is_empty() {
                let all = format!("{}\n{}\n{}\n{}", r.subject, r.text, r.html, r.webhook);
                assert!(
                    !all.to_lowercase().contains("byokd"),
                    "{name} names byokd:\n{all}"
                );
                assert!(r.text.contains(PLATFORM), "{name} never names the platform");
            }
        }
    }
}
