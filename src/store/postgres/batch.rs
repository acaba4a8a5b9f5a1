//! Rows a handler defers to the end of its batch: [`BatchStatement`] and [`PgTx::defer`].
//!
//! A handler that writes one row per record through [`PgTx::conn`] pays one round trip per
//! record. Deferred rows are kept in memory, column by column, and written by their statement
//! once per batch with each column bound as one array (`unnest($1::text[], $2::int8[])`), in the
//! batch's transaction, before its commit. A batch of a thousand records then costs the same few
//! round trips as a batch of one.
//!
//! What a failure does:
//! - rows deferred by a record whose handler then fails, or that is rolled back, are discarded
//!   with the record's other writes;
//! - if the batch's statement fails, nothing of the batch commits; the runtime handles the batch
//!   again with a savepoint before each record and writes each record's rows right after its
//!   handler, so the failure belongs to one record. There it counts as that record's handler
//!   error: a data or constraint error (SQLSTATE classes 22 and 23) is permanent (the record is
//!   dead-lettered), a lost connection or a deadlock is a store failure (the batch is tried
//!   again), anything else (a wrong statement, a missing table) is fatal (the runtime stops
//!   before the record).
//!
//! [`PgTx::defer`]: super::PgTx::defer
//! [`PgTx::conn`]: super::PgTx::conn

use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::postgres::{PgArguments, PgConnection, PgHasArrayType, Postgres};
use sqlx::query::Query;
use sqlx::{Encode, SqlSafeStr, SqlStr, Type};

use crate::handler::HandlerError;

/// A statement run once per batch over the rows the batch's records deferred with
/// [`PgTx::defer`](super::PgTx::defer). Its parameters are the row type's columns, in order, each
/// bound as an array: `$1` holds every row's first value, `$2` every second value, and so on.
///
/// Make it once (it is cheap to clone) and keep it in the handler; the statement is prepared on
/// each connection the first time it runs there.
///
/// ```
/// use idempotent_consumer::{BatchStatement, Handler, HandlerError, Outcome, PgTx, Record};
///
/// struct Payments {
///     insert: BatchStatement<(String, i64)>,
/// }
///
/// impl Payments {
///     fn new() -> Self {
///         Payments {
///             insert: BatchStatement::new(
///                 "INSERT INTO payments (id, amount) \
///                  SELECT * FROM unnest($1::text[], $2::int8[])",
///             ),
///         }
///     }
/// }
///
/// impl Handler<PgTx> for Payments {
///     async fn handle(&self, record: &Record, tx: &mut PgTx) -> Result<Outcome, HandlerError> {
///         let amount: i64 = record.json()?;
///         tx.defer(&self.insert, (format!("{}-{}", record.partition(), record.offset()), amount));
///         Ok(Outcome::none())
///     }
/// }
/// ```
pub struct BatchStatement<R> {
    inner: Arc<StatementInner>,
    row: PhantomData<fn(R)>,
}

struct StatementInner {
    /// Tells statements apart inside a transaction.
    id: u64,
    sql: SqlStr,
}

impl<R: BatchRow> BatchStatement<R> {
    /// A statement over rows of type `R` (a tuple of one to twelve column values). The text is
    /// SQL that is safe as it stands (a `&'static str`, or text wrapped in
    /// [`sqlx::AssertSqlSafe`] after review): values only ever travel as bound parameters.
    pub fn new(sql: impl SqlSafeStr) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        BatchStatement {
            inner: Arc::new(StatementInner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                sql: sql.into_sql_str(),
            }),
            row: PhantomData,
        }
    }

    /// The statement's text.
    pub fn sql(&self) -> &str {
        self.inner.sql.as_str()
    }

    pub(super) fn id(&self) -> u64 {
        self.inner.id
    }

    pub(super) fn rows(&self) -> Box<dyn Deferred> {
        Box::new(Rows::<R> {
            sql: self.inner.sql.clone(),
            columns: R::Columns::default(),
            len: 0,
        })
    }
}

impl<R> Clone for BatchStatement<R> {
    fn clone(&self) -> Self {
        BatchStatement {
            inner: self.inner.clone(),
            row: PhantomData,
        }
    }
}

impl<R> fmt::Debug for BatchStatement<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchStatement")
            .field("sql", &self.inner.sql.as_str())
            .finish()
    }
}

/// A value of one column of a deferred row: any type sqlx encodes for PostgreSQL and knows the
/// array type of (`String`, `Vec<u8>`, `i64`, `bool`, `Option` of them, and so on).
pub trait Column:
    for<'q> Encode<'q, Postgres> + Type<Postgres> + PgHasArrayType + Send + 'static
{
}

impl<T> Column for T where
    T: for<'q> Encode<'q, Postgres> + Type<Postgres> + PgHasArrayType + Send + 'static
{
}

mod sealed {
    pub trait Sealed {}
}

/// A deferred row: a tuple of one to twelve [`Column`] values. Implemented for tuples only.
pub trait BatchRow: sealed::Sealed + Send + 'static {
    #[doc(hidden)]
    type Columns: Default + Send + 'static;
    #[doc(hidden)]
    fn push_into(self, columns: &mut Self::Columns);
    #[doc(hidden)]
    fn truncate(columns: &mut Self::Columns, len: usize);
    #[doc(hidden)]
    fn bind_all<'q>(
        columns: Self::Columns,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments>;
}

macro_rules! batch_row {
    ($($t:ident $i:tt),+) => {
        impl<$($t: Column),+> sealed::Sealed for ($($t,)+) {}

        impl<$($t: Column),+> BatchRow for ($($t,)+) {
            type Columns = ($(Vec<$t>,)+);

            fn push_into(self, columns: &mut Self::Columns) {
                $(columns.$i.push(self.$i);)+
            }

            fn truncate(columns: &mut Self::Columns, len: usize) {
                $(columns.$i.truncate(len);)+
            }

            fn bind_all<'q>(
                columns: Self::Columns,
                query: Query<'q, Postgres, PgArguments>,
            ) -> Query<'q, Postgres, PgArguments> {
                $(let query = query.bind(columns.$i);)+
                query
            }
        }
    };
}

batch_row!(A 0);
batch_row!(A 0, B 1);
batch_row!(A 0, B 1, C 2);
batch_row!(A 0, B 1, C 2, D 3);
batch_row!(A 0, B 1, C 2, D 3, E 4);
batch_row!(A 0, B 1, C 2, D 3, E 4, F 5);
batch_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
batch_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
batch_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
batch_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);
batch_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10);
batch_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11);

/// The rows one statement holds in a transaction, whatever their type.
pub(super) trait Deferred: Send {
    fn len(&self) -> usize;
    fn truncate(&mut self, len: usize);
    /// The statement with every held row bound; leaves none held.
    fn take(&mut self) -> Query<'static, Postgres, PgArguments>;
    fn as_any(&mut self) -> &mut dyn Any;
}

struct Rows<R: BatchRow> {
    sql: SqlStr,
    columns: R::Columns,
    len: usize,
}

impl<R: BatchRow> Rows<R> {
    pub(super) fn push(&mut self, row: R) {
        row.push_into(&mut self.columns);
        self.len += 1;
    }
}

impl<R: BatchRow> Deferred for Rows<R> {
    fn len(&self) -> usize {
        self.len
    }

    fn truncate(&mut self, len: usize) {
        R::truncate(&mut self.columns, len);
        self.len = self.len.min(len);
    }

    fn take(&mut self) -> Query<'static, Postgres, PgArguments> {
        self.len = 0;
        R::bind_all(
            std::mem::take(&mut self.columns),
            sqlx::query(self.sql.clone()),
        )
    }

    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

/// Adds `row` to the rows of `statement` held in `deferred` (the transaction's, in order of
/// first use).
pub(super) fn push<R: BatchRow>(
    deferred: &mut Vec<(u64, Box<dyn Deferred>)>,
    statement: &BatchStatement<R>,
    row: R,
) {
    let id = statement.id();
    let at = match deferred.iter().position(|(i, _)| *i == id) {
        Some(at) => at,
        None => {
            deferred.push((id, statement.rows()));
            deferred.len() - 1
        }
    };
    match deferred[at].1.as_any().downcast_mut::<Rows<R>>() {
        Some(rows) => rows.push(row),
        // An id belongs to one statement, and a statement to one row type.
        None => unreachable!("a batch statement's rows have the statement's row type"),
    }
}

/// Runs every statement that holds rows, in order of first use, leaving no row held. Stops at
/// the first failure (the transaction is then rolled back to a savepoint or dropped).
pub(super) async fn write_all(
    conn: &mut PgConnection,
    deferred: &mut [(u64, Box<dyn Deferred>)],
) -> Result<(), sqlx::Error> {
    for (_, rows) in deferred {
        if rows.len() > 0 {
            rows.take().execute(&mut *conn).await?;
        }
    }
    Ok(())
}

/// How a failed deferred write counts for the record that deferred it (see the module docs).
pub(super) fn record_error(e: sqlx::Error) -> HandlerError {
    let data = matches!(&e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")));
    let message = format!("writing the rows deferred to the batch: {e}");
    if data {
        HandlerError::permanent(message)
    } else {
        HandlerError::fatal(message)
    }
}
