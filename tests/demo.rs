//! `byokd demo` as a new user runs it: a process that exits 0 within a minute, prints every
//! step of its timeline, and names .eml files that exist and were written to the tenant.
//! Against PostgreSQL (`BYOKD_DATABASE_URL`); standalone mode's SQLite is the same tour.

mod common;

use common::{TestDb, byokd_command};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_tours_byokd_and_keeps_its_data_dir_on_request() {
    let db = TestDb::create().await;
    let started = Instant::now();
    let out = byokd_command()
        .env("BYOKD_DATABASE_URL", &db.url)
        .args(["demo", "--keep"])
        .output()
        .expect("run byokd demo");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // Well under a minute in a release build; this is a debug build, perhaps beside the
    // rest of the suite, so the bound is looser (the README's figure is measured apart).
    assert!(
        took < Duration::from_secs(90),
        "the tour took {took:?}:\n{stdout}"
    );

    // Every step, in order, each line with its time.
    let steps = [
        "daemon:",
        "tenant:",
        "deks: 10000 DEKs wrapped",
        "rotation:",
        "re-wrap: job",
        "expiry warning: simulated clock +46 days",
        "extension:",
        "revocation:",
        "restoration:",
        "replacement:",
        "verify: all 10000 DEKs",
        "emails:",
        "done:",
    ];
    let mut from = 0;
    for step in steps {
        let at = stdout[from..]
            .find(step)
            .unwrap_or_else(|| panic!("no step {step:?} after offset {from}:\n{stdout}"));
        from += at + step.len();
    }
    assert!(
        stdout.contains("re-wrap: job") && stdout.contains("moved 10000 DEKs"),
        "{stdout}"
    );
    assert!(
        stdout.contains("unwrap refused (403)") && stdout.contains("new DEKs refused (403)"),
        "{stdout}"
    );

    // The .eml files it names exist, went to the tenant's contact, and say what happened.
    let emails: Vec<&str> = stdout
        .split([' ', ',', '\n'])
        .filter(|w| w.ends_with(".eml"))
        .collect();
    assert!(emails.len() >= 8, "{emails:?}\n{stdout}");
    let mut subjects = Vec::new();
    for path in &emails {
        let eml = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(eml.contains("To: security@acme-"), "{path}:\n{eml}");
        subjects.extend(
            eml.lines()
                .filter(|l| l.starts_with("Subject: "))
                .map(str::to_owned),
        );
    }
    assert!(subjects.len() >= 2, "{subjects:?}");

    // --keep: the data dir stays, with the command to run byokd on it.
    let kept = stdout
        .lines()
        .find_map(|l| l.strip_prefix("data dir kept: "))
        .expect("the kept data dir")
        .to_owned();
    assert!(
        stdout.contains(" run\n") || stdout.trim_end().ends_with(" run"),
        "{stdout}"
    );
    assert!(
        stdout.contains("BYOKD_LOCAL_KMS_ROOT_KEY_FILE="),
        "{stdout}"
    );
    let root_key = std::path::Path::new(&kept).join("root.key");
    assert!(root_key.is_file(), "{}", root_key.display());
    std::fs::remove_dir_all(&kept).expect("remove the kept data dir");
    db.drop_db().await;
}
