//! What the harness runs and what it found: scenarios and their reports.

use std::fmt;

use crate::metrics::StatsSnapshot;

/// What a scenario does to the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Consumes the workload once.
    Clean,
    /// Crashes the consumer `crashes` times, each right after its handler succeeded on a record
    /// chosen at random in the first half of those left (the batch open, its effects written
    /// but not committed), restarting it each time, then finishes. An incarnation that
    /// committed everything before its crash point ends without one ([`ScenarioReport::crashes`]
    /// counts the crashes made).
    CrashBeforeCommit {
        /// How many crashes.
        crashes: u32,
    },
    /// Consumes the workload, then rewinds every partition of the store to offset 0 and
    /// consumes it all again: every record is redelivered.
    RedeliveryAfterRewind,
    /// One consumer until the first third of the workload (sent alone) is committed; then a
    /// second instance joins the group and the rest is sent while the group rebalances
    /// (partitions move while records are in flight), and both finish. Needs a store the
    /// instances share ([`HarnessStore::SHARED`](super::HarnessStore::SHARED)).
    RebalanceMidStream,
    /// Real consumer processes killed with SIGKILL `kills` times at random moments while they
    /// consume (each handler call held a few milliseconds, so batches are open when the signal
    /// lands), each restarted on the store the last one left, then one run to the end.
    ///
    /// The consumer process is the test binary itself: the harness starts it again with the
    /// running test's name (`<test> --exact`, or the same arguments outside libtest) and an
    /// environment variable that makes its [`HandlerHarness::run`](super::HandlerHarness::run)
    /// serve as the consumer instead of running scenarios. So the test must reach that call
    /// the same way in the copy (what comes before it runs there too), and the kill storm must
    /// be in the test's first `run` call. Needs a store another process can open
    /// ([`HarnessStore::address`](super::HarnessStore::address): RocksDB, PostgreSQL). The
    /// counts of a killed process are its last report (made within 5 ms of each change).
    KillStorm {
        /// How many kills.
        kills: u32,
    },
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scenario::Clean => f.write_str("clean"),
            Scenario::CrashBeforeCommit { crashes } => {
                write!(f, "crash before commit ×{crashes}")
            }
            Scenario::RedeliveryAfterRewind => f.write_str("redelivery after a rewind"),
            Scenario::RebalanceMidStream => f.write_str("rebalance mid-stream"),
            Scenario::KillStorm { kills } => write!(f, "kill -9 storm ×{kills}"),
        }
    }
}

/// What one scenario found.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// The scenario.
    pub scenario: Scenario,
    /// Keys of the workload whose effect is not visible (nor kept as a dead letter).
    pub lost: Vec<String>,
    /// Keys whose effect is visible more than once, with how many times.
    pub doubled: Vec<(String, u64)>,
    /// Keys the store kept as dead letters (the handler's refusals, conflicts).
    pub dead_letters: Vec<String>,
    /// The runtime's counts over every incarnation (committed batches only).
    pub counted: StatsSnapshot,
    /// Crashes made (in process: [`Scenario::CrashBeforeCommit`]).
    pub crashes: u32,
    /// Consumer processes killed with SIGKILL ([`Scenario::KillStorm`]).
    pub kills: u32,
    /// The user's invariant: `Err` with its diff when it does not hold.
    pub invariant: Result<(), String>,
}

impl ScenarioReport {
    /// No key lost or doubled, and the invariant holds.
    pub fn holds(&self) -> bool {
        self.lost.is_empty() && self.doubled.is_empty() && self.invariant.is_ok()
    }
}

impl fmt::Display for ScenarioReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counted;
        writeln!(
            f,
            "{}: {} · lost {} · doubled {} · applied {}, duplicates {}, conflicts {}, dead letters {}, read {} · crashes {}, kills {}",
            self.scenario,
            if self.holds() { "ok" } else { "FAILED" },
            self.lost.len(),
            self.doubled.len(),
            c.applied,
            c.duplicates(),
            c.conflicts,
            c.dead_lettered,
            c.records_read,
            self.crashes,
            self.kills,
        )?;
        if !self.lost.is_empty() {
            writeln!(f, "  lost: {}", shorten(&self.lost))?;
        }
        if !self.doubled.is_empty() {
            let doubled: Vec<String> = self
                .doubled
                .iter()
                .map(|(k, n)| format!("{k} ×{n}"))
                .collect();
            writeln!(f, "  doubled: {}", shorten(&doubled))?;
        }
        if let Err(diff) = &self.invariant {
            writeln!(f, "  invariant: {diff}")?;
        }
        Ok(())
    }
}

fn shorten(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(10).map(String::as_str).collect();
    match items.len() {
        n if n > 10 => format!("{} … ({n} in all)", shown.join(", ")),
        _ => shown.join(", "),
    }
}

/// Every scenario's report.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// In the order they ran.
    pub scenarios: Vec<ScenarioReport>,
}

impl Report {
    /// Keys lost, over every scenario.
    pub fn lost(&self) -> usize {
        self.scenarios.iter().map(|s| s.lost.len()).sum()
    }

    /// Keys doubled, over every scenario.
    pub fn doubled(&self) -> usize {
        self.scenarios.iter().map(|s| s.doubled.len()).sum()
    }

    /// Crashes made, over every scenario.
    pub fn crashes(&self) -> u32 {
        self.scenarios.iter().map(|s| s.crashes).sum()
    }

    /// Consumer processes killed, over every scenario.
    pub fn kills(&self) -> u32 {
        self.scenarios.iter().map(|s| s.kills).sum()
    }

    /// Panics with the whole report unless every scenario holds.
    #[track_caller]
    pub fn assert_exactly_once(&self) {
        assert!(
            self.scenarios.iter().all(ScenarioReport::holds),
            "the handler is not exactly-once:\n{self}"
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.scenarios.iter().try_for_each(|s| write!(f, "{s}"))
    }
}
