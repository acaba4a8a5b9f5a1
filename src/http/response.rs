//! A first run's answer as the store keeps it, and its replay.

use http::{HeaderName, HeaderValue, Response, StatusCode};

use crate::error::{Error, Result};
use crate::store::entry::{Reader, put_bytes};

/// The header that marks a replayed answer (`Idempotent-Replayed: true`).
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The headers a stored answer keeps by default; the others (`Date`, `Set-Cookie`, tracing
/// headers) belong to the first exchange alone.
pub const DEFAULT_REPLAYED_HEADERS: &[&str] = &[
    "content-type",
    "content-language",
    "location",
    "etag",
    "last-modified",
];

const VERSION: u8 = 1;

/// A stored answer: status, the allowed headers in order, the body.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredResponse {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for StoredResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The body is the client's data: its length only.
        f.debug_struct("StoredResponse")
            .field("status", &self.status)
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

impl StoredResponse {
    /// Keeps `status`, the headers of `headers` named in `allowed` (lower case) and `body`.
    pub fn capture(
        status: StatusCode,
        headers: &http::HeaderMap,
        body: Vec<u8>,
        allowed: &[&str],
    ) -> Self {
        let headers = headers
            .iter()
            .filter(|(name, _)| allowed.contains(&name.as_str()))
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect();
        StoredResponse {
            status: status.as_u16(),
            headers,
            body,
        }
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The kept headers, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The answer to a retry: the same status, headers and body, and `Idempotent-Replayed:
    /// true`.
    pub fn replay(&self) -> Response<Vec<u8>> {
        let mut response = Response::new(self.body.clone());
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        for (name, value) in &self.headers {
            // Checked when captured; a row that fails here was not written by `capture`.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                headers.append(name, value);
            }
        }
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        response
    }

    /// The bytes a store keeps.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.body.len());
        out.push(VERSION);
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&(self.headers.len() as u32).to_be_bytes());
        for (name, value) in &self.headers {
            put_bytes(&mut out, name.as_bytes());
            put_bytes(&mut out, value);
        }
        put_bytes(&mut out, &self.body);
        out
    }

    /// Reads what [`encode`](Self::encode) wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut rd = Reader::new(bytes, "stored response");
        let version = rd.u8()?;
        if version != VERSION {
            return Err(Error::Corrupt(format!(
                "stored response version {version} is not supported"
            )));
        }
        let status = u16::from_be_bytes(rd.array()?);
        let count = u32::from_be_bytes(rd.array()?);
        let mut headers = Vec::new();
        for _ in 0..count {
            let name = rd.string()?;
            headers.push((name, rd.bytes()?.to_vec()));
        }
        let body = rd.bytes()?.to_vec();
        rd.finish()?;
        Ok(StoredResponse {
            status,
            headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_replay_is_the_answer_with_its_allowed_headers_and_the_mark() {
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("location", HeaderValue::from_static("/payments/7"));
        headers.insert("set-cookie", HeaderValue::from_static("session=secret"));
        headers.append("etag", HeaderValue::from_static("\"v1\""));
        let stored = StoredResponse::capture(
            StatusCode::CREATED,
            &headers,
            b"{\"id\":7}".to_vec(),
            DEFAULT_REPLAYED_HEADERS,
        );
        let replay = StoredResponse::decode(&stored.encode()).unwrap().replay();
        assert_eq!(replay.status(), StatusCode::CREATED);
        assert_eq!(replay.headers()["location"], "/payments/7");
        assert_eq!(replay.headers()["etag"], "\"v1\"");
        assert_eq!(replay.headers()[IDEMPOTENT_REPLAYED], "true");
        assert!(replay.headers().get("set-cookie").is_none(), "not allowed");
        assert_eq!(replay.body(), b"{\"id\":7}");
        assert!(
            !format!("{stored:?}").contains("id"),
            "the body is not logged"
        );
    }

    proptest! {
        #[test]
        fn encoding_round_trips(
            status in 100u16..1000,
            headers in proptest::collection::vec(("[a-z-]{1,12}", any::<Vec<u8>>()), 0..5),
            body in any::<Vec<u8>>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let stored = StoredResponse { status, headers, body };
            let bytes = stored.encode();
            prop_assert_eq!(StoredResponse::decode(&bytes).unwrap(), stored);
            let cut = cut.index(bytes.len());
            prop_assert!(StoredResponse::decode(&bytes[..cut]).is_err());
        }
    }
}
