//! How driver errors become the crate's: transient failures (trying the batch again can cure
//! them) told apart by SQLSTATE, never by parsing messages.

use crate::error::Error;

/// Maps a driver error, marking the failures that trying again can cure.
pub(super) fn pg(context: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
    move |e| {
        if is_transient(&e) {
            Error::store_transient(context.to_owned(), e)
        } else {
            Error::store(context.to_owned(), e)
        }
    }
}

/// Connection lost or refused, server shutting down or restarting, deadlock, serialization
/// failure, lock or idle timeout: nothing committed (or, for a lost commit, possibly all of it),
/// so the batch can be tried again.
pub(super) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") // connection exception
                || code.starts_with("57P") // admin/crash shutdown, cannot connect now
                || code == "40001" // serialization failure
                || code == "40P01" // deadlock detected
                || code == "55P03" // lock not available
                || code == "25P03" // idle-in-transaction timeout
                || code == "53300" // too many connections
        }),
        _ => false,
    }
}
