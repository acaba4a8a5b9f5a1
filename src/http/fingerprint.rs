//! What makes two requests with one key "the same request": the target and the body, each
//! hashed (SHA-256) apart, so a refusal can name what differs.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// How a request's body takes part in its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BodyFingerprint {
    /// Its bytes, exactly (the default).
    #[default]
    Bytes,
    /// Its JSON, canonicalised (object members sorted by name, no insignificant whitespace), so
    /// a client that serialises the same document again is not refused. Numbers are compared
    /// as written (`1` and `1.0` differ). A body that is not JSON is taken as bytes.
    Json,
    /// Only these members of its JSON, as RFC 6901 pointers (`/amount`, `/payee/iban`): a retry
    /// that changes anything else (a client timestamp) is the same request. A body that is not
    /// JSON is taken as bytes.
    JsonFields(Vec<String>),
}

/// A request's fingerprint: its target (path and query) and its body.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestFingerprint {
    target: [u8; 32],
    body: [u8; 32],
}

impl std::fmt::Debug for RequestFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::hex::Hex;
        write!(
            f,
            "RequestFingerprint(target {}…, body {}…)",
            Hex(&self.target[..4]),
            Hex(&self.body[..4])
        )
    }
}

/// What differs between a request and the first request with its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// The path or query.
    Target,
    /// The body.
    Body,
    /// Both.
    TargetAndBody,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mismatch::Target => "its path or query differs from the first request's",
            Mismatch::Body => "its body differs from the first request's",
            Mismatch::TargetAndBody => {
                "its path or query and its body differ from the first request's"
            }
        })
    }
}

impl RequestFingerprint {
    /// The fingerprint of a request to `target` (path and query, as in the request line) with
    /// `body`. The method and the route are part of the key's scope, not of the fingerprint.
    pub fn of(target: &str, body: &[u8], how: &BodyFingerprint) -> Self {
        let json = || serde_json::from_slice::<Value>(body).ok();
        let body = match how {
            BodyFingerprint::Bytes => digest(b"bytes", body),
            BodyFingerprint::Json => match json() {
                Some(value) => {
                    let mut out = Vec::with_capacity(body.len());
                    canonical(&value, &mut out);
                    digest(b"json", &out)
                }
                None => digest(b"bytes", body),
            },
            BodyFingerprint::JsonFields(pointers) => match json() {
                Some(value) => {
                    let mut out = Vec::new();
                    for pointer in pointers {
                        frame(&mut out, pointer.as_bytes());
                        match value.pointer(pointer) {
                            Some(member) => {
                                let mut member_out = Vec::new();
                                canonical(member, &mut member_out);
                                out.push(1);
                                frame(&mut out, &member_out);
                            }
                            None => out.push(0),
                        }
                    }
                    digest(b"fields", &out)
                }
                None => digest(b"bytes", body),
            },
        };
        RequestFingerprint {
            target: digest(b"target", target.as_bytes()),
            body,
        }
    }

    /// What differs from `first`, the fingerprint of the first request with the key.
    pub fn mismatch(&self, first: &RequestFingerprint) -> Option<Mismatch> {
        match (self.target == first.target, self.body == first.body) {
            (true, true) => None,
            (false, true) => Some(Mismatch::Target),
            (true, false) => Some(Mismatch::Body),
            (false, false) => Some(Mismatch::TargetAndBody),
        }
    }

    /// The 64 bytes a store keeps.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.target);
        out[32..].copy_from_slice(&self.body);
        out
    }

    /// Reads what [`to_bytes`](Self::to_bytes) wrote; `None` for anything but 64 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 64] = bytes.try_into().ok()?;
        let (target, body) = bytes.split_at(32);
        Some(RequestFingerprint {
            target: target.try_into().ok()?,
            body: body.try_into().ok()?,
        })
    }
}

fn digest(domain: &[u8], data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(domain);
    h.update([0]);
    h.update(data);
    h.finalize().into()
}

fn frame(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// JSON with object members sorted by name and no whitespace.
fn canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(members) => {
            let mut sorted: Vec<_> = members.iter().collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (name, member)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(&Value::String(name.clone()), out);
                out.push(b':');
                canonical(member, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        // Scalars serialise the same way whatever the map type.
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(target: &str, body: &str, how: &BodyFingerprint) -> RequestFingerprint {
        RequestFingerprint::of(target, body.as_bytes(), how)
    }

    #[test]
    fn bytes_must_match_exactly() {
        let how = BodyFingerprint::Bytes;
        let first = fp("/payments", r#"{"a":1,"b":2}"#, &how);
        assert_eq!(
            fp("/payments", r#"{"a":1,"b":2}"#, &how).mismatch(&first),
            None
        );
        assert_eq!(
            fp("/payments", r#"{"b":2,"a":1}"#, &how).mismatch(&first),
            Some(Mismatch::Body)
        );
        assert_eq!(
            fp("/payments?x=1", r#"{"a":1,"b":2}"#, &how).mismatch(&first),
            Some(Mismatch::Target)
        );
        assert_eq!(
            fp("/other", "", &how).mismatch(&first),
            Some(Mismatch::TargetAndBody)
        );
    }

    #[test]
    fn json_is_compared_as_a_document() {
        let how = BodyFingerprint::Json;
        let first = fp("/p", r#"{"a":1,"b":{"y":[1,2],"x":"s"}}"#, &how);
        let same = fp(
            "/p",
            "{ \"b\": {\"x\": \"s\", \"y\": [1, 2]},\n \"a\": 1 }",
            &how,
        );
        assert_eq!(same.mismatch(&first), None);
        assert_eq!(
            fp("/p", r#"{"a":1,"b":{"y":[2,1],"x":"s"}}"#, &how).mismatch(&first),
            Some(Mismatch::Body)
        );
        assert_eq!(
            fp("/p", r#"{"a":1.0,"b":{"y":[1,2],"x":"s"}}"#, &how).mismatch(&first),
            Some(Mismatch::Body),
            "numbers as written"
        );
        // Not JSON: bytes, and never equal to a JSON body's fingerprint.
        assert_eq!(
            fp("/p", "{a", &how),
            fp("/p", "{a", &BodyFingerprint::Bytes)
        );
    }

    #[test]
    fn json_fields_ignore_the_rest() {
        let how = BodyFingerprint::JsonFields(vec!["/amount".into(), "/payee/iban".into()]);
        let first = fp(
            "/p",
            r#"{"amount":5,"payee":{"iban":"X"},"sent_at":1}"#,
            &how,
        );
        let retry = fp(
            "/p",
            r#"{"sent_at":2,"payee":{"iban":"X","n":"z"},"amount":5}"#,
            &how,
        );
        assert_eq!(retry.mismatch(&first), None);
        let other = fp("/p", r#"{"amount":6,"payee":{"iban":"X"}}"#, &how);
        assert_eq!(other.mismatch(&first), Some(Mismatch::Body));
        // A missing member differs from a null one.
        let missing = fp("/p", r#"{"payee":{"iban":"X"}}"#, &how);
        let null = fp("/p", r#"{"amount":null,"payee":{"iban":"X"}}"#, &how);
        assert_ne!(missing, null);
    }

    #[test]
    fn the_stored_form_reads_back() {
        let first = fp("/p", "body", &BodyFingerprint::Bytes);
        assert_eq!(
            RequestFingerprint::from_bytes(&first.to_bytes()),
            Some(first)
        );
        assert_eq!(RequestFingerprint::from_bytes(&[0; 63]), None);
    }
}
