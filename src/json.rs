//! JSON text shared by the stages: a string kept as the JSON literal it is written as.
//!
//! Payloads are most of every byte the connector moves (BENCHMARKS.md). They arrive as JSON
//! string literals inside statement result pages and leave as JSON string literals inside Akto
//! records, so decoding them on the way in and escaping them again on the way out is work with no
//! effect. A [`JsonString`] keeps the literal: the result page's cell goes into the record
//! verbatim, and the text is decoded only where something reads it (tool calls, redaction, a cut).
//!
//! Architecture Invariant: a `JsonString` is always a complete, valid JSON string literal that
//! decodes without error, so writing it verbatim into a JSON document is always correct.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

/// A string held as a JSON string literal, quotes included (see the module doc). Two are equal
/// when their texts are, however each was escaped.
#[derive(Clone)]
pub struct JsonString(Box<str>);

impl JsonString {
    /// The literal of `text`, escaped exactly as serde_json escapes it.
    pub fn encode(text: &str) -> JsonString {
        let mut out = String::with_capacity(text.len() + 2);
        write_json_str(&mut out, text);
        JsonString(out.into_boxed_str())
    }

    /// A literal read from a JSON document (`raw` as serde_json found it: syntax checked).
    /// `Ok(None)` when `raw` is not a string. A literal with `\u` escapes is decoded once to
    /// check it (a lone surrogate is valid JSON syntax but not a string).
    pub fn from_raw(raw: Box<RawValue>) -> Result<Option<JsonString>, serde_json::Error> {
        let literal: Box<str> = raw.into();
        if !literal.starts_with('"') {
            return Ok(None);
        }
        if has_unicode_escape(&literal) {
            serde_json::from_str::<String>(&literal)?;
        }
        Ok(Some(JsonString(literal)))
    }

    /// The literal, quotes included: what a JSON document holds.
    pub fn literal(&self) -> &str {
        &self.0
    }

    /// The bytes between the quotes: the literal's size inside a JSON document, and an upper
    /// bound of the decoded text's length (an escape is never shorter than what it stands for).
    pub fn escaped_len(&self) -> usize {
        self.0.len().saturating_sub(2)
    }

    /// The empty string.
    pub fn empty() -> JsonString {
        JsonString("\"\"".into())
    }

    /// The decoded text: borrowed when the literal has no escapes.
    pub fn text(&self) -> Cow<'_, str> {
        let inner = &self.0[1..self.0.len() - 1];
        if !inner.contains('\\') {
            return Cow::Borrowed(inner);
        }
        // The invariant makes this infallible; an empty text would be the safe answer anyway.
        Cow::Owned(serde_json::from_str::<String>(&self.0).unwrap_or_default())
    }

    /// The decoded text, owned (without escapes: the literal's own buffer, quotes dropped).
    pub fn into_text(self) -> String {
        if !self.0[1..self.0.len() - 1].contains('\\') {
            let mut s = String::from(self.0);
            s.pop();
            s.remove(0);
            return s;
        }
        self.text().into_owned()
    }

    /// The same text as serde_json escapes it (the literal itself when it already is).
    pub fn canonical(&self) -> JsonString {
        JsonString::encode(&self.text())
    }

    /// The decoded text's length in bytes (decodes only when the literal has escapes).
    pub fn text_len(&self) -> usize {
        match self.text() {
            Cow::Borrowed(s) => s.len(),
            Cow::Owned(s) => s.len(),
        }
    }

    /// The first character of the text that is not whitespace (`char::is_whitespace`), if any;
    /// without decoding the text in the common case.
    pub fn first_non_whitespace(&self) -> Option<char> {
        let inner = self.0[1..self.0.len() - 1].as_bytes();
        let mut i = 0;
        while let Some(&b) = inner.get(i) {
            match b {
                b' ' => i += 1,
                b'\\' => match inner.get(i + 1) {
                    Some(b'n' | b'r' | b't' | b'f') => i += 2,
                    Some(b'"') => return Some('"'),
                    Some(b'\\') => return Some('\\'),
                    Some(b'/') => return Some('/'),
                    Some(b'b') => return Some('\u{8}'),
                    // `\u` escapes (and anything else): decode.
                    _ => return self.text().trim_start().chars().next(),
                },
                // Other ASCII whitespace (raw control characters cannot occur in a literal).
                b if b < 0x80 && (b as char).is_whitespace() => i += 1,
                b if b < 0x80 => return Some(b as char),
                _ => return self.text().trim_start().chars().next(),
            }
        }
        None
    }

    /// Whether Akto's runtime would take this text for a possibly incomplete JSON document (see
    /// [`possibly_incomplete_json`]), looking only at the literal's first and last bytes in the
    /// common case: the text is decoded only when it starts with whitespace or an escape, or
    /// when it starts like JSON and an escape may end it.
    pub fn possibly_incomplete_json(&self) -> bool {
        let inner = &self.0.as_bytes()[1..self.0.len() - 1];
        let (Some(&first), Some(&last)) = (inner.first(), inner.last()) else {
            return false;
        };
        let close = match first {
            b'{' => b'}',
            b'[' => b']',
            // The text starts with a character that opens no JSON and that no trim removes
            // (a byte >= 0x80 starts a non-ASCII character; Java's trim keeps those).
            b if b > b' ' && b != b'\\' => return false,
            // Whitespace or an escape first: decode.
            _ => return possibly_incomplete_json(&self.text()),
        };
        // `}` and `]` never end an escape: the text ends with `close`, and nothing is trimmed.
        if last == close {
            return false;
        }
        // Every escape has its backslash within its last 6 bytes: without one there, `last` is
        // the text's own last character, which is not `close`.
        if !inner[inner.len().saturating_sub(6)..].contains(&b'\\') {
            return true;
        }
        possibly_incomplete_json(&self.text())
    }
}

/// Whether Akto's runtime drops a request body `text` as possibly incomplete JSON when the
/// request's `content-type` is `application/json` (or missing, which Akto takes for it): the
/// text starts with `{` but does not end with `}`, or starts with `[` but does not end with `]`.
/// Checked on the text as is and trimmed as Java's `String.trim` does (characters up to U+0020;
/// one Akto version trims first, another does not): either firing counts. A cut payload
/// (`{"messages":[... ...[truncated by databricks-shield: original N bytes]`) is one; so is a
/// complete document followed by a newline.
pub fn possibly_incomplete_json(text: &str) -> bool {
    fn fires(s: &str) -> bool {
        (s.starts_with('{') && !s.ends_with('}')) || (s.starts_with('[') && !s.ends_with(']'))
    }
    fires(text) || fires(text.trim_matches(|c: char| c <= ' '))
}

impl From<&str> for JsonString {
    fn from(text: &str) -> JsonString {
        JsonString::encode(text)
    }
}

impl From<String> for JsonString {
    fn from(text: String) -> JsonString {
        JsonString::encode(&text)
    }
}

impl Default for JsonString {
    fn default() -> JsonString {
        JsonString::empty()
    }
}

impl PartialEq for JsonString {
    fn eq(&self, other: &JsonString) -> bool {
        self.0 == other.0 || self.text() == other.text()
    }
}

impl Eq for JsonString {}

impl std::hash::Hash for JsonString {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text().hash(state);
    }
}

impl PartialEq<str> for JsonString {
    fn eq(&self, other: &str) -> bool {
        self.text() == other
    }
}

impl PartialEq<&str> for JsonString {
    fn eq(&self, other: &&str) -> bool {
        self.text() == *other
    }
}

impl PartialEq<String> for JsonString {
    fn eq(&self, other: &String) -> bool {
        self.text() == other.as_str()
    }
}

impl fmt::Debug for JsonString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text(), f)
    }
}

/// Serialized as its text (serde_json writes the canonical literal).
impl Serialize for JsonString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

/// Read from a JSON string; its literal is kept as it was in the document.
impl<'de> Deserialize<'de> for JsonString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(JsonString::encode(&text))
    }
}

/// Whether a literal may hold a `\u` escape (the bytes `\u`; an escaped backslash followed by
/// a `u` also counts: a false positive only costs a check).
fn has_unicode_escape(literal: &str) -> bool {
    literal.contains("\\u")
}

/// Deserializes a value that must be a JSON string literal or null, keeping the literal.
pub(crate) fn deserialize_literal<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<JsonString>, D::Error> {
    let raw = Box::<RawValue>::deserialize(d)?;
    match raw.get().as_bytes().first() {
        Some(b'n') => Ok(None),
        Some(b'"') => JsonString::from_raw(raw).map_err(de::Error::custom),
        _ => {
            // Numbers and booleans: their text, as a string.
            let text = raw.get();
            if text.starts_with('{') || text.starts_with('[') {
                return Err(de::Error::invalid_type(
                    de::Unexpected::Other("an object or array"),
                    &"a string or null",
                ));
            }
            Ok(Some(JsonString::encode(text)))
        }
    }
}

/// Appends `s` as a JSON string literal, escaped exactly as serde_json does: `\"`, `\\`,
/// `\b`, `\f`, `\n`, `\r`, `\t`, other control characters as `\u00XX`, everything else
/// (including non-ASCII) verbatim.
pub(crate) fn write_json_str(out: &mut String, s: &str) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    /// Whether any byte of `w` is `"`, `\\` or below 0x20 (exact; bytes >= 0x80 never match).
    fn needs_escape(w: u64) -> bool {
        let quote = w ^ (ONES * u64::from(b'"'));
        let backslash = w ^ (ONES * u64::from(b'\\'));
        let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v;
        let control = w.wrapping_sub(ONES * 0x20) & !w;
        (zero_byte(quote) | zero_byte(backslash) | control) & HIGHS != 0
    }
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push('"');
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            if !needs_escape(u64::from_le_bytes(word)) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let escape: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x08 => Some("\\b"),
            0x0c => Some("\\f"),
            0x00..=0x1f => None,
            _ => {
                i += 1;
                continue;
            }
        };
        // `start..i` ends before an ASCII byte: a char boundary.
        out.push_str(&s[start..i]);
        match escape {
            Some(e) => out.push_str(e),
            None => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
        i += 1;
        start = i;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read(doc: &str) -> Option<JsonString> {
        let mut d = serde_json::Deserializer::from_str(doc);
        deserialize_literal(&mut d).unwrap()
    }

    #[test]
    fn literals_are_kept_as_read_and_decode_to_their_text() {
        let s = read(r#""a\/b \u00e9 \"q\"""#).unwrap();
        assert_eq!(s.literal(), r#""a\/b \u00e9 \"q\"""#);
        assert_eq!(s.text(), "a/b é \"q\"");
        assert_eq!(s, "a/b é \"q\"");
        // Equal to the same text escaped otherwise; canonical is how serde_json writes it.
        let plain = JsonString::encode("a/b é \"q\"");
        assert_eq!(s, plain);
        assert_eq!(s.canonical().literal(), plain.literal());
        assert_eq!(read("null"), None);
        assert_eq!(read("12").unwrap(), "12");
        assert_eq!(read("true").unwrap(), "true");
    }

    #[test]
    fn invalid_literals_and_containers_are_refused() {
        for doc in [r#""\ud800""#, "{}", "[1]"] {
            let mut d = serde_json::Deserializer::from_str(doc);
            assert!(deserialize_literal(&mut d).is_err(), "{doc}");
        }
        // A surrogate pair is fine.
        assert_eq!(read(r#""\ud83d\ude00""#).unwrap(), "😀");
    }

    #[test]
    fn first_non_whitespace_sees_through_escapes() {
        for (doc, want) in [
            (r#""  {\"a\":1}""#, Some('{')),
            (r#""\n\t [1]""#, Some('[')),
            (r#""\u0020{""#, Some('{')),
            (r#""\u00a0x""#, Some('x')),
            (r#"" \"x\"""#, Some('"')),
            (r#""   ""#, None),
            (r#""""#, None),
            ("\"\u{2003}é\"", Some('é')),
        ] {
            assert_eq!(read(doc).unwrap().first_non_whitespace(), want, "{doc}");
        }
    }

    #[test]
    fn possibly_incomplete_json_is_what_akto_drops_as_such() {
        for (text, want) in [
            ("", false),
            ("{}", false),
            ("[1]", false),
            ("{\"a\":", true),
            ("[1,", true),
            ("{\"a\":1]", true),
            (
                "{\"messages\":[1 ...[truncated by databricks-shield: original 9 bytes]",
                true,
            ),
            // Akto without a trim sees a trailing newline; with a trim, a leading one.
            ("{\"a\":1}\n", true),
            ("\n {\"a\":", true),
            ("[1]\r\n", true),
            // Neither sees an incomplete document.
            ("\t[1]\r\n", false),
            ("  {}  ", false),
            ("\u{1}{\"a\"", true),
            ("hello {", false),
            ("\u{a0}{\"a\":", false),
            ("é{", false),
            ("{\"q\":\"\\\"}\"", true),
            ("{\"k\":\"}\"}", false),
        ] {
            assert_eq!(possibly_incomplete_json(text), want, "{text:?}");
            let literal = JsonString::encode(text);
            assert_eq!(literal.possibly_incomplete_json(), want, "{text:?}");
            // The same text escaped otherwise (every character as `\uXXXX`).
            let other = read(&literal_otherwise(text, &[0])).unwrap();
            assert_eq!(other.possibly_incomplete_json(), want, "{text:?} escaped");
        }
    }

    /// `s` as a literal escaped otherwise than serde_json would (as another JSON writer may):
    /// per character, by `style`, `\uXXXX` (surrogate pairs above U+FFFF), `\/` or canonical.
    fn literal_otherwise(s: &str, style: &[u8]) -> String {
        let mut out = String::from('"');
        for (i, c) in s.chars().enumerate() {
            match (
                style.get(i % style.len().max(1)).copied().unwrap_or(0) % 3,
                c,
            ) {
                (0, _) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04X}"));
                    }
                }
                (1, '/') => out.push_str("\\/"),
                _ => {
                    let one = JsonString::encode(&c.to_string());
                    out.push_str(&one.literal()[1..one.literal().len() - 1]);
                }
            }
        }
        out.push('"');
        out
    }

    proptest! {
        #[test]
        fn any_valid_literal_is_kept_verbatim_and_decodes_to_its_text(
            s in any::<String>(), style in proptest::collection::vec(any::<u8>(), 1..8),
        ) {
            let literal = literal_otherwise(&s, &style);
            let j = read(&literal).unwrap();
            prop_assert_eq!(j.literal(), literal.as_str());
            prop_assert_eq!(j.text(), s.as_str());
            prop_assert_eq!(j.text_len(), s.len());
            prop_assert!(j.text_len() <= j.escaped_len());
            prop_assert_eq!(j.first_non_whitespace(), s.trim_start().chars().next());
            prop_assert_eq!(j.clone().into_text(), s.clone());
            prop_assert_eq!(j.possibly_incomplete_json(), possibly_incomplete_json(&s));
            // Inside a document, it reads back as the same text.
            let doc = format!("{{\"p\":{}}}", j.literal());
            let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
            prop_assert_eq!(v["p"].as_str(), Some(s.as_str()));
        }

        #[test]
        fn the_first_and_last_bytes_decide_incomplete_json_as_the_text_would(
            open in prop::sample::select(vec!["", "{", "[", " {", "\n[", "\u{1}{", "\\", "\""]),
            body in any::<String>(),
            close in prop::sample::select(vec!["", "}", "]", " ", "\n", "\\", "\"", "}\n", "\u{7f}", "é"]),
            style in proptest::collection::vec(any::<u8>(), 1..8),
        ) {
            let s = format!("{open}{body}{close}");
            let want = possibly_incomplete_json(&s);
            prop_assert_eq!(JsonString::encode(&s).possibly_incomplete_json(), want);
            let other = read(&literal_otherwise(&s, &style)).unwrap();
            prop_assert_eq!(other.possibly_incomplete_json(), want);
        }

        #[test]
        fn encode_matches_serde_json_and_round_trips(s in any::<String>()) {
            let j = JsonString::encode(&s);
            prop_assert_eq!(j.literal(), serde_json::to_string(&s).unwrap());
            prop_assert_eq!(j.text(), s.as_str());
            prop_assert_eq!(j.escaped_len() + 2, j.literal().len());
            prop_assert!(j.text_len() <= j.escaped_len());
            prop_assert_eq!(j.first_non_whitespace(), s.trim_start().chars().next());
            let back = read(j.literal()).unwrap();
            prop_assert_eq!(back, j);
        }
    }
}
