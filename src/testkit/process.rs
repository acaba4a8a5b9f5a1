//! Consumers in processes of their own, so a test can do to them what happens to a real
//! service: `kill -9` at any moment, a freeze past the session timeout (SIGSTOP, then SIGCONT),
//! a graceful stop (SIGTERM, which drains and commits).
//!
//! The child runs its [`Runtime`] through [`serve_reporting`], which prints the runtime's
//! counters as a `STATS name=value ...` line within 5 ms of a change, at least every 200 ms,
//! and once more at the end; the test
//! side is [`ConsumerProcess`], which starts the child, keeps the last counters it printed and
//! sends it signals. Counter names: every field of [`StatsSnapshot`](crate::StatsSnapshot)
//! (`applied`, `records_read`, `duplicates_redelivery`, ...), and `duplicates` (both causes),
//! `fenced` (`fenced_commits`), `refused` (`stale_partitions_refused`), `batches`
//! (`batches_committed`), `not_applied` (records the resolver settled without their handler).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Handler, Runtime, Store};

/// SIGKILL's number (9 on every Unix).
const SIGKILL: i32 = 9;

/// What a `STATS` line starts with.
const STATS: &str = "STATS ";

/// Runs `runtime` until SIGTERM, or until `done` (asked every 250 ms) says the work is done,
/// printing its counters as `STATS` lines on standard output.
pub async fn serve_reporting<S, H, F, Fut>(runtime: Runtime<S, H>, done: F) -> crate::Result<()>
where
    S: Store,
    H: Handler<S::Tx>,
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let stats = runtime.stats();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| crate::Error::Task(format!("installing the SIGTERM handler: {e}")))?;
    let ticker_stats = stats.clone();
    let ticker = tokio::spawn(async move {
        // A change is reported within 5 ms (what a killed process last said is nearly all it
        // committed), and the counters at least every 200 ms.
        let mut said = None;
        let mut at = Instant::now();
        loop {
            let now = ticker_stats.snapshot();
            if said != Some(now) || at.elapsed() >= Duration::from_millis(200) {
                report(&now);
                said = Some(now);
                at = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let result = runtime
        .run(async {
            loop {
                tokio::select! {
                    _ = term.recv() => return,
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                if done().await {
                    return;
                }
            }
        })
        .await;
    ticker.abort();
    report(&stats.snapshot());
    result
}

fn report(s: &crate::StatsSnapshot) {
    let mut line = format!(
        "{STATS}duplicates={} fenced={} refused={} batches={} not_applied={}",
        s.duplicates(),
        s.fenced_commits,
        s.stale_partitions_refused,
        s.batches_committed,
        s.resolved_superseded + s.resolved_stale + s.resolved_conflict + s.resolved_rejected
    );
    for (name, value) in s.named() {
        line.push_str(&format!(" {name}={value}"));
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The counters of a `STATS` line.
fn parse_stats(line: &str) -> Option<BTreeMap<String, u64>> {
    let rest = line.strip_prefix(STATS)?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect(),
    )
}

/// A consumer process and the last counters it printed; killed when dropped.
pub struct ConsumerProcess {
    child: Child,
    last: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl fmt::Debug for ConsumerProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerProcess")
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

impl ConsumerProcess {
    /// Starts `command`, a program that runs its consumer through [`serve_reporting`], and
    /// reads its counters as it prints them.
    pub fn start(mut command: Command) -> Result<Self, String> {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting a consumer: {e}"))?;
        let out = child
            .stdout
            .take()
            .ok_or("the consumer's stdout is not piped")?;
        let last = Arc::new(Mutex::new(BTreeMap::new()));
        let sink = last.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(stats) = parse_stats(&line) {
                    *sink.lock().expect("stats poisoned") = stats;
                }
            }
        });
        Ok(ConsumerProcess { child, last })
    }

    /// The last value printed for counter `name` (0 before the first line).
    pub fn stat(&self, name: &str) -> u64 {
        self.stats().get(name).copied().unwrap_or(0)
    }

    /// The last counters printed, as the runtime's [`StatsSnapshot`](crate::StatsSnapshot).
    pub fn snapshot(&self) -> crate::StatsSnapshot {
        let stats = self.stats();
        crate::StatsSnapshot::from_named(|name| stats.get(name).copied())
    }

    /// Every counter of the last line printed.
    pub fn stats(&self) -> BTreeMap<String, u64> {
        self.last.lock().expect("stats poisoned").clone()
    }

    /// Freezes the process (SIGSTOP): it keeps its sockets and transactions but does nothing,
    /// as a process stalled by the machine would.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Lets a frozen process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
    }

    /// SIGKILL, then reap; returns the last counters.
    pub fn kill(mut self) -> BTreeMap<String, u64> {
        self.sigkill();
        self.settled_stats()
    }

    /// SIGKILL, then reap: true if the signal ended the process, false if it had ended by
    /// itself. The last counters stay readable ([`settled_stats`](Self::settled_stats)).
    pub fn sigkill(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let _ = self.child.kill();
        let killed = self.child.wait().is_ok_and(|s| s.signal() == Some(SIGKILL));
        let _ = self.settled_stats();
        killed
    }

    /// SIGTERM, then waits up to `timeout` for the drain (the runtime commits what it holds);
    /// returns the last counters, or why the process did not stop cleanly.
    pub fn stop(mut self, timeout: Duration) -> Result<BTreeMap<String, u64>, String> {
        self.signal("TERM");
        match self.wait(timeout)? {
            Some(s) if s.success() => Ok(self.settled_stats()),
            Some(s) => Err(format!("a consumer stopped with {s}")),
            None => {
                let _ = self.child.kill();
                Err(format!(
                    "a consumer did not stop within {timeout:?} of SIGTERM"
                ))
            }
        }
    }

    /// Waits up to `timeout` for the process to end by itself; `None` if it is still running.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(None)
    }

    /// How the process ended, if it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last counters, once the reader had a moment to take the final line.
    pub fn settled_stats(&self) -> BTreeMap<String, u64> {
        std::thread::sleep(Duration::from_millis(50));
        self.stats()
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_stats;

    #[test]
    fn stats_lines_are_read_and_other_lines_ignored() {
        let stats = parse_stats("STATS applied=3 duplicates=1 bad=x").unwrap();
        assert_eq!(stats.get("applied"), Some(&3));
        assert_eq!(stats.get("duplicates"), Some(&1));
        assert_eq!(stats.get("bad"), None, "not a number: left out");
        assert!(parse_stats("applied=3").is_none());
    }
}
