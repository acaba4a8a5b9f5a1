//! A Kafka broker in a process of its own: librdkafka's mock cluster (real wire protocol) hosted
//! by a child process, so it outlives every `kill -9` of the consumers under test, with faults
//! injected through commands on the child's standard input.
//!
//! The host side is [`serve_mock_broker`], called by the child; the test side is
//! [`BrokerProcess`], which starts the child and sends it commands. One command per line, each
//! answered with `ok` or `err <reason>`:
//!
//! | command | effect |
//! |---|---|
//! | `topic NAME PARTITIONS` | creates a topic (replication 1) |
//! | `errors API COUNT ERROR` | the next COUNT requests of API fail with ERROR |
//! | `down ID`, `up ID` | takes broker ID down or brings it back |
//!
//! APIs: `fetch`, `commit` (offset commit), `produce`, `heartbeat`. Errors: `not_leader`,
//! `timed_out`, `coordinator` (not available), `not_enough_replicas`.

use std::fmt;
use std::io::{BufRead, BufReader, Lines, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// What the broker's first line starts with, before its bootstrap address.
const BOOTSTRAP: &str = "BOOTSTRAP ";

/// Hosts a mock cluster of `brokers` brokers in this process: prints `BOOTSTRAP <servers>`,
/// then serves commands from standard input until it closes.
pub fn serve_mock_broker(brokers: i32) -> Result<(), String> {
    let mock = MockCluster::new(brokers).map_err(|e| format!("starting the mock cluster: {e}"))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{BOOTSTRAP}{}", mock.bootstrap_servers()).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        match apply(&mock, &line) {
            Ok(()) => writeln!(out, "ok"),
            Err(e) => writeln!(out, "err {e}"),
        }
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn apply<C: rdkafka::ClientContext>(mock: &MockCluster<'_, C>, line: &str) -> Result<(), String> {
    let number = |s: &str, what: &str| s.parse::<i32>().map_err(|_| format!("bad {what} {s:?}"));
    match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["topic", name, partitions] => mock
            .create_topic(name, number(partitions, "partition count")?, 1)
            .map_err(|e| e.to_string()),
        ["errors", api, n, code] => {
            let n: usize = n.parse().map_err(|_| format!("bad count {n:?}"))?;
            mock.request_errors(api_key(api)?, &vec![error_code(code)?; n]);
            Ok(())
        }
        ["down", id] => mock
            .broker_down(number(id, "broker id")?)
            .map_err(|e| e.to_string()),
        ["up", id] => mock
            .broker_up(number(id, "broker id")?)
            .map_err(|e| e.to_string()),
        _ => Err(format!("unknown command {line:?}")),
    }
}

fn api_key(name: &str) -> Result<RDKafkaApiKey, String> {
    Ok(match name {
        "fetch" => RDKafkaApiKey::Fetch,
        "commit" => RDKafkaApiKey::OffsetCommit,
        "produce" => RDKafkaApiKey::Produce,
        "heartbeat" => RDKafkaApiKey::Heartbeat,
        other => return Err(format!("unknown api {other:?}")),
    })
}

fn error_code(name: &str) -> Result<RDKafkaRespErr, String> {
    Ok(match name {
        "not_leader" => RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        "timed_out" => RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        "coordinator" => RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
        "not_enough_replicas" => RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        other => return Err(format!("unknown error {other:?}")),
    })
}

/// A running broker process and its command channel; killed when dropped.
pub struct BrokerProcess {
    child: Child,
    stdin: ChildStdin,
    answers: Lines<BufReader<ChildStdout>>,
    bootstrap: String,
}

impl fmt::Debug for BrokerProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerProcess")
            .field("pid", &self.child.id())
            .field("bootstrap", &self.bootstrap)
            .finish_non_exhaustive()
    }
}

impl BrokerProcess {
    /// Starts `command`, a program that calls [`serve_mock_broker`] (typically the test binary
    /// itself with an argument that selects that role), and waits for its bootstrap address
    /// (what it prints before that is passed over).
    pub fn start(mut command: Command) -> Result<Self, String> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the broker process: {e}"))?;
        let stdin = child
            .stdin
            .take()
            .ok_or("the broker's stdin is not piped")?;
        let stdout = child
            .stdout
            .take()
            .ok_or("the broker's stdout is not piped")?;
        let mut answers = BufReader::new(stdout).lines();
        // Lines before the address are the host's own (a test binary's "running 1 test").
        let bootstrap = loop {
            let line = answers
                .next()
                .ok_or("the broker process ended before printing its address")?
                .map_err(|e| e.to_string())?;
            if let Some(servers) = line.strip_prefix(BOOTSTRAP) {
                break servers.to_owned();
            }
        };
        Ok(BrokerProcess {
            child,
            stdin,
            answers,
            bootstrap,
        })
    }

    /// How the broker process ended, if it has (librdkafka's mock cluster can abort).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The cluster's `bootstrap.servers`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Sends one command (see the module's table) and waits for its answer.
    pub fn command(&mut self, command: &str) -> Result<(), String> {
        writeln!(self.stdin, "{command}").map_err(|e| e.to_string())?;
        let answer = self
            .answers
            .next()
            .ok_or("the broker process ended")?
            .map_err(|e| e.to_string())?;
        if answer == "ok" {
            Ok(())
        } else {
            Err(format!("broker command {command:?}: {answer}"))
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
