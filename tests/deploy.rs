//! The files under `deploy/` and the container files against what byokd is: every metric a
//! Prometheus rule or a dashboard panel uses is one byokd describes; the alerts and panels
//! the on-call needs exist; the Kubernetes manifests, the Dockerfile, `.dockerignore` and
//! `docker-compose.yml` have their essentials. Where the real checker is installed
//! (`promtool`, `kubernetes-validate`, the Compose v2 plugin: scripts/test installs them)
//! it is run too.

use byokd::telemetry::exported_names;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(&read(path))
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

/// The metric names a PromQL expression uses: identifiers of byokd's or the process
/// collector's namespace (label names and functions never start with those).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut current = String::new();
    let mut in_string = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_string = !in_string;
            current.clear();
            continue;
        }
        if !in_string && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            current.push(c);
            continue;
        }
        if current.starts_with("byokd_") || current.starts_with("process_") {
            names.insert(current.clone());
        }
        current.clear();
    }
    names
}

/// Runs `program` if it is installed; `None` when it is not.
fn run_if_installed(program: &str, args: &[&str], env: &[(&str, &str)]) -> Option<(bool, String)> {
    let output = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Some((output.status.success(), text))
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(
            r#"sum by (le) (rate(byokd_x_bucket{le="30",a="byokd_not_me"}[5m])) / process_y"#
        ),
        BTreeSet::from(["byokd_x_bucket".to_owned(), "process_y".to_owned()])
    );
}

#[test]
fn alert_rules_use_only_described_metrics_and_cover_the_on_call_questions() {
    let path = "deploy/prometheus/byokd-alerts.yml";
    let known: BTreeSet<String> = exported_names().into_iter().collect();
    let doc = yaml(path).pop().expect("one document");
    let mut alerts = BTreeSet::new();
    for group in doc["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().expect("expr");
            let used = metric_names(expr);
            assert!(!used.is_empty(), "{name} uses no byokd metric");
            for metric in used {
                assert!(
                    known.contains(&metric),
                    "{name} uses {metric}, which byokd does not export"
                );
            }
            assert!(
                ["page", "ticket"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            assert!(alerts.insert(name.to_owned()), "{name} twice");
        }
    }
    for needed in [
        "ByokdRevocationSlow",
        "ByokdDeadLettersGrowing",
        "ByokdDeadNotifications",
        "ByokdScheduleOverdue",
        "ByokdKmsUnreachable",
        "ByokdRewrapStalled",
    ] {
        assert!(alerts.contains(needed), "no {needed} alert");
    }
    if let Some((ok, out)) = run_if_installed("promtool", &["check", "rules", path], &[]) {
        assert!(ok, "promtool check rules: {out}");
        // The rules' unit tests: each alert fires on the series it is for, and not on the
        // healthy ones beside them.
        let tests = "deploy/prometheus/byokd-alerts.test.yml";
        let (ok, out) =
            run_if_installed("promtool", &["test", "rules", tests], &[]).expect("promtool");
        assert!(ok, "promtool test rules: {out}");
    }
}

#[test]
fn dashboard_uses_only_described_metrics_and_answers_the_on_call_questions() {
    let known: BTreeSet<String> = exported_names().into_iter().collect();
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/byokd-dashboard.json")).expect("JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    for question in [
        "Intake",
        "Revocation",
        "Notifications",
        "KMS",
        "Re-wrap",
        "Schedules",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(question)),
            "no {question} row in {rows:?}"
        );
    }
    let mut used = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_i64().expect("id")),
            "panel ids unique"
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{}: {expr}", panel["title"]);
            used.extend(names);
        }
    }
    for metric in &used {
        assert!(
            known.contains(metric),
            "the dashboard uses {metric}, which byokd does not export"
        );
    }
    for essential in [
        "byokd_event_commit_latency_seconds_bucket",
        "byokd_revocation_effect_latency_seconds_bucket",
        "byokd_notification_delivery_latency_seconds_bucket",
        "byokd_kms_request_duration_seconds_bucket",
        "byokd_kms_errors_total",
        "byokd_rewrap_deks_remaining",
        "byokd_schedule_last_success_timestamp_seconds",
        "byokd_outbox_rows",
        "byokd_dead_letter_queue_messages",
    ] {
        assert!(used.contains(essential), "no panel shows {essential}");
    }
}

/// Every document of every manifest, with its file.
fn manifests() -> Vec<(String, Value)> {
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|p| {
            let rel = p
                .strip_prefix(root())
                .unwrap_or(Path::new(""))
                .display()
                .to_string();
            yaml(&rel).into_iter().map(move |doc| (rel.clone(), doc))
        })
        .collect()
}

fn kind<'a>(docs: &'a [(String, Value)], kind: &str) -> &'a Value {
    &docs
        .iter()
        .find(|(_, d)| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} manifest"))
        .1
}

#[test]
fn kubernetes_manifests_have_their_essentials() {
    let docs = manifests();
    let deployment = kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    assert_eq!(
        &deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
        &selector["app.kubernetes.io/name"]
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    let container = &pod["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");

    // Secrets come from the Secret, never as literal values.
    let env = container["env"].as_array().expect("env");
    let secret_names = [
        "BYOKD_DATABASE_URL",
        "BYOKD_AMQP_URL",
        "BYOKD_ADMIN_TOKEN",
        "BYOKD_LOCAL_KMS_ROOT_KEY",
        "BYOKD_SMTP_URL",
    ];
    for name in secret_names {
        let var = env
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{name} not set"));
        assert!(var.get("value").is_none(), "{name} has a literal value");
        assert!(
            var["valueFrom"]["secretKeyRef"]["name"].is_string(),
            "{name} is not from a Secret"
        );
    }
    // The audit spool is on a volume of its own, large enough for the spool's cap.
    let spool_dir = env
        .iter()
        .find(|v| v["name"] == "BYOKD_ACCESS__AUDIT_SPOOL_DIR")
        .and_then(|v| v["value"].as_str())
        .expect("BYOKD_ACCESS__AUDIT_SPOOL_DIR");
    let spool_mount = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["mountPath"] == spool_dir)
        .expect("the audit spool is a mount of its own");
    let spool_volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == spool_mount["name"])
        .expect("the audit spool's volume");
    let limit = spool_volume["emptyDir"]["sizeLimit"]
        .as_str()
        .and_then(|l| l.strip_suffix("Mi"))
        .and_then(|l| l.parse::<u64>().ok())
        .expect("an emptyDir with a sizeLimit in Mi");
    assert!(
        limit * 1024 * 1024 > byokd::config::AccessSettings::default().audit_spool_max_bytes,
        "the spool's volume must hold more than access.audit_spool_max_bytes"
    );
    // The config file comes from the ConfigMap, mounted where BYOKD_CONFIG points.
    let config_map = kind(&docs, "ConfigMap");
    let config_name = config_map["metadata"]["name"].as_str().expect("name");
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["configMap"]["name"] == config_name)
        .expect("the ConfigMap is a volume");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("and mounted");
    let config_path = env
        .iter()
        .find(|v| v["name"] == "BYOKD_CONFIG")
        .and_then(|v| v["value"].as_str())
        .expect("BYOKD_CONFIG");
    let file = config_path
        .strip_prefix(&format!("{}/", mount["mountPath"].as_str().expect("path")))
        .expect("BYOKD_CONFIG inside the mount");
    let toml_text = config_map["data"][file].as_str().expect("config file");
    let config: toml::Table = toml::from_str(toml_text).expect("TOML");
    assert!(
        !toml_text.contains("token") && !toml_text.contains("root_key"),
        "no secrets in the ConfigMap"
    );
    assert!(config.contains_key("http_addr"));
    // And byokd itself accepts it.
    let file_path =
        std::env::temp_dir().join(format!("byokd-configmap-{}.toml", std::process::id()));
    std::fs::write(&file_path, toml_text).expect("write config");
    let mut check = Command::new(env!("CARGO_BIN_EXE_byokd"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("BYOKD_")) {
        check.env_remove(k);
    }
    let output = check
        .arg("check-config")
        .env("BYOKD_CONFIG", &file_path)
        // The image's schedules directory does not exist outside it.
        .env("BYOKD_SCHEDULES_DIR", root().join("schedules"))
        // What the Deployment takes from its Secret, as placeholders.
        .env(
            "BYOKD_DATABASE_URL",
            "postgres://byokd:secret@postgres:5432/byokd",
        )
        .env("BYOKD_AMQP_URL", "amqp://byokd:secret@rabbitmq:5672/%2f")
        .env("BYOKD_ADMIN_TOKEN", "placeholder-admin-token-0123456789")
        .env(
            "BYOKD_LOCAL_KMS_ROOT_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )
        .output()
        .expect("byokd check-config");
    let _ = std::fs::remove_file(&file_path);
    assert!(
        output.status.success(),
        "byokd check-config refuses the ConfigMap's file: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    for needed in [
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "NetworkPolicy",
    ] {
        let doc = kind(&docs, needed);
        let labels = &doc["spec"]["selector"]["matchLabels"];
        let labels = if labels.is_null() {
            &doc["spec"]["selector"]
        } else {
            labels
        };
        let pod_selector = &doc["spec"]["podSelector"]["matchLabels"];
        let labels = if pod_selector.is_null() {
            labels
        } else {
            pod_selector
        };
        assert_eq!(
            labels["app.kubernetes.io/name"], selector["app.kubernetes.io/name"],
            "{needed} selects byokd's pods"
        );
    }

    // The kustomization lists every manifest.
    let kustomization = kind(&docs, "Kustomization");
    let listed: BTreeSet<&str> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for (file, doc) in &docs {
        let name = file.rsplit('/').next().unwrap_or(file);
        if doc["kind"] != "Kustomization" {
            assert!(listed.contains(name), "{name} is not in the kustomization");
        }
    }

    let files: Vec<String> = docs
        .iter()
        .map(|(f, _)| f.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut args = vec!["--strict", "--quiet"];
    args.extend(files.iter().map(String::as_str));
    if let Some((ok, out)) = run_if_installed("kubernetes-validate", &args, &[]) {
        assert!(ok, "kubernetes-validate: {out}");
    }
}

/// The final stage of a Dockerfile: its instructions (continuation lines joined).
fn final_stage(text: &str) -> Vec<(String, String)> {
    let joined = text.replace("\\\n", " ");
    let mut stage = Vec::new();
    for line in joined.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (instruction, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let instruction = instruction.to_ascii_uppercase();
        if instruction == "FROM" {
            stage.clear();
        }
        stage.push((instruction, rest.trim().to_owned()));
    }
    stage
}

#[test]
fn dockerfile_runs_as_a_non_root_user_in_a_directory_it_owns_with_a_healthcheck() {
    let text = read("Dockerfile");
    let stage = final_stage(&text);
    let get = |name: &str| -> Vec<&str> {
        stage
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, r)| r.as_str())
            .collect()
    };
    let healthcheck = get("HEALTHCHECK");
    assert_eq!(healthcheck.len(), 1, "one HEALTHCHECK");
    assert!(healthcheck[0].contains("/healthz"));
    let user = *get("USER").last().expect("USER");
    let uid = user.split(':').next().unwrap_or(user);
    assert!(!["root", "0", ""].contains(&uid), "USER {user} is root");
    let workdir = *get("WORKDIR").last().expect("WORKDIR");
    // The directory is created owned by that user before the switch.
    let runs = get("RUN").join(" ");
    assert!(
        runs.contains(&format!("--uid {uid}")),
        "the user {uid} is created in this stage"
    );
    assert!(
        runs.contains(&format!("install -d -o byokd -g byokd -m 0750 {workdir}"))
            || runs.contains(&format!("chown {uid}")),
        "WORKDIR {workdir} is owned by the user"
    );
    let user_at = stage.iter().position(|(i, _)| i == "USER");
    let last_run = stage.iter().rposition(|(i, _)| i == "RUN");
    assert!(last_run < user_at, "nothing runs as root after USER");

    // Dependencies are built before the sources are copied, so a source change keeps them.
    let joined = text.replace("\\\n", " ");
    let deps = joined.find("cargo build").expect("a cargo build");
    let sources = joined.find("COPY . .").expect("COPY . .");
    assert!(deps < sources, "no dependency layer before COPY . .");

    let ignore = read(".dockerignore");
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in ["node_modules", "target", ".env", ".git", ".byokd-dev"] {
        assert!(ignored.contains(needed), ".dockerignore lacks {needed}");
    }
}

#[test]
fn compose_binds_to_loopback_and_restarts_a_healthchecked_byokd() {
    let compose = yaml("docker-compose.yml").pop().expect("one document");
    let services = compose["services"].as_object().expect("services");
    for (name, service) in services {
        for port in service["ports"].as_array().into_iter().flatten() {
            let port = port.as_str().expect("short port syntax");
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} beyond loopback"
            );
        }
    }
    let byokd = &services["byokd"];
    assert!(byokd["healthcheck"]["test"].is_array(), "byokd healthcheck");
    assert!(
        ["always", "unless-stopped", "on-failure"]
            .contains(&byokd["restart"].as_str().unwrap_or("")),
        "byokd restart policy"
    );

    let env = [
        ("BYOKD_LOCAL_KMS_ROOT_KEY", "check"),
        ("BYOKD_ADMIN_TOKEN", "check"),
    ];
    let args = ["-f", "docker-compose.yml", "config", "-q"];
    let checked = run_if_installed("docker-compose", &args, &env).or_else(|| {
        let mut plugin = vec!["compose"];
        plugin.extend(args);
        run_if_installed("docker", &plugin, &env).filter(|(_, out)| !out.contains("unknown"))
    });
    if let Some((ok, out)) = checked {
        assert!(ok, "compose config: {out}");
    }
}

#[test]
fn readme_lists_every_metric_and_alert() {
    let readme = read("README.md");
    let section = readme
        .split("## Operating byokd")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("an Operating byokd section");
    for def in byokd::telemetry::METRICS {
        assert!(
            section.contains(&format!("| `{}` | {} |", def.name, def.kind.as_str())),
            "the README's metrics table lacks {} ({})",
            def.name,
            def.kind.as_str()
        );
    }
    for name in byokd::telemetry::PROCESS_METRICS {
        assert!(section.contains(name), "the README lacks {name}");
    }
    let rules = yaml("deploy/prometheus/byokd-alerts.yml")
        .pop()
        .expect("rules");
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let alert = rule["alert"].as_str().expect("alert");
            assert!(
                section.contains(&format!("| `{alert}` |")),
                "the README lacks the alert {alert}"
            );
        }
    }
}
