//! The dashboard in a real browser, on both stores: a consumer applies records, sees
//! duplicates and a conflict and keeps dead letters, an operator command is audited, and the
//! page served on 127.0.0.1 is loaded by headless Chromium. The rendered numbers (after the
//! page's script refreshed them from `api/summary`) are checked against the store and the
//! runtime's counters, a dead letter's page shows its bytes, a key with markup in it stays
//! text, and a screenshot is saved under `target/` for people.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::backend::{Backend, Postgres, Rocks};
use common::{Cluster, Incarnation, Ledger, builder, movement, unique};
use idempotent_consumer::dashboard::Dashboard;
use idempotent_consumer::{AuditRecord, Audited, Inspect, PartitionId, Stats, Store};

/// The page's key with markup in it: the browser must show it as text.
const MARKUP_KEY: &str = "<i>bad</i>";

/// A consumer of a fresh topic that applied 4 records, skipped 2 duplicates, and kept 3 dead
/// letters (a conflict, 2 undecodable records); it keeps running, its counters live.
struct Seeded {
    cluster: Cluster,
    topic: String,
    group: String,
    consumer: Incarnation,
}

fn seed<S: Store<Tx: common::LedgerTx>>(open: &dyn Fn(&tokio::runtime::Runtime) -> S) -> Seeded {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(2);
    let group = unique("group");
    cluster.send_keyed(
        &topic,
        0,
        [
            ("pay-1".to_owned(), movement("alice", 10)),
            ("pay-2".to_owned(), movement("bob", 5)),
            ("pay-1".to_owned(), movement("alice", 10)),
            ("pay-2".to_owned(), movement("bob", 7)),
            ("pay-3".to_owned(), movement("alice", -3)),
        ],
    );
    cluster.send_keyed(
        &topic,
        1,
        [
            ("pay-4".to_owned(), movement("carol", 1)),
            ("bad-1".to_owned(), b"{not json".to_vec()),
            ("pay-4".to_owned(), movement("carol", 1)),
            (MARKUP_KEY.to_owned(), b"\xff\x00binary".to_vec()),
        ],
    );
    let consumer = Incarnation::launch_with(open, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    consumer.wait_for("everything settled", |s| s.settled() == 9);
    consumer.caught_up();
    Seeded {
        cluster,
        topic,
        group,
        consumer,
    }
}

/// The dashboard served on 127.0.0.1 by a thread of its own, until the value is dropped.
struct Served {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve<S, F>(open: F, group: &str, stats: Arc<Stats>, bootstrap: &str) -> Served
where
    S: Inspect + Audited + Clone + Send + Sync + 'static,
    F: FnOnce(&tokio::runtime::Runtime) -> S + Send + 'static,
{
    let (group, bootstrap) = (group.to_owned(), bootstrap.to_owned());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = open(&rt);
        rt.block_on(async move {
            let router = Dashboard::new(store, group)
                .unwrap()
                .stats(stats)
                .bootstrap(bootstrap)
                .refresh(Duration::from_millis(500))
                .router()
                .unwrap();
            // Nested under a prefix, as a service mounts it beside its own routes: the page is
            // at `/ops`, its links under `/ops/`.
            let app = axum::Router::new().nest("/ops", router);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
    });
    let addr = addr_rx.recv().unwrap();
    Served {
        url: format!("http://{addr}/ops"),
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// Debian's Chromium, or the one `CHROMIUM` names; the README's test command installs it.
fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "no browser at {}: the README's test command installs Debian's chromium \
         (apt-get install chromium), or set CHROMIUM",
        path.display()
    );
    path
}

/// Runs headless Chromium on `url` for five seconds of the page's own time (its script
/// refreshes ten times), with `args`; returns its standard output.
fn browse(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("running chromium");
    assert!(
        out.status.success(),
        "chromium on {url}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("the DOM is UTF-8")
}

/// The text of the element with `id` in a DOM dump.
fn text_of(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element {id:?} in the page:\n{dom}"));
    let start = at + dom[at..].find('>').unwrap() + 1;
    let end = start + dom[start..].find('<').unwrap();
    dom[start..end].to_owned()
}

/// The value of attribute `name` on the page's body.
fn body_attribute(dom: &str, name: &str) -> String {
    let body = &dom[dom.find("<body").expect("a body")..];
    let at = body
        .find(&format!("{name}=\""))
        .unwrap_or_else(|| panic!("no {name} on the body: {}", &body[..body.len().min(600)]));
    let start = at + name.len() + 2;
    body[start..start + body[start..].find('"').unwrap()].to_owned()
}

fn screenshot_path(store: &str) -> PathBuf {
    // target/tmp, made by cargo for integration tests; the screenshot goes beside it.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join(format!("dashboard-{store}.png"))
}

fn the_page_shows_what_the_store_and_the_counters_say<B: Backend<S: Audited + Sync>>(
    _b: B,
    name: &str,
    open: impl Fn(&tokio::runtime::Runtime) -> B::S + Send + Clone + 'static,
) {
    let s = seed(&open);
    let store_now = |f: &dyn Fn(&B::S)| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        f(&open(&rt));
    };
    // An operator command on the group, audited.
    let record = AuditRecord::new(
        "ops-test",
        "entries purge",
        serde_json::json!({ "group": s.group }),
    );
    let audit_id = record.id.clone();
    store_now(&|store| {
        common::backend::block_on(store.purge_expired_audited(
            &s.group,
            0,
            10,
            &record,
            &|n| serde_json::json!({ "purged": n }),
        ))
        .unwrap();
    });

    let stats = s.consumer.stats.clone();
    let counted = stats.snapshot();
    assert_eq!(
        (
            counted.applied,
            counted.duplicates(),
            counted.conflicts,
            counted.dead_lettered
        ),
        (4, 2, 1, 3),
        "{counted:?}"
    );
    let served = serve(open.clone(), &s.group, stats, s.cluster.bootstrap());

    // What the script fetches: the store's numbers, as JSON.
    let summary: serde_json::Value = common::backend::block_on(async {
        reqwest::get(format!("{}/api/summary", served.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(summary["group"], s.group.as_str());
    assert_eq!(summary["dead_letters"]["total"], 3, "{summary}");
    // The page as the server renders it, before any script: whole, and the key with markup
    // in it escaped (the script, once it runs, sets text only).
    let html = common::backend::block_on(async {
        let response = reqwest::get(&served.url).await.unwrap();
        let csp = response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(csp.contains("script-src 'self'"), "{csp}");
        response.text().await.unwrap()
    });
    assert_eq!(text_of(&html, "applied"), "4");
    assert_eq!(text_of(&html, "reason-permanent"), "2");
    assert!(html.contains("&lt;i&gt;bad&lt;/i&gt;"), "the key escaped");
    assert!(!html.contains(MARKUP_KEY), "no markup from the store");

    // The page, after its script refreshed it from the summary.
    let dom = browse(&served.url, &["--dump-dom"]);
    let polls: u32 = body_attribute(&dom, "data-polls").parse().unwrap();
    assert!(polls >= 2, "the script refreshed the page {polls} times");
    assert_eq!(
        body_attribute(&dom, "data-charts"),
        "2",
        "both charts drawn"
    );
    assert_eq!(text_of(&dom, "group"), s.group);
    assert_eq!(text_of(&dom, "applied"), "4");
    assert_eq!(text_of(&dom, "duplicates"), "2");
    assert_eq!(text_of(&dom, "duplicate-rate"), "22.2 %"); // 2 of the 9 settled
    assert_eq!(text_of(&dom, "conflicts"), "1");
    assert_eq!(text_of(&dom, "conflict-rate"), "11.1 %");
    assert_eq!(text_of(&dom, "dead-letters-total"), "3");
    assert_eq!(text_of(&dom, "reason-permanent"), "2");
    assert_eq!(text_of(&dom, "reason-conflict"), "1");
    assert_eq!(text_of(&dom, "reason-retries_exhausted"), "0");
    assert_eq!(text_of(&dom, "total-lag"), "0");
    let mut positions = Vec::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = open(&rt);
    for p in 0..2 {
        let id = PartitionId::new(&s.group, &s.topic, p);
        let stored = rt.block_on(store.position(&id)).unwrap().unwrap();
        let row = format!("{}-{p}", s.topic);
        let next = stored.next_offset.unwrap();
        assert_eq!(
            text_of(&dom, &format!("{row}-next_offset")),
            next.to_string()
        );
        assert_eq!(
            text_of(&dom, &format!("{row}-epoch")),
            stored.epoch.to_string()
        );
        assert_eq!(
            text_of(&dom, &format!("{row}-high_watermark")),
            next.to_string()
        );
        assert_eq!(text_of(&dom, &format!("{row}-lag")), "0");
        positions.push(next);
    }
    assert_eq!(positions, [5, 4]);
    assert!(
        dom.contains(&format!("id=\"audit-{audit_id}\"")),
        "the audit record is listed"
    );
    // The key with markup is text on the page, not an element.
    assert!(
        dom.contains("&lt;i&gt;bad&lt;/i&gt;"),
        "the key is shown as text"
    );
    assert!(!dom.contains(MARKUP_KEY), "no markup from the store");

    // A dead letter's own page: its bytes, its error.
    let letters = rt
        .block_on(store.dead_letters(&PartitionId::new(&s.group, &s.topic, 1)))
        .unwrap();
    let bad = letters
        .iter()
        .find(|d| d.key.as_deref() == Some(b"bad-1"))
        .unwrap();
    let link = format!("dead-letters/{}/1/{}", s.topic, bad.record.offset());
    assert!(
        dom.contains(&format!("href=\"/ops/{link}\"")),
        "a link to the letter"
    );
    let letter = browse(&format!("{}/{link}", served.url), &["--dump-dom"]);
    assert_eq!(text_of(&letter, "field-reason"), "permanent");
    assert_eq!(text_of(&letter, "field-key"), "bad-1");
    assert_eq!(text_of(&letter, "payload"), "{not json");
    assert_eq!(text_of(&letter, "field-error"), bad.message);
    let missing = browse(
        &format!("{}/dead-letters/{}/1/999", served.url, s.topic),
        &["--dump-dom"],
    );
    assert!(
        text_of(&missing, "problem").contains("no dead letter"),
        "{missing}"
    );

    // For people: what the page looks like.
    let shot = screenshot_path(name);
    let _ = std::fs::remove_file(&shot);
    browse(
        &served.url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1500",
        ],
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "a screenshot at {} ({size} bytes)",
        shot.display()
    );
    drop(served);
    s.consumer.stop().unwrap();
}

#[test]
fn rocksdb_the_page_shows_what_the_store_and_the_counters_say() {
    let b = Rocks::new();
    // The consumer's own handle, as a service shares it with its dashboard.
    let store = b.store();
    the_page_shows_what_the_store_and_the_counters_say(b, "rocksdb", move |_| store.clone());
}

#[test]
fn postgres_the_page_shows_what_the_store_and_the_counters_say() {
    let b = Postgres::new();
    let url = b.url().to_owned();
    let options = b.options.clone();
    the_page_shows_what_the_store_and_the_counters_say(b, "postgres", move |rt| {
        rt.block_on(idempotent_consumer::PgStore::connect_with(
            &url,
            options.clone(),
        ))
        .expect("connecting the store")
    });
}

/// The store's errors reach the page as a problem, not a panic; a group that cannot be one is
/// refused when the dashboard is made.
#[test]
fn bad_groups_are_refused() {
    let b = Rocks::new();
    for group in ["", "a\nb"] {
        let err = Dashboard::new(b.store(), group).unwrap_err();
        assert!(err.to_string().contains("group"), "{err}");
    }
}
