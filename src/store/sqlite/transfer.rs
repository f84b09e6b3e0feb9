//! SQLite SQL of `byokd export` / `byokd import`: rows to and from the neutral form of
//! [`crate::store::transfer`] (times are already stored in its form, save `infinity`).

use super::SqliteStore;
use crate::store::StoreError;
use crate::store::transfer::{
    ExportError, Exported, Kind, Row, TABLES, Table, bad_value, not_empty,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::TryStreamExt;
use serde_json::Value;
use sqlx::Row as _;
use sqlx::sqlite::SqliteRow;

/// How SQLite stores PostgreSQL's `infinity` (migrations/sqlite).
const INFINITY: &str = "9999-12-31T23:59:59.999999Z";

fn column_list(t: &Table) -> String {
    t.columns
        .iter()
        .map(|(c, _)| *c)
        .collect::<Vec<_>>()
        .join(", ")
}

fn neutral(t: &Table, r: &SqliteRow) -> Result<Row, StoreError> {
    let mut row = Row::new();
    for (i, (col, kind)) in t.columns.iter().enumerate() {
        let value = match kind {
            Kind::Text | Kind::Uuid | Kind::ChainedJson => {
                r.try_get::<Option<String>, _>(i)?.map(Value::String)
            }
            Kind::Time => r
                .try_get::<Option<String>, _>(i)?
                .map(|s| Value::String(if s == INFINITY { "infinity".into() } else { s })),
            Kind::Int | Kind::Xid => r.try_get::<Option<i64>, _>(i)?.map(Value::from),
            Kind::Real => r.try_get::<Option<f64>, _>(i)?.map(Value::from),
            Kind::Bool => r.try_get::<Option<i64>, _>(i)?.map(|b| Value::Bool(b != 0)),
            Kind::Bytes => r
                .try_get::<Option<Vec<u8>>, _>(i)?
                .map(|b| Value::String(STANDARD.encode(b))),
            Kind::Json | Kind::TextArray => match r.try_get::<Option<String>, _>(i)? {
                None => None,
                Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
                    StoreError::Conflict(format!("{}.{col} holds no JSON: {e}", t.name))
                })?),
            },
        };
        row.insert((*col).to_owned(), value.unwrap_or(Value::Null));
    }
    Ok(row)
}

impl SqliteStore {
    pub(crate) async fn export_rows(
        &self,
        sink: &mut (dyn FnMut(Exported<'_>) -> std::io::Result<()> + Send),
    ) -> Result<(), ExportError> {
        // One read transaction: a snapshot of the file (WAL), whatever else reads it.
        let mut tx = self.pool.begin().await?;
        let mut counts = Vec::with_capacity(TABLES.len());
        for t in TABLES {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {}",
                t.name
            )))
            .fetch_one(&mut *tx)
            .await?;
            counts.push((t.name, n));
        }
        sink(Exported::Counts(counts)).map_err(ExportError::Sink)?;
        for t in TABLES {
            let sql = format!(
                "SELECT {} FROM {} ORDER BY {}",
                column_list(t),
                t.name,
                t.order
            );
            let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut *tx);
            while let Some(r) = rows.try_next().await? {
                let row = neutral(t, &r)?;
                sink(Exported::Row(t, &row)).map_err(ExportError::Sink)?;
            }
        }
        Ok(())
    }

    pub(crate) async fn import_rows(
        &self,
        rows: &[(&'static Table, Vec<Row>)],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let mut nonempty = Vec::new();
        for t in TABLES {
            let any: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT EXISTS (SELECT 1 FROM {})",
                t.name
            )))
            .fetch_one(&mut *tx.tx)
            .await?;
            if any {
                nonempty.push(t.name);
            }
        }
        if let Some(refused) = not_empty(&nonempty) {
            return Err(refused);
        }
        for (t, table_rows) in rows {
            let placeholders = (1..=t.columns.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO {} ({}) VALUES ({placeholders})",
                t.name,
                column_list(t)
            );
            for row in table_rows {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
                for (col, kind) in t.columns {
                    let v = row.get(*col).unwrap_or(&Value::Null);
                    let bad = || bad_value(t.name, col);
                    q = match (kind, v) {
                        (_, Value::Null) => q.bind(None::<String>),
                        (Kind::Text | Kind::Uuid | Kind::ChainedJson, Value::String(s)) => {
                            q.bind(s.clone())
                        }
                        (Kind::Time, Value::String(s)) => q.bind(if s == "infinity" {
                            INFINITY.to_owned()
                        } else {
                            s.clone()
                        }),
                        (Kind::Int | Kind::Xid, v) => q.bind(v.as_i64().ok_or_else(bad)?),
                        (Kind::Real, v) => q.bind(v.as_f64().ok_or_else(bad)?),
                        (Kind::Bool, Value::Bool(b)) => q.bind(i64::from(*b)),
                        (Kind::Bytes, Value::String(s)) => {
                            q.bind(STANDARD.decode(s).map_err(|_| bad())?)
                        }
                        (Kind::Json | Kind::TextArray, v) => q.bind(v.to_string()),
                        _ => return Err(bad()),
                    };
                }
                q.execute(&mut *tx.tx).await?;
            }
        }
        // AUTOINCREMENT counters follow explicit ids by themselves (sqlite_sequence).
        tx.commit().await
    }
}
