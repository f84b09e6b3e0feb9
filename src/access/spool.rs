//! The local audit spool of key access (`access.audit_mode = "spool"`, the default): an
//! append-only log per replica, like a write-ahead log, that stands between an attempt and
//! `audit_log`.
//!
//! [`Spool::record`] encodes an attempt's rows and appends them with one `write()` in the
//! request's own task: the write lands in the kernel's page cache in microseconds, whereas
//! handing it to a writer thread and back cost each answer two thread switches (about a
//! tenth of the cached-unwrap throughput, measured). From then on the rows survive a crash
//! of byokd. An `fdatasync` runs at most every `access.audit_fsync_ms` on a thread of its
//! own (0: before each acknowledgement, on a blocking thread rather than the request's),
//! which bounds what a crash of the machine can lose. [`ship_loop`] moves the spooled rows
//! into `audit_log` in large batches, each row with its attempt id so that shipping it
//! again (after a crash between the insert and the recorded position) inserts it once; a
//! new daemon ships what an earlier one left. Fail closed: a request whose rows cannot be written is refused, and
//! so is every attempt while the unshipped backlog exceeds `access.audit_spool_max_bytes`.
//!
//! On disk: `seg-<20 digits>.spool` segments, each a run of records `[len: u32 LE]
//! [crc32 of the payload: u32 LE][payload: the row as JSON]`; `shipped` (`<segment>
//! <offset>`: what is in `audit_log` already); `lock`, held by the daemon using the
//! directory. A daemon never appends to a segment it did not create, so only the end of a
//! segment can be torn (a crash mid-write); a torn end is skipped and reported, as is a
//! record whose checksum does not match.

use crate::store::{SpooledAudit, Store, StoreError};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Bytes after which the writer starts a new segment (and the shipper may delete the old
/// one once shipped).
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// Header of a record: length and checksum.
const HEADER: usize = 8;
/// A length above this is not a record's (a damaged header): the rest of the segment is
/// unreadable.
const MAX_RECORD: usize = 1024 * 1024;
/// Most bytes the shipper reads in one round: the largest record fits, and no more, since
/// what is read is decoded at once (about 3,000 key-access rows; 4 MiB held some 12,000
/// decoded rows on the shipper's thread, several MB of heap a replica kept afterwards).
const READ_BYTES: u64 = (HEADER + MAX_RECORD) as u64;
/// How often the shipper looks when nothing wakes it.
const SHIP_POLL: Duration = Duration::from_millis(250);
/// Least time between two shipments while attempts keep coming: larger batches, fewer
/// commits competing with the requests for the machine.
const SHIP_GAP: Duration = Duration::from_millis(100);

/// Why a spool cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file of the spool cannot be made, read or written.
    #[error("audit spool {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another daemon holds the spool's lock.
    #[error(
        "audit spool {0} is used by another byokd (its lock is held): give each daemon its own \
         access.audit_spool_dir"
    )]
    Locked(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// CRC-32 (IEEE, the one of zip and Ethernet), from the `crc` crate the GCP client already
/// uses for CRC32C. Its 16-slice table: the default one takes a byte per step, and every
/// attempt's record is checksummed twice (written, then shipped).
fn crc32(bytes: &[u8]) -> u32 {
    const IEEE: crc::Crc<u32, crc::Table<16>> =
        crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISO_HDLC);
    IEEE.checksum(bytes)
}

/// Appends one record of `row` to `buf`.
pub fn encode(buf: &mut Vec<u8>, row: &SpooledAudit) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    // Serializing plain data into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, row);
    let payload = &buf[start + HEADER..];
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let crc = crc32(payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// What [`decode`] read from a run of records.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Each record read whole.
    pub rows: Vec<SpooledAudit>,
    /// The offset just past each of `rows` (kept apart so the rows ship as one slice).
    pub ends: Vec<u64>,
    /// Offsets of records skipped because their checksum (or JSON) is wrong.
    pub corrupt: Vec<u64>,
    /// Where an incomplete record starts, if the bytes end inside one (or a header is
    /// unreadable: nothing after it can be found).
    pub torn: Option<u64>,
    /// Offset just past the last whole record, corrupt ones included: where reading goes on.
    pub end: u64,
}

/// Reads the records of `bytes`, which start at offset `base` of their segment.
pub fn decode(bytes: &[u8], base: u64) -> Decoded {
    let mut out = Decoded {
        end: base,
        ..Decoded::default()
    };
    let mut at = 0usize;
    while at < bytes.len() {
        let offset = base + at as u64;
        let Some(header) = bytes.get(at..at + HEADER) else {
            out.torn = Some(offset);
            break;
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_RECORD {
            out.torn = Some(offset);
            break;
        }
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            out.torn = Some(offset);
            break;
        };
        at += HEADER + len;
        let end = base + at as u64;
        match serde_json::from_slice(payload) {
            Ok(row) if crc32(payload) == crc => {
                out.rows.push(row);
                out.ends.push(end);
            }
            _ => out.corrupt.push(offset),
        }
        out.end = end;
    }
    out
}

fn segment_name(seq: u64) -> String {
    format!("seg-{seq:020}.spool")
}

fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".spool")?
        .parse()
        .ok()
}

/// The segments in `dir`, in order.
fn segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut seqs: Vec<u64> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment_seq(&e.file_name().to_string_lossy()))
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// Bytes of the spool in `dir` not yet shipped, read from its files (by another process
/// than the daemon's, too: tests waiting for shipping, an operator).
///
/// # Errors
///
/// The directory cannot be read.
pub fn unshipped_bytes(dir: &Path) -> Result<u64, SpoolError> {
    let pos = read_position(dir);
    let mut total = 0;
    for seq in segments(dir)?.into_iter().filter(|s| *s >= pos.seq) {
        let path = dir.join(segment_name(seq));
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&path)(e)),
        };
        total += if seq == pos.seq {
            len.saturating_sub(pos.offset)
        } else {
            len
        };
    }
    Ok(total)
}

/// Where shipping goes on: a segment and an offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    seq: u64,
    offset: u64,
}

fn read_position(dir: &Path) -> Position {
    std::fs::read_to_string(dir.join("shipped"))
        .ok()
        .and_then(|s| {
            let (seq, offset) = s.trim().split_once(' ')?;
            Some(Position {
                seq: seq.parse().ok()?,
                offset: offset.parse().ok()?,
            })
        })
        .unwrap_or(Position { seq: 0, offset: 0 })
}

fn write_position(dir: &Path, pos: Position) -> Result<(), SpoolError> {
    // Not synced: a position lost to a machine crash only ships rows again, which the
    // trail's unique attempt ids skip.
    let tmp = dir.join("shipped.tmp");
    std::fs::write(&tmp, format!("{} {}\n", pos.seq, pos.offset)).map_err(io(&tmp))?;
    let path = dir.join("shipped");
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// The segment being appended to.
struct Writer {
    file: File,
    seq: u64,
    /// Its length: whole records only (a failed write is cut back).
    len: u64,
    /// Where records are encoded, reused: one buffer per spool rather than one per request
    /// (a batch of 1,000 attempts is some 250 KB).
    buf: Vec<u8>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.file.sync_data();
    }
}

/// The segment being written and its length of whole records, in one atomic word (the
/// segment's number in the high 32 bits, the length in the low 32). The shipper reads it
/// from a thread at the lowest priority (`daemon::background`): behind a lock the request
/// path also takes, a request could wait for that thread to be scheduled again. Segments
/// are numbered from 0 and roll at 8 MiB, so neither half comes near its bound; a write
/// that would pass it is refused (a segment that could not roll for 4 GiB).
struct Current(AtomicU64);

impl Current {
    const HALF: u64 = u32::MAX as u64;

    fn new(pos: Position) -> Current {
        let current = Current(AtomicU64::new(0));
        current.set(pos);
        current
    }

    fn fits(pos: Position) -> bool {
        pos.seq <= Self::HALF && pos.offset <= Self::HALF
    }

    fn get(&self) -> Position {
        let v = self.0.load(Ordering::Acquire);
        Position {
            seq: v >> 32,
            offset: v & Self::HALF,
        }
    }

    fn set(&self, pos: Position) {
        debug_assert!(Self::fits(pos), "{pos:?}");
        self.0.store(
            (pos.seq << 32) | (pos.offset & Self::HALF),
            Ordering::Release,
        );
    }
}

/// What the requests (appending), the shipper and the sync thread share.
struct Shared {
    dir: PathBuf,
    /// The segment being written and its length (whole groups only).
    current: Current,
    /// Appends; held for one `write()` (and, every `SEGMENT_BYTES`, the next segment's
    /// creation).
    writer: Mutex<Writer>,
    /// `fdatasync` before each acknowledgement (`access.audit_fsync_ms = 0`).
    sync_each: bool,
    /// The writer's segment, for the periodic fdatasync.
    sync_file: Mutex<Option<File>>,
    /// Written since the last fdatasync.
    dirty: AtomicBool,
    backlog_bytes: AtomicU64,
    backlog_rows: AtomicU64,
    /// Unix milliseconds of the oldest unshipped attempt (at most), 0 when none waits.
    oldest_ms: AtomicI64,
    /// Something was appended.
    wrote: Notify,
    max_bytes: u64,
    /// Held while the daemon uses the directory.
    _lock: File,
}

impl Shared {
    fn publish_gauges(&self) {
        metrics::gauge!(crate::telemetry::AUDIT_SPOOL_BACKLOG_BYTES)
            .set(self.backlog_bytes.load(Ordering::Relaxed) as f64);
        metrics::gauge!(crate::telemetry::AUDIT_SPOOL_BACKLOG_ROWS)
            .set(self.backlog_rows.load(Ordering::Relaxed) as f64);
        let oldest = self.oldest_ms.load(Ordering::Relaxed);
        let age = if oldest == 0 {
            0.0
        } else {
            (chrono::Utc::now().timestamp_millis() - oldest).max(0) as f64 / 1e3
        };
        metrics::gauge!(crate::telemetry::AUDIT_SPOOL_OLDEST_SECONDS).set(age);
    }
}

/// A replica's audit spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.shared.dir)
            .field("backlog_bytes", &self.backlog_bytes())
            .finish_non_exhaustive()
    }
}

/// Why an attempt was not spooled.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The write failed.
    #[error("cannot write the audit spool: {0}")]
    Io(Arc<std::io::Error>),
    /// Too much is waiting to be shipped.
    #[error("{0}")]
    Backlog(String),
}

impl Spool {
    /// Opens (making it if need be) and locks the spool in `dir`, starts a new segment to
    /// append to and the thread of the periodic fdatasync; what earlier daemons left is
    /// shipped by [`ship_loop`].
    ///
    /// # Errors
    ///
    /// The directory cannot be made or read, or another daemon holds it.
    pub fn open(dir: &Path, fsync_ms: u64, max_bytes: u64) -> Result<Spool, SpoolError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // A daemon of this process that is stopping may hold it a little longer.
        let mut tries = 0;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if tries < 40 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(SpoolError::Locked(dir.to_owned()));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
            }
        }
        let pos = read_position(dir);
        let mut backlog_bytes = 0;
        let mut backlog_rows = 0;
        let mut oldest_ms = 0;
        let existing = segments(dir)?;
        for &seq in existing.iter().filter(|s| **s >= pos.seq) {
            let path = dir.join(segment_name(seq));
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let from = if seq == pos.seq { pos.offset } else { 0 };
            let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
            let decoded = decode(&bytes[from..], from as u64);
            backlog_bytes += (bytes.len() - from) as u64;
            backlog_rows += decoded.rows.len() as u64;
            if oldest_ms == 0
                && let Some(first) = decoded.rows.first()
            {
                oldest_ms = first.at.timestamp_millis();
            }
        }
        if backlog_rows > 0 {
            tracing::info!(dir = %dir.display(), rows = backlog_rows, bytes = backlog_bytes,
                "the audit spool holds attempts an earlier byokd did not ship; shipping them");
        }
        let seq = existing.last().map_or(pos.seq, |s| s + 1).max(pos.seq + 1);
        let (file, sync_file) = create_segment(dir, seq)?;
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            current: Current::new(Position { seq, offset: 0 }),
            writer: Mutex::new(Writer {
                file,
                seq,
                len: 0,
                buf: Vec::with_capacity(64 * 1024),
            }),
            sync_each: fsync_ms == 0,
            sync_file: Mutex::new(Some(sync_file)),
            dirty: AtomicBool::new(false),
            backlog_bytes: AtomicU64::new(backlog_bytes),
            backlog_rows: AtomicU64::new(backlog_rows),
            oldest_ms: AtomicI64::new(oldest_ms),
            wrote: Notify::new(),
            max_bytes,
            _lock: lock,
        });
        shared.publish_gauges();
        metrics::counter!(crate::telemetry::ACCESS_ATTEMPTS_AUDITED).increment(0);
        metrics::counter!(crate::telemetry::AUDIT_SHIP_FAILURES).increment(0);
        if fsync_ms > 0 {
            let weak = Arc::downgrade(&shared);
            let every = Duration::from_millis(fsync_ms);
            std::thread::Builder::new()
                .name("audit-spool-sync".into())
                .spawn(move || sync_loop(&weak, every))
                .map_err(io(dir))?;
        }
        Ok(Spool { shared })
    }

    /// Unshipped bytes.
    pub fn backlog_bytes(&self) -> u64 {
        self.shared.backlog_bytes.load(Ordering::Relaxed)
    }

    /// Unshipped rows.
    pub fn backlog_rows(&self) -> u64 {
        self.shared.backlog_rows.load(Ordering::Relaxed)
    }

    /// Why attempts are refused now (the backlog is over its cap), if they are.
    pub fn refusing(&self) -> Option<String> {
        let backlog = self.backlog_bytes();
        (backlog > self.shared.max_bytes).then(|| {
            format!(
                "the audit spool holds {backlog} bytes of attempts not yet shipped to the audit \
                 trail, over access.audit_spool_max_bytes ({}): is the database reachable?",
                self.shared.max_bytes
            )
        })
    }

    /// Appends `rows` to the spool, returning once they are written (not necessarily
    /// synced: see the module).
    ///
    /// # Errors
    ///
    /// The rows were not written, or the backlog is over its cap: the caller must not
    /// serve the attempt.
    pub async fn record(&self, rows: Vec<SpooledAudit>) -> Result<(), RecordError> {
        if let Some(why) = self.refusing() {
            return Err(RecordError::Backlog(why));
        }
        let written = append(&self.shared, &rows).map_err(|e| RecordError::Io(Arc::new(e)))?;
        if let Some(file) = written {
            // fdatasync before the answer, as configured; on a blocking thread, not the
            // request's.
            tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .map_err(|e| RecordError::Io(Arc::new(std::io::Error::other(e))))?
                .map_err(|e| RecordError::Io(Arc::new(e)))?;
        }
        Ok(())
    }

    /// Ships one batch (the next records after the shipped position, up to `batch` rows);
    /// returns how many rows it shipped and whether more is waiting.
    ///
    /// # Errors
    ///
    /// The database refused the batch (it stays in the spool) or a file cannot be read.
    pub async fn ship_once(&self, store: &Store, batch: usize) -> Result<(u64, bool), ShipError> {
        let shared = self.shared.clone();
        let read = tokio::task::spawn_blocking(move || read_next(&shared))
            .await
            .map_err(|e| {
                ShipError::Spool(SpoolError::Io {
                    path: self.shared.dir.clone(),
                    source: std::io::Error::other(e),
                })
            })??;
        let Some(ReadBatch {
            pos,
            decoded,
            size,
            reached_end,
            segment_done,
        }) = read
        else {
            return Ok((0, false));
        };
        let mut shipped = 0;
        let mut offset = pos.offset;
        let batch = batch.max(1);
        for (rows, ends) in decoded.rows.chunks(batch).zip(decoded.ends.chunks(batch)) {
            if let Err(e) = store.ship_audit(rows).await {
                self.advance(pos, offset, shipped, None)?;
                return Err(ShipError::Store(e));
            }
            shipped += rows.len() as u64;
            offset = ends.last().copied().unwrap_or(offset);
        }
        for c in &decoded.corrupt {
            tracing::error!(dir = %self.shared.dir.display(), segment = pos.seq, offset = c,
                "a record of the audit spool does not match its checksum; it is skipped");
            metrics::counter!(crate::telemetry::AUDIT_SPOOL_DAMAGED, "kind" => "corrupt")
                .increment(1);
        }
        // Corrupt records count as read.
        offset = offset.max(decoded.end);
        if segment_done {
            if let Some(t) = decoded.torn {
                tracing::warn!(dir = %self.shared.dir.display(), segment = pos.seq, offset = t,
                    "the audit spool segment ends in a torn record (a crash mid-write); it is \
                     skipped");
                metrics::counter!(crate::telemetry::AUDIT_SPOOL_DAMAGED, "kind" => "torn")
                    .increment(1);
            }
            self.finish_segment(pos, size, shipped)?;
            return Ok((shipped, true));
        }
        // The first attempt still waiting is no older than the last one shipped.
        let last_at = decoded.rows.last().map(|r| r.at.timestamp_millis());
        self.advance(pos, offset, shipped, last_at)?;
        // No progress (damage in the segment being written): wait for the next poll rather
        // than spin; the segment is skipped past its damage once the writer moves on.
        Ok((shipped, !reached_end && offset > pos.offset))
    }

    /// Records that everything before `offset` in `pos.seq` is shipped.
    fn advance(
        &self,
        pos: Position,
        offset: u64,
        rows: u64,
        oldest: Option<i64>,
    ) -> Result<(), SpoolError> {
        if offset == pos.offset {
            return Ok(());
        }
        write_position(
            &self.shared.dir,
            Position {
                seq: pos.seq,
                offset,
            },
        )?;
        self.shipped(offset - pos.offset, rows, oldest);
        Ok(())
    }

    /// Moves past a shipped segment (not the one being written) and deletes it.
    fn finish_segment(&self, pos: Position, size: u64, rows: u64) -> Result<(), SpoolError> {
        let dir = &self.shared.dir;
        let next = segments(dir)?
            .into_iter()
            .find(|s| *s > pos.seq)
            .unwrap_or(pos.seq + 1);
        write_position(
            dir,
            Position {
                seq: next,
                offset: 0,
            },
        )?;
        let path = dir.join(segment_name(pos.seq));
        let _ = std::fs::remove_file(&path);
        self.shipped(size.saturating_sub(pos.offset), rows, None);
        Ok(())
    }

    fn shipped(&self, bytes: u64, rows: u64, oldest: Option<i64>) {
        let s = &self.shared;
        let _ = s
            .backlog_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(bytes))
            });
        let left = s
            .backlog_rows
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                Some(r.saturating_sub(rows))
            })
            .map_or(0, |r| r.saturating_sub(rows));
        if left == 0 {
            s.oldest_ms.store(0, Ordering::Release);
        } else if let Some(at) = oldest {
            s.oldest_ms.store(at, Ordering::Release);
        }
        metrics::counter!(crate::telemetry::ACCESS_ATTEMPTS_AUDITED).increment(rows);
        s.publish_gauges();
    }
}

/// Why a shipment failed.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The spool's files.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

struct ReadBatch {
    pos: Position,
    decoded: Decoded,
    /// The segment's length (what the writer has written of it, for the current one).
    size: u64,
    /// The read reached `size`.
    reached_end: bool,
    /// The read reached the end of a segment the writer is done with.
    segment_done: bool,
}

/// Reads the next run of records after the shipped position.
fn read_next(shared: &Shared) -> Result<Option<ReadBatch>, SpoolError> {
    let dir = &shared.dir;
    let current = shared.current.get();
    let mut pos = read_position(dir);
    loop {
        if pos.seq > current.seq {
            return Ok(None);
        }
        let limit = if pos.seq == current.seq {
            current.offset
        } else {
            u64::MAX
        };
        let path = dir.join(segment_name(pos.seq));
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && pos.seq < current.seq => {
                // Gone (shipped and deleted before the position was moved on): next one.
                let next = segments(dir)?
                    .into_iter()
                    .find(|s| *s > pos.seq)
                    .unwrap_or(current.seq);
                pos = Position {
                    seq: next,
                    offset: 0,
                };
                write_position(dir, pos)?;
                continue;
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let size = file.metadata().map_err(io(&path))?.len().min(limit);
        if pos.offset >= size {
            if pos.seq == current.seq {
                return Ok(None);
            }
            return Ok(Some(ReadBatch {
                pos,
                decoded: Decoded {
                    end: pos.offset,
                    ..Decoded::default()
                },
                size,
                reached_end: true,
                segment_done: true,
            }));
        }
        let want = (size - pos.offset).min(READ_BYTES);
        file.seek(SeekFrom::Start(pos.offset)).map_err(io(&path))?;
        let mut bytes = Vec::with_capacity(usize::try_from(want).unwrap_or(0));
        Read::by_ref(&mut file)
            .take(want)
            .read_to_end(&mut bytes)
            .map_err(io(&path))?;
        let mut decoded = decode(&bytes, pos.offset);
        let read_to = pos.offset + bytes.len() as u64;
        let mut reached_end = read_to >= size;
        if !reached_end && let Some(t) = decoded.torn {
            if read_to - t < (HEADER + MAX_RECORD) as u64 {
                // Cut by the read's limit, not torn: the next round reads it whole.
                decoded.torn = None;
            } else {
                // A damaged header: nothing after it can be found, as at a torn end.
                reached_end = true;
            }
        }
        return Ok(Some(ReadBatch {
            pos,
            decoded,
            size,
            reached_end,
            segment_done: reached_end && pos.seq < current.seq,
        }));
    }
}

/// Appends `rows` to the current segment with one write, moving to a new segment past
/// `SEGMENT_BYTES`. With `sync_each`, returns a handle of the segment written, for the
/// caller to fdatasync before it answers.
fn append(shared: &Shared, rows: &[SpooledAudit]) -> std::io::Result<Option<File>> {
    let mut guard = shared.writer.lock().unwrap_or_else(PoisonError::into_inner);
    let writer = &mut *guard;
    writer.buf.clear();
    for row in rows {
        encode(&mut writer.buf, row);
    }
    // A buffer grown past 1 MiB (more than 4,000 attempts at once) is not kept.
    writer.buf.shrink_to(1024 * 1024);
    let bytes = writer.buf.len() as u64;
    let rows_n = rows.len() as u64;
    let first_at = rows.first().map(|r| r.at.timestamp_millis());
    let written = Position {
        seq: writer.seq,
        offset: writer.len + bytes,
    };
    let result = if Current::fits(written) {
        writer.file.write_all(&writer.buf)
    } else {
        Err(std::io::Error::other(
            "the audit spool segment reached 4 GiB (new segments cannot be made)",
        ))
    };
    if let Err(e) = result {
        tracing::error!(error = %e, rows = rows_n, dir = %shared.dir.display(),
            "could not write access attempts to the audit spool; they are refused");
        metrics::counter!(crate::telemetry::AUDIT_WRITE_FAILURES).increment(1);
        // A partial write must not stay: cut the segment back to its last whole record.
        let _ = writer.file.set_len(writer.len);
        return Err(e);
    }
    writer.len += bytes;
    shared.current.set(written);
    shared.dirty.store(true, Ordering::Release);
    shared.backlog_bytes.fetch_add(bytes, Ordering::AcqRel);
    if shared.backlog_rows.fetch_add(rows_n, Ordering::AcqRel) == 0
        && let Some(at) = first_at
    {
        let _ = shared
            .oldest_ms
            .compare_exchange(0, at, Ordering::AcqRel, Ordering::Acquire);
    }
    shared.wrote.notify_one();
    // Taken before a new segment replaces the file: the rows are in this one.
    let sync = if shared.sync_each {
        Some(writer.file.try_clone()?)
    } else {
        None
    };
    if writer.len >= SEGMENT_BYTES {
        match next_segment(shared, writer.seq + 1) {
            Ok(next) => {
                let seq = writer.seq + 1;
                let done = std::mem::replace(&mut writer.file, next);
                writer.seq = seq;
                writer.len = 0;
                // The finished segment's last writes reach the disk off this thread (on it,
                // should no thread be had).
                let done = Arc::new(done);
                let syncing = done.clone();
                if std::thread::Builder::new()
                    .name("audit-spool-seg".into())
                    .spawn(move || syncing.sync_data())
                    .is_err()
                {
                    let _ = done.sync_data();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a new audit spool segment; the current one grows");
            }
        }
    }
    Ok(sync)
}

/// Makes segment `seq` (it must not exist yet): the file to append to, and a handle of it
/// for the periodic fdatasync.
fn create_segment(dir: &Path, seq: u64) -> Result<(File, File), SpoolError> {
    let path = dir.join(segment_name(seq));
    if !Current::fits(Position { seq, offset: 0 }) {
        return Err(io(&path)(std::io::Error::other(
            "segment number out of range (not a segment byokd made)",
        )));
    }
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(io(&path))?;
    let sync = file.try_clone().map_err(io(&path))?;
    Ok((file, sync))
}

fn next_segment(shared: &Shared, seq: u64) -> Result<File, SpoolError> {
    let (file, sync) = create_segment(&shared.dir, seq)?;
    *shared
        .sync_file
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(sync);
    shared.current.set(Position { seq, offset: 0 });
    Ok(file)
}

fn sync_loop(shared: &std::sync::Weak<Shared>, every: Duration) {
    loop {
        std::thread::sleep(every);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.dirty.swap(false, Ordering::AcqRel) {
            let file = shared
                .sync_file
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .and_then(|f| f.try_clone().ok());
            if let Some(file) = file
                && let Err(e) = file.sync_data()
            {
                tracing::error!(error = %e, "cannot sync the audit spool");
            }
        }
    }
}

/// Ships the spool into the audit trail until shutdown, then once more.
pub async fn ship_loop(
    spool: Spool,
    store: Store,
    batch: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff =
        crate::broker::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let stopping = *shutdown.borrow();
        let delay = match spool.ship_once(&store, batch).await {
            Ok((_, true)) => {
                backoff.reset();
                if !stopping {
                    continue;
                }
                Duration::ZERO
            }
            Ok((shipped, false)) => {
                backoff.reset();
                if shipped > 0 && !stopping {
                    tokio::select! {
                        () = tokio::time::sleep(SHIP_GAP) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                SHIP_POLL
            }
            Err(e) => {
                tracing::warn!(error = %e, backlog_bytes = spool.backlog_bytes(),
                    "cannot ship audit spool to the audit trail; retrying (the spool keeps the attempts)");
                metrics::counter!(crate::telemetry::AUDIT_SHIP_FAILURES).increment(1);
                spool.shared.publish_gauges();
                if stopping {
                    return;
                }
                // Backs off whatever is written meanwhile: each write would wake it.
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        };
        spool.shared.publish_gauges();
        if stopping {
            // One last pass on shutdown, so a clean stop leaves nothing behind when the
            // database is there (what is left is shipped by the next start).
            while let Ok((_, true)) = spool.ship_once(&store, batch).await {}
            return;
        }
        tokio::select! {
            () = spool.shared.wrote.notified() => {}
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AuditRow;
    use serde_json::json;

    fn row(n: u32) -> SpooledAudit {
        SpooledAudit {
            attempt_id: uuid::Uuid::new_v4(),
            at: chrono::Utc::now(),
            row: AuditRow::operation(Some("t1"), "dek_unwrap", "api", json!({ "n": n })),
        }
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_record_written_by_earlier_versions_still_reads() {
        // The payload as byokd has written it since the spool exists (the row's fields
        // beside the attempt's, as `flatten` serialized them); a spool left by an earlier
        // version must ship after an upgrade.
        let payload = br#"{"attempt_id":"0192f3a4-5b6c-7d8e-9f00-112233445566","at":"2026-11-29T10:00:00.123456Z","tenant_id":"t1","provider":"local","key_ref":"k1","action":"dek_unwrap","outcome":"allowed","source":"api","event_id":null,"detail":{"client":"svc","dek_id":"d1"}}"#;
        let mut buf = (payload.len() as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&crc32(payload).to_le_bytes());
        buf.extend_from_slice(payload);
        let d = decode(&buf, 0);
        assert!(d.corrupt.is_empty() && d.torn.is_none());
        let r = &d.rows[0];
        assert_eq!(
            r.attempt_id.to_string(),
            "0192f3a4-5b6c-7d8e-9f00-112233445566"
        );
        assert_eq!(r.at.to_rfc3339(), "2026-11-29T10:00:00.123456+00:00");
        assert_eq!(r.row.tenant_id.as_deref(), Some("t1"));
        assert_eq!(r.row.provider, Some(crate::domain::Provider::Local));
        assert_eq!(r.row.key_ref.as_deref(), Some("k1"));
        assert_eq!(
            (
                r.row.action.as_str(),
                r.row.outcome.as_str(),
                r.row.source.as_str()
            ),
            ("dek_unwrap", "allowed", "api")
        );
        assert_eq!(r.row.event_id, None);
        assert_eq!(r.row.detail, json!({"client": "svc", "dek_id": "d1"}));
        // And what is written now is that same object.
        let mut again = Vec::new();
        encode(&mut again, r);
        let written: serde_json::Value = serde_json::from_slice(&again[HEADER..]).expect("JSON");
        let expected: serde_json::Value = serde_json::from_slice(payload).expect("JSON");
        assert_eq!(written, expected);
    }

    #[test]
    fn the_current_position_packs_both_halves() {
        for pos in [
            Position { seq: 0, offset: 0 },
            Position {
                seq: 7,
                offset: 8 * 1024 * 1024 + 123,
            },
            Position {
                seq: u64::from(u32::MAX),
                offset: u64::from(u32::MAX),
            },
        ] {
            assert!(Current::fits(pos));
            assert_eq!(Current::new(pos).get(), pos);
        }
        assert!(!Current::fits(Position {
            seq: 1 << 32,
            offset: 0
        }));
        assert!(!Current::fits(Position {
            seq: 0,
            offset: 1 << 32
        }));
    }

    #[test]
    fn records_round_trip() {
        let rows: Vec<SpooledAudit> = (0..3).map(row).collect();
        let mut buf = Vec::new();
        for r in &rows {
            encode(&mut buf, r);
        }
        let d = decode(&buf, 0);
        assert_eq!(d.rows, rows);
        assert_eq!(d.end, buf.len() as u64);
        assert!(d.torn.is_none() && d.corrupt.is_empty());
        // Read from the middle, at a record's start.
        let second = d.ends[0];
        let rest = decode(&buf[second as usize..], second);
        assert_eq!(rest.rows.len(), 2);
        assert_eq!(rest.end, buf.len() as u64);
    }

    #[test]
    fn a_torn_last_record_is_skipped_and_reported() {
        let mut buf = Vec::new();
        encode(&mut buf, &row(1));
        let whole = buf.len() as u64;
        encode(&mut buf, &row(2));
        for cut in [
            whole as usize + 3,
            whole as usize + HEADER + 5,
            buf.len() - 1,
        ] {
            let d = decode(&buf[..cut], 0);
            assert_eq!(d.rows.len(), 1, "cut at {cut}");
            assert_eq!(d.torn, Some(whole), "cut at {cut}");
            assert_eq!(d.end, whole);
        }
    }

    #[test]
    fn a_corrupted_record_is_detected_by_its_checksum() {
        let mut buf = Vec::new();
        encode(&mut buf, &row(1));
        let first = buf.len();
        encode(&mut buf, &row(2));
        encode(&mut buf, &row(3));
        // Flip a byte inside the second record's JSON (still valid JSON: a digit).
        let payload = &buf[first + HEADER..];
        let digit = payload
            .iter()
            .position(|b| *b == b'2')
            .expect("the row's number")
            + first
            + HEADER;
        buf[digit] = b'7';
        let d = decode(&buf, 0);
        assert_eq!(d.corrupt, vec![first as u64]);
        assert_eq!(d.rows.len(), 2);
        assert_eq!(d.end, buf.len() as u64);
        assert!(d.torn.is_none());
    }

    #[test]
    fn a_damaged_length_stops_reading_where_it_is() {
        let mut buf = Vec::new();
        encode(&mut buf, &row(1));
        let first = buf.len();
        encode(&mut buf, &row(2));
        encode(&mut buf, &row(3));
        buf[first + 3] = 0xff;
        let d = decode(&buf, 0);
        assert_eq!(d.rows.len(), 1);
        assert_eq!(d.torn, Some(first as u64));
        assert_eq!(d.end, first as u64);
    }

    #[test]
    fn a_second_daemon_cannot_open_the_same_spool() {
        let dir = std::env::temp_dir().join(format!("byokd-spool-lock-{}", uuid::Uuid::new_v4()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        let first = Spool::open(&dir, 100, 1 << 20).expect("first opens");
        assert!(matches!(
            Spool::open(&dir, 100, 1 << 20),
            Err(SpoolError::Locked(_))
        ));
        drop(first);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
