//! For every combination of key state, expiry, permission and replacement, what
//! `GET /v1/tenants/{id}` says about access agrees with what `POST .../deks` does, and both
//! agree with the access the combination implies (computed here, independently of byokd).
//!
//! Each combination is a tenant whose key records are written straight into the database
//! (no event, no confirmation pending, so nothing in the daemon moves them), with byokd's
//! local KMS put in the same state, so a DEK the API allows is really wrapped.

mod common;

use byokd::domain::KeyState;
use chrono::{DateTime, Duration as Days, Utc};
use common::TestApp;
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expiry {
    None,
    Future,
    Past,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Replacement {
    /// Only the primary key.
    None,
    /// The previous key still holds DEKs and is usable.
    HeldUsable,
    /// The previous key still holds DEKs and is disabled at the KMS.
    HeldDisabled,
}

/// The access a combination implies, from the design's rules alone.
fn expected(
    state: KeyState,
    expiry: Expiry,
    revoked: bool,
    replacement: Replacement,
) -> &'static str {
    let primary_unusable = state != KeyState::Enabled || revoked;
    if primary_unusable || replacement == Replacement::HeldDisabled {
        "inaccessible"
    } else if expiry == Expiry::Past {
        "encrypt_blocked"
    } else {
        "accessible"
    }
}

async fn set_local(app: &TestApp, key: &str, state: KeyState, expires_at: Option<DateTime<Utc>>) {
    use KeyState::{Destroyed, Disabled, Enabled, PendingDeletion};
    let kms = app.local_kms().await;
    kms.create(key, None).await.expect("create");
    if state != Enabled {
        kms.transition(key, &[Enabled], state)
            .await
            .expect("transition");
    }
    if expires_at.is_some() && !matches!(state, Destroyed | PendingDeletion | Disabled) {
        kms.set_expiry(key, expires_at).await.expect("expiry");
    }
}

async fn insert_kek(
    app: &TestApp,
    tenant: &str,
    key: &str,
    state: KeyState,
    revoked: bool,
    expires_at: Option<DateTime<Utc>>,
    primary: bool,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO keks (tenant_id, provider, key_ref, state, revoked, current_version,
                           expires_at, is_primary, observed_at)
         VALUES ($1, 'local', $2, $3, $4, '1', $5, $6, now()) RETURNING id",
    )
    .bind(tenant)
    .bind(key)
    .bind(state.as_str())
    .bind(revoked)
    .bind(expires_at)
    .bind(primary)
    .fetch_one(&app.pool)
    .await
    .expect("kek")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_api_says_about_access_is_what_it_enforces_in_every_state() {
    use KeyState::{Destroyed, Disabled, Enabled, PendingDeletion};
    let app = TestApp::spawn().await;
    let mut combos = Vec::new();
    for state in [Enabled, Disabled, PendingDeletion, Destroyed] {
        for expiry in [Expiry::None, Expiry::Future, Expiry::Past] {
            for revoked in [false, true] {
                for replacement in [
                    Replacement::None,
                    Replacement::HeldUsable,
                    Replacement::HeldDisabled,
                ] {
                    combos.push((state, expiry, revoked, replacement));
                }
            }
        }
    }
    for (i, &(state, expiry, revoked, replacement)) in combos.iter().enumerate() {
        let tenant = format!("m{i}");
        let key = format!("m{i}-key");
        let r = app
            .post("/v1/tenants", json!({ "id": tenant, "name": tenant }))
            .await;
        assert_eq!(r.status(), 201);
        let expires_at = match expiry {
            Expiry::None => None,
            Expiry::Future => Some(Utc::now() + Days::days(30)),
            Expiry::Past => Some(Utc::now() - Days::hours(1)),
        };
        set_local(&app, &key, state, expires_at).await;
        insert_kek(&app, &tenant, &key, state, revoked, expires_at, true).await;
        if replacement != Replacement::None {
            let old = format!("m{i}-old");
            let old_state = if replacement == Replacement::HeldDisabled {
                Disabled
            } else {
                Enabled
            };
            set_local(&app, &old, old_state, None).await;
            let old_id = insert_kek(&app, &tenant, &old, old_state, false, None, false).await;
            sqlx::query(
                "INSERT INTO deks (id, tenant_id, kek_id, kek_version, wrapped, kcv)
                 SELECT gen_random_uuid(), $1, $2, '1', '\\x00', '000000000000'
                 FROM generate_series(1, 3)",
            )
            .bind(&tenant)
            .bind(old_id)
            .execute(&app.pool)
            .await
            .expect("held DEKs");
        }
    }

    let mut mismatches = Vec::new();
    for (i, &(state, expiry, revoked, replacement)) in combos.iter().enumerate() {
        let tenant = format!("m{i}");
        let shown = app.tenant(&tenant).await;
        let access = shown["access"].as_str().unwrap_or_default().to_owned();
        let status = app
            .post(&format!("/v1/tenants/{tenant}/deks"), json!({}))
            .await
            .status()
            .as_u16();
        let want = expected(state, expiry, revoked, replacement);
        let enforced = if status == 201 {
            "accessible"
        } else {
            "blocked"
        };
        let said = if access == "accessible" {
            "accessible"
        } else {
            "blocked"
        };
        if access != want || said != enforced || !matches!(status, 201 | 409) {
            mismatches.push(format!(
                "{state:?}/{expiry:?}/revoked={revoked}/{replacement:?}: GET says {access}, \
                 POST .../deks answered {status}, expected {want}"
            ));
        }
        if want != "accessible" {
            assert!(shown["reason"].is_string(), "{shown}");
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} combinations disagree:\n{}",
        mismatches.len(),
        combos.len(),
        mismatches.join("\n")
    );
    // Whatever GET found changed since the rows were written was recorded once, with its
    // access message: the stored access now matches too.
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT id, access FROM tenants ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .expect("tenants");
    for (id, access) in stored {
        let i: usize = id[1..].parse().expect("index");
        let (state, expiry, revoked, replacement) = combos[i];
        assert_eq!(
            access,
            expected(state, expiry, revoked, replacement),
            "{id}"
        );
    }
    app.shutdown().await;
}
