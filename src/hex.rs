//! Bytes as lowercase hex digits: keys that are not text, ids, and digests in traces.

use std::fmt;

/// Shows its bytes as hex digits, two a byte, without allocating.
pub(crate) struct Hex<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The bytes as a string of hex digits.
pub(crate) fn hex(bytes: &[u8]) -> String {
    Hex(bytes).to_string()
}

/// Bytes as text when they are UTF-8 without control characters, else `0x` and hex digits.
#[cfg(any(feature = "cli", feature = "dashboard"))]
pub(crate) fn shown(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_owned(),
        _ => format!("0x{}", Hex(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_lowercase_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(hex(&[]), "");
        assert_eq!(format!("<{}>", Hex(b"\x01")), "<01>");
    }

    #[test]
    #[cfg(any(feature = "cli", feature = "dashboard"))]
    fn text_as_it_is_other_bytes_as_hex() {
        assert_eq!(shown(b"k-1"), "k-1");
        assert_eq!(shown(b"a\nb"), "0x610a62");
    }
}
