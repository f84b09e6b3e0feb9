//! Two transactions applying copies of the same events at once, against the real
//! PostgreSQL: the inbox lookup and the plain INSERT after it (src/store/postgres) leave a
//! window where both see an event as new; the one that loses is applied again and then
//! calls the event a duplicate. Every event is applied exactly once, whatever the overlap.

mod common;

use byokd::domain::{EventKind, LifecycleEvent, Origin, Provider};
use byokd::events::intake::{self, Wakers};
use byokd::lifecycle::Outcome;
use byokd::store::Store;
use common::{TestApp, at};
use std::time::Duration;

fn event(id: &str, kind: EventKind) -> LifecycleEvent {
    LifecycleEvent {
        provider: Provider::Local,
        event_id: id.into(),
        kind,
        key_ref: "race-kek".into(),
        version: None,
        expires_at: None,
        time: at(0),
        source: "race".into(),
        origin: Origin::Event,
    }
}

fn applied(outcomes: &[Outcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| **o != Outcome::Duplicate)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_batches_applied_at_once_apply_each_event_once() {
    let mut app = TestApp::spawn().await;
    app.tenant_with_key("racer", "race-kek").await;
    // Nothing else consumes or writes meanwhile.
    app.stop().await;
    let a = Store::connect(&app.db.url, 2).await.expect("store a");
    let b = Store::connect(&app.db.url, 2).await.expect("store b");
    let wake = Wakers::default();
    let mut total = 0;
    for round in 0..20 {
        // 300 events; one side gets the first 200, the other the last 200 (in reverse, so
        // the two do not simply take turns), and the first side has one of its events twice.
        let kinds = [EventKind::Disabled, EventKind::Enabled];
        let events: Vec<LifecycleEvent> = (0..300)
            .map(|i| event(&format!("r{round}-e{i}"), kinds[i % 2]))
            .collect();
        let mut left: Vec<LifecycleEvent> = events[..200].to_vec();
        left.push(events[7].clone());
        let mut right: Vec<LifecycleEvent> = events[100..].to_vec();
        right.reverse();
        let (ra, rb) = tokio::join!(
            intake::apply(&a, &left, &wake),
            intake::apply(&b, &right, &wake)
        );
        let (ra, rb) = (ra.expect("left side"), rb.expect("right side"));
        assert_eq!(
            ra.outcomes.last(),
            Some(&Outcome::Duplicate),
            "the second copy inside one batch"
        );
        assert_eq!(
            applied(&ra.outcomes) + applied(&rb.outcomes),
            300,
            "round {round}: each of 300 events applied once"
        );
        total += 300;
        let inbox = app.sql("SELECT count(*) FROM processed_events").int().await;
        assert_eq!(inbox, total);
    }
    // Applied again, a whole batch is duplicates.
    let again: Vec<LifecycleEvent> = (0..300)
        .map(|i| event(&format!("r0-e{i}"), EventKind::Disabled))
        .collect();
    let r = intake::apply(&a, &again, &wake).await.expect("again");
    assert_eq!(applied(&r.outcomes), 0);
    app.shutdown().await;
}

/// The race made certain: a transaction holds an event inserted but uncommitted while a
/// batch with it is applied; the batch's INSERT waits, fails once the holder commits, and
/// the batch applied again calls that event a duplicate and the other one new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_loses_the_race_is_applied_again_and_finds_the_duplicate() {
    let mut app = TestApp::spawn().await;
    app.tenant_with_key("racer", "race-kek").await;
    app.stop().await;
    let store = Store::connect(&app.db.url, 2).await.expect("store");
    let mut holder = app.pool.begin().await.expect("tx");
    sqlx::query(
        "INSERT INTO processed_events (provider, source, event_id, kind, key_ref, event_time)
         VALUES ('local', 'race', 'held', 'disabled', 'race-kek', now())",
    )
    .execute(&mut *holder)
    .await
    .expect("hold");
    let batch = vec![
        event("held", EventKind::Disabled),
        event("new", EventKind::Disabled),
    ];
    let applying = tokio::spawn(async move {
        intake::apply(&store, &batch, &Wakers::default())
            .await
            .expect("applied after the race")
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!applying.is_finished(), "the INSERT waits for the holder");
    holder.commit().await.expect("commit");
    let result = applying.await.expect("task");
    assert_eq!(result.raced, 1);
    assert_eq!(result.outcomes[0], Outcome::Duplicate);
    assert_ne!(result.outcomes[1], Outcome::Duplicate);
    let inbox = app.sql("SELECT count(*) FROM processed_events").int().await;
    assert_eq!(inbox, 2);
    app.shutdown().await;
}
