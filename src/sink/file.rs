//! The file sink: the exact records as JSON lines, to a file or stdout.
//!
//! It exists for dry runs, the demo and inspection: what would have gone to Akto, byte for
//! byte, one record per line. A record counts as delivered once its line was written and
//! flushed to the kernel; [`FileSink::flush`] fsyncs, and delivery calls it before every state
//! commit, so state never records a line that is not on disk (one fsync per checkpoint instead
//! of one per batch). A pipe, FIFO or device (`--output /dev/null`, `/dev/stdout` piped) has
//! nothing to fsync, seek or cut: its lines are only written and flushed.
//!
//! Architecture Invariant: a failed write leaves no partial line behind (the file is cut back
//! to its previous length), so a retry never produces a torn or duplicated record. A torn last
//! line left by a crash or power loss mid-write (never reported delivered, so never
//! checkpointed) is cut off when the file is opened, so the next record never glues onto it.
//! A file that holds no line break at all is never cut (it may be any file `OUTPUT_PATH` was
//! pointed at by mistake): the sink refuses to open it and leaves it unchanged.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{BatchOutcome, OutRecord, SinkError};

/// Appends records as JSON lines to a file (created with mode 0600) or stdout.
pub struct FileSink {
    target: Target,
    /// `AKTO_MAX_RECORD_BYTES`: the file holds what would go to Akto's ingestion service, so
    /// records are cut to the same size as for the HTTP sink.
    max_record_bytes: usize,
}

enum Target {
    Stdout,
    File {
        path: PathBuf,
        file: Arc<Mutex<Output>>,
    },
}

/// The open output file.
struct Output {
    file: File,
    /// A regular file: it can be fsynced, sought and cut back. A pipe, FIFO or device
    /// (`/dev/null`, `/dev/stdout` piped) cannot (fsync answers EINVAL, seek ESPIPE): lines are
    /// only written to it, and "durable" means handed to the kernel.
    regular: bool,
    /// Set when a failed write could not be cut back: the length the file had before it. The
    /// next write first cuts the file back (or to its last complete line) and writes nothing
    /// until that worked.
    cut_to: Option<u64>,
}

impl fmt::Debug for FileSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSink")
            .field("target", &self.target_name())
            .finish()
    }
}

impl FileSink {
    /// Opens `path` for appending (creating it with mode 0600); `None` or `-` means stdout.
    pub fn new(path: Option<PathBuf>) -> Result<FileSink, SinkError> {
        let path = match path {
            Some(p) if p.as_os_str() != "-" => p,
            _ => {
                return Ok(FileSink {
                    target: Target::Stdout,
                    max_record_bytes: super::DEFAULT_AKTO_MAX_RECORD_BYTES,
                })
            }
        };
        let file = open_output(&path)?;
        let regular = file
            .metadata()
            .map_err(|source| SinkError::Io {
                target: path.display().to_string(),
                source,
            })?
            .is_file();
        Ok(FileSink {
            target: Target::File {
                path,
                file: Arc::new(Mutex::new(Output {
                    file,
                    regular,
                    cut_to: None,
                })),
            },
            max_record_bytes: super::DEFAULT_AKTO_MAX_RECORD_BYTES,
        })
    }

    /// Sets `AKTO_MAX_RECORD_BYTES` (see [`super::HttpSink::with_max_record_bytes`]): the file
    /// feeds the same pipeline as the HTTP sink, so its records are cut alike. Out of range: a
    /// configuration error naming the setting.
    pub fn with_max_record_bytes(mut self, bytes: usize) -> Result<FileSink, SinkError> {
        self.max_record_bytes = super::http::checked_max_record_bytes(bytes)?;
        Ok(self)
    }

    /// `AKTO_MAX_RECORD_BYTES`: the longest record (its JSON) the connector writes.
    pub fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }

    /// `JSON lines file /path` or `JSON lines on stdout`.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::Stdout => "JSON lines on stdout".to_string(),
            Target::File { path, .. } => format!("JSON lines file {}", path.display()),
        }
    }

    fn target_name(&self) -> String {
        match &self.target {
            Target::Stdout => "stdout".to_string(),
            Target::File { path, .. } => path.display().to_string(),
        }
    }

    /// Checks the file is still writable (its metadata can be read); stdout is always fine.
    pub async fn healthcheck(&self) -> Result<(), SinkError> {
        match &self.target {
            Target::Stdout => Ok(()),
            Target::File { path, file } => {
                let file = Arc::clone(file);
                let res = tokio::task::spawn_blocking(move || {
                    let out = file.lock().map_err(|_| poisoned())?;
                    let meta = out.file.metadata()?;
                    if meta.permissions().readonly() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            "the file is read-only",
                        ));
                    }
                    Ok(())
                })
                .await;
                flatten(res).map_err(|source| SinkError::Io {
                    target: path.display().to_string(),
                    source,
                })
            }
        }
    }

    /// Writes every record as one line and flushes it to the kernel before reporting delivered
    /// (durable after the next [`FileSink::flush`]).
    ///
    /// A record whose JSON contains a line break would break the JSON-lines framing; it is
    /// rejected instead of written.
    pub async fn deliver(&self, batch: &[OutRecord]) -> Result<BatchOutcome, SinkError> {
        let mut out = BatchOutcome::default();
        let mut buf = Vec::with_capacity(batch.iter().map(|r| r.json.len() + 1).sum());
        for (i, r) in batch.iter().enumerate() {
            if r.json.contains(['\n', '\r']) {
                out.rejected.push((
                    i,
                    "record contains a line break; JSON lines need one record per line".into(),
                ));
                continue;
            }
            buf.extend_from_slice(r.json.as_bytes());
            buf.push(b'\n');
            out.delivered.push(i);
        }
        if buf.is_empty() {
            return Ok(out);
        }
        let res = match &self.target {
            Target::Stdout => {
                tokio::task::spawn_blocking(move || {
                    let mut lock = std::io::stdout().lock();
                    lock.write_all(&buf)?;
                    lock.flush()
                })
                .await
            }
            Target::File { file, .. } => {
                let file = Arc::clone(file);
                tokio::task::spawn_blocking(move || {
                    let mut out = file.lock().map_err(|_| poisoned())?;
                    append(&mut out, &buf)
                })
                .await
            }
        };
        flatten(res).map_err(|source| SinkError::Io {
            target: self.target_name(),
            source,
        })?;
        Ok(out)
    }

    /// Flushes (and fsyncs a regular file; a pipe or device has nothing to sync).
    pub async fn flush(&self) -> Result<(), SinkError> {
        let res = match &self.target {
            Target::Stdout => {
                tokio::task::spawn_blocking(|| std::io::stdout().lock().flush()).await
            }
            Target::File { file, .. } => {
                let file = Arc::clone(file);
                tokio::task::spawn_blocking(move || {
                    let mut out = file.lock().map_err(|_| poisoned())?;
                    out.file.flush()?;
                    if out.regular {
                        out.file.sync_all()
                    } else {
                        Ok(())
                    }
                })
                .await
            }
        };
        flatten(res).map_err(|source| SinkError::Io {
            target: self.target_name(),
            source,
        })
    }
}

/// Opens `path` for appending, creating it with mode 0600 (and fsyncing its directory, so the
/// new file survives a power loss with the records state says it holds), and cuts off a torn
/// last line. A non-empty regular file without any line break is refused and left unchanged.
fn open_output(path: &Path) -> Result<File, SinkError> {
    let io_error = |source| SinkError::Io {
        target: path.display().to_string(),
        source,
    };
    let (mut file, check) = open_file(path).map_err(io_error)?;
    if !check {
        return Ok(file);
    }
    let len = file.metadata().map_err(io_error)?.len();
    let Some(keep) = last_line_end(&mut file).map_err(io_error)? else {
        return Err(SinkError::Config {
            field: "OUTPUT_PATH (--output)",
            message: format!(
                "{} holds no complete line: not a JSON-lines file this connector wrote, or its \
                 first record was cut by a crash; move it aside or choose another OUTPUT_PATH; \
                 nothing was changed",
                path.display()
            ),
        });
    };
    if keep < len {
        cut_back(&mut file, keep).map_err(io_error)?;
        let removed = len - keep;
        tracing::warn!(
            sink = "file",
            file = %path.display(),
            bytes = removed,
            "the output file ended in a torn line (a crash or power loss during a write): \
             removed its last {removed} bytes; that record was never confirmed, so it is written \
             again"
        );
    }
    Ok(file)
}

/// Opens (or creates) `path` for appending; true when it is an existing regular file, opened
/// for reading too, whose last line is to be checked.
fn open_file(path: &Path) -> std::io::Result<(File, bool)> {
    let mut opts = OpenOptions::new();
    opts.append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    // Read too: the last line is checked for a tear.
    match opts.clone().read(true).create_new(true).open(path) {
        Ok(f) => {
            sync_parent_dir(path)?;
            Ok((f, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => match opts.clone().read(true).open(path) {
                Ok(f) => Ok((f, true)),
                // Appending allowed, reading not: the tail cannot be checked.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    Ok((opts.open(path)?, false))
                }
                Err(e) => Err(e),
            },
            // A pipe or device (e.g. /dev/stdout): nothing to check or cut.
            Ok(_) => Ok((opts.open(path)?, false)),
            // A dangling symbolic link: its target is created, as before.
            Err(_) => Ok((opts.create(true).open(path)?, false)),
        },
        Err(e) => Err(e),
    }
}

/// Makes a newly created file's directory entry durable.
fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match File::open(dir).and_then(|d| d.sync_all()) {
        Ok(()) => Ok(()),
        // Some file systems cannot fsync a directory; nothing more can be done there.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            ) =>
        {
            tracing::debug!(sink = "file", "cannot fsync {}: {e}", dir.display());
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Where the file's last complete line ends: its length when it ends with a line break (or is
/// empty, or not a regular file), else just after its last line break; `None` when a non-empty
/// regular file holds no line break at all.
fn last_line_end(f: &mut File) -> std::io::Result<Option<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let meta = f.metadata()?;
    let len = meta.len();
    if !meta.is_file() || len == 0 {
        return Ok(Some(len));
    }
    let mut end = len;
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let n = usize::try_from(end - start).unwrap_or(buf.len());
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(pos) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + pos as u64 + 1));
        }
        end = start;
    }
    Ok(None)
}

/// Cuts the file back to `keep` bytes and makes that durable.
fn cut_back(f: &mut File, keep: u64) -> std::io::Result<()> {
    f.set_len(keep)?;
    f.sync_all()
}

/// After a failed write of this sink: when the file does not end with a line break, cuts it
/// back to just after its last one, or to empty when it holds none (then all of it is the torn
/// first line this sink wrote); returns the number of bytes removed.
fn cut_torn_tail(f: &mut File) -> std::io::Result<u64> {
    let len = f.metadata()?.len();
    let keep = last_line_end(f)?.unwrap_or(0);
    if keep >= len {
        return Ok(0);
    }
    cut_back(f, keep)?;
    Ok(len - keep)
}

/// Appends `buf` and flushes it; on failure cuts the file back to where it was (a regular file
/// only: a pipe or device cannot be sought or cut, what it took is gone).
fn append(out: &mut Output, buf: &[u8]) -> std::io::Result<()> {
    if !out.regular {
        return out.file.write_all(buf).and_then(|()| out.file.flush());
    }
    if let Some(cut_to) = out.cut_to {
        // An earlier failed write was not cut back: do it now, before writing anything.
        let len = out.file.metadata()?.len();
        if len > cut_to {
            out.file.set_len(cut_to)?;
        }
        cut_torn_tail(&mut out.file)?;
        out.cut_to = None;
    }
    let f = &mut out.file;
    let before = f.seek(SeekFrom::End(0))?;
    let res = f.write_all(buf).and_then(|()| f.flush());
    if let Err(e) = res {
        // Remove the partial tail so a retry does not duplicate or tear lines. When that fails
        // too, at least the torn line goes; the next write retries the cut first.
        if f.set_len(before).is_err() {
            let torn = cut_torn_tail(f);
            tracing::warn!(
                sink = "file",
                "a failed write could not be cut back to {before} bytes ({}); the next write \
                 retries that first",
                match torn {
                    Ok(n) => format!("removed a torn last line of {n} bytes"),
                    Err(t) => format!("cutting the torn last line failed too: {t}"),
                }
            );
            out.cut_to = Some(before);
        }
        return Err(e);
    }
    Ok(())
}

fn poisoned() -> std::io::Error {
    std::io::Error::other("an earlier write panicked; the output file is in an unknown state")
}

fn flatten(res: Result<std::io::Result<()>, tokio::task::JoinError>) -> std::io::Result<()> {
    match res {
        Ok(inner) => inner,
        Err(join) => Err(std::io::Error::other(format!("write task failed: {join}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(json: &str) -> OutRecord {
        OutRecord {
            key: "k".into(),
            json: json.into(),
        }
    }

    #[tokio::test]
    async fn appends_exact_lines_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let sink = FileSink::new(Some(path.clone())).unwrap();
        sink.healthcheck().await.unwrap();
        let batch = vec![rec(r#"{"a":"1"}"#), rec(r#"{"b":"é \u0000"}"#)];
        let out = sink.deliver(&batch).await.unwrap();
        assert_eq!(out.delivered, vec![0, 1]);
        assert!(out.rejected.is_empty());
        let out = sink.deliver(&[rec(r#"{"c":"3"}"#)]).await.unwrap();
        assert_eq!(out.delivered, vec![0]);
        sink.flush().await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"a\":\"1\"}\n{\"b\":\"é \\u0000\"}\n{\"c\":\"3\"}\n"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(sink.describe().contains("out.jsonl"));
        // Reopening appends rather than truncating.
        drop(sink);
        let sink = FileSink::new(Some(path.clone())).unwrap();
        sink.deliver(&[rec("{}")]).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 4);
    }

    #[tokio::test]
    async fn rejects_records_with_line_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let sink = FileSink::new(Some(path.clone())).unwrap();
        let out = sink
            .deliver(&[rec("{\"a\":\n1}"), rec("{}"), rec("x\ry")])
            .await
            .unwrap();
        assert_eq!(out.delivered, vec![1]);
        assert_eq!(out.all_indices(), vec![0, 1, 2]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
    }

    #[tokio::test]
    async fn unwritable_path_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("out.jsonl");
        let e = FileSink::new(Some(path)).unwrap_err();
        assert!(!e.is_retriable());
        let msg = e.to_string();
        assert!(
            msg.contains("missing-dir") && msg.contains("--output"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn stdout_target() {
        let sink = FileSink::new(Some(PathBuf::from("-"))).unwrap();
        assert_eq!(sink.describe(), "JSON lines on stdout");
        let sink = FileSink::new(None).unwrap();
        sink.healthcheck().await.unwrap();
        let out = sink.deliver(&[]).await.unwrap();
        assert!(out.delivered.is_empty() && out.rejected.is_empty());
    }

    #[test]
    fn failed_append_leaves_no_partial_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{}\n").unwrap();
        // A read-only handle makes the write fail; the file must be unchanged.
        let file = OpenOptions::new().read(true).open(&path).unwrap();
        let mut out = Output {
            file,
            regular: true,
            cut_to: None,
        };
        assert!(append(&mut out, b"{\"x\":1}\n").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
    }

    #[test]
    fn a_write_after_a_failed_cut_back_cuts_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        // What a failed write left when cutting it back failed too: whole lines of the failed
        // write (never confirmed) and a torn one.
        std::fs::write(&path, "{\"a\":1}\n{\"x\":1}\n{\"y\":").unwrap();
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut out = Output {
            file,
            regular: true,
            cut_to: Some(8),
        };
        append(&mut out, b"{\"b\":2}\n").unwrap();
        assert!(out.cut_to.is_none());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n"
        );
        // Shorter than the remembered length (someone truncated it): only the torn line goes.
        std::fs::write(&path, "{\"a\":1}\n{\"y").unwrap();
        out.cut_to = Some(1000);
        append(&mut out, b"{}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{}\n");
    }

    #[test]
    fn torn_tail_is_cut_to_the_last_line_break() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let cases: Vec<(Vec<u8>, usize)> = vec![
            (b"".to_vec(), 0),
            (b"{}\n".to_vec(), 3),
            (b"{}\n{\"torn".to_vec(), 3),
            // After this sink's own failed first write: all of it is the torn line.
            (b"no line break at all".to_vec(), 0),
            // A torn line longer than one read chunk.
            ([b"{}\n".to_vec(), vec![b'x'; 200_000]].concat(), 3),
            (
                [vec![b'y'; 100_000], b"\n".to_vec(), vec![b'x'; 70_000]].concat(),
                100_001,
            ),
        ];
        for (content, keep) in cases {
            std::fs::write(&path, &content).unwrap();
            let mut f = OpenOptions::new()
                .read(true)
                .append(true)
                .open(&path)
                .unwrap();
            let end = last_line_end(&mut f).unwrap();
            let has_break = content.is_empty() || content.contains(&b'\n');
            assert_eq!(end, has_break.then_some(keep as u64));
            let removed = cut_torn_tail(&mut f).unwrap();
            assert_eq!(removed as usize, content.len() - keep);
            assert_eq!(std::fs::read(&path).unwrap(), content[..keep].to_vec());
        }
    }

    #[test]
    fn opening_a_file_without_any_line_break_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        // Longer than one read chunk, so every chunk is searched.
        let content = [b"an unrelated file ".to_vec(), vec![b'z'; 150_000]].concat();
        std::fs::write(&path, &content).unwrap();
        let e = FileSink::new(Some(path.clone())).unwrap_err();
        assert!(!e.is_retriable());
        let msg = e.to_string();
        assert!(msg.contains("OUTPUT_PATH"), "{msg}");
        assert!(msg.contains("notes.txt"), "{msg}");
        assert!(msg.contains("holds no complete line"), "{msg}");
        assert!(msg.contains("nothing was changed"), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), content);
        // One line break anywhere: a JSON-lines file with a torn tail, cut back to it.
        let content = [b"{}\n".to_vec(), vec![b'z'; 150_000]].concat();
        std::fs::write(&path, &content).unwrap();
        FileSink::new(Some(path.clone())).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}\n");
    }
}
