//! `byokd export` / `byokd import`: a whole deployment as one self-describing archive, to
//! move a standalone (SQLite) deployment to PostgreSQL intact, or back.
//!
//! The archive is JSON Lines: a header (format and its version, byokd's version, the source
//! back end, when, rows per table), one line per row in [`crate::store::transfer::TABLES`]
//! order (`{"table": .., "row": {..}}`, values in the store's neutral form), and a trailer
//! with the counts again and the SHA-256 of every byte before it. An import checks the
//! whole archive before it writes anything: a truncated archive has no trailer, and an edited
//! or damaged one no longer matches its hash. What is carried, and what not, is said in
//! [`crate::store::transfer`].
//!
//! The audit trail keeps verifying after the move because nothing of it is recomputed: rows
//! keep their ids, `at` to the microsecond, txid, chain_seq and chain values, and `detail`
//! travels as the exact text its chain value covers (PostgreSQL keeps that text beside the
//! jsonb when the jsonb would print it otherwise). The chain key travels sealed, so the
//! target needs the source's root key, which an import checks first. A row edited in the
//! archive (and the hash recomputed) is imported as it is and caught by `audit verify`.

use crate::config::RootKeys;
use crate::seal::{AUDIT_CHAIN_PURPOSE, Sealer};
use crate::store::transfer::{Exported, Row, TABLES, Table, invalid, table};
use crate::store::{Store, StoreError};
use base64::Engine;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};

/// Names the format in the header.
pub const FORMAT: &str = "byokd-archive";
/// The format's version; an import refuses any other.
pub const VERSION: u64 = 1;

/// What an archive holds, as its header and trailer say (and an import found).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// The back end it was exported from (`sqlite` or `postgres`).
    pub source: String,
    /// The byokd version that wrote it.
    pub byokd_version: String,
    /// Rows per table.
    pub counts: BTreeMap<String, i64>,
    /// All rows.
    pub rows: i64,
    /// SHA-256 (hex) of everything before the trailer.
    pub sha256: String,
}

/// Why an export or an import did not happen. Each is one line.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The archive is not one byokd can import as it is: truncated, edited, damaged or of
    /// another format. Nothing was written.
    #[error("archive refused, nothing imported: {0}")]
    Archive(String),
    /// The target database already holds data. Nothing was written.
    #[error("{0}: import only into a freshly migrated, empty database")]
    NotEmpty(String),
    /// The archive's sealed values do not open with the configured root key.
    #[error(
        "the archive's audit chain key does not open with the configured root key: import \
         with the root key of the exported deployment (BYOKD_LOCAL_KMS_ROOT_KEY, or its \
         root.key)"
    )]
    WrongRootKey,
    /// Reading or writing the archive failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn refuse(msg: impl Into<String>) -> TransferError {
    TransferError::Archive(msg.into())
}

/// Writes lines and hashes every byte written.
struct HashingWriter<'w> {
    out: &'w mut (dyn Write + Send),
    hash: Sha256,
}

impl HashingWriter<'_> {
    fn line(&mut self, value: &Value) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec(value)?;
        bytes.push(b'\n');
        self.hash.update(&bytes);
        self.out.write_all(&bytes)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the whole of `store` to `out` as an archive.
///
/// # Errors
///
/// The database failed or `out` could not be written.
pub async fn export(store: &Store, out: &mut (dyn Write + Send)) -> Result<Summary, TransferError> {
    let source = if store.single_node() {
        "sqlite"
    } else {
        "postgres"
    };
    let mut w = HashingWriter {
        out,
        hash: Sha256::new(),
    };
    let mut written: BTreeMap<String, i64> = BTreeMap::new();
    let mut sink = |item: Exported<'_>| -> std::io::Result<()> {
        match item {
            Exported::Counts(c) => {
                let counts: BTreeMap<&str, i64> = c.into_iter().collect();
                w.line(&json!({
                    "format": FORMAT,
                    "version": VERSION,
                    "byokd_version": env!("CARGO_PKG_VERSION"),
                    "source": source,
                    "exported_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    "counts": counts,
                }))
            }
            Exported::Row(t, row) => {
                *written.entry(t.name.to_owned()).or_default() += 1;
                w.line(&json!({ "table": t.name, "row": row }))
            }
        }
    };
    store.export_rows(&mut sink).await.map_err(|e| match e {
        crate::store::transfer::ExportError::Store(e) => TransferError::Store(e),
        crate::store::transfer::ExportError::Sink(e) => TransferError::Io(e),
    })?;
    for t in TABLES {
        written.entry(t.name.to_owned()).or_default();
    }
    let sha256 = hex(&w.hash.clone().finalize());
    let rows: i64 = written.values().sum();
    w.out.write_all(
        format!(
            "{}\n",
            json!({ "trailer": { "counts": written, "rows": rows, "sha256": sha256 } })
        )
        .as_bytes(),
    )?;
    w.out.flush()?;
    Ok(Summary {
        source: source.to_owned(),
        byokd_version: env!("CARGO_PKG_VERSION").to_owned(),
        counts: written,
        rows,
        sha256,
    })
}

/// A checked archive, ready to import.
#[derive(Debug)]
pub struct Archive {
    /// What it holds.
    pub summary: Summary,
    /// Its rows per table, in [`TABLES`] order.
    pub tables: Vec<(&'static Table, Vec<Row>)>,
}

fn counts_of(value: Option<&Value>, what: &str) -> Result<BTreeMap<String, i64>, TransferError> {
    let map = value
        .and_then(Value::as_object)
        .ok_or_else(|| refuse(format!("the {what} has no counts")))?;
    map.iter()
        .map(|(k, v)| {
            v.as_i64()
                .map(|n| (k.clone(), n))
                .ok_or_else(|| refuse(format!("the {what} counts {k} as {v}")))
        })
        .collect()
}

/// Reads and checks a whole archive: header, trailer, hash, counts, and every row against
/// its table's columns. Writes nothing anywhere.
///
/// # Errors
///
/// [`TransferError::Archive`] naming what is wrong (and the line, where there is one);
/// [`TransferError::Io`] if `input` cannot be read.
pub fn read_archive(mut input: impl BufRead) -> Result<Archive, TransferError> {
    let mut hash = Sha256::new();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut trailer: Option<Value> = None;
    loop {
        let mut line = Vec::new();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if trailer.is_some() {
            return Err(refuse("there are lines after the trailer"));
        }
        if line.starts_with(b"{\"trailer\":") {
            let value: Value = serde_json::from_slice(&line)
                .map_err(|e| refuse(format!("the trailer is not JSON: {e}")))?;
            trailer = Some(value);
            continue;
        }
        if line.last() != Some(&b'\n') {
            return Err(refuse(
                "it ends in the middle of a line, without its trailer: it is truncated",
            ));
        }
        hash.update(&line);
        lines.push(line);
    }
    let trailer = trailer
        .ok_or_else(|| refuse("it ends without its trailer line: it is truncated"))?
        .get_mut("trailer")
        .map(Value::take)
        .unwrap_or_default();
    let sha256 = hex(&hash.finalize());
    if trailer.get("sha256").and_then(Value::as_str) != Some(sha256.as_str()) {
        return Err(refuse(
            "its SHA-256 does not match the one in its trailer: lines were changed, added or \
             removed",
        ));
    }
    let mut lines = lines.into_iter().enumerate();
    let header: Value = match lines.next() {
        Some((_, line)) => serde_json::from_slice(&line)
            .map_err(|e| refuse(format!("line 1 (the header) is not JSON: {e}")))?,
        None => return Err(refuse("it has no header")),
    };
    if header.get("format").and_then(Value::as_str) != Some(FORMAT) {
        return Err(refuse(format!("it is not a {FORMAT} (line 1)")));
    }
    let version = header.get("version").and_then(Value::as_u64);
    if version != Some(VERSION) {
        return Err(refuse(format!(
            "it is of format version {}, this byokd reads version {VERSION}",
            version.map_or_else(|| "?".to_owned(), |v| v.to_string())
        )));
    }
    let header_counts = counts_of(header.get("counts"), "header")?;
    let trailer_counts = counts_of(trailer.get("counts"), "trailer")?;
    let mut tables: Vec<(&'static Table, Vec<Row>)> =
        TABLES.iter().map(|t| (t, Vec::new())).collect();
    let mut at_table = 0;
    for (i, line) in lines {
        let n = i + 1;
        let mut value: Value = serde_json::from_slice(&line)
            .map_err(|e| refuse(format!("line {n} is not JSON: {e}")))?;
        let name = value
            .get("table")
            .and_then(Value::as_str)
            .ok_or_else(|| refuse(format!("line {n} names no table")))?
            .to_owned();
        let t = table(&name)
            .ok_or_else(|| refuse(format!("line {n}: byokd carries no table {name:?}")))?;
        let index = TABLES
            .iter()
            .position(|x| x.name == t.name)
            .unwrap_or_default();
        if index < at_table {
            return Err(refuse(format!(
                "line {n}: {name} comes after the tables that follow it"
            )));
        }
        at_table = index;
        let row: Map<String, Value> = match value.get_mut("row").map(Value::take) {
            Some(Value::Object(row)) => row,
            _ => return Err(refuse(format!("line {n} holds no row"))),
        };
        if row.len() != t.columns.len() {
            return Err(refuse(format!(
                "line {n}: a {name} row has {} columns, not {}",
                row.len(),
                t.columns.len()
            )));
        }
        for (col, kind) in t.columns {
            let v = row
                .get(*col)
                .ok_or_else(|| refuse(format!("line {n}: the {name} row has no {col}")))?;
            if let Some(expected) = invalid(*kind, v) {
                return Err(refuse(format!("line {n}: {name}.{col} is not {expected}")));
            }
        }
        tables[index].1.push(row);
    }
    let counts: BTreeMap<String, i64> = tables
        .iter()
        .map(|(t, rows)| (t.name.to_owned(), rows.len() as i64))
        .collect();
    for (what, claimed) in [("header", &header_counts), ("trailer", &trailer_counts)] {
        if *claimed != counts {
            let wrong = counts
                .iter()
                .find(|(t, n)| claimed.get(t.as_str()) != Some(*n))
                .map_or_else(
                    || "a table byokd does not carry".to_owned(),
                    |(t, n)| {
                        format!(
                            "{t}: {} counted, {n} found",
                            claimed.get(t).copied().unwrap_or(0)
                        )
                    },
                );
            return Err(refuse(format!("its {what} counts other rows ({wrong})")));
        }
    }
    let rows = counts.values().sum();
    if trailer.get("rows").and_then(Value::as_i64) != Some(rows) {
        return Err(refuse("its trailer counts another number of rows"));
    }
    Ok(Archive {
        summary: Summary {
            source: header
                .get("source")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned(),
            byokd_version: header
                .get("byokd_version")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned(),
            counts,
            rows,
            sha256,
        },
        tables,
    })
}

/// Checks that the archive's sealed audit chain key opens with `keys`: a deployment moved
/// under another root key could open none of its secrets.
fn check_root_key(archive: &Archive, keys: &RootKeys) -> Result<(), TransferError> {
    let Some((_, rows)) = archive
        .tables
        .iter()
        .find(|(t, _)| t.name == "audit_chain_key")
    else {
        return Ok(());
    };
    let sealer = Sealer::with_previous(keys, AUDIT_CHAIN_PURPOSE);
    for row in rows {
        let sealed = row
            .get("sealed")
            .and_then(Value::as_str)
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .ok_or_else(|| refuse("the audit chain key is not base64"))?;
        crate::audit::ChainKey::open(&sealer, &sealed).map_err(|_| TransferError::WrongRootKey)?;
    }
    Ok(())
}

/// Imports a checked archive into `store`, which must be migrated and empty, in one
/// transaction; records the import in the audit trail.
///
/// # Errors
///
/// [`TransferError::WrongRootKey`], [`TransferError::NotEmpty`], or the database refused the
/// rows (nothing is written then either).
pub async fn import(
    store: &Store,
    archive: &Archive,
    keys: &RootKeys,
) -> Result<(), TransferError> {
    check_root_key(archive, keys)?;
    store
        .import_rows(&archive.tables)
        .await
        .map_err(|e| match e {
            StoreError::Conflict(msg) if msg.starts_with(crate::store::transfer::NOT_EMPTY) => {
                TransferError::NotEmpty(msg)
            }
            e => TransferError::Store(e),
        })?;
    let s = &archive.summary;
    store
        .append_audit(&[crate::store::AuditRow::operation(
            None,
            "archive_imported",
            "cli",
            json!({ "source": s.source, "byokd_version": s.byokd_version, "rows": s.rows, "sha256": s.sha256 }),
        )])
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An archive of `rows` (table, row) with `header` fields merged over a valid header,
    /// and a valid trailer.
    fn archive(header: Value, rows: &[(&str, Value)]) -> Vec<u8> {
        let mut counts: BTreeMap<String, i64> =
            TABLES.iter().map(|t| (t.name.to_owned(), 0)).collect();
        for (t, _) in rows {
            *counts.entry((*t).to_owned()).or_default() += 1;
        }
        let mut head = json!({
            "format": FORMAT, "version": VERSION, "byokd_version": "0", "source": "sqlite",
            "counts": counts,
        });
        for (k, v) in header.as_object().into_iter().flatten() {
            head[k] = v.clone();
        }
        let mut body = format!("{head}\n");
        for (t, row) in rows {
            body.push_str(&format!("{}\n", json!({ "table": t, "row": row })));
        }
        let sha = hex(&Sha256::digest(body.as_bytes()));
        let n: i64 = counts.values().sum();
        body.push_str(&format!(
            "{}\n",
            json!({ "trailer": { "counts": counts, "rows": n, "sha256": sha } })
        ));
        body.into_bytes()
    }

    fn contact(email: &str) -> Value {
        json!({ "tenant_id": "acme", "email": email })
    }

    fn refused(bytes: &[u8]) -> String {
        match read_archive(bytes) {
            Err(TransferError::Archive(why)) => why,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_well_formed_archive_reads_back_by_table() {
        let bytes = archive(
            json!({}),
            &[
                ("tenant_contacts", contact("a@x")),
                ("tenant_contacts", contact("b@x")),
            ],
        );
        let a = read_archive(bytes.as_slice()).expect("archive");
        assert_eq!(a.summary.rows, 2);
        assert_eq!(a.summary.counts["tenant_contacts"], 2);
        let (t, rows) = &a.tables[1];
        assert_eq!(t.name, "tenant_contacts");
        assert_eq!(rows.len(), 2);
    }

    #[test]
    fn another_format_version_lines_after_the_trailer_and_bad_rows_are_refused() {
        assert!(refused(&archive(json!({ "version": 2 }), &[])).contains("format version 2"));
        assert!(refused(&archive(json!({ "format": "tar" }), &[])).contains("not a byokd-archive"));
        let mut extra = archive(json!({}), &[]);
        extra.extend_from_slice(b"{}\n");
        assert!(refused(&extra).contains("after the trailer"));
        let why = refused(&archive(json!({}), &[("nope", json!({}))]));
        assert!(why.contains("no table \"nope\""), "{why}");
        let why = refused(&archive(
            json!({}),
            &[("tenant_contacts", json!({ "tenant_id": "acme" }))],
        ));
        assert!(why.contains("has 1 columns, not 2"), "{why}");
        let why = refused(&archive(
            json!({}),
            &[(
                "tenant_contacts",
                json!({ "tenant_id": "acme", "mail": "a@x" }),
            )],
        ));
        assert!(why.contains("has no email"), "{why}");
        let why = refused(&archive(
            json!({}),
            &[("tenant_contacts", json!({ "tenant_id": 7, "email": "a@x" }))],
        ));
        assert!(
            why.contains("tenant_contacts.tenant_id is not text"),
            "{why}"
        );
        // Parents come first: a child before its parent's table cannot be replayed.
        let why = refused(&archive(
            json!({}),
            &[("tenant_contacts", contact("a@x")), ("tenants", json!({}))],
        ));
        assert!(why.contains("comes after"), "{why}");
    }

    #[test]
    fn neutral_values_are_checked_by_kind() {
        use crate::store::transfer::{Kind, invalid};
        assert_eq!(
            invalid(Kind::Time, &json!("2026-11-29T13:45:00.123456Z")),
            None
        );
        assert_eq!(invalid(Kind::Time, &json!("infinity")), None);
        assert!(invalid(Kind::Time, &json!("2026-11-29T13:45:00Z")).is_some());
        assert!(invalid(Kind::Bytes, &json!("not base64!")).is_some());
        assert!(invalid(Kind::Uuid, &json!("acme")).is_some());
        assert!(invalid(Kind::Int, &json!(1.5)).is_some());
        assert!(invalid(Kind::TextArray, &json!(["a", 1])).is_some());
        assert_eq!(invalid(Kind::Json, &json!({ "any": ["thing"] })), None);
        assert_eq!(invalid(Kind::Bool, &Value::Null), None);
    }
}
