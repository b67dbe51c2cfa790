//! A secret mounted as a file (`DATABRICKS_CLIENT_SECRET_FILE`, `DATABRICKS_TOKEN_FILE`,
//! `AKTO_JWT_TOKEN_FILE`), read again while the connector runs, so that a rotated secret (the
//! seed's 90-day rotation) needs no restart.
//!
//! One rule for every such file, the one configuration applies at start ([`secret_text`]): the
//! content without its trailing line break. A file that cannot be read, or is empty, keeps the
//! secret read before, with a WARN naming the setting and the path, never the value.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

/// The secret in a file's (or a variable's) content: the text without a leading byte order mark
/// (PowerShell's `Set-Content -Encoding UTF8` writes one) and without surrounding whitespace and
/// line breaks (`echo` adds one; a secret never starts or ends with a space); None when nothing
/// is left.
pub(crate) fn secret_text(content: &str) -> Option<&str> {
    let content = content.trim_start_matches('\u{feff}');
    Some(content.trim()).filter(|s| !s.is_empty())
}

/// Whether a secret holds a control character (a line break or tab inside it): it could not be
/// sent in an HTTP header, and is surely a paste or quoting mistake.
pub(crate) fn has_control(secret: &str) -> bool {
    secret.chars().any(char::is_control)
}

/// A secret file and the secret last read from it.
pub struct SecretFile {
    path: PathBuf,
    /// Its setting, for messages.
    variable: &'static str,
    /// The secret last read, and when; no time: read the file at the next use.
    last: Mutex<(SecretString, Option<Instant>)>,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFile")
            .field("variable", &self.variable)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SecretFile {
    /// `initial`: the secret configuration read from `path` at start.
    pub fn new(path: PathBuf, variable: &'static str, initial: SecretString) -> SecretFile {
        SecretFile {
            path,
            variable,
            last: Mutex::new((initial, Some(Instant::now()))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn variable(&self) -> &'static str {
        self.variable
    }

    /// Reads the file now. Returns its secret (the one read before when it cannot be read or
    /// is empty) and whether it differs from the one read before (logged: a rotation).
    pub fn read(&self) -> (SecretString, bool) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = match std::fs::read_to_string(&self.path) {
            Ok(content) => match secret_text(&content) {
                Some(s) if has_control(s) => {
                    tracing::warn!(
                        "{} {} holds a control character (a line break or tab inside the \
                         secret): still using the secret read before",
                        self.variable,
                        self.path.display()
                    );
                    None
                }
                Some(s) => Some(SecretString::from(s.to_owned())),
                None => {
                    tracing::warn!(
                        "{} {} is empty now: still using the secret read before",
                        self.variable,
                        self.path.display()
                    );
                    None
                }
            },
            Err(e) => {
                tracing::warn!(
                    "{} {}: cannot read it again ({e}): still using the secret read before",
                    self.variable,
                    self.path.display()
                );
                None
            }
        };
        last.1 = Some(Instant::now());
        let Some(fresh) = fresh else {
            return (last.0.clone(), false);
        };
        let changed = fresh.expose_secret() != last.0.expose_secret();
        if changed {
            tracing::info!(
                "{} {} changed (rotated): the new secret is used from now on",
                self.variable,
                self.path.display()
            );
            last.0 = fresh;
        }
        (last.0.clone(), changed)
    }

    /// Whether `every` has passed since the last read, or [`Self::recheck`] was called.
    pub fn due(&self, every: Duration) -> bool {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.1.is_none_or(|at| at.elapsed() >= every)
    }

    /// The secret, the file read again when [`Self::due`].
    pub fn current(&self, every: Duration) -> SecretString {
        if self.due(every) {
            return self.read().0;
        }
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// The next [`Self::current`] reads the file (e.g. after the secret was refused).
    pub fn recheck(&self) {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).1 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_file_is_read_and_a_broken_one_keeps_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "first\n").unwrap();
        let f = SecretFile::new(path.clone(), "X_FILE", SecretString::from("first"));
        // Not due yet: the file is not read.
        std::fs::write(&path, "second\r\n").unwrap();
        assert_eq!(
            f.current(Duration::from_secs(3600)).expose_secret(),
            "first"
        );
        f.recheck();
        assert_eq!(
            f.current(Duration::from_secs(3600)).expose_secret(),
            "second"
        );
        let (s, changed) = f.read();
        assert_eq!((s.expose_secret(), changed), ("second", false));
        // Empty or missing: the secret read before stays.
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(f.read().0.expose_secret(), "second");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(f.read().0.expose_secret(), "second");
        std::fs::write(&path, "third").unwrap();
        assert_eq!(f.current(Duration::ZERO).expose_secret(), "third");
        assert!(!format!("{f:?}").contains("third"));
        // Surrounding whitespace goes; a line break inside keeps the secret read before.
        std::fs::write(&path, "  fourth \t\r\n").unwrap();
        assert_eq!(f.read().0.expose_secret(), "fourth");
        std::fs::write(&path, "fif\nth\n").unwrap();
        assert_eq!(f.read().0.expose_secret(), "fourth");
        assert_eq!(secret_text(" \r\n\t"), None);
        assert!(has_control("a\u{7f}b") && !has_control("eyJ.a-b_c"));
        // A byte order mark (PowerShell's UTF-8) is no part of the secret.
        std::fs::write(&path, "\u{feff}sixth\r\n").unwrap();
        assert_eq!(f.read().0.expose_secret(), "sixth");
        assert_eq!(secret_text("\u{feff}\r\n"), None);
    }
}
