//! A throwaway PostgreSQL database on the server of a URL: made by [`ThrowawayDb::create`],
//! dropped (`WITH (FORCE)`) with the value. The tests, the fault harness (`examples/chaos/`)
//! and the benchmark (`benches/throughput.rs`) each give every run a database of its own.

use std::fmt;

use sqlx::{Connection, Executor, PgConnection};

/// A database of its own, dropped with the value.
pub struct ThrowawayDb {
    url: String,
    admin_url: String,
    name: String,
}

impl fmt::Debug for ThrowawayDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URLs may hold a password: only the database's name is printed.
        f.debug_struct("ThrowawayDb")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ThrowawayDb {
    /// Creates database `name` on the server of `admin_url` and runs `setup` (statements without
    /// parameters) in it. The name must be 1 to 63 characters of `[a-z0-9_]`, not starting with
    /// a digit.
    pub async fn create(admin_url: &str, name: &str, setup: &str) -> Result<Self, sqlx::Error> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(sqlx::Error::Configuration(
                format!("database name {name:?} is not 1 to 63 characters of [a-z0-9_]").into(),
            ));
        }
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

    /// The URL of the database (the admin URL with its database replaced).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
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
fn with_database(url: &str, name: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_is_replaced_and_the_query_kept() {
        assert_eq!(
            with_database("postgres://u@h:5/postgres?sslmode=disable", "t1"),
            "postgres://u@h:5/t1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@h:5", "t1"),
            "postgres://u@h:5/t1"
        );
    }
}
