//! A throwaway PostgreSQL database on the server of a URL: made by [`ThrowawayDb::create`],
//! dropped (`WITH (FORCE)`) with the value. Shared by the tests, the fault harness
//! (`examples/chaos.rs`) and the benchmark (`benches/throughput.rs`), which include this file.

#![allow(dead_code, unreachable_pub)]

use sqlx::{Connection, Executor, PgConnection};

/// A database of its own; `url` connects to it.
pub struct ThrowawayDb {
    pub url: String,
    admin_url: String,
    name: String,
}

impl ThrowawayDb {
    /// Creates database `name` (made by the caller from safe characters) on the server of
    /// `admin_url` and runs `setup` in it.
    pub async fn create(admin_url: &str, name: &str, setup: &str) -> Result<Self, sqlx::Error> {
        let url = with_database(admin_url, name);
        let mut admin = PgConnection::connect(admin_url).await?;
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .await?;
        // From here on, dropping the value drops the database, also if the setup fails.
        let db = ThrowawayDb {
            url,
            admin_url: admin_url.to_owned(),
            name: name.to_owned(),
        };
        let mut conn = PgConnection::connect(&db.url).await?;
        conn.execute(sqlx::AssertSqlSafe(setup.to_owned())).await?;
        Ok(db)
    }
}

impl Drop for ThrowawayDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Best effort, on a thread with a runtime of its own: the owner may be unwinding, or
        // inside a runtime that cannot block.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| {
                    rt.block_on(async {
                        if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                            let _ = admin
                                .execute(sqlx::AssertSqlSafe(format!(
                                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                                )))
                                .await;
                        }
                    })
                })
        })
        .join();
    }
}

/// `url` with its database name replaced by `name` (query parameters kept).
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}
