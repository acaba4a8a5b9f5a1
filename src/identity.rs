//! Identity of a record: its idempotency key, the scope the key lives in, and the payload
//! fingerprint stored with it.
//!
//! The key is taken from the first [`KeySource`] that yields one, in the configured order (by
//! default the `idempotency-key` header). A record without a key is handled by [`MissingKey`]:
//! rejected to the dead-letter path (the default) or keyed by its topic/partition/offset, which
//! still makes redeliveries no-ops but cannot catch a producer's retry at another offset.
//!
//! Keys are always scoped by consumer group and an optional tenant: two groups consuming the same
//! topic each apply every record once. The [`Fingerprint`] (SHA-256 of the payload) stored with
//! a key turns "same key, different payload" into a detectable conflict.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::handler::panic_message;
use crate::record::Record;

/// What the tenant of the conflict scope adds to the tenant: a control character no configured
/// tenant may contain, then a word.
const CONFLICT_SUFFIX: &str = "\u{1f}conflicts";

/// Default header that carries the idempotency key.
pub const DEFAULT_KEY_HEADER: &str = "idempotency-key";

/// Default limit on a key's length in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 1024;

/// A user function deriving a key from a record; `None` means "no key here, try the next source".
pub type KeyFn = Arc<dyn Fn(&Record) -> Option<Vec<u8>> + Send + Sync>;

/// Where an idempotency key comes from.
#[derive(Clone)]
pub enum KeySource {
    /// The value of the named header.
    Header(String),
    /// The Kafka record key.
    RecordKey,
    /// A user function over the record.
    Function(KeyFn),
    /// SHA-256 of the payload: identical payloads are the same event.
    PayloadHash,
}

impl KeySource {
    fn origin(&self) -> KeyOrigin {
        match self {
            KeySource::Header(_) => KeyOrigin::Header,
            KeySource::RecordKey => KeyOrigin::RecordKey,
            KeySource::Function(_) => KeyOrigin::Function,
            KeySource::PayloadHash => KeyOrigin::PayloadHash,
        }
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Header(name) => f.debug_tuple("Header").field(name).finish(),
            KeySource::RecordKey => f.write_str("RecordKey"),
            KeySource::Function(_) => f.write_str("Function(..)"),
            KeySource::PayloadHash => f.write_str("PayloadHash"),
        }
    }
}

/// What to do with a record none of the sources gives a key for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// Send it to the dead-letter path with a clear reason (default).
    #[default]
    Reject,
    /// Use `topic/partition/offset` as the key: redeliveries are still no-ops.
    FallbackToOffset,
}

/// What to do with a key longer than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OversizeKey {
    /// Send the record to the dead-letter path (default).
    #[default]
    Reject,
    /// Replace the key by its SHA-256.
    Hash,
}

/// Which source produced a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyOrigin {
    /// A header.
    Header,
    /// The record key.
    RecordKey,
    /// The user function.
    Function,
    /// The payload hash.
    PayloadHash,
    /// The topic/partition/offset fallback.
    Offset,
}

/// An idempotency key as stored (after any hashing), with where it came from. One derived for
/// a scope ([`Identity::scoped_key_of`]) holds its store key too, in the same allocation: the
/// scope's bytes, then the key's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdempotencyKey {
    /// The scope's bytes (none for an unscoped key), then the key's.
    bytes: Vec<u8>,
    /// Where the key's own bytes start.
    start: usize,
    origin: KeyOrigin,
}

impl IdempotencyKey {
    /// An unscoped key.
    #[cfg(test)]
    fn unscoped(bytes: Vec<u8>, origin: KeyOrigin) -> Self {
        IdempotencyKey {
            bytes,
            start: 0,
            origin,
        }
    }

    /// The key bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    /// The store key of a key derived for a scope: the same bytes as [`Scope::store_key`]
    /// makes.
    pub(crate) fn store_key(&self) -> &[u8] {
        &self.bytes
    }

    /// Which source produced it.
    #[cfg_attr(not(test), allow(dead_code))] // read by the tests of the key sources
    pub(crate) fn origin(&self) -> KeyOrigin {
        self.origin
    }
}

impl fmt::Display for IdempotencyKey {
    /// Printable form for traces: UTF-8 keys as they are (cut at 64 bytes), others as hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.as_bytes();
        let shown = &bytes[..bytes.len().min(64)];
        match std::str::from_utf8(shown) {
            Ok(s) if s.chars().all(|c| !c.is_control()) => f.write_str(s)?,
            _ => write!(f, "{}", crate::hex::Hex(shown))?,
        }
        if bytes.len() > shown.len() {
            f.write_str("…")?;
        }
        Ok(())
    }
}

/// Why a record has no usable key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyError {
    /// No source produced a key and the policy is [`MissingKey::Reject`].
    Missing {
        /// The sources that were tried, for the error message.
        tried: String,
    },
    /// The key function panicked; its message.
    FunctionPanicked(String),
    /// The key is longer than the limit and the policy is [`OversizeKey::Reject`].
    Oversize {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Missing { tried } => {
                write!(f, "record has no idempotency key (tried {tried})")
            }
            KeyError::FunctionPanicked(message) => {
                write!(f, "the key function panicked: {message}")
            }
            KeyError::Oversize { len, max } => {
                write!(f, "idempotency key is {len} bytes, over the limit of {max}")
            }
        }
    }
}

/// How keys are derived and scoped. Built with [`Identity::new`] and its setters.
#[derive(Debug, Clone)]
pub struct Identity {
    sources: Vec<KeySource>,
    missing: MissingKey,
    oversize: OversizeKey,
    max_key_len: usize,
    tenant: Option<String>,
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            sources: vec![KeySource::Header(DEFAULT_KEY_HEADER.to_owned())],
            missing: MissingKey::default(),
            oversize: OversizeKey::default(),
            max_key_len: DEFAULT_MAX_KEY_LEN,
            tenant: None,
        }
    }
}

impl Identity {
    /// The default: the `idempotency-key` header, reject records without one.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the sources, tried in the given order.
    pub fn sources(mut self, sources: impl IntoIterator<Item = KeySource>) -> Self {
        self.sources = sources.into_iter().collect();
        self
    }

    /// Uses only the named header.
    pub fn header(name: impl Into<String>) -> Self {
        Self::default().sources([KeySource::Header(name.into())])
    }

    /// Sets the policy for records without a key.
    pub fn missing_key(mut self, policy: MissingKey) -> Self {
        self.missing = policy;
        self
    }

    /// Sets the policy for keys over the limit.
    pub fn oversize_key(mut self, policy: OversizeKey) -> Self {
        self.oversize = policy;
        self
    }

    /// Sets the key length limit in bytes (default 1 KiB).
    pub fn max_key_len(mut self, max: usize) -> Self {
        self.max_key_len = max;
        self
    }

    /// Scopes keys by a tenant as well as the consumer group (no control characters).
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.sources.is_empty() && self.missing == MissingKey::Reject {
            return Err(Error::Config(
                "identity has no key source and rejects records without a key: every record would be rejected".into(),
            ));
        }
        if self.max_key_len == 0 {
            return Err(Error::Config("max_key_len must be at least 1".into()));
        }
        // The conflict scope's tenant is the tenant and a suffix, and must fit too.
        let max_tenant = u16::MAX as usize - CONFLICT_SUFFIX.len();
        if self.tenant.as_ref().is_some_and(|t| t.len() > max_tenant) {
            return Err(Error::Config(format!(
                "tenant is longer than {max_tenant} bytes"
            )));
        }
        if self
            .tenant
            .as_ref()
            .is_some_and(|t| t.chars().any(char::is_control))
        {
            return Err(Error::Config(
                "tenant must not contain control characters".into(),
            ));
        }
        Ok(())
    }

    /// The most bytes a store key of `group` can take: group, tenant and key, for the longest key
    /// (a conflicting record's: the conflict scope's tenant, the key and a fingerprint).
    pub(crate) fn longest_store_key(&self, group: &str) -> usize {
        let tenant = self.tenant.as_ref().map_or(0, String::len);
        group.len() + tenant + CONFLICT_SUFFIX.len() + self.max_key_len + 32
    }

    /// The scope of records that conflicted with keys consumed by `group`.
    pub(crate) fn conflict_scope(&self, group: &str) -> Scope {
        Scope::conflicts(group, self.tenant.as_deref())
    }

    /// The scope for keys consumed by `group`.
    pub(crate) fn scope(&self, group: &str) -> Scope {
        Scope::new(group, self.tenant.as_deref())
    }

    /// Derives the idempotency key of a record.
    #[cfg(test)]
    pub(crate) fn key_of(&self, record: &Record) -> Result<IdempotencyKey, KeyError> {
        self.derive(record, &[])
    }

    /// Derives the idempotency key of a record in `scope`, store key included (one allocation
    /// for a key read from a header or the record key).
    pub(crate) fn scoped_key_of(
        &self,
        record: &Record,
        scope: &Scope,
    ) -> Result<IdempotencyKey, KeyError> {
        self.derive(record, scope.as_bytes())
    }

    fn derive(&self, record: &Record, prefix: &[u8]) -> Result<IdempotencyKey, KeyError> {
        use std::borrow::Cow;
        let mut found = None;
        for source in &self.sources {
            let candidate: Option<Cow<'_, [u8]>> = match source {
                KeySource::Header(name) => record.header(name).map(Cow::Borrowed),
                KeySource::RecordKey => record.key().map(Cow::Borrowed),
                // The user's code: a panic is this record's invalid key, not the runtime's end.
                KeySource::Function(f) => std::panic::catch_unwind(AssertUnwindSafe(|| f(record)))
                    .map_err(|panic| KeyError::FunctionPanicked(panic_message(&*panic).into()))?
                    .map(Cow::Owned),
                KeySource::PayloadHash => {
                    Some(Cow::Owned(Fingerprint::of(record.payload()).0.to_vec()))
                }
            };
            // An empty key is no key: it would make every such record the same event.
            if let Some(bytes) = candidate.filter(|b| !b.is_empty()) {
                found = Some((bytes, source.origin()));
                break;
            }
        }
        let (bytes, origin) = match (found, self.missing) {
            (Some(found), _) => found,
            (None, MissingKey::FallbackToOffset) => (
                Cow::Owned(
                    format!(
                        "{}/{}@{}",
                        record.topic(),
                        record.partition(),
                        record.offset()
                    )
                    .into_bytes(),
                ),
                KeyOrigin::Offset,
            ),
            (None, MissingKey::Reject) => {
                return Err(KeyError::Missing {
                    tried: format!("{:?}", self.sources),
                });
            }
        };
        let bytes = if bytes.len() <= self.max_key_len {
            bytes
        } else {
            match self.oversize {
                OversizeKey::Reject => {
                    return Err(KeyError::Oversize {
                        len: bytes.len(),
                        max: self.max_key_len,
                    });
                }
                OversizeKey::Hash => Cow::Owned(Sha256::digest(&bytes).to_vec()),
            }
        };
        let mut scoped = Vec::with_capacity(prefix.len() + bytes.len());
        scoped.extend_from_slice(prefix);
        scoped.extend_from_slice(&bytes);
        Ok(IdempotencyKey {
            bytes: scoped,
            start: prefix.len(),
            origin,
        })
    }
}

/// The namespace of keys: consumer group plus optional tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Scope {
    encoded: Vec<u8>,
}

impl Scope {
    /// Scope of a group and tenant.
    pub(crate) fn new(group: &str, tenant: Option<&str>) -> Self {
        let tenant = tenant.unwrap_or("");
        let mut encoded = Vec::with_capacity(4 + group.len() + tenant.len());
        push_len_prefixed(&mut encoded, group.as_bytes());
        push_len_prefixed(&mut encoded, tenant.as_bytes());
        Scope { encoded }
    }

    /// Stable, unambiguous bytes of the scope (length-prefixed group and tenant).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.encoded
    }

    /// The scope where records that conflicted with a key are remembered: the same group, and
    /// the tenant followed by a control character no configured tenant may contain.
    pub(crate) fn conflicts(group: &str, tenant: Option<&str>) -> Self {
        Scope::new(
            group,
            Some(&format!("{}{CONFLICT_SUFFIX}", tenant.unwrap_or(""))),
        )
    }

    /// The store key of the record with `fingerprint` that conflicted with `key`, in a scope
    /// made by [`Scope::conflicts`]. Unambiguous: the fingerprint has a fixed length.
    pub(crate) fn conflict_key(&self, key: &IdempotencyKey, fingerprint: &Fingerprint) -> Vec<u8> {
        let mut out = self.store_key(key);
        out.extend_from_slice(&fingerprint.0);
        out
    }

    /// The store key of `key` in this scope: scope bytes followed by the key bytes. Prefix-free,
    /// because the scope part is length-prefixed.
    pub(crate) fn store_key(&self, key: &IdempotencyKey) -> Vec<u8> {
        let key = key.as_bytes();
        let mut out = Vec::with_capacity(self.encoded.len() + key.len());
        out.extend_from_slice(&self.encoded);
        out.extend_from_slice(key);
        out
    }
}

/// The parts of a store key made by [`Scope::store_key`]: group, tenant and key bytes. `None`
/// when the bytes are not a store key.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn split_store_key(store_key: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    fn take(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
        let (len, rest) = bytes.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_be_bytes(*len));
        (rest.len() >= len).then(|| rest.split_at(len))
    }
    let (group, rest) = take(store_key)?;
    let (tenant, key) = take(rest)?;
    Some((group, tenant, key))
}

fn push_len_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths are checked at configuration time (group ids and tenants are far below 64 KiB).
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

/// SHA-256 over the payload, distinguishing a null payload from an empty one.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub(crate) [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a payload (`None` for a tombstone).
    pub fn of(payload: Option<&[u8]>) -> Self {
        let mut h = Sha256::new();
        match payload {
            None => h.update([0u8]),
            Some(p) => {
                h.update([1u8]);
                h.update(p);
            }
        }
        Fingerprint(h.finalize().into())
    }

    /// The SHA-256 digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint(")?;
        write!(f, "{}…)", crate::hex::Hex(&self.0[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec() -> Record {
        Record::new("pay", 3, 42, Some(b"rk".to_vec()), Some(b"{}".to_vec()))
    }

    #[test]
    fn header_is_the_default_source() {
        let id = Identity::new();
        let r = rec().with_header(DEFAULT_KEY_HEADER, Some(b"k-1".to_vec()));
        let key = id.key_of(&r).unwrap();
        assert_eq!(key.as_bytes(), b"k-1");
        assert_eq!(key.origin(), KeyOrigin::Header);
    }

    #[test]
    fn sources_are_tried_in_order() {
        let id = Identity::new().sources([
            KeySource::Header("h".into()),
            KeySource::Function(Arc::new(|_| None)),
            KeySource::RecordKey,
            KeySource::PayloadHash,
        ]);
        let key = id.key_of(&rec()).unwrap();
        assert_eq!(
            (key.as_bytes(), key.origin()),
            (&b"rk"[..], KeyOrigin::RecordKey)
        );
        let no_key = Record::new("pay", 0, 0, None, Some(b"x".to_vec()));
        assert_eq!(id.key_of(&no_key).unwrap().origin(), KeyOrigin::PayloadHash);
        let f = Identity::new().sources([KeySource::Function(Arc::new(|r| {
            Some(format!("fn-{}", r.offset()).into_bytes())
        }))]);
        assert_eq!(f.key_of(&rec()).unwrap().as_bytes(), b"fn-42");
    }

    #[test]
    fn a_key_derived_for_a_scope_is_the_key_and_its_store_key() {
        let r = rec().with_header(DEFAULT_KEY_HEADER, Some(b"k-1".to_vec()));
        let hashed = Identity::new()
            .max_key_len(2)
            .oversize_key(OversizeKey::Hash);
        for id in [Identity::new(), hashed] {
            let scope = Scope::new("group", Some("tenant"));
            let plain = id.key_of(&r).unwrap();
            let scoped = id.scoped_key_of(&r, &scope).unwrap();
            assert_eq!(scoped.as_bytes(), plain.as_bytes());
            assert_eq!(scoped.origin(), plain.origin());
            assert_eq!(scoped.to_string(), plain.to_string());
            assert_eq!(scoped.store_key(), scope.store_key(&plain));
            assert_eq!(scope.store_key(&scoped), scope.store_key(&plain));
        }
    }

    #[test]
    fn a_panicking_key_function_is_an_invalid_key_not_a_crash() {
        let id = Identity::new().sources([KeySource::Function(Arc::new(|r| {
            assert!(r.offset() != 42, "no key for offset {}", r.offset());
            None
        }))]);
        let err = id.key_of(&rec()).unwrap_err();
        assert_eq!(
            err,
            KeyError::FunctionPanicked("no key for offset 42".into()),
            "{err}"
        );
        assert!(err.to_string().contains("key function panicked"), "{err}");
    }

    #[test]
    fn missing_key_policies() {
        let r = rec();
        let err = Identity::new().key_of(&r).unwrap_err();
        assert!(err.to_string().contains("no idempotency key"), "{err}");
        let fb = Identity::new().missing_key(MissingKey::FallbackToOffset);
        let key = fb.key_of(&r).unwrap();
        assert_eq!(
            (key.as_bytes(), key.origin()),
            (&b"pay/3@42"[..], KeyOrigin::Offset)
        );
        let empty = rec().with_header(DEFAULT_KEY_HEADER, Some(Vec::new()));
        assert!(
            Identity::new().key_of(&empty).is_err(),
            "an empty key is no key"
        );
    }

    #[test]
    fn oversize_key_policies() {
        let r = rec().with_header(DEFAULT_KEY_HEADER, Some(vec![b'a'; 11]));
        let reject = Identity::new().max_key_len(10);
        assert_eq!(
            reject.key_of(&r).unwrap_err(),
            KeyError::Oversize { len: 11, max: 10 }
        );
        let hash = reject.clone().oversize_key(OversizeKey::Hash);
        assert_eq!(hash.key_of(&r).unwrap().as_bytes().len(), 32);
    }

    #[test]
    fn fingerprint_separates_null_empty_and_content() {
        let a = Fingerprint::of(None);
        let b = Fingerprint::of(Some(b""));
        let c = Fingerprint::of(Some(b"x"));
        assert!(a != b && b != c && a != c);
        assert_eq!(c, Fingerprint::of(Some(b"x")));
    }

    #[test]
    fn tenants_with_control_characters_are_rejected() {
        // The conflict scope appends a control character to the tenant: a configured tenant
        // holding one could name that scope.
        let err = Identity::new()
            .tenant("acme\u{1f}conflicts")
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("control characters"), "{err}");
        Identity::new().tenant("acme").validate().unwrap();
    }

    proptest! {
        // A conflicting record's key never equals a key of the records' own scope, whatever
        // group, valid tenant and key bytes (so it can never shadow or be shadowed by one).
        #[test]
        fn conflict_keys_never_meet_record_keys(
            g in ".{0,8}", t in proptest::option::of("[^\\p{Cc}]{0,8}"),
            k1 in proptest::collection::vec(any::<u8>(), 1..48),
            k2 in proptest::collection::vec(any::<u8>(), 1..48),
            t2 in proptest::option::of("[^\\p{Cc}]{0,8}"),
        ) {
            let key = |b: Vec<u8>| IdempotencyKey::unscoped(b, KeyOrigin::Header);
            let fingerprint = Fingerprint::of(Some(b"p"));
            let conflict = Scope::conflicts(&g, t.as_deref()).conflict_key(&key(k1.clone()), &fingerprint);
            // The record key that spells the same bytes after the scope: key + fingerprint.
            let spelled = [k1, fingerprint.0.to_vec()].concat();
            let record = |t: Option<&str>, k: Vec<u8>| Scope::new(&g, t).store_key(&key(k));
            prop_assert_ne!(&conflict, &record(t.as_deref(), spelled.clone()));
            prop_assert_ne!(&conflict, &record(t2.as_deref(), spelled));
            prop_assert_ne!(&conflict, &record(t2.as_deref(), k2));
        }

        // Different (group, tenant, key) triples never produce the same store key.
        #[test]
        fn store_keys_are_unambiguous(
            g1 in ".{0,8}", t1 in proptest::option::of(".{0,8}"), k1 in proptest::collection::vec(any::<u8>(), 1..8),
            g2 in ".{0,8}", t2 in proptest::option::of(".{0,8}"), k2 in proptest::collection::vec(any::<u8>(), 1..8),
        ) {
            let key = |b: Vec<u8>| IdempotencyKey::unscoped(b, KeyOrigin::Header);
            let a = Scope::new(&g1, t1.as_deref()).store_key(&key(k1.clone()));
            let b = Scope::new(&g2, t2.as_deref()).store_key(&key(k2.clone()));
            let same = g1 == g2 && t1.unwrap_or_default() == t2.unwrap_or_default() && k1 == k2;
            prop_assert_eq!(a == b, same);
        }

        // A store key splits back into exactly the group, tenant and key it was made of.
        #[test]
        fn store_keys_split_back(
            g in ".{0,8}", t in proptest::option::of(".{0,8}"), k in proptest::collection::vec(any::<u8>(), 1..8),
        ) {
            let key = IdempotencyKey::unscoped(k.clone(), KeyOrigin::Header);
            let store_key = Scope::new(&g, t.as_deref()).store_key(&key);
            let (group, tenant, bytes) = split_store_key(&store_key).unwrap();
            prop_assert_eq!(group, g.as_bytes());
            let t = t.unwrap_or_default();
            prop_assert_eq!(tenant, t.as_bytes());
            prop_assert_eq!(bytes, &k[..]);
        }
    }
}
