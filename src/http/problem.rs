//! Refusals as RFC 9457 problem details (`application/problem+json`).

use axum::body::Body;
use http::{HeaderValue, Response, StatusCode, header};

use super::{KeyProblem, Mismatch};

/// The media type of a problem body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A refusal: the members RFC 9457 defines.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    /// A URI naming the kind of problem (`urn:idempotency-key:...`).
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
}

impl Problem {
    fn new(kind: &str, title: &str, status: StatusCode, detail: String) -> Self {
        Problem {
            kind: format!("urn:idempotency-key:{kind}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail,
        }
    }

    /// **400**: the key is missing or malformed.
    pub fn bad_key(problem: &KeyProblem) -> Self {
        let kind = if *problem == KeyProblem::Missing {
            "missing"
        } else {
            "malformed"
        };
        let title = if kind == "missing" {
            "Idempotency-Key missing"
        } else {
            "Idempotency-Key malformed"
        };
        Problem::new(kind, title, StatusCode::BAD_REQUEST, problem.to_string())
    }

    /// **422**: the key was first used with another request.
    pub fn reused(mismatch: Mismatch) -> Self {
        Problem::new(
            "reused",
            "Idempotency-Key reused with another request",
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "this Idempotency-Key was first used with another request: {mismatch}; use a \
                 new key for a new request"
            ),
        )
    }

    /// **409**: the first request with the key is still being handled.
    pub fn in_flight() -> Self {
        Problem::new(
            "in-flight",
            "A request with this Idempotency-Key is in progress",
            StatusCode::CONFLICT,
            "the first request with this Idempotency-Key has not finished; retry later to get \
             its answer"
                .into(),
        )
    }

    /// **409**: this request's hold on the key ran out while it was handled and another took
    /// the key over; nothing of this request was kept.
    pub fn superseded() -> Self {
        Problem::new(
            "superseded",
            "This request's hold on its Idempotency-Key expired",
            StatusCode::CONFLICT,
            "the request took longer than its lease on the Idempotency-Key and another request \
             with the key took over; nothing of this request was kept; retry to get the \
             answer that stands"
                .into(),
        )
    }

    /// **413**: the request's body is over the limit the layer buffers (it must read the whole
    /// body to fingerprint it).
    pub fn too_large(limit: usize) -> Self {
        Problem::new(
            "too-large",
            "Request body too large",
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the limit of {limit} bytes"),
        )
    }

    /// **400**: the request's body could not be read to its end.
    pub fn unreadable_body() -> Self {
        Problem::new(
            "unreadable-body",
            "Request body unreadable",
            StatusCode::BAD_REQUEST,
            "the request's body could not be read to its end".into(),
        )
    }

    /// **400**: the key's scope (the tenant the service derived from the request) is unusable.
    pub fn bad_scope(detail: String) -> Self {
        Problem::new(
            "scope",
            "Idempotency-Key scope invalid",
            StatusCode::BAD_REQUEST,
            detail,
        )
    }

    /// **503**: the store could not be reached, or a key of the handler's state stayed busy;
    /// nothing was kept, and a retry with the same key runs the request.
    pub fn unavailable() -> Self {
        Problem::new(
            "unavailable",
            "Try again",
            StatusCode::SERVICE_UNAVAILABLE,
            "the request could not be completed now; retry with the same Idempotency-Key".into(),
        )
    }

    /// **500**: the server failed; nothing of the request was kept (the detail never names
    /// the cause, which is logged).
    pub fn internal(detail: &str) -> Self {
        Problem::new(
            "internal",
            "Internal server error",
            StatusCode::INTERNAL_SERVER_ERROR,
            detail.to_owned(),
        )
    }

    /// The response: the problem as JSON, with `Retry-After: 1` on a 409 or a 503.
    pub fn to_response(&self) -> Response<Vec<u8>> {
        let body = serde_json::to_vec(self).expect("a problem serialises");
        let mut response = Response::new(body);
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if matches!(self.status, 409 | 503) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl axum::response::IntoResponse for Problem {
    fn into_response(self) -> axum::response::Response {
        self.to_response().map(Body::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_rfc_9457_bodies() {
        let response = Problem::reused(Mismatch::Body).to_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["type"], "urn:idempotency-key:reused");
        assert_eq!(body["status"], 422);
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("its body differs")
        );

        let response = Problem::in_flight().to_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");

        let missing = Problem::bad_key(&KeyProblem::Missing);
        assert_eq!(
            (missing.status, missing.kind.as_str()),
            (400, "urn:idempotency-key:missing")
        );
        let long = Problem::bad_key(&KeyProblem::TooLong { len: 300, max: 255 });
        assert!(long.detail.contains("300 bytes"), "{}", long.detail);
    }
}
