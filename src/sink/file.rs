//! The file sink: the exact records as JSON lines, to a file or stdout.
//!
//! It exists for dry runs, the demo and inspection: what would have gone to Akto, byte for
//! byte, one record per line. A record counts as delivered once its line was written and
//! flushed to the kernel; [`FileSink::flush`] fsyncs, and delivery calls it before every state
//! commit, so state never records a line that is not on disk (one fsync per checkpoint instead
//! of one per batch).
//!
//! Architecture Invariant: a failed write leaves no partial line behind (the file is cut back
//! to its previous length), so a retry never produces a torn or duplicated record.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{BatchOutcome, OutRecord, SinkError};

/// Appends records as JSON lines to a file (created with mode 0600) or stdout.
pub struct FileSink {
    target: Target,
}

enum Target {
    Stdout,
    File {
        path: PathBuf,
        file: Arc<Mutex<File>>,
    },
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
                })
            }
        };
        let file = open_append(&path).map_err(|source| SinkError::Io {
            target: path.display().to_string(),
            source,
        })?;
        Ok(FileSink {
            target: Target::File {
                path,
                file: Arc::new(Mutex::new(file)),
            },
        })
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
                    let f = file.lock().map_err(|_| poisoned())?;
                    let meta = f.metadata()?;
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
                    let mut f = file.lock().map_err(|_| poisoned())?;
                    append(&mut f, &buf)
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

    /// Flushes (and fsyncs a file).
    pub async fn flush(&self) -> Result<(), SinkError> {
        let res = match &self.target {
            Target::Stdout => {
                tokio::task::spawn_blocking(|| std::io::stdout().lock().flush()).await
            }
            Target::File { file, .. } => {
                let file = Arc::clone(file);
                tokio::task::spawn_blocking(move || {
                    let mut f = file.lock().map_err(|_| poisoned())?;
                    f.flush()?;
                    f.sync_all()
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

fn open_append(path: &Path) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

/// Appends `buf` and flushes it; on failure cuts the file back to where it was.
fn append(f: &mut File, buf: &[u8]) -> std::io::Result<()> {
    let before = f.seek(SeekFrom::End(0))?;
    let res = f.write_all(buf).and_then(|()| f.flush());
    if let Err(e) = res {
        // Best effort: remove the partial tail so a retry does not duplicate or tear lines.
        let _ = f.set_len(before);
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
        let mut f = OpenOptions::new().read(true).open(&path).unwrap();
        assert!(append(&mut f, b"{\"x\":1}\n").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
    }
}
