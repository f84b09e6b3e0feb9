//! Key-material hygiene: the local KMS's sealed key material is bound to its key and version.

mod common;

use byokd::config::{Config, RootKeys};
use byokd::kms::{Dek, DekContext, KmsError, KmsProvider, LocalKms, Wrapped, WrappedRef};
use byokd::seal::{LOCAL_KMS_PURPOSE, SealError, Sealer};
use byokd::store::Store;
use common::{ROOT_KEY, TestDb};
use secrecy::SecretString;
use sqlx::PgPool;
use std::sync::Arc;
use uuid::Uuid;

fn root_keys(current: &str, previous: &[&str]) -> RootKeys {
    Config {
        local_kms_root_key: Some(SecretString::from(current.to_owned())),
        local_kms_previous_root_keys: (!previous.is_empty())
            .then(|| SecretString::from(previous.join(","))),
        ..Config::default()
    }
    .require_root_keys()
    .expect("root keys")
}

fn local_kms(store: &Store, keys: &RootKeys) -> LocalKms {
    LocalKms::new(
        store.clone(),
        Arc::new(Sealer::with_previous(keys, LOCAL_KMS_PURPOSE)),
    )
}

/// A DEK wrapped for tenant `t`.
struct Item {
    dek: Dek,
    id: Uuid,
    wrapped: Wrapped,
}

async fn wrap(kms: &LocalKms, key: &str, version: Option<&str>) -> Item {
    let dek = Dek::generate();
    let id = Uuid::now_v7();
    let ctx = DekContext {
        tenant_id: "t",
        dek_id: id,
    };
    let wrapped = kms
        .wrap_many(key, version, &[(&dek, ctx)])
        .await
        .expect("wrap")
        .remove(0);
    Item { dek, id, wrapped }
}

/// Unwraps `item` through `key`: the whole call's error or the item's.
async fn unwrap(kms: &LocalKms, key: &str, item: &Item) -> Result<Dek, KmsError> {
    kms.unwrap_many(
        key,
        &[WrappedRef {
            ctx: DekContext {
                tenant_id: "t",
                dek_id: item.id,
            },
            version: &item.wrapped.version,
            ciphertext: &item.wrapped.ciphertext,
        }],
    )
    .await?
    .remove(0)
}

/// Swaps the sealed material of two key versions in one statement, as someone with write
/// access to the database could.
async fn swap(pool: &PgPool, a: (&str, i32), b: (&str, i32)) {
    let swapped = sqlx::query(
        "UPDATE local_key_versions v SET material_sealed = o.material_sealed
         FROM local_key_versions o
         WHERE (v.key_ref = $1 AND v.version = $2 AND o.key_ref = $3 AND o.version = $4)
            OR (v.key_ref = $3 AND v.version = $4 AND o.key_ref = $1 AND o.version = $2)",
    )
    .bind(a.0)
    .bind(a.1)
    .bind(b.0)
    .bind(b.1)
    .execute(pool)
    .await
    .expect("swap")
    .rows_affected();
    assert_eq!(swapped, 2);
}

fn assert_sealed_material_error(result: Result<Dek, KmsError>, key: &str, version: i32) {
    let e = match result {
        Err(e) => e,
        Ok(dek) => panic!("unwrapped {dek:?} with material moved from another row"),
    };
    assert_eq!(
        e.to_string(),
        format!(
            "local key {key:?} version {version}: cannot open its key material: it fails its \
             integrity check (corrupted, tampered with, or moved from the row it was sealed for)"
        )
    );
    assert!(matches!(
        e,
        KmsError::SealedMaterial {
            reason: SealError::Integrity,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn material_swapped_between_keys_or_versions_fails_its_integrity_check() {
    let db = TestDb::create().await;
    let store = Store::connect(&db.url, 4).await.expect("store");
    store.migrate().await.expect("migrate");
    let pool = PgPool::connect(&db.url).await.expect("pool");
    let kms = local_kms(&store, &root_keys(ROOT_KEY, &[]));
    for key in ["key-a", "key-b"] {
        kms.create(key, None).await.expect("create");
    }
    let a1 = wrap(&kms, "key-a", None).await;
    let b1 = wrap(&kms, "key-b", None).await;
    kms.rotate("key-a").await.expect("rotate");
    let a2 = wrap(&kms, "key-a", None).await;
    assert_eq!(
        (a1.wrapped.version.as_str(), a2.wrapped.version.as_str()),
        ("1", "2")
    );
    for (key, item) in [("key-a", &a1), ("key-b", &b1), ("key-a", &a2)] {
        assert_eq!(
            unwrap(&kms, key, item).await.expect("unwraps").kcv(),
            item.dek.kcv()
        );
    }

    // Between keys: neither key opens the other's material. Without the binding, key-b would
    // now unwrap key-a's DEKs (the DEK's own binding names the tenant and DEK, not the key).
    swap(&pool, ("key-a", 1), ("key-b", 1)).await;
    assert_sealed_material_error(unwrap(&kms, "key-a", &a1).await, "key-a", 1);
    assert_sealed_material_error(unwrap(&kms, "key-b", &b1).await, "key-b", 1);
    assert_sealed_material_error(unwrap(&kms, "key-b", &a1).await, "key-b", 1);
    swap(&pool, ("key-a", 1), ("key-b", 1)).await;
    assert!(unwrap(&kms, "key-a", &a1).await.is_ok());
    assert!(unwrap(&kms, "key-b", &b1).await.is_ok());

    // Between versions of one key: neither unwraps, and nothing is wrapped under the current
    // version with another version's material.
    swap(&pool, ("key-a", 1), ("key-a", 2)).await;
    assert_sealed_material_error(unwrap(&kms, "key-a", &a1).await, "key-a", 1);
    assert_sealed_material_error(unwrap(&kms, "key-a", &a2).await, "key-a", 2);
    let dek = Dek::generate();
    let refused = kms
        .wrap_many(
            "key-a",
            None,
            &[(
                &dek,
                DekContext {
                    tenant_id: "t",
                    dek_id: Uuid::now_v7(),
                },
            )],
        )
        .await
        .map(|_| dek);
    assert_sealed_material_error(refused, "key-a", 2);

    pool.close().await;
    db.drop_db().await;
}
