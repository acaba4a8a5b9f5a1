//! The `Idempotency-Key` request header: one field, a Structured Field string (RFC 9651).

use http::HeaderMap;

/// The header's name (lower case, as HTTP/2 and `http` spell it).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The longest client key accepted by default, in bytes (a UUID is 36; the draft sets no
/// limit, and public APIs accept about 255).
pub const DEFAULT_MAX_CLIENT_KEY_LEN: usize = 255;

/// The key a client sent: the string's content, without the quotes and escapes of its field.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientKey(String);

impl ClientKey {
    /// Reads the request's key. `Ok(None)` when it has none (the caller decides whether the
    /// endpoint requires one: [`KeyProblem::Missing`]).
    pub fn from_headers(headers: &HeaderMap, max_len: usize) -> Result<Option<Self>, KeyProblem> {
        let mut fields = headers.get_all(IDEMPOTENCY_KEY).iter();
        let Some(field) = fields.next() else {
            return Ok(None);
        };
        let more = fields.count();
        if more > 0 {
            return Err(KeyProblem::Repeated(more + 1));
        }
        let item: sfv::Item = sfv::Parser::new(field.as_bytes())
            .parse()
            .map_err(|e| KeyProblem::NotAString(e.to_string()))?;
        let key = match item.bare_item {
            sfv::BareItem::String(s) => s.as_str().to_owned(),
            other => {
                let kind = match other {
                    sfv::BareItem::Decimal(_) => "a decimal",
                    sfv::BareItem::Integer(_) => "an integer",
                    sfv::BareItem::ByteSequence(_) => "a byte sequence",
                    sfv::BareItem::Boolean(_) => "a boolean",
                    sfv::BareItem::Token(_) => "a token (quote it)",
                    sfv::BareItem::Date(_) => "a date",
                    _ => "a display string",
                };
                return Err(KeyProblem::NotAString(format!("it is {kind}")));
            }
        };
        if key.is_empty() {
            return Err(KeyProblem::Empty);
        }
        if key.len() > max_len {
            return Err(KeyProblem::TooLong {
                len: key.len(),
                max: max_len,
            });
        }
        Ok(Some(ClientKey(key)))
    }

    /// The key as the client sent it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are the client's data: their length is enough to debug with.
        write!(f, "ClientKey({} bytes)", self.0.len())
    }
}

/// Why a request's `Idempotency-Key` is refused (each a **400**).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyProblem {
    /// The endpoint requires a key and the request has none.
    #[error("this endpoint requires an Idempotency-Key header")]
    Missing,
    /// More than one `Idempotency-Key` field.
    #[error("the request has {0} Idempotency-Key fields; send exactly one")]
    Repeated(usize),
    /// The field is not one Structured Field string.
    #[error(
        "the Idempotency-Key is not a Structured Field string (RFC 9651) such as \
         \"8e03978e-40d5-43e8-bc93-6894a57f9324\", quotes included: {0}"
    )]
    NotAString(String),
    /// The string is empty.
    #[error("the Idempotency-Key is empty")]
    Empty,
    /// The string is longer than the limit.
    #[error("the Idempotency-Key is {len} bytes, over the limit of {max}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(fields: &[&[u8]]) -> Result<Option<ClientKey>, KeyProblem> {
        let mut headers = HeaderMap::new();
        for field in fields {
            headers.append(
                IDEMPOTENCY_KEY,
                http::HeaderValue::from_bytes(field).unwrap(),
            );
        }
        ClientKey::from_headers(&headers, 16)
    }

    #[test]
    fn a_structured_string_is_the_key() {
        let key = parse(&[b"\"8e03-40d5\""]).unwrap().unwrap();
        assert_eq!(key.as_str(), "8e03-40d5");
        // Escapes are undone; parameters (none defined by the draft) are ignored.
        let key = parse(&[b"\"a\\\"b\";v=1"]).unwrap().unwrap();
        assert_eq!(key.as_str(), "a\"b");
        assert_eq!(parse(&[]).unwrap(), None);
    }

    #[test]
    fn anything_else_is_refused_with_its_reason() {
        assert_eq!(parse(&[b"\"a\"", b"\"b\""]), Err(KeyProblem::Repeated(2)));
        assert!(matches!(
            parse(&[b"abc"]),
            Err(KeyProblem::NotAString(reason)) if reason.contains("a token")
        ));
        assert!(matches!(
            parse(&[b"\"a\", \"b\""]),
            Err(KeyProblem::NotAString(_))
        ));
        assert!(matches!(
            parse(&[b"\"open"]),
            Err(KeyProblem::NotAString(_))
        ));
        assert!(matches!(parse(&[b"42"]), Err(KeyProblem::NotAString(r)) if r.contains("integer")));
        assert_eq!(parse(&[b"\"\""]), Err(KeyProblem::Empty));
        assert_eq!(
            parse(&[b"\"0123456789abcdefX\""]),
            Err(KeyProblem::TooLong { len: 17, max: 16 })
        );
        let text = KeyProblem::NotAString("x".into()).to_string();
        assert!(text.contains("quotes included"), "{text}");
    }
}
