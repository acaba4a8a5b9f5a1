//! The operations tool (feature `cli`): `idc`, a command line over a store the crate wrote.
//!
//! It opens a RocksDB directory (read-only: the service that owns it may keep running) or a
//! PostgreSQL URL (never printed with its password), checks that the store is of this version,
//! and answers what an operator asks first: what happened to a key, where each partition of a
//! group stands, what was dead-lettered and why, why an entity is in its state. Four commands
//! change a store: `positions rewind`, `positions replay --i-know` (the one way to apply
//! records again), `entries purge --expired` and `dead-letters redrive`
//! (which also produces to the broker); each writes an audit
//! record (who, when, what, the filters, the counts) in the same write as its change, and
//! `audit list` reads them. Every command prints a table, or with `--json` one JSON document on
//! standard output.
//!
//! Exit codes: 0 done; 1 the store or the broker failed (unreachable, an I/O error); 2 bad
//! input, with nothing written: an unknown option or group, a malformed URL, a directory or
//! database that holds no store of this version, a key the store cannot hold.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod change;
mod commands;
mod open;
mod output;
mod redrive;

pub use open::redact_url;
pub use redrive::{REDRIVE_COUNT, REDRIVE_OF};

/// `idc`: inspect a store of idempotent-consumer.
#[derive(Debug, Parser)]
#[command(
    name = "idc",
    version,
    about = "Inspect a store of idempotent-consumer"
)]
pub struct Cli {
    /// The store: a RocksDB directory (a path, or `rocksdb:<path>`) or a PostgreSQL URL
    /// (`postgres://user:password@host/database`). Also `IDC_STORE`.
    #[arg(long, env = "IDC_STORE", hide_env_values = true, global = true)]
    pub store: Option<String>,
    /// PostgreSQL: the schema of the store's tables.
    #[arg(long, default_value = "public", global = true)]
    pub schema: String,
    /// PostgreSQL: the prefix of the store's tables.
    #[arg(long, default_value = "idc_", global = true)]
    pub table_prefix: String,
    /// PostgreSQL: how long to try to connect, in seconds.
    #[arg(long, default_value_t = 10, global = true)]
    pub connect_timeout: u64,
    /// Kafka bootstrap servers, for the broker's side of `positions show` (committed offsets,
    /// high watermarks, lag). Also `KAFKA_BOOTSTRAP_SERVERS`.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", global = true)]
    pub bootstrap: Option<String>,
    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Who runs a command that changes the store, for its audit record (default: the user
    /// and host). Also `IDC_WHO`.
    #[arg(long, env = "IDC_WHO", global = true)]
    pub who: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Dedup entries: what happened to a key.
    #[command(subcommand)]
    Entries(EntriesCommand),
    /// Partitions' positions: the store's, and with `--bootstrap` the broker's.
    #[command(subcommand)]
    Positions(PositionsCommand),
    /// Dead letters: what failed and why.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Entities of the resolver: why an entity is in its state.
    #[command(subcommand)]
    Entities(EntitiesCommand),
    /// The audit log: every change made with this tool.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// `idc audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The latest audit records, newest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

/// `idc entries ...`
#[derive(Debug, Subcommand)]
pub enum EntriesCommand {
    /// The entry of one key: status, fingerprint, outcome, the first record's position, when
    /// it was written and expires, and the conflicts recorded for it.
    Get {
        /// The consumer group.
        group: String,
        /// The idempotency key, as the records carry it.
        key: String,
        /// The tenant, when the group's keys are scoped by one.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// How many entries the store holds (RocksDB: its estimate).
    Count,
    /// Deletes a group's expired entries now, in bounded batches (each one audited), instead of
    /// waiting for the service's own purge. Entries inside their window are never deleted.
    Purge {
        /// The consumer group.
        group: String,
        /// Required: only expired entries are ever purged.
        #[arg(long, required = true)]
        expired: bool,
        /// Entries per batch (one write each).
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
    },
}

/// `idc positions ...`
#[derive(Debug, Subcommand)]
pub enum PositionsCommand {
    /// Every partition of a group: the store's next offset and epoch, and with `--bootstrap`
    /// the broker's committed offset, high watermark and the lag.
    Show {
        /// The consumer group.
        group: String,
    },
    /// Moves a partition's stored position (the service resumes there; records it applied
    /// before are skipped as redeliveries). Refused while the group has live members, which
    /// the broker is asked about (`--bootstrap`), unless `--force`. Audited.
    Rewind {
        /// The consumer group.
        group: String,
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset to resume from.
        #[arg(long, conflicts_with = "to_time", required_unless_present = "to_time")]
        to_offset: Option<i64>,
        /// Resume from the first record at or after this time (milliseconds since the epoch;
        /// asked of the broker).
        #[arg(long)]
        to_time: Option<i64>,
        /// Rewind without asking the broker whether the group has live members.
        #[arg(long)]
        force: bool,
    },
    /// Applies the records of an offset range AGAIN, on purpose: releases the dedup entries of
    /// the records first seen at `--from..--to` and moves the position to `--from`, in one
    /// audited write; the group then handles those records as new (the others after `--from`
    /// are redeliveries). The one command that makes a record's effects happen twice: it needs
    /// `--i-know`. Refused while the group has live members, as a rewind is.
    Replay {
        /// The consumer group.
        group: String,
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The first offset to apply again.
        #[arg(long)]
        from: i64,
        /// The offset after the last to apply again.
        #[arg(long)]
        to: i64,
        /// Says that applying these records' effects again is what you want.
        #[arg(long = "i-know", required = true)]
        i_know: bool,
        /// Replay without asking the broker whether the group has live members.
        #[arg(long)]
        force: bool,
    },
}

/// `idc dead-letters ...`
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// The dead letters of a group, oldest first, filtered.
    List {
        /// The consumer group.
        group: String,
        /// Which letters.
        #[command(flatten)]
        filter: LetterFilter,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter whole: its original bytes and headers, and the error.
    Show {
        /// The consumer group.
        group: String,
        /// The record's topic.
        topic: String,
        /// The record's partition.
        partition: i32,
        /// The record's offset.
        offset: i64,
    },
    /// Produces dead letters again (to their own topic, or `--to-topic`), each once, marked in
    /// the store and audited; an interrupted redrive goes on where it stopped when run again.
    /// A record redriven `--max-redrives` times already is left alone unless `--force`.
    Redrive {
        /// The consumer group.
        group: String,
        /// Which letters.
        #[command(flatten)]
        filter: LetterFilter,
        /// Produce to this topic instead of each letter's own (partition: the letter's, modulo
        /// the topic's partitions).
        #[arg(long)]
        to_topic: Option<String>,
        /// Count what would be redriven; produce and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// The loop guard: records already redriven this many times are left alone.
        #[arg(long, default_value_t = 3)]
        max_redrives: u32,
        /// Redrive past the loop guard.
        #[arg(long)]
        force: bool,
        /// At most this many letters a second (default: as fast as the broker acknowledges).
        #[arg(long)]
        rate: Option<u32>,
        /// The tenant of the group's keys, when they are scoped by one (to free the
        /// dead-lettered keys for the redriven records).
        #[arg(long)]
        tenant: Option<String>,
    },
}

/// Which dead letters a command takes.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct LetterFilter {
    /// Only this topic's.
    #[arg(long)]
    pub topic: Option<String>,
    /// Only this partition's.
    #[arg(long)]
    pub partition: Option<i32>,
    /// Only this reason's (`permanent`, `retries_exhausted`, `conflict`, `invalid_key`).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only this idempotency key's.
    #[arg(long)]
    pub key: Option<String>,
    /// Only letters that failed at or after this time (milliseconds since the epoch).
    #[arg(long)]
    pub since_ms: Option<i64>,
    /// Only letters that failed before this time (milliseconds since the epoch).
    #[arg(long)]
    pub until_ms: Option<i64>,
}

/// `idc entities ...`
#[derive(Debug, Subcommand)]
pub enum EntitiesCommand {
    /// An entity's winner and its resolution records, newest first.
    Explain {
        /// The consumer group.
        group: String,
        /// The entity.
        entity: String,
        /// At most this many records.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

impl Command {
    /// True for a command that changes the store (and so is audited).
    fn writes(&self) -> bool {
        matches!(
            self,
            Command::Entries(EntriesCommand::Purge { .. })
                | Command::Positions(PositionsCommand::Rewind { .. })
                | Command::Positions(PositionsCommand::Replay { .. })
                | Command::DeadLetters(DeadLettersCommand::Redrive { dry_run: false, .. })
        )
    }
}

/// Why a command failed, and so its exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad input; nothing was written. Exit code 2.
    Input(String),
    /// The store or the broker failed. Exit code 1.
    Service(String),
}

impl From<crate::Error> for Failure {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Config(message) => Failure::Input(message),
            other => {
                // The error and what caused it: "connecting to PostgreSQL: pool timed out ...".
                let mut message = other.to_string();
                let mut source = std::error::Error::source(&other);
                while let Some(cause) = source {
                    let text = cause.to_string();
                    if !message.contains(&text) {
                        message.push_str(": ");
                        message.push_str(&text);
                    }
                    source = cause.source();
                }
                Failure::Service(message)
            }
        }
    }
}

impl From<crate::lag::AskError> for Failure {
    fn from(e: crate::lag::AskError) -> Self {
        match e {
            crate::lag::AskError::Settings(message) => Failure::Input(message),
            crate::lag::AskError::Broker(message) => Failure::Service(message),
        }
    }
}

/// Runs `idc` with the process's arguments: what the binary does.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idc: starting tokio: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(&cli)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(Failure::Input(message)) => {
            eprintln!("idc: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Service(message)) => {
            eprintln!("idc: {message}");
            ExitCode::from(1)
        }
    }
}

/// Runs one command and returns what it prints.
pub async fn run(cli: &Cli) -> Result<String, Failure> {
    let store = open::open(cli, cli.command.writes()).await?;
    let doc = commands::run(&store, cli).await?;
    Ok(if cli.json {
        let mut text = serde_json::to_string_pretty(&doc.json).expect("JSON serializes");
        text.push('\n');
        text
    } else {
        doc.human
    })
}
