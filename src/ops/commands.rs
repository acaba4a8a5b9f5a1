//! The commands, on any store that can be inspected: each reads what it needs and returns its
//! answer as JSON and as tables. None of them writes.

use std::time::Duration;

use serde_json::{Value, json};

use super::change::{self, Target};
use super::open::Opened;
use super::output::{Doc, bytes, cut, fields, shown, table, when};
use super::{
    AuditCommand, Cli, Command, DeadLettersCommand, EntitiesCommand, EntriesCommand, Failure,
    LetterFilter, PositionsCommand,
};
use crate::resolve::Entities;
use crate::store::{Audited, EntryKey, Inspect};
use crate::{DeadLetter, DeadLetterReason, PartitionId, StoredPosition};

pub(super) async fn run(store: &Opened, cli: &Cli) -> Result<Doc, Failure> {
    match store {
        Opened::Rocks(s) => run_on(s, cli).await,
        Opened::Pg(s) => run_on(s, cli).await,
    }
}

async fn run_on<S: Inspect + Entities + Audited + Sync>(
    store: &S,
    cli: &Cli,
) -> Result<Doc, Failure> {
    let who = || change::who(cli.who.as_deref());
    match &cli.command {
        Command::Entries(EntriesCommand::Purge { group, batch, .. }) => {
            known_group(store, group).await?;
            change::purge(store, group, *batch, who(), cli.json).await
        }
        Command::Positions(PositionsCommand::Rewind {
            group,
            topic,
            partition,
            to_offset,
            to_time,
            force,
        }) => {
            known_group(store, group).await?;
            let target = Target {
                offset: *to_offset,
                time_ms: *to_time,
            };
            let partition = PartitionId::new(group, topic, *partition);
            change::rewind(
                store,
                partition,
                target,
                *force,
                cli.bootstrap.as_deref(),
                who(),
            )
            .await
        }
        Command::Positions(PositionsCommand::Replay {
            group,
            topic,
            partition,
            from,
            to,
            force,
            ..
        }) => {
            known_group(store, group).await?;
            let partition = PartitionId::new(group, topic, *partition);
            let bootstrap = cli.bootstrap.as_deref();
            change::replay(store, partition, (*from, *to), *force, bootstrap, who()).await
        }
        Command::Audit(AuditCommand::List { limit }) => change::audit_list(store, *limit).await,
        Command::Entries(EntriesCommand::Get { group, key, tenant }) => {
            entry(store, group, key, tenant.as_deref()).await
        }
        Command::Entries(EntriesCommand::Count) => {
            let n = store.entry_count().await?;
            Ok(Doc {
                json: json!({ "entries": n }),
                human: format!("{n} entries\n"),
            })
        }
        Command::Positions(PositionsCommand::Show { group }) => {
            positions(store, group, cli.bootstrap.as_deref()).await
        }
        Command::DeadLetters(DeadLettersCommand::List {
            group,
            filter,
            limit,
        }) => {
            let mut letters = matching(store, group, filter).await?;
            letters.sort_by_key(|d| (d.failed_at_ms, d.record.offset()));
            let total = letters.len();
            letters.truncate(*limit);
            Ok(list(&letters, total))
        }
        Command::DeadLetters(DeadLettersCommand::Redrive {
            group,
            filter,
            to_topic,
            dry_run,
            max_redrives,
            force,
            rate,
            tenant,
        }) => {
            let letters = matching(store, group, filter).await?;
            let plan = super::redrive::Plan {
                group,
                to_topic: to_topic.as_deref(),
                dry_run: *dry_run,
                max_redrives: *max_redrives,
                force: *force,
                rate: *rate,
                tenant: tenant.as_deref(),
                quiet: cli.json,
                filters: serde_json::to_value(filter).expect("filters serialize"),
            };
            super::redrive::redrive(store, letters, plan, cli.bootstrap.as_deref(), who()).await
        }
        Command::DeadLetters(DeadLettersCommand::Show {
            group,
            topic,
            partition,
            offset,
        }) => {
            let found = letters(store, group, Some(topic.as_str()), Some(*partition), |d| {
                d.record.offset() == *offset
            })
            .await?;
            let letter = found.into_iter().next().ok_or_else(|| {
                Failure::Input(format!(
                    "group {group:?} has no dead letter at {topic}/{partition}@{offset}"
                ))
            })?;
            Ok(show(&letter))
        }
        Command::Entities(EntitiesCommand::Explain {
            group,
            entity,
            limit,
        }) => {
            known_group(store, group).await?;
            crate::resolve::check_entity(entity).map_err(Failure::Input)?;
            let why = store.explain(group, entity, *limit).await?;
            Ok(explain(entity, &why))
        }
    }
}

/// The dead letters of `group` that `filter` takes, in topic, partition and offset order.
async fn matching<S: Inspect>(
    store: &S,
    group: &str,
    filter: &LetterFilter,
) -> Result<Vec<DeadLetter>, Failure> {
    let reason = filter.reason.as_deref().map(parse_reason).transpose()?;
    let keep = |d: &DeadLetter| {
        reason.is_none_or(|r| d.reason == r)
            && filter
                .key
                .as_ref()
                .is_none_or(|k| d.key.as_deref() == Some(k.as_bytes()))
            && filter.since_ms.is_none_or(|t| d.failed_at_ms >= t)
            && filter.until_ms.is_none_or(|t| d.failed_at_ms < t)
    };
    letters(
        store,
        group,
        filter.topic.as_deref(),
        filter.partition,
        keep,
    )
    .await
}

/// The group's positions, or bad input when the store has none: a group it never saw.
async fn known_group<S: Inspect>(
    store: &S,
    group: &str,
) -> Result<Vec<(PartitionId, StoredPosition)>, Failure> {
    let positions = store.positions(group).await?;
    if positions.is_empty() {
        return Err(Failure::Input(format!(
            "unknown group {group:?}: the store has no partition of it"
        )));
    }
    Ok(positions)
}

fn parse_reason(reason: &str) -> Result<DeadLetterReason, Failure> {
    [
        DeadLetterReason::Permanent,
        DeadLetterReason::RetriesExhausted,
        DeadLetterReason::Conflict,
        DeadLetterReason::InvalidKey,
    ]
    .into_iter()
    .find(|r| r.as_str() == reason)
    .ok_or_else(|| {
        Failure::Input(format!(
            "unknown reason {reason:?}: permanent, retries_exhausted, conflict or invalid_key"
        ))
    })
}

/// The dead letters of `group`'s partitions (of `topic` and `partition` when given) that
/// `keep` keeps.
async fn letters<S: Inspect>(
    store: &S,
    group: &str,
    topic: Option<&str>,
    partition: Option<i32>,
    keep: impl Fn(&DeadLetter) -> bool,
) -> Result<Vec<DeadLetter>, Failure> {
    let mut out = Vec::new();
    for (pid, _) in known_group(store, group).await? {
        if topic.is_some_and(|t| t != pid.topic) || partition.is_some_and(|p| p != pid.partition) {
            continue;
        }
        out.extend(store.dead_letters(&pid).await?.into_iter().filter(&keep));
    }
    Ok(out)
}

async fn entry<S: Inspect + Sync>(
    store: &S,
    group: &str,
    key: &str,
    tenant: Option<&str>,
) -> Result<Doc, Failure> {
    known_group(store, group).await?;
    if key.is_empty() {
        return Err(Failure::Input("an idempotency key cannot be empty".into()));
    }
    let mut entry_key = EntryKey::new(group, key);
    if let Some(t) = tenant {
        entry_key = entry_key.tenant(t);
    }
    if let Some(limit) = store.max_key_bytes()
        && entry_key.store_key().len() > limit
    {
        return Err(Failure::Input(format!(
            "the key is {} bytes with its group and tenant, over the {limit} this store can hold",
            entry_key.store_key().len()
        )));
    }
    let found = store.entry(&entry_key).await?;
    let conflicts = letters(store, group, None, None, |d| {
        d.reason == DeadLetterReason::Conflict && d.key.as_deref() == Some(key.as_bytes())
    })
    .await?;
    let now = crate::store::now_ms();
    let entry_json = found.as_ref().map(|e| {
        json!({
            "status": e.status.as_str(),
            "fingerprint": super::output::hex(e.fingerprint.as_bytes()),
            "outcome": e.outcome.as_deref().map(bytes),
            "topic": e.topic,
            "partition": e.partition,
            "offset": e.offset,
            "created_at_ms": e.created_at_ms,
            "expires_at_ms": e.expires_at_ms,
            "expired": e.is_expired(now),
        })
    });
    let conflicts_json: Vec<Value> = conflicts
        .iter()
        .map(|d| {
            json!({
                "topic": d.record.topic(),
                "partition": d.record.partition(),
                "offset": d.record.offset(),
                "failed_at_ms": d.failed_at_ms,
                "message": d.message,
            })
        })
        .collect();
    let json = json!({
        "group": group,
        "tenant": tenant,
        "key": key,
        "found": found.is_some(),
        "entry": entry_json,
        "conflicts": conflicts_json,
    });
    let mut human = match &found {
        None => format!("no entry for key {key:?} in group {group:?}\n"),
        Some(e) => fields([
            ("status", e.status.as_str().to_owned()),
            (
                "first record",
                format!("{}/{}@{}", e.topic, e.partition, e.offset),
            ),
            ("fingerprint", super::output::hex(e.fingerprint.as_bytes())),
            (
                "outcome",
                e.outcome
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |o| cut(&shown(o), 80)),
            ),
            ("created", when(e.created_at_ms)),
            (
                "expires",
                format!(
                    "{}{}",
                    when(e.expires_at_ms),
                    if e.is_expired(now) { " (expired)" } else { "" }
                ),
            ),
        ]),
    };
    if !conflicts.is_empty() {
        human.push_str("\nconflicts (the same key with another payload):\n");
        human.push_str(&table(
            &["record", "failed", "message"],
            conflicts.iter().map(|d| {
                [
                    format!(
                        "{}/{}@{}",
                        d.record.topic(),
                        d.record.partition(),
                        d.record.offset()
                    ),
                    when(d.failed_at_ms),
                    cut(&d.message, 80),
                ]
            }),
        ));
    }
    Ok(Doc { json, human })
}

async fn positions<S: Inspect>(
    store: &S,
    group: &str,
    bootstrap: Option<&str>,
) -> Result<Doc, Failure> {
    let positions = known_group(store, group).await?;
    let broker = match bootstrap {
        Some(servers) => {
            let partitions: Vec<&PartitionId> = positions.iter().map(|(p, _)| p).collect();
            let consumer = client(servers, group)?;
            Some(crate::lag::broker_side(
                &consumer,
                &partitions,
                Duration::from_secs(10),
            )?)
        }
        None => None,
    };
    let rows: Vec<Value> = positions
        .iter()
        .enumerate()
        .map(|(i, (p, s))| {
            let b = broker.as_ref().map(|b| &b[i]);
            json!({
                "topic": p.topic,
                "partition": p.partition,
                "next_offset": s.next_offset,
                "epoch": s.epoch,
                "committed_offset": b.and_then(|b| b.committed),
                "high_watermark": b.map(|b| b.high_watermark),
                "lag": b.map(|b| b.lag(s)),
            })
        })
        .collect();
    let text = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let human = table(
        &[
            "topic",
            "partition",
            "store next offset",
            "epoch",
            "Kafka committed",
            "high watermark",
            "lag",
        ],
        rows.iter().map(|r| {
            [
                r["topic"].as_str().unwrap_or_default().to_owned(),
                text(&r["partition"]),
                text(&r["next_offset"]),
                text(&r["epoch"]),
                text(&r["committed_offset"]),
                text(&r["high_watermark"]),
                text(&r["lag"]),
            ]
        }),
    );
    Ok(Doc {
        json: json!({ "group": group, "partitions": rows }),
        human,
    })
}

/// A Kafka client of `group` that never joins it: for asking the broker.
pub(super) fn client(
    servers: &str,
    group: &str,
) -> Result<rdkafka::consumer::BaseConsumer, Failure> {
    Ok(crate::lag::client(servers, group)?)
}

fn letter_row(d: &DeadLetter) -> Value {
    json!({
        "topic": d.record.topic(),
        "partition": d.record.partition(),
        "offset": d.record.offset(),
        "key": d.key.as_deref().map(shown),
        "reason": d.reason.as_str(),
        "attempts": d.attempts,
        "first_failed_at_ms": d.first_failed_at_ms,
        "failed_at_ms": d.failed_at_ms,
        "message": d.message,
        "batch_id": d.batch_id,
    })
}

fn list(letters: &[DeadLetter], total: usize) -> Doc {
    let human = table(
        &["record", "key", "reason", "attempts", "failed", "message"],
        letters.iter().map(|d| {
            [
                format!(
                    "{}/{}@{}",
                    d.record.topic(),
                    d.record.partition(),
                    d.record.offset()
                ),
                d.key.as_deref().map_or_else(|| "-".to_owned(), shown),
                d.reason.as_str().to_owned(),
                d.attempts.to_string(),
                when(d.failed_at_ms),
                cut(&d.message, 60),
            ]
        }),
    );
    let shown_count = letters.len();
    Doc {
        json: json!({
            "matched": total,
            "dead_letters": letters.iter().map(letter_row).collect::<Vec<_>>(),
        }),
        human: format!("{human}{shown_count} of {total} matching dead letters\n"),
    }
}

fn show(d: &DeadLetter) -> Doc {
    let r = &d.record;
    let headers: Vec<Value> = r
        .headers()
        .iter()
        .map(|h| json!({ "name": h.name, "value": h.value.as_deref().map(bytes) }))
        .collect();
    let mut json = letter_row(d);
    json["record_key"] = r.key().map_or(Value::Null, bytes);
    json["payload"] = r.payload().map_or(Value::Null, bytes);
    json["timestamp_ms"] = json!(r.timestamp_ms());
    json["headers"] = Value::Array(headers);
    let mut human = fields([
        (
            "record",
            format!("{}/{}@{}", r.topic(), r.partition(), r.offset()),
        ),
        (
            "idempotency key",
            d.key.as_deref().map_or_else(|| "-".to_owned(), shown),
        ),
        ("reason", d.reason.as_str().to_owned()),
        ("message", d.message.clone()),
        ("attempts", d.attempts.to_string()),
        ("first failed", when(d.first_failed_at_ms)),
        ("failed", when(d.failed_at_ms)),
        (
            "batch",
            d.batch_id.clone().unwrap_or_else(|| "-".to_owned()),
        ),
        (
            "record key",
            r.key().map_or_else(|| "(null)".to_owned(), shown),
        ),
        (
            "payload",
            r.payload()
                .map_or_else(|| "(null)".to_owned(), |p| cut(&shown(p), 200)),
        ),
    ]);
    if !r.headers().is_empty() {
        human.push_str("\nheaders:\n");
        human.push_str(&table(
            &["name", "value"],
            r.headers().iter().map(|h| {
                [
                    h.name.clone(),
                    h.value
                        .as_deref()
                        .map_or_else(|| "(null)".to_owned(), shown),
                ]
            }),
        ));
    }
    Doc { json, human }
}

fn explain(entity: &str, why: &crate::resolve::Explanation) -> Doc {
    let json = serde_json::to_value(why).expect("an explanation serializes");
    let mut human = match &why.state {
        None => format!("entity {entity:?} has never been decided\n"),
        Some(s) => {
            let winner = s.winner.as_ref().map_or_else(
                || "none (every record refused)".to_owned(),
                |w| format!("{} at {}/{}@{}", w.key, w.topic, w.partition, w.offset),
            );
            format!(
                "{entity}: winner {winner}, after {} decisions ({} resolution records)\n",
                s.decisions, s.resolutions
            )
        }
    };
    if !why.resolutions.is_empty() {
        human.push_str(&table(
            &["#", "outcome", "record", "key", "rule", "reason"],
            why.resolutions.iter().map(|r| {
                [
                    r.seq.to_string(),
                    r.outcome.as_str().to_owned(),
                    format!(
                        "{}/{}@{}",
                        r.candidate.topic, r.candidate.partition, r.candidate.offset
                    ),
                    r.candidate.key.clone(),
                    format!("{} v{}", r.rule, r.rule_version),
                    cut(&r.reason, 80),
                ]
            }),
        ));
    }
    Doc { json, human }
}
