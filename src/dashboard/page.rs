//! The dashboard's HTML, rendered on the server from a [`Summary`] (the page is whole without
//! its script, which only refreshes it). Every value from the store is escaped.

use std::fmt::Write as _;

use super::summary::{Counters, LetterRow, PartitionRow, Summary};
use crate::dead_letter::DeadLetter;
use crate::hex::{hex, shown};

/// Text for HTML content and attribute values (quoted with `"`).
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A time as the page's script shows it too: RFC 3339 in UTC, to the second.
pub(super) fn time(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn opt(v: Option<i64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A share as the script shows it: a percentage with one decimal.
fn percent(share: f64) -> String {
    format!("{:.1} %", share * 100.0)
}

fn head(out: &mut String, base: &str, title: &str) {
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title>\
         <link rel=\"stylesheet\" href=\"{base}assets/dashboard.css\">",
        title = escape(title),
        base = escape(base),
    );
}

/// The page of a group: counters, rates, partitions, dead letters, operator commands.
pub(super) fn index(s: &Summary, base: &str) -> String {
    let mut out = String::with_capacity(16 * 1024);
    head(
        &mut out,
        base,
        &format!("{} · idempotent-consumer", s.group),
    );
    let _ = write!(
        out,
        "<script src=\"{base}assets/chart.umd.min.js\" defer></script>\
         <script src=\"{base}assets/dashboard.js\" defer></script></head>\
         <body data-summary=\"{base}api/summary\" data-base=\"{base}\" data-refresh-ms=\"{refresh}\" \
         data-polls=\"0\" data-charts=\"0\">\
         <header><h1>Consumer group <span id=\"group\">{group}</span></h1>\
         <p class=\"muted\">as of <time id=\"taken-at\">{taken}</time>, refreshed every \
         {refresh_s} s <span id=\"status\"></span></p></header><main>",
        base = escape(base),
        refresh = s.refresh_ms,
        refresh_s = (s.refresh_ms as f64 / 1000.0),
        group = escape(&s.group),
        taken = time(s.taken_at_ms),
    );
    counters(&mut out, s);
    rates(&mut out, s);
    partitions(&mut out, s);
    dead_letters(&mut out, s, base);
    audit(&mut out, s);
    out.push_str("</main></body></html>\n");
    out
}

fn card(out: &mut String, id: &str, label: &str, value: &str, detail: Option<(&str, String)>) {
    let _ = write!(
        out,
        "<div class=\"card\"><div class=\"label\">{label}</div>\
         <div class=\"value\" id=\"{id}\">{value}</div>",
        value = escape(value),
    );
    if let Some((detail_id, text)) = detail {
        let _ = write!(
            out,
            "<div class=\"detail\" id=\"{detail_id}\">{}</div>",
            escape(&text)
        );
    }
    out.push_str("</div>");
}

fn counters(out: &mut String, s: &Summary) {
    out.push_str("<section class=\"cards\">");
    let c = s.counters;
    let n = |f: fn(&Counters) -> u64| c.as_ref().map_or("-".to_owned(), |c| f(c).to_string());
    card(out, "applied", "applied", &n(|c| c.applied), None);
    card(
        out,
        "duplicates",
        "duplicates",
        &n(|c| c.duplicates),
        Some((
            "duplicate-rate",
            c.map_or("-".into(), |c| percent(c.duplicate_rate)),
        )),
    );
    card(
        out,
        "conflicts",
        "conflicts",
        &n(|c| c.conflicts),
        Some((
            "conflict-rate",
            c.map_or("-".into(), |c| percent(c.conflict_rate)),
        )),
    );
    card(
        out,
        "dead-letters-total",
        "dead letters kept",
        &s.dead_letters.total.to_string(),
        None,
    );
    card(out, "total-lag", "lag", &opt(s.total_lag), None);
    out.push_str("</section>");
}

fn rates(out: &mut String, s: &Summary) {
    out.push_str("<section><h2>Records a second</h2>");
    if s.counters.is_some() {
        out.push_str(
            "<div class=\"chart\"><canvas id=\"rates-chart\" \
             aria-label=\"records a second by outcome\"></canvas></div>",
        );
    } else {
        out.push_str(
            "<p class=\"muted\" id=\"rates-missing\">The rates come from the consumer's \
             counters: serve the dashboard from the service, with <code>Dashboard::stats</code>.\
             </p>",
        );
    }
    out.push_str("</section>");
}

fn partition_row(out: &mut String, p: &PartitionRow) {
    let id = format!("{}-{}", p.topic, p.partition);
    let _ = write!(
        out,
        "<tr id=\"partition-{id}\"><td>{topic}</td><td class=\"num\">{partition}</td>",
        id = escape(&id),
        topic = escape(&p.topic),
        partition = p.partition,
    );
    for (field, value) in [
        ("next_offset", opt(p.next_offset)),
        ("epoch", p.epoch.to_string()),
        ("committed_offset", opt(p.committed_offset)),
        ("high_watermark", opt(p.high_watermark)),
        ("lag", opt(p.lag)),
    ] {
        let _ = write!(
            out,
            "<td class=\"num\" id=\"{id}-{field}\">{value}</td>",
            id = escape(&id),
        );
    }
    out.push_str("</tr>");
}

fn partitions(out: &mut String, s: &Summary) {
    out.push_str(
        "<section><h2>Partitions</h2><table id=\"partitions\"><thead><tr><th>topic</th>\
         <th>partition</th><th>store next offset</th><th>epoch</th><th>Kafka committed</th>\
         <th>high watermark</th><th>lag</th></tr></thead><tbody>",
    );
    for p in &s.partitions {
        partition_row(out, p);
    }
    out.push_str("</tbody></table>");
    let none = if s.partitions.is_empty() {
        format!(
            "The store has no partition of group {} yet: its consumer has not been assigned \
             one, or the group is another.",
            s.group
        )
    } else {
        String::new()
    };
    let _ = write!(
        out,
        "<p class=\"muted\" id=\"no-partitions\">{}</p>",
        escape(&none)
    );
    let broker = match &s.broker {
        super::summary::BrokerState::NotConfigured => {
            "No broker configured: the Kafka columns stay empty.".to_owned()
        }
        super::summary::BrokerState::Answered => String::new(),
        super::summary::BrokerState::Failed(message) => format!("The broker: {message}"),
    };
    let _ = write!(
        out,
        "<p class=\"muted\" id=\"broker\">{}</p></section>",
        escape(&broker)
    );
}

fn letter_row(out: &mut String, d: &LetterRow, base: &str) {
    let _ = write!(
        out,
        "<tr><td><a href=\"{base}dead-letters/{topic}/{partition}/{offset}\">\
         {topic}/{partition}/{offset}</a></td><td>{key}</td><td>{reason}</td>\
         <td class=\"message\">{message}</td><td>{at}</td></tr>",
        base = escape(base),
        topic = escape(&d.topic),
        partition = d.partition,
        offset = d.offset,
        key = escape(d.key.as_deref().unwrap_or("-")),
        reason = d.reason,
        message = escape(&d.message),
        at = time(d.failed_at_ms),
    );
}

fn dead_letters(out: &mut String, s: &Summary, base: &str) {
    out.push_str(
        "<section><h2>Dead letters by reason</h2><div class=\"split\"><div class=\"chart small\">\
         <canvas id=\"reasons-chart\" aria-label=\"dead letters by reason\"></canvas></div>\
         <table id=\"reasons\"><tbody>",
    );
    for r in &s.dead_letters.by_reason {
        let _ = write!(
            out,
            "<tr><td>{reason}</td><td class=\"num\" id=\"reason-{reason}\">{count}</td></tr>",
            reason = r.reason,
            count = r.count,
        );
    }
    out.push_str(
        "</tbody></table></div><h3>Newest</h3><table id=\"letters\"><thead><tr><th>record</th>\
         <th>key</th><th>reason</th><th>error</th><th>dead-lettered</th></tr></thead><tbody>",
    );
    for d in &s.dead_letters.latest {
        letter_row(out, d, base);
    }
    out.push_str("</tbody></table></section>");
}

fn audit(out: &mut String, s: &Summary) {
    out.push_str(
        "<section><h2>Operator commands</h2><table id=\"audit\"><thead><tr><th>when</th>\
         <th>who</th><th>command</th><th>counts</th></tr></thead><tbody>",
    );
    for r in &s.audit {
        let _ = write!(
            out,
            "<tr id=\"audit-{id}\"><td>{at}</td><td>{who}</td><td>{command}</td>\
             <td class=\"message\">{counts}</td></tr>",
            id = escape(&r.id),
            at = time(r.at_ms),
            who = escape(&r.who),
            command = escape(&r.command),
            counts = escape(&r.counts.to_string()),
        );
    }
    out.push_str("</tbody></table></section>");
}

/// At most this much of a payload or header value is shown.
const SHOWN_BYTES: usize = 64 * 1024;

fn bytes(b: &[u8]) -> String {
    let cut = &b[..b.len().min(SHOWN_BYTES)];
    let mut text = match std::str::from_utf8(cut) {
        Ok(s) => s.to_owned(),
        Err(_) => format!("0x{}", hex(cut)),
    };
    if b.len() > cut.len() {
        let _ = write!(text, "… ({} bytes in all)", b.len());
    }
    text
}

/// One dead letter: the record's bytes and headers, the error, the attempts.
pub(super) fn letter(group: &str, d: &DeadLetter, base: &str) -> String {
    let r = &d.record;
    let mut out = String::with_capacity(4 * 1024);
    let title = format!("{}/{}/{}", r.topic(), r.partition(), r.offset());
    head(&mut out, base, &format!("{title} · {group}"));
    let _ = write!(
        out,
        "</head><body><header><p><a href=\"{base}\">← {group}</a></p>\
         <h1>Dead letter <span id=\"record\">{title}</span></h1></header><main><section>\
         <table class=\"fields\"><tbody>",
        base = escape(base),
        group = escape(group),
        title = escape(&title),
    );
    let fields = [
        ("key", d.key.as_deref().map_or("-".to_owned(), shown)),
        ("reason", d.reason.as_str().to_owned()),
        ("error", d.message.clone()),
        ("attempts", d.attempts.to_string()),
        ("first failed", time(d.first_failed_at_ms)),
        ("dead-lettered", time(d.failed_at_ms)),
        ("batch", d.batch_id.clone().unwrap_or_else(|| "-".into())),
        ("logged", r.timestamp_ms().map_or("-".into(), time)),
    ];
    for (name, value) in fields {
        let _ = write!(
            out,
            "<tr><th>{name}</th><td id=\"field-{id}\">{value}</td></tr>",
            id = name.replace(' ', "-"),
            value = escape(&value),
        );
    }
    out.push_str(
        "</tbody></table></section><section><h2>Headers</h2><table id=\"headers\"><tbody>",
    );
    for h in r.headers() {
        let _ = write!(
            out,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(&h.name),
            escape(&h.value.as_deref().map_or("(null)".into(), bytes)),
        );
    }
    let _ = writeln!(
        out,
        "</tbody></table></section><section><h2>Payload</h2><pre id=\"payload\">{}</pre>\
         </section></main></body></html>",
        escape(&r.payload().map_or("(none)".into(), bytes)),
    );
    out
}

/// A short page for an error (the message has no secrets: the store's errors never carry its
/// URL or password).
pub(super) fn problem(base: &str, title: &str, message: &str) -> String {
    let mut out = String::new();
    head(&mut out, base, title);
    let _ = writeln!(
        out,
        "</head><body><header><p><a href=\"{base}\">← back</a></p><h1>{title}</h1></header>\
         <main><p id=\"problem\">{message}</p></main></body></html>",
        base = escape(base),
        title = escape(title),
        message = escape(message),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_html_would_read() {
        assert_eq!(
            escape("<script>\"a\" & 'b'</script>"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn a_group_the_store_does_not_know_says_so() {
        let s = Summary {
            group: "<g>".into(),
            taken_at_ms: 0,
            refresh_ms: 2_000,
            partitions: Vec::new(),
            total_lag: None,
            broker: super::super::summary::BrokerState::NotConfigured,
            counters: None,
            rates: Vec::new(),
            dead_letters: super::super::summary::DeadLetters {
                total: 0,
                by_reason: Vec::new(),
                latest: Vec::new(),
            },
            audit: Vec::new(),
        };
        let html = index(&s, "/");
        assert!(
            html.contains("no partition of group &lt;g&gt; yet"),
            "{html}"
        );
        assert!(
            html.contains("id=\"rates-missing\""),
            "without counters, says where they come from"
        );
    }

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(1_796_626_255_123), "2026-12-07T06:50:55Z");
    }

    #[test]
    fn long_or_binary_bytes_are_cut_and_shown_as_hex() {
        assert_eq!(bytes(b"ok"), "ok");
        assert_eq!(bytes(&[0xff, 0x00]), "0xff00");
        let long = vec![b'a'; SHOWN_BYTES + 3];
        assert!(bytes(&long).ends_with(&format!("… ({} bytes in all)", SHOWN_BYTES + 3)));
    }
}
