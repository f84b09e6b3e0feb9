//! Standalone mode: byokd on a bare machine with nothing but its binary.
//!
//! With neither `BYOKD_DATABASE_URL` nor `BYOKD_AMQP_URL` set, [`prepare`] fills in what a
//! production deployment configures: everything lives in the data dir (`BYOKD_DATA_DIR`,
//! default `./byokd-data`, created 0700):
//!
//! * `byokd.db`: the SQLite database (`sqlite://<data dir>/byokd.db`);
//! * `root.key`: the root key that seals secrets at rest, generated on first start;
//! * `admin-token`: the admin API's bearer token, generated on first start;
//! * `mail/`: notification emails as `.eml` files, unless `BYOKD_SMTP_URL` is set.
//!
//! The two files are made 0600 and refused when group or others may read them; their
//! contents never reach a log line or an error, only their paths. Explicit settings win:
//! `BYOKD_LOCAL_KMS_ROOT_KEY`, `BYOKD_ADMIN_TOKEN` and `BYOKD_MAIL_DIR` are used as given,
//! and a later start reuses the files made by the first.
//!
//! Only `byokd run` (and `byokd demo`, in a temporary dir) create anything; the other
//! commands read what the daemon made, so `byokd clients create` or `byokd publish` work on
//! its data dir without repeating its settings. There is no broker in this mode: events
//! arrive over `POST /v1/events` (see the `daemon` module). Several replicas need PostgreSQL.

use crate::config::{Config, ConfigError};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use crate::config::DEFAULT_DATA_DIR;
/// The root key's file in the data dir.
pub const ROOT_KEY_FILE: &str = "root.key";
/// The admin token's file in the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The SQLite database's file in the data dir.
pub const DATABASE_FILE: &str = "byokd.db";

/// How a configuration runs byokd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Neither a database URL nor a broker: everything in the data dir.
    Standalone,
    /// A database, no broker: one node taking events over HTTP.
    NoBroker,
    /// A database and RabbitMQ: the production stack.
    Broker,
}

impl Mode {
    /// The mode `config` asks for, before [`prepare`] fills anything in.
    pub fn of(config: &Config) -> Mode {
        match (&config.database_url, &config.amqp_url) {
            (None, None) => Mode::Standalone,
            (_, None) => Mode::NoBroker,
            (_, Some(_)) => Mode::Broker,
        }
    }

    /// One line for `check-config` and the start-up log.
    pub fn describe(self) -> &'static str {
        match self {
            Mode::Standalone => {
                "standalone: SQLite, root key and admin token in the data dir, no broker \
                 (events over POST /v1/events)"
            }
            Mode::NoBroker => {
                "single node without a broker: events over POST /v1/events, applied before \
                 the answer"
            }
            Mode::Broker => "with a broker: events consumed from RabbitMQ",
        }
    }
}

/// Where one of the data dir's secrets came from (never what it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "from", content = "path")]
pub enum Origin {
    /// Set explicitly (environment or config file); the file is not used.
    Setting,
    /// Read from this file, made by an earlier start.
    Found(PathBuf),
    /// Generated into this file now.
    Created(PathBuf),
    /// Not there, and this command does not create it (only `byokd run` does).
    Missing(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Setting => f.write_str("from the settings"),
            Origin::Found(p) => write!(f, "{}", p.display()),
            Origin::Created(p) => write!(f, "{} (created)", p.display()),
            Origin::Missing(p) => {
                write!(f, "{} (not created yet: byokd run makes it)", p.display())
            }
        }
    }
}

/// What [`prepare`] found or made.
#[derive(Debug, Clone, Serialize)]
pub struct DataDir {
    /// The data dir, absolute.
    pub dir: PathBuf,
    /// The database URL it set.
    pub database_url: String,
    /// The root key.
    pub root_key: Origin,
    /// The admin token.
    pub admin_token: Origin,
    /// Where emails go (`None` with SMTP).
    pub mail_dir: Option<PathBuf>,
}

impl DataDir {
    /// Logs where everything is (paths, never contents).
    pub fn log(&self) {
        tracing::info!(
            data_dir = %self.dir.display(),
            database = %self.database_url,
            root_key = %self.root_key,
            admin_token = %self.admin_token,
            mail = %self.mail_dir.as_ref().map_or_else(|| "SMTP".to_owned(), |d| d.display().to_string()),
            "standalone mode: everything is in the data dir; the admin API's bearer token is \
             in the admin-token file"
        );
    }
}

/// Why standalone mode cannot start: one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StandaloneError(pub String);

impl From<StandaloneError> for ConfigError {
    fn from(e: StandaloneError) -> ConfigError {
        ConfigError(vec![e.0])
    }
}

/// In standalone mode (see [`Mode::of`]), fills `config` in from the data dir: the database
/// URL, the mail dir, and the root key and admin token unless set explicitly. With `create`
/// the data dir and missing files are made (`byokd run`); without, missing files stay
/// missing. Any other mode is left alone (`None`).
///
/// # Errors
///
/// The data dir cannot be made or read, a file is readable by others or holds no valid key
/// or token, or the resulting configuration does not validate (a build without SQLite).
pub fn prepare(config: &mut Config, create: bool) -> Result<Option<DataDir>, StandaloneError> {
    if Mode::of(config) != Mode::Standalone {
        return Ok(None);
    }
    let dir = std::path::absolute(&config.data_dir).map_err(|e| {
        StandaloneError(format!("BYOKD_DATA_DIR {}: {e}", config.data_dir.display()))
    })?;
    let database_url = format!("sqlite://{}", dir.join(DATABASE_FILE).display());
    config.database_url = Some(database_url.clone());
    // Before anything is made: a build that cannot use SQLite says so and leaves no trace.
    validate(config)?;
    let mail_dir = if config.smtp_url.is_some() {
        None
    } else {
        if config.mail_dir == Config::default().mail_dir {
            config.mail_dir = dir.join("mail");
        }
        Some(config.mail_dir.clone())
    };
    let (root_key, admin_token) = secrets(config, &dir, create)?;
    validate(config)?;
    Ok(Some(DataDir {
        dir,
        database_url,
        root_key,
        admin_token,
        mail_dir,
    }))
}

/// Fills in the root key and the admin token from `dir` (`root.key`, `admin-token`) where
/// the settings do not give them; with `create`, makes `dir` (0700) and whichever file is
/// missing (0600). Used by [`prepare`] and by `byokd demo` for its own data dir.
///
/// # Errors
///
/// `dir` or a file cannot be made or read, a file is readable by others or empty, or
/// `root.key` holds no root key: one line naming the file, never its contents.
pub fn secrets(
    config: &mut Config,
    dir: &Path,
    create: bool,
) -> Result<(Origin, Origin), StandaloneError> {
    if create {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                StandaloneError(format!("cannot create the data dir {}: {e}", dir.display()))
            })?;
    }
    let root_key = match config.local_kms_root_key {
        Some(_) => Origin::Setting,
        None => {
            let path = dir.join(ROOT_KEY_FILE);
            let (origin, key) = secret_file(&path, create, crate::seal::generate_root_key)?;
            if let Some(key) = &key
                && let Err(e) =
                    crate::config::decode_root_key(key.expose_secret(), &path.display().to_string())
            {
                return Err(StandaloneError(format!(
                    "{e}, so it is not a root key: restore the right file, or set \
                     BYOKD_LOCAL_KMS_ROOT_KEY (byokd root-key generate makes a new key, which \
                     cannot open what the old one sealed)"
                )));
            }
            config.local_kms_root_key = key;
            origin
        }
    };
    let admin_token = match config.admin_token {
        Some(_) => Origin::Setting,
        None => {
            let (origin, token) = secret_file(
                &dir.join(ADMIN_TOKEN_FILE),
                create,
                crate::access::generate_admin_token,
            )?;
            config.admin_token = token;
            origin
        }
    };
    Ok((root_key, admin_token))
}

/// [`Config::validate`], saying plainly when it is SQLite this build cannot use.
fn validate(config: &Config) -> Result<(), StandaloneError> {
    config.validate().map_err(|e| {
        if e.0.iter().any(|m| m.contains("BYOKD_DATABASE_URL")) {
            StandaloneError(format!(
                "standalone mode needs SQLite, which this build of byokd cannot use ({e}); \
                 set BYOKD_DATABASE_URL=postgres://... to use PostgreSQL instead"
            ))
        } else {
            StandaloneError(e.to_string())
        }
    })
}

/// Reads the secret in `path`, refusing a file group or others may read; makes it (0600,
/// never overwriting) with `generate` when it is missing and `create` is set.
fn secret_file(
    path: &Path,
    create: bool,
    generate: impl FnOnce() -> SecretString,
) -> Result<(Origin, Option<SecretString>), StandaloneError> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(StandaloneError(format!(
                    "{shown} is readable by others (mode {mode:04o}); run: chmod 600 {shown}"
                )));
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| StandaloneError(format!("cannot read {shown}: {e}")))?;
            let value = text.trim();
            if value.is_empty() {
                return Err(StandaloneError(format!(
                    "{shown} is empty; remove it to have a new one made"
                )));
            }
            Ok((
                Origin::Found(path.to_owned()),
                Some(SecretString::from(value.to_owned())),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !create {
                return Ok((Origin::Missing(path.to_owned()), None));
            }
            let secret = generate();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| StandaloneError(format!("cannot create {shown}: {e}")))?;
            file.write_all(secret.expose_secret().as_bytes())
                .and_then(|()| file.write_all(b"\n"))
                .and_then(|()| file.sync_all())
                .map_err(|e| StandaloneError(format!("cannot write {shown}: {e}")))?;
            Ok((Origin::Created(path.to_owned()), Some(secret)))
        }
        Err(e) => Err(StandaloneError(format!("cannot read {shown}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("byokd-standalone-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn modes_follow_the_two_urls() {
        let mut config = Config::default();
        assert_eq!(Mode::of(&config), Mode::Standalone);
        config.database_url = Some("postgres://db/byokd".into());
        assert_eq!(Mode::of(&config), Mode::NoBroker);
        config.amqp_url = Some("amqp://mq".into());
        assert_eq!(Mode::of(&config), Mode::Broker);
        let mut config = Config {
            database_url: Some("postgres://db/byokd".into()),
            ..Config::default()
        };
        assert!(prepare(&mut config, true).expect("no-op").is_none());
        assert!(config.local_kms_root_key.is_none());
    }

    #[test]
    fn secret_files_are_made_0600_then_reused_and_refused_when_open_to_others() {
        let dir = temp_dir();
        let path = dir.join("secret");
        let (origin, missing) = secret_file(&path, false, || unreachable!()).expect("missing");
        assert_eq!(origin, Origin::Missing(path.clone()));
        assert!(missing.is_none());
        let (origin, made) =
            secret_file(&path, true, || SecretString::from("s3cret-value")).expect("created");
        assert_eq!(origin, Origin::Created(path.clone()));
        assert_eq!(made.expect("made").expose_secret(), "s3cret-value");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (origin, again) =
            secret_file(&path, true, || SecretString::from("other")).expect("found");
        assert_eq!(origin, Origin::Found(path.clone()));
        assert_eq!(again.expect("read").expose_secret(), "s3cret-value");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = secret_file(&path, true, || unreachable!()).expect_err("too open");
        assert!(e.0.contains("readable by others (mode 0644)"), "{e}");
        assert!(!e.0.contains("s3cret"), "{e}");
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
