//! The commands that change a store: each makes one audit record and writes it, with its
//! counts so far, in the same write as each change.

use std::time::Duration;

use serde_json::json;

use super::Failure;
use super::output::{Doc, table, when};
use crate::PartitionId;
use crate::store::{AuditRecord, Audited, Inspect};

/// Who runs the command: `--who`, or the user and host.
pub(super) fn who(given: Option<&str>) -> String {
    if let Some(who) = given.filter(|w| !w.trim().is_empty()) {
        return who.trim().to_owned();
    }
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    format!("{user}@{}", crate::store::host_name())
}

/// `entries purge --expired`: bounded batches until one purges fewer than `batch`, a progress
/// line on standard error when it is a terminal.
pub(super) async fn purge<S: Inspect + Audited + Sync>(
    store: &S,
    group: &str,
    batch: usize,
    who: String,
    quiet: bool,
) -> Result<Doc, Failure> {
    if batch == 0 {
        return Err(Failure::Input("--batch must be at least 1".into()));
    }
    let record = AuditRecord::new(
        who,
        "entries purge",
        json!({ "group": group, "expired": true, "batch": batch }),
    );
    let progress = progress(quiet, None);
    progress.set_message("purging expired entries");
    let mut total = 0usize;
    let mut batches = 0u64;
    loop {
        let done = total;
        let n = store
            .purge_expired_audited(
                group,
                crate::store::now_ms(),
                batch,
                &record,
                &|n| json!({ "purged": done + n, "batches": batches + 1 }),
            )
            .await?;
        total += n;
        batches += 1;
        progress.set_message(format!("{total} expired entries purged"));
        progress.tick();
        if n < batch {
            break;
        }
    }
    progress.finish_and_clear();
    Ok(Doc {
        json: json!({ "group": group, "purged": total, "batches": batches, "audit_id": record.id }),
        human: format!(
            "{total} expired entries of group {group:?} purged in {batches} batches (audit {})\n",
            record.id
        ),
    })
}

/// A progress line on standard error, when it is a terminal and the output is not JSON: a bar
/// of `len` steps, or a spinner.
pub(super) fn progress(quiet: bool, len: Option<u64>) -> indicatif::ProgressBar {
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    }
}

/// Where `positions rewind` goes: the offset given, or the broker's first offset at or after
/// the time given.
pub(super) struct Target {
    pub(super) offset: Option<i64>,
    pub(super) time_ms: Option<i64>,
}

/// `positions rewind`: refused while the group has live members (asked of the broker) unless
/// forced; the move and its audit record in one write.
pub(super) async fn rewind<S: Inspect + Audited + Sync>(
    store: &S,
    partition: PartitionId,
    target: Target,
    force: bool,
    bootstrap: Option<&str>,
    who: String,
) -> Result<Doc, Failure> {
    let Checked {
        current,
        consumer,
        members,
    } = check(store, &partition, force, bootstrap, "a rewind").await?;
    let timeout = Duration::from_secs(10);
    let to = match (target.offset, target.time_ms) {
        (Some(offset), _) => offset,
        (None, Some(ms)) => {
            let c = consumer.as_ref().ok_or_else(|| {
                Failure::Input("--to-time asks the broker: give --bootstrap".into())
            })?;
            offset_at(c, &partition, ms, timeout)?
        }
        (None, None) => return Err(Failure::Input("give --to-offset or --to-time".into())),
    };
    if to < 0 {
        return Err(Failure::Input(format!("offset {to} is negative")));
    }
    let from = current.next_offset;
    let mut record = AuditRecord::new(
        who,
        "positions rewind",
        json!({
            "group": partition.group,
            "topic": partition.topic,
            "partition": partition.partition,
            "to_offset": target.offset,
            "to_time_ms": target.time_ms,
            "force": force,
            "live_members": members.as_ref().map(Vec::len),
        }),
    );
    record.counts = json!({ "from": from, "to": to });
    store.set_position_audited(&partition, to, &record).await?;
    Ok(Doc {
        json: json!({
            "group": partition.group,
            "topic": partition.topic,
            "partition": partition.partition,
            "from": from,
            "to": to,
            "audit_id": record.id,
        }),
        human: format!(
            "{}/{} of group {:?}: next offset {} -> {to} (audit {})\n",
            partition.topic,
            partition.partition,
            partition.group,
            from.map_or_else(|| "none".to_owned(), |f| f.to_string()),
            record.id
        ),
    })
}

/// What a change to a partition's position starts from.
struct Checked {
    current: crate::StoredPosition,
    consumer: Option<rdkafka::consumer::BaseConsumer>,
    members: Option<Vec<String>>,
}

/// The partition's stored position, a client of the broker when one is named, and the group's
/// members: refused when the store has no position for the partition, or (see [`stopped`])
/// while the group may be running.
async fn check<S: Inspect>(
    store: &S,
    partition: &PartitionId,
    force: bool,
    bootstrap: Option<&str>,
    what: &str,
) -> Result<Checked, Failure> {
    let positions = store.positions(&partition.group).await?;
    let Some((_, current)) = positions.into_iter().find(|(p, _)| p == partition) else {
        return Err(Failure::Input(format!(
            "group {:?} has no position for {}/{} in this store",
            partition.group, partition.topic, partition.partition
        )));
    };
    let consumer = match bootstrap {
        Some(servers) => Some(super::commands::client(servers, &partition.group)?),
        None => None,
    };
    let members = stopped(consumer.as_ref(), &partition.group, force, what)?;
    Ok(Checked {
        current,
        consumer,
        members,
    })
}

/// Refuses a change to `group`'s positions while the broker lists live members of it, or
/// cannot be asked, unless `force`; the members it listed (none when forced).
fn stopped(
    consumer: Option<&rdkafka::consumer::BaseConsumer>,
    group: &str,
    force: bool,
    what: &str,
) -> Result<Option<Vec<String>>, Failure> {
    if force {
        return Ok(None);
    }
    let Some(consumer) = consumer else {
        return Err(Failure::Input(format!(
            "{what} asks the broker whether the group has live members: give --bootstrap (or \
             --force to go on without asking)"
        )));
    };
    let members = live_members(consumer, group, Duration::from_secs(10))?;
    if !members.is_empty() {
        return Err(Failure::Input(format!(
            "group {group:?} has {} live member(s) ({}): stop them first (or --force)",
            members.len(),
            members.join(", ")
        )));
    }
    Ok(Some(members))
}

/// `positions replay`: the records first seen at `from..to` handled again, on purpose.
pub(super) async fn replay<S: Inspect + Audited + Sync>(
    store: &S,
    partition: PartitionId,
    (from, to): (i64, i64),
    force: bool,
    bootstrap: Option<&str>,
    who: String,
) -> Result<Doc, Failure> {
    if from < 0 || to <= from {
        return Err(Failure::Input(format!(
            "the range {from}..{to} is empty or negative: give --from below --to"
        )));
    }
    let Checked {
        current, members, ..
    } = check(store, &partition, force, bootstrap, "a replay").await?;
    let previous = current.next_offset;
    let record = AuditRecord::new(
        who,
        "positions replay",
        json!({
            "group": partition.group,
            "topic": partition.topic,
            "partition": partition.partition,
            "from": from,
            "to": to,
            "force": force,
            "live_members": members.as_ref().map(Vec::len),
        }),
    );
    let released = store
        .replay_range(
            &partition,
            from,
            to,
            &record,
            &|n| json!({ "released": n, "previous_position": previous }),
        )
        .await?;
    Ok(Doc {
        json: json!({
            "group": partition.group,
            "topic": partition.topic,
            "partition": partition.partition,
            "from": from,
            "to": to,
            "released": released,
            "previous_position": previous,
            "audit_id": record.id,
        }),
        human: format!(
            "{}/{} of group {:?}: {released} entries of offsets {from}..{to} released; the group \
             resumes at {from} and handles those records again (audit {})\n",
            partition.topic, partition.partition, partition.group, record.id
        ),
    })
}

/// The members the broker lists for `group` (client id and host of each).
fn live_members(
    consumer: &rdkafka::consumer::BaseConsumer,
    group: &str,
    timeout: Duration,
) -> Result<Vec<String>, Failure> {
    use rdkafka::consumer::Consumer;
    let list = consumer
        .fetch_group_list(Some(group), timeout)
        .map_err(|e| match e.rdkafka_error_code() {
            // librdkafka's mock cluster, for one, has no ListGroups or DescribeGroups: what
            // cannot be asked is not taken for "no members".
            Some(rdkafka::types::RDKafkaErrorCode::UnsupportedFeature) => Failure::Input(format!(
                "the broker cannot list group {group:?}'s members ({e}): once you know its \
                 consumers are stopped, rewind with --force"
            )),
            _ => Failure::Service(format!("asking the broker for group {group:?}: {e}")),
        })?;
    Ok(list
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .flat_map(|g| g.members())
        .map(|m| format!("{} on {}", m.client_id(), m.client_host()))
        .collect())
}

/// The first offset of `partition` at or after `ms`, or its end when none is.
fn offset_at(
    consumer: &rdkafka::consumer::BaseConsumer,
    partition: &PartitionId,
    ms: i64,
    timeout: Duration,
) -> Result<i64, Failure> {
    use rdkafka::consumer::Consumer;
    use rdkafka::{Offset, TopicPartitionList};
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(&partition.topic, partition.partition, Offset::Offset(ms))
        .map_err(|e| Failure::Input(format!("{e}")))?;
    let found = consumer
        .offsets_for_times(list, timeout)
        .map_err(|e| Failure::Service(format!("asking the broker for offsets by time: {e}")))?;
    let elem = found
        .find_partition(&partition.topic, partition.partition)
        .ok_or_else(|| Failure::Service("the broker did not answer for the partition".into()))?;
    match elem.offset() {
        Offset::Offset(o) => Ok(o),
        // No record at or after the time: the end of the log.
        Offset::End => {
            let (_, high) = consumer
                .fetch_watermarks(&partition.topic, partition.partition, timeout)
                .map_err(|e| Failure::Service(format!("asking the broker for watermarks: {e}")))?;
            Ok(high)
        }
        other => Err(Failure::Service(format!(
            "the broker answered {other:?} for time {ms}"
        ))),
    }
}

/// `audit list`.
pub(super) async fn audit_list<S: Audited + Sync>(store: &S, limit: usize) -> Result<Doc, Failure> {
    let records = store.audit_log(limit).await?;
    let human = if records.is_empty() {
        "no audit records\n".to_owned()
    } else {
        table(
            &["when", "who", "command", "details", "counts"],
            records.iter().map(|r| {
                [
                    when(r.at_ms),
                    r.who.clone(),
                    r.command.clone(),
                    r.details.to_string(),
                    r.counts.to_string(),
                ]
            }),
        )
    };
    Ok(Doc {
        json: json!({ "records": records }),
        human,
    })
}
