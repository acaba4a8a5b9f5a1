//! `idc dead-letters redrive`: dead letters produced again, to their topic or another, once
//! each, with a loop guard, resumable after an interruption.
//!
//! Each letter goes through two marks in the store, each written with the command's audit
//! record: *pending* (with the target partition's end at that moment) before it is produced,
//! *done* (with the offset it landed at) once the broker acknowledged it. A redrive interrupted
//! between the two leaves a pending mark; the next one reads the target partition from the
//! recorded end for the record (every redriven record names its letter in the
//! `idc-redrive-of` header) and only produces it when it is not there. A letter marked done is
//! never produced again.
//!
//! The redriven record is the original one (key, payload, headers, so its idempotency key)
//! with `idc-redrive-count` (how many times it was redriven) and `idc-redrive-of`. The pending
//! mark's write also frees the key's dead-lettered entry, so the consumer handles the record
//! again; a record applied meanwhile keeps its entry and is a duplicate for the consumer. A letter whose record was
//! already redriven `--max-redrives` times is left alone unless `--force`.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

use super::Failure;
use super::output::Doc;
use crate::DeadLetter;
use crate::store::{AuditRecord, Audited, RedriveMark};

/// The header counting a record's redrives.
pub const REDRIVE_COUNT: &str = "idc-redrive-count";
/// The header naming the dead letter a redriven record came from (`group/topic/partition/offset`).
pub const REDRIVE_OF: &str = "idc-redrive-of";

/// What `dead-letters redrive` was asked.
pub(super) struct Plan<'a> {
    pub(super) group: &'a str,
    pub(super) to_topic: Option<&'a str>,
    pub(super) dry_run: bool,
    pub(super) max_redrives: u32,
    pub(super) force: bool,
    /// At most this many letters a second.
    pub(super) rate: Option<u32>,
    /// The tenant of the group's keys.
    pub(super) tenant: Option<&'a str>,
    /// No progress bar (the output is JSON).
    pub(super) quiet: bool,
    /// The filters, for the audit record.
    pub(super) filters: Value,
}

/// The counts a redrive reports (and keeps in its audit record).
#[derive(Default, Debug, serde::Serialize)]
struct Counts {
    matched: usize,
    redriven: usize,
    found_after_interruption: usize,
    already_redriven: usize,
    skipped_loop_guard: usize,
}

fn letter_id(group: &str, d: &DeadLetter) -> String {
    let r = &d.record;
    format!("{group}/{}/{}/{}", r.topic(), r.partition(), r.offset())
}

/// How many times the letter's record was redriven before.
fn redriven_before(d: &DeadLetter) -> u32 {
    d.record
        .header(REDRIVE_COUNT)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub(super) async fn redrive<S: Audited + Sync>(
    store: &S,
    letters: Vec<DeadLetter>,
    plan: Plan<'_>,
    bootstrap: Option<&str>,
    who: String,
) -> Result<Doc, Failure> {
    let group = plan.group;
    let marks: HashMap<(String, i32, i64), RedriveMark> = store
        .redrive_marks(group)
        .await?
        .into_iter()
        .map(|m| ((m.topic.clone(), m.partition, m.offset), m))
        .collect();
    let mut counts = Counts {
        matched: letters.len(),
        ..Counts::default()
    };
    let mut todo: Vec<(DeadLetter, Option<&RedriveMark>)> = Vec::new();
    for d in letters {
        let r = &d.record;
        let mark = marks.get(&(r.topic().to_owned(), r.partition(), r.offset()));
        if mark.is_some_and(|m| m.done) {
            counts.already_redriven += 1;
        } else if redriven_before(&d) >= plan.max_redrives && !plan.force {
            counts.skipped_loop_guard += 1;
        } else {
            todo.push((d, mark));
        }
    }
    if plan.dry_run {
        return Ok(report(&counts, todo.len(), None, true));
    }
    let servers = bootstrap.ok_or_else(|| {
        Failure::Input("a redrive produces to the broker: give --bootstrap".into())
    })?;
    let mut record = AuditRecord::new(
        who,
        "dead-letters redrive",
        json!({
            "group": group,
            "filters": plan.filters,
            "to_topic": plan.to_topic,
            "max_redrives": plan.max_redrives,
            "force": plan.force,
        }),
    );
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "60000")
        .create()
        .map_err(|e| Failure::Input(format!("the Kafka client refused its settings: {e}")))?;
    let reader = super::commands::client(servers, &format!("idc-redrive-{}", record.id))?;
    let timeout = Duration::from_secs(10);
    let mut partitions: HashMap<String, i32> = HashMap::new();
    let mut lower_bounds: HashMap<(String, i32), i64> = HashMap::new();
    let progress = super::change::progress(plan.quiet, Some(todo.len() as u64));
    progress.set_message("redriving dead letters");
    for (d, mark) in todo {
        progress.inc(1);
        let r = &d.record;
        let target_topic = plan.to_topic.unwrap_or(r.topic()).to_owned();
        let id = letter_id(group, &d);
        if let Some(mark) = mark
            && let Some(offset) = find(
                &reader,
                &mark.target_topic,
                mark.target_partition,
                mark.from_offset,
                &id,
            )?
        {
            // Produced by the interrupted redrive, after all: marked, not produced again.
            counts.found_after_interruption += 1;
            record.counts = serde_json::to_value(&counts).expect("counts serialize");
            let done = RedriveMark {
                done: true,
                produced_offset: Some(offset),
                audit_id: record.id.clone(),
                ..mark.clone()
            };
            store.put_redrive_mark(group, &done, &record, None).await?;
            continue;
        }
        let target_partition = match plan.to_topic {
            None => r.partition(),
            Some(_) => {
                let n = match partitions.get(&target_topic) {
                    Some(n) => *n,
                    None => {
                        let n = partition_count(&reader, &target_topic, timeout)?;
                        partitions.insert(target_topic.clone(), n);
                        n
                    }
                };
                r.partition().rem_euclid(n)
            }
        };
        // Where the search of a resumed run starts: the partition's end when this run first
        // produces to it, then just past the record it produced there last (its next record
        // lands after that one), so a letter costs no round trip of its own.
        let at = (target_topic.clone(), target_partition);
        let end = match lower_bounds.get(&at) {
            Some(end) => *end,
            None => {
                reader
                    .fetch_watermarks(&target_topic, target_partition, timeout)
                    .map_err(|e| {
                        Failure::Service(format!("asking the broker for {target_topic}: {e}"))
                    })?
                    .1
            }
        };
        let count = redriven_before(&d) + 1;
        let mut mark = RedriveMark {
            topic: r.topic().to_owned(),
            partition: r.partition(),
            offset: r.offset(),
            done: false,
            target_topic: target_topic.clone(),
            target_partition,
            from_offset: end,
            produced_offset: None,
            count,
            audit_id: record.id.clone(),
            at_ms: crate::store::now_ms(),
        };
        record.counts = serde_json::to_value(&counts).expect("counts serialize");
        // The key freed with the pending mark: the redriven record is handled again, unless it
        // was applied meanwhile.
        let free = d.key.as_deref().map(|k| {
            let key = crate::store::EntryKey::new(group, k);
            match plan.tenant {
                Some(t) => key.tenant(t),
                None => key,
            }
        });
        store
            .put_redrive_mark(group, &mark, &record, free.as_ref())
            .await?;
        let mut headers = OwnedHeaders::new();
        for h in r.headers() {
            if !h.name.starts_with("idc-redrive-") {
                headers = headers.insert(Header {
                    key: &h.name,
                    value: h.value.as_deref(),
                });
            }
        }
        let count_text = count.to_string();
        headers = headers
            .insert(Header {
                key: REDRIVE_COUNT,
                value: Some(count_text.as_bytes()),
            })
            .insert(Header {
                key: REDRIVE_OF,
                value: Some(id.as_bytes()),
            });
        let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&target_topic)
            .partition(target_partition)
            .headers(headers);
        if let Some(key) = r.key() {
            out = out.key(key);
        }
        if let Some(payload) = r.payload() {
            out = out.payload(payload);
        }
        let delivered = producer
            .send(out, Duration::from_secs(60))
            .await
            .map_err(|(e, _)| Failure::Service(format!("producing {id} to {target_topic}: {e}")))?;
        counts.redriven += 1;
        record.counts = serde_json::to_value(&counts).expect("counts serialize");
        lower_bounds.insert(at, delivered.offset + 1);
        mark.done = true;
        mark.produced_offset = Some(delivered.offset);
        store.put_redrive_mark(group, &mark, &record, None).await?;
        if let Some(rate) = plan.rate.filter(|r| *r > 0) {
            tokio::time::sleep(Duration::from_secs(1) / rate).await;
        }
    }
    progress.finish_and_clear();
    let redriven = counts.redriven + counts.found_after_interruption;
    Ok(report(&counts, redriven, Some(&record.id), false))
}

fn report(counts: &Counts, redriven: usize, audit: Option<&str>, dry_run: bool) -> Doc {
    let mut json = serde_json::to_value(counts).expect("counts serialize");
    json["dry_run"] = json!(dry_run);
    json["audit_id"] = json!(audit);
    if dry_run {
        json["would_redrive"] = json!(redriven);
    }
    let human = format!(
        "{} matched: {} {}, {} already redriven, {} left alone by the loop guard{}\n",
        counts.matched,
        redriven,
        if dry_run {
            "would be redriven"
        } else {
            "redriven"
        },
        counts.already_redriven,
        counts.skipped_loop_guard,
        audit.map_or_else(String::new, |a| format!(" (audit {a})"))
    );
    Doc { json, human }
}

fn partition_count(reader: &BaseConsumer, topic: &str, timeout: Duration) -> Result<i32, Failure> {
    let metadata = reader
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| Failure::Service(format!("asking the broker about {topic}: {e}")))?;
    let n = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    if n == 0 {
        return Err(Failure::Input(format!("topic {topic:?} does not exist")));
    }
    Ok(i32::try_from(n).unwrap_or(i32::MAX))
}

/// The offset of the record naming `id` in its `idc-redrive-of` header, read from `from` to
/// the partition's end, if there is one. The reader is left with nothing assigned: an assigned
/// partition keeps it in fetch long-polls that hold up its later watermark queries.
fn find(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    id: &str,
) -> Result<Option<i64>, Failure> {
    let found = scan(reader, topic, partition, from, id);
    reader
        .unassign()
        .map_err(|e| Failure::Service(format!("reading {topic}/{partition}: {e}")))?;
    found
}

fn scan(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    id: &str,
) -> Result<Option<i64>, Failure> {
    let timeout = Duration::from_secs(10);
    let (_, end) = reader
        .fetch_watermarks(topic, partition, timeout)
        .map_err(|e| Failure::Service(format!("asking the broker for {topic}: {e}")))?;
    if end <= from {
        return Ok(None);
    }
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition_offset(topic, partition, rdkafka::Offset::Offset(from))
        .map_err(|e| Failure::Service(e.to_string()))?;
    reader
        .assign(&list)
        .map_err(|e| Failure::Service(format!("reading {topic}/{partition}: {e}")))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut at = from;
    while at < end {
        if std::time::Instant::now() > deadline {
            return Err(Failure::Service(format!(
                "reading {topic}/{partition} from {from} to {end} took over 60 s"
            )));
        }
        let Some(message) = reader.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message =
            message.map_err(|e| Failure::Service(format!("reading {topic}/{partition}: {e}")))?;
        at = message.offset() + 1;
        let names_it = message.headers().is_some_and(|hs| {
            hs.iter()
                .any(|h| h.key == REDRIVE_OF && h.value == Some(id.as_bytes()))
        });
        if names_it {
            return Ok(Some(message.offset()));
        }
    }
    Ok(None)
}
