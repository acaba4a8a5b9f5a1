//! Where a request's key lives in the store: the namespace (the service's name, as a consumer
//! group scopes its keys), the tenant or principal, the method and the route template, then the
//! client's key. Request keys never meet a consumer's keys of the same namespace and tenant:
//! their tenant part ends in a control character no configured tenant may contain.

use http::Method;

use super::ClientKey;
use crate::error::{Error, Result};
use crate::identity::Scope;

/// What the tenant part of a request key's scope adds to the tenant.
const REQUEST_SUFFIX: &str = "\u{1f}requests";

/// The scope of a request's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestScope<'a> {
    /// The service's name (keys of other services in one store stay apart).
    pub namespace: &'a str,
    /// The tenant or principal the request acts for (an authenticated user id), if keys are
    /// scoped by one.
    pub tenant: Option<&'a str>,
    /// The request's method.
    pub method: &'a Method,
    /// The route template (`/payments/{id}`), not the path: one key names one operation.
    pub route: &'a str,
}

impl RequestScope<'_> {
    /// The store key of `key` in this scope (what [`RequestStore`](crate::RequestStore)'s
    /// methods take). Refuses an empty namespace and control characters in it or the tenant.
    pub fn store_key(&self, key: &ClientKey) -> Result<Vec<u8>> {
        let plain = |what: &str, s: &str| {
            if s.chars().any(char::is_control) {
                Err(Error::Config(format!(
                    "the {what} of a request key must not contain control characters"
                )))
            } else if s.len() > usize::from(u16::MAX) - REQUEST_SUFFIX.len() {
                Err(Error::Config(format!(
                    "the {what} of a request key is too long"
                )))
            } else {
                Ok(())
            }
        };
        if self.namespace.is_empty() {
            return Err(Error::Config("a request key's namespace is empty".into()));
        }
        plain("namespace", self.namespace)?;
        plain("tenant", self.tenant.unwrap_or(""))?;
        let tenant = format!("{}{REQUEST_SUFFIX}", self.tenant.unwrap_or(""));
        let mut out = Scope::new(self.namespace, Some(&tenant))
            .as_bytes()
            .to_vec();
        for part in [self.method.as_str(), self.route] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out.extend_from_slice(key.as_str().as_bytes());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_key(k: &str) -> ClientKey {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            super::super::IDEMPOTENCY_KEY,
            format!("\"{k}\"").parse().unwrap(),
        );
        ClientKey::from_headers(&headers, 64).unwrap().unwrap()
    }

    #[test]
    fn every_part_of_the_scope_keeps_keys_apart() {
        let key = client_key("k1");
        let base = RequestScope {
            namespace: "payments",
            tenant: Some("acme"),
            method: &Method::POST,
            route: "/payments",
        };
        let stored = base.store_key(&key).unwrap();
        let others = [
            RequestScope {
                namespace: "ledger",
                ..base
            },
            RequestScope {
                tenant: Some("globex"),
                ..base
            },
            RequestScope {
                tenant: None,
                ..base
            },
            RequestScope {
                method: &Method::PUT,
                ..base
            },
            RequestScope {
                route: "/refunds",
                ..base
            },
        ];
        for other in others {
            assert_ne!(other.store_key(&key).unwrap(), stored, "{other:?}");
        }
        assert_ne!(base.store_key(&client_key("k2")).unwrap(), stored);
        // Never a consumer's key of the same group and tenant, whatever its bytes.
        let consumer = Scope::new("payments", Some("acme"));
        assert!(!stored.starts_with(consumer.as_bytes()));
        // The stores can split it like any scoped key.
        let (group, _, _) = crate::identity::split_store_key(&stored).unwrap();
        assert_eq!(group, b"payments");
    }

    #[test]
    fn bad_scopes_are_refused() {
        let key = client_key("k");
        let scope = |namespace, tenant| RequestScope {
            namespace,
            tenant,
            method: &Method::POST,
            route: "/p",
        };
        assert!(scope("", None).store_key(&key).is_err());
        let err = scope("svc", Some("a\u{1f}b")).store_key(&key).unwrap_err();
        assert!(err.to_string().contains("control characters"), "{err}");
    }
}
