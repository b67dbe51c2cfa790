//! How large a record becomes once Akto's ingestion service has re-encoded it for Kafka.
//!
//! This module exists because the size that decides whether Akto keeps a record sent over HTTP
//! is not the size we send. Akto's Data Ingestion Service (`IngestionAction` ->
//! `KafkaUtils.insertData`) parses each record into an `IngestDataBatch`, copies its 22 known
//! fields into a `BasicDBObject` and produces `obj.toString()` (mongo-java-driver 4.x
//! `StrictCharacterStreamJsonWriter`) to `akto.api.logs`, asynchronously, after answering 200. A
//! record whose produced form is over the producer's `max.request.size`
//! (`AKTO_KAFKA_MAX_REQUEST_SIZE`, 5,242,880 by default in current Akto; Kafka's 1,048,576 in
//! releases without that setting) is dropped with only a log line in Akto.
//!
//! The re-encoding differs from ours (serde_json) in three ways:
//! - a fixed part: every one of the 22 fields is written (`null` when absent), with `": "` and
//!   `", "` between names and values, numbers become quoted strings, and Kafka adds its record
//!   batch framing (61 bytes of batch header, at most ~40 of record framing) to what it measures;
//!   at most [`AKTO_FIXED_OVERHEAD_BYTES`] in all;
//! - Java's writer escapes as `\uXXXX` (6 bytes per UTF-16 unit) every character of the Unicode
//!   categories control, format, surrogate, private use, unassigned, line/paragraph separator,
//!   modifier letter and the three mark categories; serde writes them raw. An emoji (4 bytes in
//!   UTF-8, a surrogate pair in Java) becomes 12 bytes, a combining mark (2-3 bytes) 6, DEL
//!   (1 byte) 6;
//! - escapes serde writes (`\"`, `\\`, `\n`, `\u0001`, ...) are written alike by Java (or
//!   shorter), so they never grow.
//!
//! [`akto_size_upper_bound`] bounds the produced size from above without a Unicode table: only
//! characters of blocks whose every character Java certainly writes raw (letters, digits,
//! punctuation and symbols assigned since Unicode 6.0 or earlier; Akto targets Java 8) count at
//! their UTF-8 length; every other non-ASCII character counts as escaped.

/// Bytes Akto's re-encoding adds to any record whatever its content: the 22 field names of
/// Akto's `BasicDBObject` as `"name": null, ` (420 bytes when all are absent; a field we send is
/// counted in our own JSON already), quotes around up to 22 values we send as numbers (44),
/// and Kafka's record batch header and record framing (61 + at most 40). 601 bytes; rounded up.
pub const AKTO_FIXED_OVERHEAD_BYTES: usize = 1024;

/// The most a record's JSON can grow per byte when Akto re-encodes it: DEL (U+007F), one byte
/// that serde writes raw and Java writes as `\u007f`.
pub const AKTO_MAX_GROWTH_FACTOR: usize = 6;

/// Non-ASCII ranges Java's JSON writer writes raw (every character in them is a letter, digit,
/// punctuation, space or non-modifier symbol, assigned by Unicode 6.0): the scripts and symbols
/// most text uses. Sorted, disjoint.
const RAW_RANGES: &[(u32, u32)] = &[
    (0x00A0, 0x00AC), // Latin-1 punctuation and symbols (U+00AD soft hyphen is a format char)
    (0x00AE, 0x024F), // Latin-1 letters, Latin Extended-A and -B
    (0x0250, 0x02AF), // IPA letters (U+02B0.. are modifier letters: escaped)
    (0x0386, 0x038A), // Greek letters
    (0x038C, 0x038C),
    (0x038E, 0x03A1),
    (0x03A3, 0x03CE),
    (0x0400, 0x0482), // Cyrillic (U+0483..U+0489 are marks)
    (0x048A, 0x04FF),
    (0x05D0, 0x05EA), // Hebrew letters
    (0x0621, 0x063A), // Arabic letters (U+0640 tatweel is a modifier letter)
    (0x0641, 0x064A),
    (0x0660, 0x0669), // Arabic-Indic digits
    (0x0905, 0x0939), // Devanagari letters (vowel signs are marks: escaped)
    (0x0958, 0x0961),
    (0x0966, 0x096F),
    (0x0E01, 0x0E30), // Thai letters (vowel and tone marks: escaped)
    (0x0E32, 0x0E33),
    (0x0E40, 0x0E45),
    (0x0E50, 0x0E59),
    (0x1E00, 0x1EFF), // Latin Extended Additional (Vietnamese)
    (0x2010, 0x2027), // dashes, quotes, bullets, ellipsis (U+2028/9 are separators)
    (0x2030, 0x205E),
    (0x20A0, 0x20B8), // currency signs
    (0x2190, 0x22FF), // arrows, mathematical operators
    (0x2500, 0x25FF), // box drawing, blocks, geometric shapes
    (0x3000, 0x3004), // CJK punctuation (U+3005 is a modifier letter)
    (0x3006, 0x3029),
    (0x3041, 0x3096), // Hiragana
    (0x309B, 0x309C),
    (0x30A0, 0x30FB), // Katakana (U+30FC..U+30FE are modifier letters)
    (0x30FF, 0x30FF),
    (0x4E00, 0x9FCB), // CJK unified ideographs
    (0xAC00, 0xD7A3), // Hangul syllables
    (0xFF01, 0xFF5E), // fullwidth ASCII forms
    (0xFF61, 0xFF6F), // halfwidth Katakana (U+FF70, U+FF9E/F are modifier letters)
    (0xFF71, 0xFF9D),
];

/// Whether Java's JSON writer certainly writes `c` (non-ASCII) raw.
fn written_raw(c: char) -> bool {
    let c = u32::from(c);
    RAW_RANGES
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// The most bytes Akto's re-encoding adds to `json` beyond its own length for its characters
/// (the fixed part, [`AKTO_FIXED_OVERHEAD_BYTES`], not included).
pub fn akto_escape_growth(json: &str) -> usize {
    let mut growth = 0usize;
    for c in json.chars() {
        if c.is_ascii() {
            if c == '\u{7f}' {
                growth += 5;
            }
        } else if !written_raw(c) {
            // `\uXXXX` per UTF-16 unit: 6 for a BMP character, 12 for a surrogate pair.
            growth += 6 * c.len_utf16() - c.len_utf8();
        }
    }
    growth
}

/// An upper bound of the bytes Akto's ingestion producer measures for `json` (one record as we
/// send it) against its `max.request.size`: our length, plus what Java's escaping may add, plus
/// [`AKTO_FIXED_OVERHEAD_BYTES`].
pub fn akto_size_upper_bound(json: &str) -> usize {
    json.len()
        .saturating_add(akto_escape_growth(json))
        .saturating_add(AKTO_FIXED_OVERHEAD_BYTES)
}

/// The limit to compare `json.len()` against so that `json` also fits `limit` once Akto
/// re-encoded it: `limit` itself when even the worst growth fits (the common case: nothing is
/// scanned), else `limit` less the growth and the fixed part (see [`akto_size_upper_bound`]),
/// but never below the length at which even the worst growth fits: a record cut to that always
/// fits, so a payload of emoji is cut further, never refused.
pub fn akto_limit_for(json: &str, limit: usize) -> usize {
    let worst = json
        .len()
        .saturating_mul(AKTO_MAX_GROWTH_FACTOR)
        .saturating_add(AKTO_FIXED_OVERHEAD_BYTES);
    if worst <= limit {
        return limit;
    }
    let always_fits = limit.saturating_sub(AKTO_FIXED_OVERHEAD_BYTES) / AKTO_MAX_GROWTH_FACTOR;
    limit
        .saturating_sub(akto_size_upper_bound(json) - json.len())
        .max(always_fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What mongo-java-driver's `StrictCharacterStreamJsonWriter` writes for a string value,
    /// for the characters these tests use, byte for byte (escape set written from its source:
    /// categories Lu Ll Lt Lo Nd Nl No Zs Pc Pd Ps Pe Pi Pf Po Sm Sc Sk So raw, the rest
    /// `\uXXXX`), given as the expected UTF-16 units escaped.
    fn java_len(s: &str, escaped: impl Fn(char) -> bool) -> usize {
        s.chars()
            .map(|c| match c {
                '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
                c if escaped(c) => 6 * c.len_utf16(),
                c => c.len_utf8(),
            })
            .sum::<usize>()
    }

    #[test]
    fn ranges_are_sorted_and_disjoint() {
        for w in RAW_RANGES.windows(2) {
            assert!(w[0].0 <= w[0].1 && w[0].1 < w[1].0, "{w:?}");
        }
    }

    #[test]
    fn plain_text_does_not_grow() {
        let text = "Hello, world! {\"a\":[1,2]} / <tag> ~ café naïve Ünïcödé ¿qué? «ok» © ±";
        assert_eq!(akto_escape_growth(text), 0);
        let cjk = "数据砖块上的代理，日本語のテキスト、한국어 텍스트。（ＡＢＣ）";
        assert_eq!(akto_escape_growth(cjk), 0);
        let more = "Привет мир — “quoted” … • € → ∑ ─ Tiếng Việt שלום مرحبا";
        assert_eq!(akto_escape_growth(more), 0);
    }

    #[test]
    fn escaped_characters_grow_as_java_writes_them() {
        // Emoji: surrogate pair, 12 bytes in Java for 4 in UTF-8.
        assert_eq!(akto_escape_growth("😀"), 8);
        // DEL and a C1 control: control characters.
        assert_eq!(akto_escape_growth("\u{7f}"), 5);
        assert_eq!(akto_escape_growth("\u{85}"), 4);
        // Combining acute accent (Mn), zero width joiner (Cf), line separator (Zl), soft
        // hyphen (Cf), private use, Katakana prolonged sound mark (Lm), variation selector.
        assert_eq!(akto_escape_growth("e\u{301}"), 4);
        assert_eq!(akto_escape_growth("\u{200d}"), 3);
        assert_eq!(akto_escape_growth("\u{2028}"), 3);
        assert_eq!(akto_escape_growth("\u{ad}"), 4);
        assert_eq!(akto_escape_growth("\u{e000}"), 3);
        assert_eq!(akto_escape_growth("ー"), 3);
        assert_eq!(akto_escape_growth("\u{fe0f}"), 3);
        // Devanagari: letters raw, vowel signs (Mc/Mn) escaped.
        assert_eq!(akto_escape_growth("क"), 0);
        assert_eq!(akto_escape_growth("कि"), 3);
        // A family emoji: 4 code points (each 4 bytes) and 3 ZWJ.
        let family = "👨\u{200d}👩\u{200d}👧\u{200d}👦";
        assert_eq!(akto_escape_growth(family), 4 * 8 + 3 * 3);
    }

    #[test]
    fn bound_covers_java_for_mixed_payloads() {
        // Exactly escaped by Java: these characters; our bound must be at least Java's size.
        let java_escapes = |c: char| {
            matches!(
                c,
                '\u{7f}' | '\u{85}' | '\u{301}' | '\u{200d}' | '\u{fe0f}' | 'ー'
            ) || c.len_utf16() == 2
        };
        let samples = [
            "plain ascii text with \\\"escapes\\\" and \\n newlines",
            "emoji 😀😀😀 and ZWJ 👨\u{200d}👩 and e\u{301} ー\u{fe0f}",
            "\u{7f}\u{85}\u{7f}",
            "日本語 한국어 Ελληνικά",
        ];
        for s in samples {
            // Our JSON of the string value: serde's escaping.
            let ours = serde_json::to_string(s).unwrap();
            let java = java_len(s, java_escapes) + 2;
            let bound = ours.len() + akto_escape_growth(&ours);
            assert!(bound >= java, "{s:?}: bound {bound} < java {java}");
            // And tight for them: the bound is Java's size exactly.
            assert_eq!(bound, java, "{s:?}");
        }
    }

    #[test]
    fn limit_for_leaves_small_and_plain_records_alone() {
        let limit = 1_000_000;
        // Small: not scanned, whatever its content.
        let small = "😀".repeat(10_000);
        assert_eq!(akto_limit_for(&small, limit), limit);
        // Large plain ASCII: only the fixed part comes off.
        let plain = "x".repeat(900_000);
        assert_eq!(
            akto_limit_for(&plain, limit),
            limit - AKTO_FIXED_OVERHEAD_BYTES
        );
        // Large with emoji: each takes 8 bytes more off.
        let emoji = format!("{}{}", "x".repeat(800_000), "😀".repeat(10_000));
        assert_eq!(
            akto_limit_for(&emoji, limit),
            limit - AKTO_FIXED_OVERHEAD_BYTES - 80_000
        );
        assert_eq!(
            akto_size_upper_bound(&emoji),
            emoji.len() + 80_000 + AKTO_FIXED_OVERHEAD_BYTES
        );
        // A record that fits as sent but not once re-encoded: its limit is below its length.
        let near = format!("{}{}", "x".repeat(900_000), "😀".repeat(20_000));
        assert!(near.len() <= limit);
        assert!(akto_limit_for(&near, limit) < near.len());
        // At worst, the length at which any content fits: a record cut to it always fits.
        let worst = "\u{7f}".repeat(limit);
        let floor = (limit - AKTO_FIXED_OVERHEAD_BYTES) / AKTO_MAX_GROWTH_FACTOR;
        assert_eq!(akto_limit_for(&worst, limit), floor);
        let cut = &worst[..floor];
        assert!(akto_size_upper_bound(cut) <= limit);
    }

    #[test]
    fn fixed_overhead_covers_akto_field_names() {
        // Akto's BasicDBObject with every field null, as Java writes it, plus quotes around 22
        // values and Kafka's framing (61-byte batch header, record framing <= 40).
        let names = [
            "path",
            "requestHeaders",
            "responseHeaders",
            "method",
            "requestPayload",
            "responsePayload",
            "ip",
            "destIp",
            "time",
            "statusCode",
            "type",
            "status",
            "akto_account_id",
            "akto_vxlan_id",
            "is_pending",
            "source",
            "direction",
            "process_id",
            "socket_id",
            "daemonset_id",
            "enabled_graph",
            "tag",
        ];
        let skeleton = format!(
            "{{{}}}",
            names
                .iter()
                .map(|n| format!("\"{n}\": null"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert_eq!(skeleton.len(), 420);
        assert!(skeleton.len() + 2 * names.len() + 61 + 40 <= AKTO_FIXED_OVERHEAD_BYTES);
    }
}
