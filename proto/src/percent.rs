//! Percent-encoding as both binaries use it in URLs they build (query values, path segments):
//! one set of characters left as they are, RFC 3986's unreserved ones.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Everything but RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`) is escaped.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes `s` for use as one URL component (a query value or a path segment).
pub fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, NOT_UNRESERVED).to_string()
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits stays as it is, and bytes that
/// are not UTF-8 become U+FFFD.
pub fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreserved_stay_everything_else_is_escaped() {
        assert_eq!(encode_component("a=b c/d"), "a%3Db%20c%2Fd");
        assert_eq!(encode_component("Az09-._~"), "Az09-._~");
        assert_eq!(encode_component("é"), "%C3%A9");
    }

    #[test]
    fn decoding_keeps_what_is_not_an_escape() {
        assert_eq!(decode("a%3Ab%2f"), "a:b/");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode(&encode_component("x y/é")), "x y/é");
    }
}
