//! What a command prints: one JSON document, or tables for people.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};

/// A command's answer: the JSON document (`--json`) and the same for people.
pub(super) struct Doc {
    pub(super) json: Value,
    pub(super) human: String,
}

/// A table with `headers` and `rows`.
pub(super) fn table<R: IntoIterator<Item = String>>(
    headers: &[&str],
    rows: impl IntoIterator<Item = R>,
) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    t.set_header(headers.iter().copied());
    for row in rows {
        t.add_row(row);
    }
    format!("{t}\n")
}

/// Fields of one thing, a row each.
pub(super) fn fields<'a>(rows: impl IntoIterator<Item = (&'a str, String)>) -> String {
    table(
        &["field", "value"],
        rows.into_iter().map(|(k, v)| [k.to_owned(), v]),
    )
}

/// A time in milliseconds since the Unix epoch, as RFC 3339 (UTC), or the number when it is
/// outside what a date can show.
pub(super) fn when(ms: i64) -> String {
    u64::try_from(ms)
        .ok()
        .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
        .filter(|_| ms < 253_402_300_800_000) // year 10000
        .map_or_else(
            || format!("{ms} ms"),
            |t| humantime::format_rfc3339_millis(t).to_string(),
        )
}

/// Bytes as JSON: their UTF-8 text when they are text, always their hex, and their length.
pub(super) fn bytes(b: &[u8]) -> Value {
    json!({
        "utf8": std::str::from_utf8(b).ok(),
        "hex": hex(b),
        "len": b.len(),
    })
}

/// Bytes for people: the text when they are printable UTF-8, else hex.
pub(super) use crate::hex::shown;

pub(super) use crate::hex::hex;

/// At most `n` characters of `s`, with an ellipsis when cut.
pub(super) fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(n).collect();
        out.push('…');
        out
    }
}
