//! The file sink across a crash: a torn last line (the process killed or the power lost in the
//! middle of a write) must not glue onto the next record when the sink opens the file again.
//! And on a device or FIFO (`--output /dev/null`, `/dev/stdout` piped), which cannot be fsynced
//! or sought: every checkpoint's sync must succeed.

use std::io::Write;
use std::sync::{Arc, Mutex};

use databricks_shield::sink::{AnySink, FileSink, OutRecord};

fn rec(json: &str) -> OutRecord {
    OutRecord {
        key: "agent.ws".into(),
        json: json.into(),
    }
}

/// Collects what `tracing` writes while a closure runs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn open_logged(path: &std::path::Path) -> (FileSink, String) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let sink = tracing::subscriber::with_default(subscriber, || {
        FileSink::new(Some(path.to_path_buf())).expect("open")
    });
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    (sink, log)
}

#[tokio::test]
async fn a_torn_last_line_is_cut_off_before_the_next_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    // What a SIGKILL in the middle of a write leaves: one whole line, one torn one.
    let torn = "{\"b\":2,\"pay";
    std::fs::write(&path, format!("{{\"a\":1}}\n{torn}")).unwrap();

    let (sink, log) = open_logged(&path);
    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains(&format!("{} bytes", torn.len())), "{log}");
    let sink = AnySink::File(sink);
    let out = sink
        .deliver(&[rec("{\"b\":2,\"payload\":\"x\"}"), rec("{\"c\":3}")])
        .await
        .unwrap();
    assert_eq!(out.delivered, vec![0, 1]);
    sink.flush().await.unwrap();

    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.ends_with('\n'));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for line in &lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "line does not parse: {line}"
        );
    }
    assert_eq!(
        lines,
        vec!["{\"a\":1}", "{\"b\":2,\"payload\":\"x\"}", "{\"c\":3}"]
    );
}

#[tokio::test]
async fn a_file_of_whole_lines_is_kept_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    std::fs::write(&path, "{\"a\":1}\n{\"b\":2}\n").unwrap();
    let (sink, log) = open_logged(&path);
    assert!(!log.contains("WARN"), "{log}");
    sink.deliver(&[rec("{\"c\":3}")]).await.unwrap();
    sink.flush().await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n"
    );

    // A torn line after the first one is cut back to the last complete line.
    std::fs::write(&path, "{\"a\":1}\n{\"torn").unwrap();
    let (sink, log) = open_logged(&path);
    assert!(log.contains("6 bytes"), "{log}");
    sink.deliver(&[rec("{}")]).await.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{}\n");
}

#[tokio::test]
async fn an_existing_file_without_any_line_break_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    // OUTPUT_PATH pointed at a file that is not this connector's: no line break at all.
    let path = dir.path().join("report.txt");
    let content = "quarterly figures, no trailing newline";
    std::fs::write(&path, content).unwrap();
    let e = FileSink::new(Some(path.clone())).unwrap_err();
    assert!(!e.is_retriable());
    let msg = e.to_string();
    assert!(
        msg.contains("OUTPUT_PATH") && msg.contains(&path.display().to_string()),
        "{msg}"
    );
    assert!(
        msg.contains("holds no complete line") && msg.contains("nothing was changed"),
        "{msg}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), content);

    // The same for a torn first record (a crash during the very first write): nothing is
    // guessed away; moved aside, the sink starts a new file.
    std::fs::write(&path, "{\"torn").unwrap();
    assert!(FileSink::new(Some(path.clone())).is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"torn");
    std::fs::rename(&path, dir.path().join("report.txt.aside")).unwrap();
    let sink = FileSink::new(Some(path.clone())).unwrap();
    sink.deliver(&[rec("{}")]).await.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");

    // An empty file is fine: nothing to cut.
    std::fs::write(&path, "").unwrap();
    let sink = FileSink::new(Some(path.clone())).unwrap();
    sink.deliver(&[rec("{\"a\":1}")]).await.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
}

#[tokio::test]
async fn a_new_file_in_a_new_directory_is_created_and_written() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("out");
    std::fs::create_dir(&sub).unwrap();
    let path = sub.join("records.jsonl");
    let sink = FileSink::new(Some(path.clone())).expect("created (and its directory fsynced)");
    sink.deliver(&[rec("{\"a\":1}")]).await.unwrap();
    sink.flush().await.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[cfg(unix)]
#[tokio::test]
async fn a_device_is_written_without_a_tail_check() {
    // Not a regular file: nothing to read back or cut (e.g. --output /dev/null or /dev/stdout).
    let sink = AnySink::File(FileSink::new(Some("/dev/null".into())).expect("a device opens"));
    let out = sink.deliver(&[rec("{\"a\":1}")]).await.unwrap();
    assert_eq!(out.delivered, vec![0]);
    // What every checkpoint does: fsync on a device answers EINVAL, which must not stop the
    // service (it has nothing to sync).
    sink.sync_confirmed()
        .await
        .expect("a device has nothing to sync");
    sink.flush().await.unwrap();
    sink.close().await.unwrap();
}

/// `--output` a FIFO (or `/dev/stdout` piped to another program): it can be neither fsynced nor
/// sought; the lines reach the reader and every checkpoint's sync succeeds.
#[cfg(unix)]
#[tokio::test]
async fn a_fifo_is_written_and_synced_without_error() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("records.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success(), "mkfifo failed");
    // The reader: opening a FIFO blocks until its other end is opened too.
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo))
    };
    let sink = AnySink::File(FileSink::new(Some(fifo.clone())).expect("a FIFO opens"));
    let out = sink
        .deliver(&[rec("{\"a\":1}"), rec("{\"b\":2}")])
        .await
        .expect("written to the FIFO");
    assert_eq!(out.delivered, vec![0, 1]);
    sink.sync_confirmed()
        .await
        .expect("a FIFO has nothing to sync");
    let out = sink.deliver(&[rec("{\"c\":3}")]).await.unwrap();
    assert_eq!(out.delivered, vec![0]);
    sink.flush().await.unwrap();
    drop(sink);
    let got = reader.join().unwrap().expect("the reader reads to EOF");
    assert_eq!(got, "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n");
}
