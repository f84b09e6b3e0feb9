//! The Vault / OpenBao Transit provider against the real OpenBao dev server: key references that
//! try to name something other than one key in the configured mount, and which answers count
//! as definitive (not found, access denied) rather than "unreachable".
//!
//! Each test mounts Transit on a path of its own, so tests run in parallel on the shared server.
//! Answers OpenBao itself never gives (a proxy's HTML 404, an empty 403, a load balancer's 503)
//! come from [`Responder`], a canned-answer HTTP server on a real socket.

mod common;

use byokd::domain::{KeyState, Provider};
use byokd::kms::{Dek, DekContext, KmsError, KmsProvider, VaultKms, WrappedRef};
use common::http_fault::Responder;
use common::vault::{Vault, client};
use tokio::net::TcpListener;
use uuid::Uuid;

fn ctx() -> DekContext<'static> {
    DekContext {
        tenant_id: "tenant-vp",
        dek_id: Uuid::now_v7(),
    }
}

/// Calls describe, wrap_many and unwrap_many with `key_ref` and returns their errors.
async fn every_call(kms: &VaultKms, key_ref: &str) -> Vec<(&'static str, Option<KmsError>)> {
    let dek = Dek::generate();
    let ctx = ctx();
    let item = WrappedRef {
        ctx,
        version: "1",
        ciphertext: b"vault:v1:AAAA",
    };
    vec![
        ("describe", kms.describe(key_ref).await.err()),
        (
            "wrap_many",
            kms.wrap_many(key_ref, None, &[(&dek, ctx)]).await.err(),
        ),
        ("unwrap_many", kms.unwrap_many(key_ref, &[item]).await.err()),
    ]
}

const BAD_REFS: &[&str] = &[
    "x/../k",
    "../../sys/mounts",
    "../../sys/policies/acl/root",
    "x%2F..%2Fk",
    "a b",
    ".",
    "..",
    "",
];

#[tokio::test]
async fn key_refs_that_leave_their_key_are_refused_before_any_request() {
    let vault = Vault::new("vp").await;
    vault.create_key("k").await;
    // The root token could read sys/mounts and bind `k` through `x/../k`: only the check
    // stands between a reference and those paths.
    let kms = vault.kms("root");
    let too_long = "k".repeat(129);
    for key_ref in BAD_REFS.iter().copied().chain([too_long.as_str()]) {
        for (call, error) in every_call(&kms, key_ref).await {
            match error {
                Some(e @ KmsError::InvalidKeyRef { .. }) => {
                    assert!(!e.is_transient(), "{e}");
                    assert!(e.to_string().starts_with("invalid vault key_ref: "), "{e}");
                }
                other => panic!("{call}({key_ref:?}): expected InvalidKeyRef, got {other:?}"),
            }
        }
    }
    // The longest valid name still reaches OpenBao and is a plain missing key.
    assert!(matches!(
        kms.describe(&"k".repeat(128)).await,
        Err(KmsError::NotFound { .. })
    ));
    assert_eq!(
        kms.describe("k").await.expect("describe k").state,
        KeyState::Enabled
    );

    // Refused before any request: a server that would answer anything never sees one.
    let responder = Responder::start(
        "200 OK",
        Some("application/json"),
        r#"{"data":{"latest_version":1,"batch_results":[]}}"#,
    )
    .await;
    let kms = client(&responder.url(), "root", &vault.mount, Some(1));
    for key_ref in BAD_REFS {
        for (call, error) in every_call(&kms, key_ref).await {
            assert!(
                matches!(error, Some(KmsError::InvalidKeyRef { .. })),
                "{call}({key_ref:?}): {error:?}"
            );
        }
    }
    assert_eq!(responder.connections(), 0);
    vault.cleanup().await;
}

#[tokio::test]
async fn a_missing_key_is_not_found_and_an_existing_one_round_trips() {
    let vault = Vault::new("vp").await;
    vault.create_key("present").await;
    let kms = vault.kms(&vault.scoped_token().await);

    // GET keys/<missing> is 404 {"errors":[]}; decrypt on a missing key is
    // 400 {"errors":["encryption key not found"]}: both Transit's own answers.
    match kms.describe("absent").await {
        Err(KmsError::NotFound { provider, key_ref }) => {
            assert_eq!(provider, Provider::Vault);
            assert_eq!(key_ref, "absent");
        }
        other => panic!("describe: {other:?}"),
    }
    let item = WrappedRef {
        ctx: ctx(),
        version: "1",
        ciphertext: b"vault:v1:AAAA",
    };
    assert!(matches!(
        kms.unwrap_many("absent", &[item]).await,
        Err(KmsError::NotFound { .. })
    ));
    // Without `create`, encrypt on a missing key is refused, and does not create it.
    let dek = Dek::generate();
    assert!(matches!(
        kms.wrap_many("absent", None, &[(&dek, ctx())]).await,
        Err(KmsError::AccessDenied { .. })
    ));
    assert!(matches!(
        kms.describe("absent").await,
        Err(KmsError::NotFound { .. })
    ));

    // The same client still does its job on a key that exists.
    let info = kms.describe("present").await.expect("describe");
    assert_eq!(info.state, KeyState::Enabled);
    assert_eq!(info.current_version, "1");
    let ctx = ctx();
    let wrapped = kms
        .wrap_many("present", None, &[(&dek, ctx)])
        .await
        .expect("wrap")
        .pop()
        .expect("one");
    assert_eq!(wrapped.version, "1");
    let back = kms
        .unwrap_many(
            "present",
            &[WrappedRef {
                ctx,
                version: &wrapped.version,
                ciphertext: &wrapped.ciphertext,
            }],
        )
        .await
        .expect("unwrap")
        .pop()
        .expect("one")
        .expect("authentic");
    assert_eq!(back.expose(), dek.expose());
    vault.cleanup().await;
}

#[tokio::test]
async fn a_token_without_encrypt_and_decrypt_can_describe_but_is_denied() {
    let vault = Vault::new("vp").await;
    vault.create_key("kek").await;
    let dek = Dek::generate();
    let ctx = ctx();
    let wrapped = vault
        .kms(&vault.scoped_token().await)
        .wrap_many("kek", None, &[(&dek, ctx)])
        .await
        .expect("wrap with the scoped token")
        .pop()
        .expect("one");

    let kms = vault.kms(
        &vault
            .capability_token("readonly", "keys/*", &["read"])
            .await,
    );
    let info = kms.describe("kek").await.expect("describe with read only");
    assert_eq!(info.state, KeyState::Enabled);
    match kms.wrap_many("kek", None, &[(&dek, ctx)]).await {
        Err(e @ KmsError::AccessDenied { .. }) => {
            assert!(!e.is_transient());
            assert!(e.to_string().contains("permission denied"), "{e}");
        }
        other => panic!("wrap_many: {other:?}"),
    }
    let item = WrappedRef {
        ctx,
        version: &wrapped.version,
        ciphertext: &wrapped.ciphertext,
    };
    assert!(matches!(
        kms.unwrap_many("kek", &[item]).await,
        Err(KmsError::AccessDenied { .. })
    ));
    vault.cleanup().await;
}

#[tokio::test]
async fn only_vaults_own_error_body_is_a_definitive_answer() {
    byokd::install_crypto_provider();
    let html = "<html><head><title>404 Not Found</title></head>\
                <body><center><h1>404 Not Found</h1></center><hr><center>nginx</center></body></html>";
    let json = Some("application/json");
    let cases: &[(&str, Option<&str>, &str, &str)] = &[
        ("404 Not Found", Some("text/html"), html, "unreachable"),
        ("404 Not Found", None, "", "unreachable"),
        (
            "404 Not Found",
            json,
            r#"{"message":"no Route matched"}"#,
            "unreachable",
        ),
        ("404 Not Found", json, r#"{"errors":[]}"#, "not_found"),
        (
            "404 Not Found",
            json,
            r#"{"errors":["no handler for route \"transit/keys/k\". route entry not found."]}"#,
            "unreachable",
        ),
        (
            "403 Forbidden",
            Some("text/html"),
            "<h1>Forbidden</h1>",
            "unreachable",
        ),
        ("403 Forbidden", None, "", "unreachable"),
        (
            "403 Forbidden",
            json,
            r#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#,
            "access_denied",
        ),
        (
            "503 Service Unavailable",
            Some("text/html"),
            "<h1>down</h1>",
            "unreachable",
        ),
        (
            "503 Service Unavailable",
            json,
            r#"{"errors":["Vault is sealed"]}"#,
            "unreachable",
        ),
        ("502 Bad Gateway", None, "", "unreachable"),
        (
            "200 OK",
            Some("text/html"),
            "<h1>captive portal</h1>",
            "unreachable",
        ),
    ];
    for (status, content_type, body, expected) in cases {
        let responder = Responder::start(status, *content_type, body).await;
        let kms = client(&responder.url(), "t", "transit", Some(1));
        for (call, error) in every_call(&kms, "k").await {
            let got = match &error {
                Some(e @ KmsError::Unreachable { .. }) if e.is_transient() => "unreachable",
                Some(KmsError::NotFound { .. }) => "not_found",
                Some(KmsError::AccessDenied { .. }) => "access_denied",
                _ => "other",
            };
            assert_eq!(
                got, *expected,
                "{call} answered {status} {content_type:?} {body:?}: {error:?}"
            );
        }
        assert_eq!(responder.connections(), 3, "{status} {body:?}");
    }
}

#[tokio::test]
async fn timeouts_refused_connections_and_tls_failures_are_unreachable() {
    byokd::install_crypto_provider();
    let silent = Responder::silent().await;
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr")
    };
    let plain = Responder::start("200 OK", Some("application/json"), "{}").await;
    for address in [
        silent.url(),
        format!("http://{closed}"),
        // TLS to a server that speaks plain HTTP.
        format!("https://{}", plain.addr),
    ] {
        let kms = client(&address, "t", "transit", Some(1));
        for (call, error) in every_call(&kms, "k").await {
            assert!(
                matches!(&error, Some(e @ KmsError::Unreachable { .. }) if e.is_transient()),
                "{call} via {address}: {error:?}"
            );
        }
    }
}
