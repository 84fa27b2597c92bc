//! The `usage` an answer reports, found at its end without buffering it: a JSON
//! body closes with it, a stream carries it on its last event, after any image.

use serde::Deserialize;

/// How much of a response's end is kept to find its `usage`.
pub const TAIL: usize = 16 * 1024;

/// Tokens an answer reports, across the Images, Chat and Responses shapes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    /// Of `input`, the tokens of input images (edits).
    pub input_images: u64,
    pub output: u64,
    pub total: u64,
}

/// Keeps the last [`TAIL`] bytes seen.
pub fn keep_tail(tail: &mut Vec<u8>, data: &[u8]) {
    if data.len() >= TAIL {
        tail.clear();
        tail.extend_from_slice(&data[data.len() - TAIL..]);
    } else {
        let excess = (tail.len() + data.len()).saturating_sub(TAIL);
        tail.drain(..excess);
        tail.extend_from_slice(data);
    }
}

/// The last `"usage": {...}` object in `tail`, if any (a chat stream's earlier
/// chunks carry `"usage": null`).
pub fn find(tail: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Details {
        image_tokens: Option<u64>,
    }
    #[derive(Deserialize)]
    struct Raw {
        total_tokens: Option<u64>,
        input_tokens: Option<u64>,
        output_tokens: Option<u64>,
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        input_tokens_details: Option<Details>,
    }
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(pos) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        end = pos;
        let rest = &tail[pos + KEY.len()..];
        let Some(colon) = rest.iter().position(|b| !b.is_ascii_whitespace()) else {
            continue;
        };
        if rest[colon] != b':' {
            continue;
        }
        let mut it =
            serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<Option<Raw>>();
        let Some(Ok(Some(u))) = it.next() else {
            continue;
        };
        let input = u.input_tokens.or(u.prompt_tokens);
        let output = u.output_tokens.or(u.completion_tokens);
        let total = u
            .total_tokens
            .or_else(|| Some(input? + output.unwrap_or(0)));
        if let Some(total) = total {
            return Some(Usage {
                input: input.unwrap_or(total.saturating_sub(output.unwrap_or(0))),
                input_images: u
                    .input_tokens_details
                    .and_then(|d| d.image_tokens)
                    .unwrap_or(0),
                output: output.unwrap_or(0),
                total,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
