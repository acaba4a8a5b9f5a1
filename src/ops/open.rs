//! Opening the store a command names, without changing it, and naming it without secrets.

use super::{Cli, Failure};
use crate::{PgOptions, PgStore, RocksStore};

/// The store a command runs on.
pub(super) enum Opened {
    Rocks(RocksStore),
    Pg(PgStore),
}

/// Opens `cli.store`: a PostgreSQL URL (`postgres://`, `postgresql://`) with the store's schema
/// checked, or a RocksDB directory (a path, or `rocksdb:<path>`), read-only unless `writes`.
pub(super) async fn open(cli: &Cli, writes: bool) -> Result<Opened, Failure> {
    // Global, so it may come after the command too; required all the same.
    let store = cli
        .store
        .as_deref()
        .map(str::trim)
        .ok_or_else(|| Failure::Input("give the store: --store (or IDC_STORE)".into()))?;
    if store.starts_with("postgres://") || store.starts_with("postgresql://") {
        let options = PgOptions {
            schema: cli.schema.clone(),
            table_prefix: cli.table_prefix.clone(),
            max_connections: 2,
            connect_timeout: std::time::Duration::from_secs(cli.connect_timeout.max(1)),
            ..PgOptions::default()
        };
        return PgStore::open_existing(store, options)
            .await
            .map(Opened::Pg)
            .map_err(|e| with_store(e, store));
    }
    if store.contains("://") {
        return Err(Failure::Input(format!(
            "unknown store {}: give a RocksDB directory or a postgres:// URL",
            redact_url(store)
        )));
    }
    let path = store.strip_prefix("rocksdb:").unwrap_or(store);
    if path.is_empty() {
        return Err(Failure::Input("--store is empty".into()));
    }
    if writes {
        RocksStore::open_existing(path, crate::RocksOptions::default())
    } else {
        RocksStore::open_read_only(path)
    }
    .map(Opened::Rocks)
    .map_err(Failure::from)
}

/// The failure, naming the store without its secrets.
fn with_store(e: crate::Error, url: &str) -> Failure {
    match Failure::from(e) {
        Failure::Input(m) => Failure::Input(format!("{}: {m}", redact_url(url))),
        Failure::Service(m) => Failure::Service(format!("{}: {m}", redact_url(url))),
    }
}

/// A store URL fit to print: the password and the query (which may hold one, or a key) are
/// replaced with `***`.
///
/// ```
/// use idempotent_consumer::ops::redact_url;
/// assert_eq!(redact_url("postgres://app:s3cret@db:5432/ledger?sslmode=require"),
///            "postgres://app:***@db:5432/ledger?***");
/// assert_eq!(redact_url("/var/lib/ledger"), "/var/lib/ledger");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, _)) => (r, "?***"),
        None => (rest, ""),
    };
    let rest = match rest.rsplit_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{credentials}@{host}"),
        },
        None => rest.to_owned(),
    };
    format!("{scheme}://{rest}{query}")
}
