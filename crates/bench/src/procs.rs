//! Processes and CPU clocks: the emulator and the stand-in run as separate processes so the
//! connector's CPU time (`getrusage`, `/proc/<pid>/stat`) is its own, and a connector binary run
//! is reaped with `wait4` to read its peak RSS and CPU time exactly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a benchmark step could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot start {program}: {detail} (build it first: scripts/bench.sh builds every binary in release)")]
    Spawn { program: String, detail: String },
    #[error("{what}: {detail}")]
    Step { what: String, detail: String },
}

/// A helper step failed: `what` names the step.
pub fn step_err(what: &str, detail: impl std::fmt::Display) -> BenchError {
    BenchError::Step {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

/// Where the sibling release binaries live (next to `shield-bench`).
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/release"))
}

/// User + system CPU seconds of this process (all threads).
pub fn self_cpu() -> f64 {
    rusage_secs(libc::RUSAGE_SELF)
}

fn rusage_secs(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(who, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// CPU seconds of the calling thread.
pub fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// User + system CPU seconds of another process, from `/proc/<pid>/stat` (clock-tick resolution).
pub fn pid_cpu(pid: u32) -> f64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let Some(rest) = text.rfind(')').map(|i| &text[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// A long-running helper process that prints `listening on URL` as its first stdout line.
pub struct Service {
    name: String,
    child: Child,
    pub url: String,
    _stdout: BufReader<ChildStdout>,
}

impl Service {
    /// Starts `program args` and waits for its `listening on` line; stderr goes to `log`.
    pub fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Service, BenchError> {
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let spawn_err = |detail: String| BenchError::Spawn {
            program: program.display().to_string(),
            detail,
        };
        let stderr = std::fs::File::create(log).map_err(|e| spawn_err(e.to_string()))?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| spawn_err(e.to_string()))?;
        let Some(out) = child.stdout.take() else {
            let _ = child.kill();
            return Err(spawn_err("no stdout pipe".into()));
        };
        let mut out = BufReader::new(out);
        let mut line = String::new();
        let read = out.read_line(&mut line);
        let url = match read {
            Ok(n) if n > 0 => line
                .trim()
                .strip_prefix("listening on ")
                .map(str::to_string),
            _ => None,
        };
        let Some(url) = url else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(spawn_err(format!(
                "expected `listening on URL` on stdout, got {line:?}; see {}",
                log.display()
            )));
        };
        Ok(Service {
            name,
            child,
            url,
            _stdout: out,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds used so far.
    pub fn cpu(&self) -> f64 {
        pid_cpu(self.pid())
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// What a measured child process used.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChildUsage {
    pub exit_code: i32,
    pub wall_s: f64,
    pub user_s: f64,
    pub sys_s: f64,
    /// Peak resident set of the child's own program, KiB: the largest `VmHWM` of
    /// `/proc/<pid>/status` read every 10 ms until it exited. (`ru_maxrss` from `wait4` is not
    /// used for this: Linux carries the parent's resident set at fork into the child's
    /// `ru_maxrss`, so a large bench process would hide a smaller child.) `ru_maxrss` only for a
    /// child that exited before the first read.
    pub max_rss_kib: u64,
    /// `ru_maxrss` from `wait4`, for reference (at least the parent's RSS at fork).
    pub ru_maxrss_kib: u64,
}

/// `VmHWM` of a live process, KiB; `None` once it exited (a zombie has no memory).
fn vm_hwm_kib(pid: libc::pid_t) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs `cmd` to completion and reaps it with `wait4`, which returns its own rusage.
pub fn run_measured(mut cmd: Command) -> Result<ChildUsage, BenchError> {
    let program = format!("{:?}", cmd.get_program());
    let started = Instant::now();
    let child = cmd.spawn().map_err(|e| BenchError::Spawn {
        program: program.clone(),
        detail: e.to_string(),
    })?;
    let pid = child.id() as libc::pid_t;
    // Poll the child's high-water mark until it has exited (it stays a zombie, and its pid
    // cannot be reused, until the wait4 below reaps it). VmHWM only grows, so the last value
    // read is the peak up to 10 ms before the end.
    let mut max_rss_kib = 0;
    while let Some(kib) = vm_hwm_kib(pid) {
        max_rss_kib = max_rss_kib.max(kib);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut status: libc::c_int = 0;
    // SAFETY: zeroed rusage is valid; wait4 reaps our own child (std never waits on it: we
    // drop `child` without calling wait, which does not reap).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = loop {
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if rc == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break rc;
    };
    let wall_s = started.elapsed().as_secs_f64();
    drop(child);
    if rc != pid {
        return Err(step_err(
            &program,
            format!("wait4 failed: {}", std::io::Error::last_os_error()),
        ));
    }
    let exit_code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok(ChildUsage {
        exit_code,
        wall_s,
        user_s: tv(ru.ru_utime),
        sys_s: tv(ru.ru_stime),
        // A child that exited before the first read (milliseconds) has only ru_maxrss.
        max_rss_kib: if max_rss_kib > 0 {
            max_rss_kib
        } else {
            ru.ru_maxrss as u64
        },
        ru_maxrss_kib: ru.ru_maxrss as u64,
    })
}

/// The median of a non-empty list (the mean of the two middle values for even lengths).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_and_nan() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }

    #[test]
    fn clocks_advance_with_work() {
        let (t0, p0) = (thread_cpu(), self_cpu());
        let mut x = 0u64;
        for i in 0..30_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu() > t0);
        assert!(self_cpu() > p0);
    }

    #[test]
    fn measured_child_reports_exit_code() {
        let mut c = Command::new("sh");
        c.args(["-c", "exit 3"]);
        let u = run_measured(c).expect("sh runs");
        assert_eq!(u.exit_code, 3);
        assert!(u.max_rss_kib > 0);
    }
}
