//! Rows as the store reads them back. Domain enums live in text columns; a name there that
//! the code does not know (a newer schema, a hand edit) must fail the read with an error
//! that names it, never panic or be read as some other variant.

mod common;

use byokd::store::{Store, StoreError};
use common::TestDb;
use sqlx::PgPool;

#[tokio::test]
async fn an_unknown_name_in_an_enum_column_fails_the_read_and_names_it() {
    let db = TestDb::create().await;
    let store = Store::connect(&db.url, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    let pool = PgPool::connect(&db.url).await.expect("pool");
    sqlx::query("ALTER TABLE tenants DROP CONSTRAINT tenants_access_check")
        .execute(&pool)
        .await
        .expect("drop the check");
    sqlx::query("INSERT INTO tenants (id, name, access) VALUES ('acme', 'Acme', 'sideways')")
        .execute(&pool)
        .await
        .expect("insert");
    pool.close().await;

    let err = store
        .tenant("acme")
        .await
        .expect_err("an access the code does not know must not read");
    assert!(matches!(err, StoreError::Other(_)), "{err:?}");
    assert!(!err.is_transient(), "retrying cannot help: {err}");
    assert!(
        err.to_string().contains("unknown access \"sideways\""),
        "{err}"
    );
    db.drop_db().await;
}
