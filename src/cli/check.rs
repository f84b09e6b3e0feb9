//! `byokd check-config`: everything `byokd run` needs from its configuration, checked without
//! connecting to anything, each check named with its outcome (text, or JSON with `--json`).
//!
//! It fails (exit 3) where `run` would fail on the same configuration, and also on settings
//! byokd does not know (a misspelt variable silently does nothing in `run`).

use crate::config::{Config, ConfigError, redact_url};
use serde::Serialize;
use std::str::FromStr;

/// One named check.
#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    ok: bool,
    detail: String,
}

/// The whole report.
#[derive(Debug, Serialize)]
struct Report {
    valid: bool,
    checks: Vec<Check>,
    warnings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<String>,
}

/// Loads the configuration from the environment, runs every check, prints the report, and
/// fails with a [`ConfigError`] listing what failed.
pub fn run(json: bool) -> anyhow::Result<()> {
    let report = match Config::load() {
        Ok(mut config) => {
            let mode = crate::standalone::Mode::of(&config);
            let data_dir = crate::standalone::prepare(&mut config, false);
            let mut report = check(&config);
            let (ok, detail) = match data_dir {
                Ok(None) => (true, mode.describe().to_owned()),
                Ok(Some(d)) => (
                    true,
                    format!(
                        "{}; data dir {}, root key {}, admin token {}",
                        mode.describe(),
                        d.dir.display(),
                        d.root_key,
                        d.admin_token
                    ),
                ),
                Err(e) => (false, format!("{}: {e}", mode.describe())),
            };
            report.valid &= ok;
            report.checks.insert(
                1,
                Check {
                    check: "mode",
                    ok,
                    detail,
                },
            );
            report
        }
        Err(e) => Report {
            valid: false,
            checks: vec![Check {
                check: "load",
                ok: false,
                detail: e.to_string(),
            }],
            warnings: Vec::new(),
            config: None,
        },
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for c in &report.checks {
            println!(
                "{} {:<16} {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.check,
                c.detail
            );
        }
        for w in &report.warnings {
            println!("warn {w}");
        }
        if let Some(config) = &report.config {
            println!("{config}");
        }
    }
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.check, c.detail))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(ConfigError(failed).into())
    }
}

fn check(config: &Config) -> Report {
    let mut checks = Vec::new();
    let mut warnings = Vec::new();
    let mut add = |check: &'static str, result: Result<String, String>| {
        let (ok, detail) = match result {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        checks.push(Check { check, ok, detail });
    };
    add(
        "load",
        Ok("defaults, BYOKD_CONFIG, BYOKD_* variables and *_FILE secrets parse".to_owned()),
    );
    add(
        "database_url",
        match config.require_database_url() {
            Err(e) => Err(e.to_string()),
            Ok(url) if url.starts_with("sqlite:") => {
                sqlx::sqlite::SqliteConnectOptions::from_str(url)
                    .map(|_| redact_url(url))
                    .map_err(|e| format!("BYOKD_DATABASE_URL {:?}: {e}", redact_url(url)))
            }
            Ok(url) => sqlx::postgres::PgConnectOptions::from_str(url)
                .map(|_| redact_url(url))
                .map_err(|e| format!("BYOKD_DATABASE_URL {:?}: {e}", redact_url(url))),
        },
    );
    add(
        "amqp_url",
        match config.amqp_url.as_deref() {
            None => Ok("not set: no broker; events arrive over POST /v1/events".to_owned()),
            Some(url) => lapin::uri::AMQPUri::from_str(url)
                .map(|_| redact_url(url))
                .map_err(|e| format!("BYOKD_AMQP_URL {:?}: {e}", redact_url(url))),
        },
    );
    add(
        "root_key",
        config
            .require_root_keys()
            .map(|keys| {
                format!(
                    "set (32 bytes), {} previous root key(s)",
                    keys.previous.len()
                )
            })
            .map_err(|e| e.to_string()),
    );
    add(
        "schedules",
        crate::sweeps::load_dir(&config.schedules_dir)
            .map(|s| {
                let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
                format!(
                    "{} in {}: {}",
                    s.len(),
                    config.schedules_dir.display(),
                    names.join(", ")
                )
            })
            .map_err(|e| e.to_string()),
    );
    add(
        "templates",
        crate::notify::render::check_templates()
            .map(|n| format!("{n} email templates parse"))
            .map_err(|errors| errors.join("; ")),
    );
    add(
        "rewrap",
        crate::rewrap::rate_limits(&config.rewrap)
            .map(|limits| format!("{} provider rate limit(s)", limits.len()))
            .map_err(|e| format!("rewrap.rate_limits: {e}")),
    );
    if let Some(vault) = &config.kms.vault {
        add(
            "kms.vault",
            url::Url::parse(&vault.address)
                .map(|_| format!("{} mount {}", vault.address, vault.mount))
                .map_err(|e| format!("kms.vault.address {:?}: {e}", vault.address)),
        );
    }
    if let Some(azure) = &config.kms.azure {
        add(
            "kms.azure",
            crate::kms::AzureKms::new(azure)
                .map(|_| {
                    format!(
                        "{} auth, Key Vault api-version {}, {} requests per 10 s per vault",
                        azure.auth().kind(),
                        crate::kms::azure::API_VERSION,
                        azure.requests_per_10s
                    )
                })
                .map_err(|e| format!("kms.azure: {e}")),
        );
    }
    if let Some(gcp) = &config.kms.gcp {
        // Builds the client: reads the service-account key file, checks the URLs; no request.
        add(
            "kms.gcp",
            crate::kms::GcpKms::new(gcp)
                .map(|_| {
                    let auth = gcp.credentials_path.as_ref().map_or_else(
                        || format!("metadata server {}", gcp.metadata_url),
                        |p| format!("service-account key file {}", p.display()),
                    );
                    format!("{} with {auth}", gcp.endpoint_url)
                })
                .map_err(|e| e.to_string()),
        );
    }
    add(
        "settings",
        if config.unknown.is_empty() {
            Ok("no unknown settings".to_owned())
        } else {
            Err(config.unknown.join("; "))
        },
    );
    if config.admin_token.is_none() {
        warnings.push("BYOKD_ADMIN_TOKEN is not set: the admin API (/v1) is off".to_owned());
    }
    if config.smtp_url.is_none() {
        warnings.push(format!(
            "BYOKD_SMTP_URL is not set: emails are written as .eml files to {}",
            config.mail_dir.display()
        ));
    }
    let valid = checks.iter().all(|c| c.ok);
    Report {
        valid,
        checks,
        warnings,
        config: Some(format!("{config:#?}")),
    }
}
