//! Which answers of a first run are kept for the key's replays.

use std::sync::Arc;

use http::StatusCode;

/// What becomes of the key once its first run answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The answer is stored with the handler's writes and replayed to every retry.
    Store,
    /// Nothing is stored and the key is released: a retry runs the handler again.
    Release,
}

/// Decides by status whether a first run's answer is kept. The default keeps every final
/// answer below 500 except 408 (Request Timeout), 409 (Conflict) and 429 (Too Many Requests),
/// which say "try again"; a 5xx releases the key, as does a dropped connection (nothing was
/// answered).
#[derive(Clone)]
pub struct StorePolicy(Arc<dyn Fn(StatusCode) -> Keep + Send + Sync>);

impl StorePolicy {
    /// A policy of your own.
    pub fn new(decide: impl Fn(StatusCode) -> Keep + Send + Sync + 'static) -> Self {
        StorePolicy(Arc::new(decide))
    }

    /// What becomes of the key after an answer with `status`.
    pub fn decide(&self, status: StatusCode) -> Keep {
        (self.0)(status)
    }
}

impl Default for StorePolicy {
    fn default() -> Self {
        StorePolicy::new(|status| {
            let retry_later = matches!(status.as_u16(), 408 | 409 | 429);
            if status.is_informational() || status.is_server_error() || retry_later {
                Keep::Release
            } else {
                Keep::Store
            }
        })
    }
}

impl std::fmt::Debug for StorePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorePolicy(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_default_answers_are_kept_unless_they_say_try_again() {
        let policy = StorePolicy::default();
        for kept in [200, 201, 204, 303, 400, 402, 404, 422] {
            let status = StatusCode::from_u16(kept).unwrap();
            assert_eq!(policy.decide(status), Keep::Store, "{kept}");
        }
        for released in [408, 409, 429, 500, 502, 503] {
            let status = StatusCode::from_u16(released).unwrap();
            assert_eq!(policy.decide(status), Keep::Release, "{released}");
        }
        let only_success = StorePolicy::new(|s| {
            if s.is_success() {
                Keep::Store
            } else {
                Keep::Release
            }
        });
        assert_eq!(only_success.decide(StatusCode::NOT_FOUND), Keep::Release);
    }
}
