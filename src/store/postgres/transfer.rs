//! PostgreSQL SQL of `byokd export` / `byokd import`: the server converts between its
//! column types and the neutral form of [`crate::store::transfer`] (json_build_object out,
//! jsonb_to_recordset in), so rows cross as JSON in batches.

use super::PgStore;
use super::audit::chained_detail;
use crate::store::StoreError;
use crate::store::transfer::{
    ExportError, Exported, Kind, Row, TABLES, Table, not_empty, parse_row,
};
use futures_util::TryStreamExt;
use serde_json::Value;

/// Rows per INSERT of an import (one jsonb parameter each).
const BATCH: usize = 1000;

/// The carried columns of `audit_log` that PostgreSQL keeps in `audit_chain` (same names,
/// joined on `id`; `audit_chain.row_txid` is `audit_log.txid` again).
const IN_AUDIT_CHAIN: [&str; 2] = ["chain_seq", "chain"];

/// The columns of `t` stored in the table itself.
fn own_columns(t: &Table) -> impl Iterator<Item = &(&'static str, Kind)> {
    t.columns
        .iter()
        .filter(move |(c, _)| t.name != "audit_log" || !IN_AUDIT_CHAIN.contains(c))
}

/// What `t`'s rows are read from.
fn source(t: &Table) -> String {
    if t.name == "audit_log" {
        "audit_log LEFT JOIN audit_chain USING (id)".to_owned()
    } else {
        t.name.to_owned()
    }
}

/// The neutral form of column `c` of kind `kind`, as SQL.
fn out_expr(c: &str, kind: Kind) -> String {
    match kind {
        Kind::Time => format!(
            r#"CASE WHEN isfinite("{c}")
                    THEN to_char("{c}" AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                    ELSE "{c}"::text END"#
        ),
        Kind::Bytes => format!(r#"translate(encode("{c}", 'base64'), E'\n', '')"#),
        Kind::Xid => format!(r#""{c}"::text::bigint"#),
        Kind::ChainedJson => chained_detail!().to_owned(),
        _ => format!(r#""{c}""#),
    }
}

/// The type `jsonb_to_recordset` reads a neutral value of `kind` as.
fn record_type(kind: Kind) -> &'static str {
    match kind {
        Kind::Text | Kind::Bytes | Kind::Xid | Kind::ChainedJson => "text",
        Kind::Uuid => "uuid",
        Kind::Int => "bigint",
        Kind::Real => "float8",
        Kind::Bool => "boolean",
        Kind::Time => "timestamptz",
        Kind::Json => "jsonb",
        Kind::TextArray => "text[]",
    }
}

/// The column value from record field `r."c"`.
fn in_expr(c: &str, kind: Kind) -> String {
    match kind {
        Kind::Bytes => format!(r#"decode(r."{c}", 'base64')"#),
        Kind::Xid => format!(r#"r."{c}"::xid8"#),
        Kind::ChainedJson => format!(r#"r."{c}"::jsonb"#),
        _ => format!(r#"r."{c}""#),
    }
}

/// The INSERT of a batch of `t`'s rows (`$1`: a jsonb array of neutral rows).
fn insert_sql(t: &Table) -> String {
    let mut columns: Vec<String> = own_columns(t).map(|(c, _)| format!(r#""{c}""#)).collect();
    let mut values: Vec<String> = own_columns(t).map(|(c, k)| in_expr(c, *k)).collect();
    let record = own_columns(t)
        .map(|(c, k)| format!(r#""{c}" {}"#, record_type(*k)))
        .collect::<Vec<_>>()
        .join(", ");
    for (c, k) in t.columns {
        if *k == Kind::ChainedJson {
            // The text the chain covers, where the jsonb would give another one.
            columns.push("detail_text".to_owned());
            values.push(format!(
                r#"CASE WHEN r."{c}"::jsonb::text = r."{c}" THEN NULL ELSE r."{c}" END"#
            ));
        }
    }
    format!(
        "INSERT INTO {} ({}) SELECT {} FROM jsonb_to_recordset($1::jsonb) AS r({record})",
        t.name,
        columns.join(", "),
        values.join(", ")
    )
}

impl PgStore {
    pub(crate) async fn export_rows(
        &self,
        sink: &mut (dyn FnMut(Exported<'_>) -> std::io::Result<()> + Send),
    ) -> Result<(), ExportError> {
        let mut tx = self.pool.begin().await?;
        // One snapshot for the counts and every row.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
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
            let fields = t
                .columns
                .iter()
                .map(|(c, k)| format!("'{c}', {}", out_expr(c, *k)))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT json_build_object({fields})::text FROM {} ORDER BY {}",
                source(t),
                t.order
            );
            let mut rows =
                sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).fetch(&mut *tx);
            while let Some(text) = rows.try_next().await? {
                let row = parse_row(&text)?;
                sink(Exported::Row(t, &row)).map_err(ExportError::Sink)?;
            }
        }
        Ok(())
    }

    pub(crate) async fn import_rows(
        &self,
        rows: &[(&'static Table, Vec<Row>)],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        // Two imports at once would each find the tables empty: the second waits here, then
        // finds rows.
        let names = TABLES.iter().map(|t| t.name).collect::<Vec<_>>().join(", ");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "LOCK TABLE {names} IN EXCLUSIVE MODE"
        )))
        .execute(&mut *tx)
        .await?;
        let mut nonempty = Vec::new();
        for t in TABLES {
            let any: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT EXISTS (SELECT 1 FROM {})",
                t.name
            )))
            .fetch_one(&mut *tx)
            .await?;
            if any {
                nonempty.push(t.name);
            }
        }
        if let Some(refused) = not_empty(&nonempty) {
            return Err(refused);
        }
        for (t, table_rows) in rows {
            let sql = insert_sql(t);
            for batch in table_rows.chunks(BATCH) {
                let json = Value::Array(batch.iter().cloned().map(Value::Object).collect());
                sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                    .bind(&json)
                    .execute(&mut *tx)
                    .await?;
                if t.name == "audit_log" {
                    sqlx::query!(
                        "INSERT INTO audit_chain (chain_seq, id, row_txid, chain)
                         SELECT r.chain_seq, r.id, r.txid::xid8, decode(r.chain, 'base64')
                         FROM jsonb_to_recordset($1::jsonb)
                             AS r(chain_seq bigint, id bigint, txid text, chain text)
                         WHERE r.chain_seq IS NOT NULL",
                        json
                    )
                    .execute(&mut *tx)
                    .await?;
                }
            }
            if let Some(serial) = t.serial {
                // New rows after the import must not collide with the ids it brought.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT setval(pg_get_serial_sequence('{0}', '{serial}'), max({serial}))
                     FROM {0} HAVING max({serial}) IS NOT NULL",
                    t.name
                )))
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }
}
