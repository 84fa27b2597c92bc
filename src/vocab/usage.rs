//! The `usage` an answer reports, found at its end without buffering it: a JSON
//! body closes with it, a stream carries it on its last event, after any image.

use serde::Deserialize;

/// How much of a response's end is kept to find its `usage`.
pub(crate) const TAIL: usize = 16 * 1024;

/// Tokens an answer reports, across the Images, Chat and Responses shapes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) input: u64,
    /// Of `input`, the tokens of input images (edits).
    pub(crate) input_images: u64,
    pub(crate) output: u64,
    pub(crate) total: u64,
}

/// Keeps the last [`TAIL`] bytes seen.
pub(crate) fn keep_tail(tail: &mut Vec<u8>, data: &[u8]) {
    if data.len() >= TAIL {
        tail.clear();
        tail.extend_from_slice(&data[data.len() - TAIL..]);
    } else {
        let excess = (tail.len() + data.len()).saturating_sub(TAIL);
        tail.drain(..excess);
        tail.extend_from_slice(data);
    }
}

/// The key of the object looked for.
const KEY: &[u8] = b"\"usage\"";

/// The counts of one `usage` object, as sent (absent or `null` is `None`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
struct Raw {
    total_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens_details: Option<Details>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
struct Details {
    image_tokens: Option<u64>,
}

/// The last `"usage": {...}` object in `tail`, if any (a chat stream's earlier
/// chunks carry `"usage": null`).
pub(crate) fn find(tail: &[u8]) -> Option<Usage> {
    let mut end = tail.len();
    while let Some(pos) = rfind(&tail[..end]) {
        end = pos;
        if let Some(u) = object_after(&tail[pos + KEY.len()..]) {
            return Some(u);
        }
    }
    None
}

/// The Responses API's usage of its image tool: the last
/// `"image_gen": {...}` object (in `tool_usage`) in `tail`, if any.
pub(crate) fn image_tool(tail: &[u8]) -> Option<Usage> {
    const IMAGE_GEN: &[u8] = b"\"image_gen\"";
    let mut end = tail.len();
    while let Some(pos) = memchr::memmem::rfind(&tail[..end], IMAGE_GEN) {
        end = pos;
        if let Some(u) = object_after(&tail[pos + IMAGE_GEN.len()..]) {
            return Some(u);
        }
    }
    None
}

/// The usage object after a key (`rest` starts after its closing quote).
fn object_after(rest: &[u8]) -> Option<Usage> {
    let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    let u = read(&rest[colon + 1..])?;
    let input = u.input_tokens.or(u.prompt_tokens);
    let output = u.output_tokens.or(u.completion_tokens);
    let total = u
        .total_tokens
        .or_else(|| Some(input?.saturating_add(output.unwrap_or(0))))?;
    Some(Usage {
        input: input.unwrap_or(total.saturating_sub(output.unwrap_or(0))),
        input_images: u
            .input_tokens_details
            .and_then(|d| d.image_tokens)
            .unwrap_or(0),
        output: output.unwrap_or(0),
        total,
    })
}

/// The usage object `text` starts with (after blanks); `None` when it is
/// `null` or not a usage object.
fn read(text: &[u8]) -> Option<Raw> {
    match Scan::new(text).usage() {
        Some(raw) => Some(raw),
        None => serde_json::Deserializer::from_slice(text)
            .into_iter::<Option<Raw>>()
            .next()?
            .ok()?,
    }
}

/// Reads the usage objects OpenAI sends, objects of integers, some of them
/// in objects of integers, at a fraction of a general parser's cost (the
/// usage of every answer is read). Anything else (text, a fraction, a list, a
/// key written with an escape or not in ASCII, a field sent twice, a number
/// too large) is left to `serde_json`: `None` means "not read here", and what is read
/// here is what `serde_json` would read.
struct Scan<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn new(text: &'a [u8]) -> Self {
        Scan { text, at: 0 }
    }

    fn usage(&mut self) -> Option<Raw> {
        let mut raw = Raw::default();
        let mut seen = 0u8;
        self.object(|scan, key| {
            let (bit, field) = match key {
                b"total_tokens" => (0, &mut raw.total_tokens),
                b"input_tokens" => (1, &mut raw.input_tokens),
                b"output_tokens" => (2, &mut raw.output_tokens),
                b"prompt_tokens" => (3, &mut raw.prompt_tokens),
                b"completion_tokens" => (4, &mut raw.completion_tokens),
                b"input_tokens_details" => {
                    if seen & 1 << 5 != 0 {
                        return None;
                    }
                    seen |= 1 << 5;
                    raw.input_tokens_details = scan.details()?;
                    return Some(());
                }
                other => return scan.skip(other),
            };
            if seen & 1 << bit != 0 {
                return None;
            }
            seen |= 1 << bit;
            *field = scan.integer()?;
            Some(())
        })?;
        Some(raw)
    }

    /// `null`, or an object of integers with `image_tokens` among them.
    fn details(&mut self) -> Option<Option<Details>> {
        if self.null() {
            return Some(None);
        }
        let mut details = Details::default();
        let mut seen = false;
        self.object(|scan, key| match key {
            b"image_tokens" if !seen => {
                seen = true;
                details.image_tokens = scan.integer()?;
                Some(())
            }
            b"image_tokens" => None,
            other => scan.skip(other),
        })?;
        Some(Some(details))
    }

    /// An unknown field (its name read as sent) and its value: an integer,
    /// `null`, or an object of those.
    fn skip(&mut self, key: &[u8]) -> Option<()> {
        plain(key)?;
        self.blanks();
        match self.text.get(self.at)? {
            b'{' => self.object(|scan, key| {
                plain(key)?;
                scan.integer().map(drop)
            }),
            _ => self.integer().map(drop),
        }
    }

    /// `{ "key": value, … }`, each value read by `field`.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.byte(b'{')?;
        if self.byte(b'}').is_some() {
            return Some(());
        }
        loop {
            self.byte(b'"')?;
            let rest = &self.text[self.at..];
            // The bytes up to the next quote; `field` matches them against
            // the names it knows and checks any other with `plain`.
            let key = &rest[..memchr::memchr(b'"', rest)?];
            self.at += key.len() + 1;
            self.byte(b':')?;
            field(self, key)?;
            if self.byte(b',').is_none() {
                return self.byte(b'}');
            }
        }
    }

    /// A non-negative integer that fits a `u64`, or `null`.
    fn integer(&mut self) -> Option<Option<u64>> {
        if self.null() {
            return Some(None);
        }
        let digits = self.text[self.at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let after = self.text.get(self.at + digits).copied();
        // A leading zero, a fraction or an exponent: serde's to judge.
        if digits == 0
            || (digits > 1 && self.text[self.at] == b'0')
            || matches!(after, Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        let mut n = 0u64;
        for &d in &self.text[self.at..self.at + digits] {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        self.at += digits;
        Some(Some(n))
    }

    fn null(&mut self) -> bool {
        self.blanks();
        let found = self.text[self.at..].starts_with(b"null");
        if found {
            self.at += 4;
        }
        found
    }

    fn byte(&mut self, b: u8) -> Option<()> {
        self.blanks();
        (self.text.get(self.at) == Some(&b)).then(|| self.at += 1)
    }

    fn blanks(&mut self) {
        while matches!(self.text.get(self.at), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }
}

/// A name that reads as its bytes: printable ASCII without an escape (an
/// escaped quote would also have ended it early).
fn plain(key: &[u8]) -> Option<()> {
    key.iter()
        .all(|&b| b.wrapping_sub(0x20) < 0x60 && b != b'\\')
        .then_some(())
}

/// Where the last `"usage"` starts in `hay`: its `g` looked for from the end
/// (a vectorised search; the key sits near the end of an answer, and `g` is
/// rare in JSON), the rest compared only there.
fn rfind(hay: &[u8]) -> Option<usize> {
    let mut end = hay.len();
    while let Some(g) = memchr::memrchr(b'g', &hay[..end]) {
        end = g;
        let start = g.checked_sub(4)?;
        if hay.get(start..start + KEY.len()) == Some(KEY) {
            return Some(start);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_tools_usage_is_read_apart_from_the_responses() {
        let body = br#"{"usage": {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12},
            "tool_usage": {"image_gen": {"input_tokens": 7, "output_tokens": 4160, "total_tokens": 4167}}}"#;
        assert_eq!(find(body).map(|u| u.total), Some(12));
        let tool = image_tool(body).unwrap();
        assert_eq!((tool.input, tool.output, tool.total), (7, 4160, 4167));
        assert_eq!(image_tool(br#"{"usage": {"total_tokens": 1}}"#), None);
        assert_eq!(image_tool(br#""image_gen": null"#), None);
        let huge = format!(
            r#""image_gen": {{"input_tokens": {}, "output_tokens": 5}}"#,
            u64::MAX
        );
        assert_eq!(image_tool(huge.as_bytes()).map(|u| u.total), Some(u64::MAX));
    }

    #[test]
    fn usage_is_found_at_the_end_of_json_and_streams() {
        let json = br#"{"created":1,"data":[{"b64_json":"AAAA"}],"usage":{"input_tokens":10,"input_tokens_details":{"text_tokens":4,"image_tokens":6},"output_tokens":4160,"total_tokens":4170}}"#;
        assert_eq!(
            find(json),
            Some(Usage {
                input: 10,
                input_images: 6,
                output: 4160,
                total: 4170
            })
        );
        let chat = b"data: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":5,\"total_tokens\":12}}\n\ndata: [DONE]\n\n";
        assert_eq!(
            find(chat).map(|u| (u.input, u.output, u.total)),
            Some((7, 5, 12))
        );
        let no_usage = b"data: {\"choices\":[],\"usage\":null}\n\ndata: [DONE]\n\n";
        assert_eq!(find(no_usage), None);
        let parts = br#"{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}"#;
        assert_eq!(find(parts).map(|u| u.total), Some(5));
        // A cut stream: no usage, the estimate stands.
        assert_eq!(find(br#"{"usage":{"total_tok"#), None);
    }

    /// Text that looks like a usage object: OpenAI's fields and others,
    /// with every kind of value, nested objects, blanks, duplicates, escapes.
    fn usage_like() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let key = prop::sample::select(vec![
            "total_tokens",
            "input_tokens",
            "output_tokens",
            "prompt_tokens",
            "completion_tokens",
            "input_tokens_details",
            "image_tokens",
            "cached_tokens",
            "t\\u006ftal_tokens",
            "tokens_é",
            "",
        ]);
        let scalar = prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            (0u64..100).prop_map(|n| n.to_string()),
            prop::sample::select(vec![
                "null",
                "-1",
                "1.5",
                "1e3",
                "01",
                "0",
                "\"7\"",
                "[1]",
                "true",
                "18446744073709551616",
                "nul",
                "",
            ])
            .prop_map(str::to_string),
        ];
        let blank = prop::sample::select(vec!["", " ", "\n\t", "\r"]);
        let member = (key.clone(), blank.clone(), scalar.clone())
            .prop_map(|(k, b, v)| format!("\"{k}\"{b}:{b}{v}"));
        let inner = prop::collection::vec(member.clone(), 0..4)
            .prop_map(|m| format!("{{{}}}", m.join(",")));
        let value = prop_oneof![3 => scalar, 1 => inner];
        let outer = (key, blank.clone(), value).prop_map(|(k, b, v)| format!("\"{k}\"{b}:{b}{v}"));
        (prop::collection::vec(outer, 0..7), blank, any::<bool>()).prop_map(|(m, b, null)| {
            match null {
                true => format!("{b}null"),
                false => format!("{b}{{{b}{}{b}}}, \"more\": 1}}", m.join(",")),
            }
        })
    }

    proptest::proptest! {
        // Cheap cases: enough of them to meet each rare value at each field.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(8192))]

        /// What the hand reader reads is what `serde_json` reads; what it
        /// declines, `serde_json` decides.
        #[test]
        fn the_hand_reader_agrees_with_serde(text in usage_like()) {
            let by_serde = serde_json::Deserializer::from_slice(text.as_bytes())
                .into_iter::<Option<Raw>>()
                .next()
                .and_then(Result::ok)
                .flatten();
            if let Some(by_hand) = Scan::new(text.as_bytes()).usage() {
                proptest::prop_assert_eq!(Some(by_hand), by_serde, "{}", text);
            }
            proptest::prop_assert_eq!(read(text.as_bytes()), by_serde, "{}", text);
        }
    }

    #[test]
    fn openai_usage_objects_are_read_by_hand() {
        for text in [
            r#"{"prompt_tokens":17,"completion_tokens":9,"total_tokens":26,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#,
            r#"{"input_tokens":50,"input_tokens_details":{"text_tokens":10,"image_tokens":40},"output_tokens":4160,"total_tokens":4210}"#,
            r#"{ "input_tokens": 5, "output_tokens": null, "total_tokens": 5 }"#,
        ] {
            assert!(Scan::new(text.as_bytes()).usage().is_some(), "{text}");
        }
        let details = Scan::new(br#"{"input_tokens_details":{"image_tokens":40}}"#).usage();
        assert_eq!(
            details.and_then(|r| r.input_tokens_details?.image_tokens),
            Some(40)
        );
    }

    #[test]
    fn the_key_is_found_where_it_last_starts() {
        for (hay, want) in [
            (&b"\"usage\""[..], Some(0)),
            (b"x\"usage\"x\"usage\"", Some(9)),
            (b"\"usage\"\"usag", Some(0)),
            (b"gg\"usage\"gggg", Some(2)),
            (b"\"usag", None),
            (b"g", None),
            (b"", None),
            (b"usage\"", None),
        ] {
            assert_eq!(rfind(hay), want, "{:?}", String::from_utf8_lossy(hay));
        }
    }

    #[test]
    fn the_tail_keeps_only_the_last_bytes() {
        let mut tail = Vec::new();
        keep_tail(&mut tail, &vec![b'a'; TAIL - 10]);
        keep_tail(&mut tail, b"0123456789abcdef");
        assert_eq!(tail.len(), TAIL);
        assert!(tail.ends_with(b"0123456789abcdef"));
        keep_tail(&mut tail, &vec![b'z'; TAIL * 2]);
        assert_eq!(tail, vec![b'z'; TAIL]);
    }
}
