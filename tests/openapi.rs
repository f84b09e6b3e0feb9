//! The OpenAPI description: the committed `openapi.json` is what the code generates and what
//! the daemon serves (`BYOKD_UPDATE_OPENAPI=1` rewrites it instead of comparing), every
//! documented `/v1` route refuses a request without a token, and schemathesis (PyPI; the
//! version `scripts/test` installs) drives the live daemon from the description and finds no
//! 5xx and no status, content type or body outside it. `BYOKD_SCHEMATHESIS_EXAMPLES` and
//! `BYOKD_SCHEMATHESIS_SEED` run it deeper or with other data.

mod common;

use common::{TOKEN, TestApp};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.json")
}

#[tokio::test]
async fn the_committed_spec_is_generated_from_the_code_and_served() {
    let generated = byokd::http::openapi::spec_json();
    let path = committed_path();
    if std::env::var_os("BYOKD_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write openapi.json");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi.json differs from what the code generates; rerun with \
         BYOKD_UPDATE_OPENAPI=1 and review the diff:\n--- committed\n{committed}\n--- generated\n{generated}"
    );

    let spec: Value = serde_json::from_str(&generated).expect("spec is JSON");
    assert_eq!(spec["openapi"], "3.1.0");
    let mut v1 = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{method} {path} documents no success"
            );
            if path.starts_with("/v1/") {
                assert!(
                    op["security"].as_array().is_some_and(|s| !s.is_empty()),
                    "{method} {path} documents no auth"
                );
                for status in ["401", "403"] {
                    assert!(
                        responses.contains_key(status),
                        "{method} {path} does not document {status}"
                    );
                }
                v1.push((method.clone(), path.clone()));
            }
        }
    }
    assert!(
        v1.len() >= 21,
        "only {} /v1 operations documented",
        v1.len()
    );

    let app = TestApp::spawn().await;
    let served = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("GET /openapi.json");
    assert_eq!(served.status(), 200, "served without a token");
    assert!(
        served.headers()["content-type"]
            .to_str()
            .is_ok_and(|c| c.starts_with("application/json"))
    );
    assert_eq!(served.text().await.expect("body"), generated);

    // Every documented /v1 route exists and refuses a request without a token: the router
    // and the description are one list.
    for (method, path) in &v1 {
        let concrete = path
            .replace("{dek_id}", "0190e0f5-1111-7000-8000-000000000000")
            .replace("{webhook_id}", "0190e0f5-1111-7000-8000-000000000000")
            .replace("{id}", "acme")
            .replace("{name}", "somebody");
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let r = app
            .http
            .request(method.clone(), app.url(&concrete))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 401, "{method} {concrete} without a token");
        let body: Value = r.json().await.expect("error body is JSON");
        assert!(body["error"].is_string(), "{method} {concrete}: {body}");
    }
    app.shutdown().await;
}

/// Runs schemathesis against `app` with `token` on the operations `filter` selects (extra
/// `st run` arguments), at most `max_examples` cases per operation per phase, killed after
/// `limit`; returns whether it passed and its output.
async fn schemathesis(
    app: &TestApp,
    token: &str,
    filter: &[&str],
    max_examples: u32,
    limit: Duration,
) -> (bool, String) {
    let seed = std::env::var("BYOKD_SCHEMATHESIS_SEED").unwrap_or_else(|_| "14".to_owned());
    // The module rather than the `st` script: pip may put scripts where PATH does not look.
    let mut cmd = tokio::process::Command::new("python3");
    cmd.args([
        "-m",
        "schemathesis.cli",
        "run",
        &app.url("/openapi.json"),
        "--url",
        &app.base,
        "--header",
        &format!("Authorization: Bearer {token}"),
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,\
         response_schema_conformance",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        &max_examples.to_string(),
        "--seed",
        &seed,
        // One worker: with two, Hypothesis in both threads parses the same source file to
        // describe a lambda, and CPython 3.11's ast module, whose recursion-depth count is
        // not thread-safe, fails one of them with "AST constructor recursion depth
        // mismatch" (a runtime error schemathesis counts against the operation). It failed
        // a fresh-clone CI run and 1 of 4 runs here.
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--no-shrink",
        "--suppress-health-check",
        "all",
    ])
    .args(filter)
    // Its cache of crashes goes there, not into the work tree.
    .current_dir(std::env::temp_dir())
    .env("NO_COLOR", "1")
    .kill_on_drop(true);
    let output = match tokio::time::timeout(limit, cmd.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!(
            "cannot run python3 -m schemathesis.cli ({e}); scripts/test installs it from \
             PyPI (python3 -m pip install schemathesis)"
        ),
        Err(_) => panic!("schemathesis did not finish within {limit:?}"),
    };
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_nothing_outside_the_spec() {
    let app = TestApp::spawn().await;
    // Something to find: a tenant with a key and a DEK, and a client of that tenant.
    app.tenant_with_key("acme", "acme-kek").await;
    let r = app.post("/v1/tenants/acme/deks", json!({})).await;
    assert_eq!(r.status(), 201);
    let r = app
        .post(
            "/v1/clients",
            json!({ "name": "billing", "tenants": ["acme"] }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let client: Value = r.json().await.expect("client");
    let client_token = client["token"].as_str().expect("token").to_owned();

    // Small by default, to keep the suite quick; BYOKD_SCHEMATHESIS_EXAMPLES (and _SEED)
    // run it deeper or differently.
    let examples = std::env::var("BYOKD_SCHEMATHESIS_EXAMPLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(25);
    let limit = Duration::from_secs(300);
    // Key access with the client's token first: the admin run may revoke the client or
    // delete the tenant, as schemathesis reuses the names it saw in answers.
    for (token, filter) in [
        (client_token.as_str(), &["--include-tag", "key-access"][..]),
        (TOKEN, &[][..]),
    ] {
        let (ok, output) = schemathesis(&app, token, filter, examples, limit).await;
        println!("{output}");
        assert!(ok, "schemathesis found problems:\n{output}");
        assert!(
            output.contains("Tested:") && !output.contains("No operations"),
            "schemathesis tested nothing:\n{output}"
        );
    }
    app.shutdown().await;
}

/// Hostile input the fuzzing may or may not draw, pinned: each is one JSON error with a 4xx,
/// never a 5xx or axum's plain-text rejection.
#[tokio::test]
async fn hostile_paths_queries_and_bodies_get_a_json_4xx() {
    let app = TestApp::spawn().await;
    app.tenant_with_key("acme", "acme-kek").await;
    // (method, path, body, status)
    type Case<'a> = (reqwest::Method, &'a str, Option<Value>, u16);
    let cases: Vec<Case> = vec![
        // A NUL cannot be stored or looked up in PostgreSQL text.
        (reqwest::Method::GET, "/v1/tenants/a%00b", None, 400),
        (reqwest::Method::GET, "/v1/audit?tenant=a%00b", None, 400),
        (reqwest::Method::GET, "/v1/tenants?after=%00", None, 400),
        (reqwest::Method::DELETE, "/v1/clients/x%00", None, 400),
        (
            reqwest::Method::POST,
            "/v1/tenants",
            Some(json!({ "id": "nul", "name": "a\u{0}b" })),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/clients",
            Some(json!({ "name": "c\u{0}", "tenants": ["acme"] })),
            422,
        ),
        // Not UTF-8 once percent-decoded.
        (reqwest::Method::GET, "/v1/tenants/%FF", None, 400),
        // A query parameter of the wrong type.
        (
            reqwest::Method::GET,
            "/v1/audit?tenant=acme&limit=lots",
            None,
            400,
        ),
        (
            reqwest::Method::GET,
            "/v1/audit/checkpoints?before=x",
            None,
            400,
        ),
        (
            reqwest::Method::GET,
            "/v1/notifications?tenant=acme&limit=1e99",
            None,
            400,
        ),
    ];
    for (method, path, body, status) in cases {
        let mut request = app
            .http
            .request(method.clone(), app.url(path))
            .bearer_auth(TOKEN);
        if let Some(body) = &body {
            request = request.json(body);
        }
        let r = request.send().await.expect("request");
        assert_eq!(r.status().as_u16(), status, "{method} {path} {body:?}");
        let text = r.text().await.expect("body");
        let error: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}"));
        assert!(error["error"].is_string(), "{method} {path}: {error}");
    }
    // The tenant with a NUL in its name was not half-created.
    assert_eq!(app.get("/v1/tenants/nul").await.status(), 404);
    app.shutdown().await;
}
