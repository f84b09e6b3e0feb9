//! Every row of a deployment, out and in, for `byokd export` / `byokd import` (moving a
//! standalone SQLite deployment to PostgreSQL, or back): the tables carried, each column's
//! kind, and one backend-neutral JSON form of a row that both back ends read and write.
//!
//! Carried, in [`TABLES`] order (an order inserts can replay, parents first), all rows and
//! all columns: tenants and their contacts and webhook endpoints (secrets stay sealed: both
//! sides use the same root key), keks (observed state, claims, version states), deks
//! (wrapped bytes), the local KMS's keys and sealed versions, processed events (dedupe must
//! survive the move), the audit chain key (sealed), the audit log with its chain values and
//! checkpoints, the outbox with its delivery attempts (delivered rows too: their dedupe keys
//! are what keep an expiry warning from going out twice, and operators read the history),
//! rewrap jobs and their failures, schedule runs, clients (token hashes) and alerts.
//!
//! Not carried: SQLite's `changes` (its stand-in for PostgreSQL's LISTEN/NOTIFY: wake-ups for
//! processes running at the time, pruned by age; a stopped deployment has none to deliver),
//! and the migration bookkeeping, which the target keeps for its own migrations.
//!
//! The neutral form of a value, by [`Kind`]: text and UUIDs as strings; integers and reals as
//! numbers; booleans as booleans; times as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (microseconds, as both
//! back ends keep them) or `infinity`; byte strings as standard base64; JSON documents as
//! JSON; text arrays as JSON arrays. An audit row's `detail` is the exact text its chain value
//! covers ([`Kind::ChainedJson`]), never a re-formatted document.

use super::StoreError;
use serde_json::{Map, Value};

/// How a column is represented (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text.
    Text,
    /// A UUID (text in its hyphenated lower-case form).
    Uuid,
    /// A 64-bit integer (narrower columns too).
    Int,
    /// A double.
    Real,
    /// A boolean.
    Bool,
    /// A time, to the microsecond.
    Time,
    /// Bytes (base64).
    Bytes,
    /// A JSON document.
    Json,
    /// A list of text.
    TextArray,
    /// PostgreSQL's `xid8` (SQLite: an integer, always 0): a number.
    Xid,
    /// The audit log's `detail`: the exact text the chain covers.
    ChainedJson,
}

/// One carried table.
#[derive(Debug)]
pub struct Table {
    /// Its name (the same on both back ends).
    pub name: &'static str,
    /// Its columns and their kinds.
    pub columns: &'static [(&'static str, Kind)],
    /// The columns it is read in order of (its key), so an export is reproducible.
    pub order: &'static str,
    /// The column a PostgreSQL sequence fills, moved past the imported values.
    pub serial: Option<&'static str>,
}

use Kind::{Bool, Bytes, ChainedJson, Int, Json, Real, Text, TextArray, Time, Uuid, Xid};

/// Every table carried, parents before children.
pub const TABLES: &[Table] = &[
    Table {
        name: "tenants",
        columns: &[
            ("id", Text),
            ("name", Text),
            ("access", Text),
            ("access_reason", Text),
            ("created_at", Time),
            ("updated_at", Time),
        ],
        order: "id",
        serial: None,
    },
    Table {
        name: "tenant_contacts",
        columns: &[("tenant_id", Text), ("email", Text)],
        order: "tenant_id, email",
        serial: None,
    },
    Table {
        name: "webhook_endpoints",
        columns: &[
            ("id", Uuid),
            ("tenant_id", Text),
            ("url", Text),
            ("secret_sealed", Bytes),
            ("enabled", Bool),
            ("disabled_reason", Text),
            ("created_at", Time),
            ("failing_since", Time),
            ("previous_secret_sealed", Bytes),
            ("previous_secret_expires_at", Time),
        ],
        order: "id",
        serial: None,
    },
    Table {
        name: "keks",
        columns: &[
            ("id", Int),
            ("tenant_id", Text),
            ("provider", Text),
            ("key_ref", Text),
            ("state", Text),
            ("revoked", Bool),
            ("current_version", Text),
            ("expires_at", Time),
            ("state_changed_at", Time),
            ("version_changed_at", Time),
            ("expiry_changed_at", Time),
            ("is_primary", Bool),
            ("created_at", Time),
            ("updated_at", Time),
            ("retired_at", Time),
            ("probed_at", Time),
            ("probe_error", Text),
            ("unreachable_since", Time),
            ("unreachable_notified_at", Time),
            ("claim", Text),
            ("claimed_at", Time),
            ("observed_at", Time),
            ("expiry_event_at", Time),
            ("confirm_due_at", Time),
            ("confirm_attempts", Int),
            ("watch_gen", Int),
            ("role_arn", Text),
            ("external_id", Text),
            ("rewrap_on_rotation", Bool),
            ("version_states", Json),
        ],
        order: "id",
        serial: Some("id"),
    },
    Table {
        name: "deks",
        columns: &[
            ("id", Uuid),
            ("tenant_id", Text),
            ("kek_id", Int),
            ("kek_version", Text),
            ("wrapped", Bytes),
            ("kcv", Text),
            ("created_at", Time),
            ("updated_at", Time),
        ],
        order: "id",
        serial: None,
    },
    Table {
        name: "local_keys",
        columns: &[
            ("key_ref", Text),
            ("state", Text),
            ("current_version", Int),
            ("expires_at", Time),
            ("created_at", Time),
            ("updated_at", Time),
        ],
        order: "key_ref",
        serial: None,
    },
    Table {
        name: "local_key_versions",
        columns: &[
            ("key_ref", Text),
            ("version", Int),
            ("material_sealed", Bytes),
            ("created_at", Time),
        ],
        order: "key_ref, version",
        serial: None,
    },
    Table {
        name: "processed_events",
        columns: &[
            ("provider", Text),
            ("source", Text),
            ("event_id", Text),
            ("kind", Text),
            ("key_ref", Text),
            ("event_time", Time),
            ("received_at", Time),
        ],
        order: "provider, source, event_id",
        serial: None,
    },
    Table {
        name: "audit_chain_key",
        columns: &[
            ("id", Int),
            ("sealed", Bytes),
            ("origin", Text),
            ("created_at", Time),
        ],
        order: "id",
        serial: None,
    },
    Table {
        name: "audit_log",
        columns: &[
            ("id", Int),
            ("at", Time),
            ("tenant_id", Text),
            ("provider", Text),
            ("key_ref", Text),
            ("action", Text),
            ("outcome", Text),
            ("source", Text),
            ("event_id", Text),
            ("detail", ChainedJson),
            ("client", Text),
            ("txid", Xid),
            ("chain_seq", Int),
            ("chain", Bytes),
            ("attempt_id", Uuid),
        ],
        order: "id",
        serial: Some("id"),
    },
    Table {
        name: "audit_checkpoints",
        columns: &[("chain_seq", Int), ("chain", Bytes), ("at", Time)],
        order: "chain_seq",
        serial: None,
    },
    Table {
        name: "outbox",
        columns: &[
            ("id", Uuid),
            ("seq", Int),
            ("tenant_id", Text),
            ("channel", Text),
            ("recipient", Text),
            ("kind", Text),
            ("dedupe_key", Text),
            ("payload", Json),
            ("status", Text),
            ("attempts", Int),
            ("next_attempt_at", Time),
            ("last_error", Text),
            ("created_at", Time),
            ("delivered_at", Time),
            ("locked_until", Time),
            ("lease_id", Uuid),
            ("dead_at", Time),
        ],
        order: "seq",
        serial: Some("seq"),
    },
    Table {
        name: "notification_attempts",
        columns: &[
            ("id", Int),
            ("outbox_id", Uuid),
            ("at", Time),
            ("outcome", Text),
            ("status_code", Int),
            ("detail", Text),
            ("duration_ms", Int),
        ],
        order: "id",
        serial: Some("id"),
    },
    Table {
        name: "rewrap_jobs",
        columns: &[
            ("id", Int),
            ("tenant_id", Text),
            ("kind", Text),
            ("kek_id", Int),
            ("target_kek_id", Int),
            ("target_version", Text),
            ("state", Text),
            ("from_versions", TextArray),
            ("planned", Bool),
            ("total", Int),
            ("done", Int),
            ("failed", Int),
            ("not_before", Time),
            ("last_error", Text),
            ("created_at", Time),
            ("updated_at", Time),
            ("completed_at", Time),
        ],
        order: "id",
        serial: Some("id"),
    },
    Table {
        name: "rewrap_failures",
        columns: &[
            ("job_id", Int),
            ("dek_id", Uuid),
            ("reason", Text),
            ("attempts", Int),
            ("next_attempt_at", Time),
        ],
        order: "job_id, dek_id",
        serial: None,
    },
    Table {
        name: "schedule_runs",
        columns: &[
            ("name", Text),
            ("last_tick_at", Time),
            ("last_started_at", Time),
            ("last_finished_at", Time),
            ("last_status", Text),
            ("last_report", Json),
            ("last_success_at", Time),
        ],
        order: "name",
        serial: None,
    },
    Table {
        name: "clients",
        columns: &[
            ("name", Text),
            ("token_hash", Bytes),
            ("all_tenants", Bool),
            ("tenants", TextArray),
            ("created_at", Time),
            ("revoked_at", Time),
        ],
        order: "name",
        serial: None,
    },
    Table {
        name: "alerts",
        columns: &[
            ("id", Int),
            ("rule", Text),
            ("subject", Text),
            ("window_start", Time),
            ("tenant_id", Text),
            ("client", Text),
            ("observed", Real),
            ("threshold", Real),
            ("detail", Json),
            ("raised_at", Time),
        ],
        order: "id",
        serial: Some("id"),
    },
];

/// The carried table called `name`.
pub fn table(name: &str) -> Option<&'static Table> {
    TABLES.iter().find(|t| t.name == name)
}

/// One row in the neutral form: column name to value.
pub type Row = Map<String, Value>;

/// What an export hands its sink, in order: the row counts (once, first), then every row.
#[derive(Debug)]
pub enum Exported<'a> {
    /// Rows per table, in [`TABLES`] order, of the snapshot the rows come from.
    Counts(Vec<(&'static str, i64)>),
    /// One row of a table.
    Row(&'static Table, &'a Row),
}

/// The time form of the neutral rows.
pub const TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// Whether `text` is a time in the neutral form: `infinity` or the fixed-width UTC form.
pub(crate) fn check_time(text: &str) -> bool {
    text == "infinity"
        || chrono::NaiveDateTime::parse_from_str(text, TIME_FORMAT).is_ok() && text.len() == 27
}

/// Why `value` is not a neutral value of `kind`, if it is not one. NULL passes: the target's
/// NOT NULL constraints judge it.
pub fn invalid(kind: Kind, value: &Value) -> Option<&'static str> {
    use base64::Engine;
    let ok = match (kind, value) {
        (_, Value::Null) => true,
        (Text | ChainedJson, Value::String(_)) => true,
        (Uuid, Value::String(s)) => uuid::Uuid::parse_str(s).is_ok(),
        (Int | Xid, Value::Number(n)) => n.is_i64(),
        (Real, Value::Number(_)) => true,
        (Bool, Value::Bool(_)) => true,
        (Time, Value::String(s)) => check_time(s),
        (Bytes, Value::String(s)) => base64::engine::general_purpose::STANDARD.decode(s).is_ok(),
        (Json, _) => true,
        (TextArray, Value::Array(items)) => items.iter().all(Value::is_string),
        _ => false,
    };
    if ok {
        return None;
    }
    Some(match kind {
        Text | ChainedJson => "text",
        Uuid => "a UUID",
        Int | Xid => "an integer",
        Real => "a number",
        Bool => "a boolean",
        Time => "a time (YYYY-MM-DDTHH:MM:SS.ffffffZ or infinity)",
        Bytes => "base64",
        Json => "JSON",
        TextArray => "an array of text",
    })
}

/// A store failure to the importer: a value the back end would not take.
pub(crate) fn bad_value(table: &str, column: &str) -> StoreError {
    StoreError::Conflict(format!("{table}.{column}: a value of the wrong kind"))
}

impl super::Store {
    /// Reads every carried row in one consistent snapshot, handing `sink` the counts and
    /// then each row ([`Exported`]). On SQLite, run it with no daemon on the file (the
    /// caller holds [`super::Store::lock_single_node`]).
    ///
    /// # Errors
    ///
    /// The database failed, or `sink` did (its error is returned as is, inside
    /// [`ExportError::Sink`]).
    pub async fn export_rows(
        &self,
        sink: &mut (dyn FnMut(Exported<'_>) -> std::io::Result<()> + Send),
    ) -> Result<(), ExportError> {
        dispatch!(self, s => s.export_rows(sink).await)
    }

    /// Inserts `rows` (per table, in [`TABLES`] order; each row valid for its table's kinds)
    /// in one transaction, after checking that the carried tables are empty, and moves
    /// PostgreSQL's sequences past the ids inserted. Nothing is written if anything fails.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] with [`not_empty`]'s message if a table holds rows (a
    /// database not migrated fails there too: its tables are missing); any constraint the rows violate; a
    /// database failure.
    pub async fn import_rows(&self, rows: &[(&'static Table, Vec<Row>)]) -> Result<(), StoreError> {
        dispatch!(self, s => s.import_rows(rows).await)
    }
}

/// Start of the message of the [`StoreError::Conflict`] an import into a database holding
/// rows fails with.
pub const NOT_EMPTY: &str = "the target database is not empty";

/// The refusal of an import into a database whose `tables` hold rows (none if it is empty).
pub(crate) fn not_empty(tables: &[&str]) -> Option<StoreError> {
    (!tables.is_empty()).then(|| {
        StoreError::Conflict(format!(
            "{NOT_EMPTY} ({} {} rows)",
            tables.join(", "),
            if tables.len() == 1 { "holds" } else { "hold" }
        ))
    })
}

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sink failed (writing the archive).
    #[error("cannot write the archive: {0}")]
    Sink(#[source] std::io::Error),
}

impl From<sqlx::Error> for ExportError {
    fn from(e: sqlx::Error) -> ExportError {
        ExportError::Store(e.into())
    }
}

/// A neutral row from a JSON object read by PostgreSQL (`row_to_json` of the export query).
pub(crate) fn parse_row(text: &str) -> Result<Row, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Conflict(format!("unreadable row: {e}")))
}
