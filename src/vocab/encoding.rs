//! Reading answers whatever their `Content-Encoding`. The upstream compresses
//! (OpenAI's edge does, when the client accepts it), and penstock must still read
//! what it needs of an answer: an error's code (whole, decoded, small) and the
//! `usage` at the end of a body or stream (decoded as it passes, keeping only the
//! decoded tail). What the client receives is never re-encoded here.

use std::io::{Read, Write};

use bytes::Bytes;
use http::header::GetAll;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING};
use http::{HeaderMap, HeaderValue};

use crate::vocab::usage;

/// An encoding penstock can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Identity,
    Gzip,
    /// HTTP's `deflate`: zlib-wrapped.
    Deflate,
    Brotli,
}

impl Encoding {
    fn parse(name: &str) -> Option<Encoding> {
        // Compared without case, nothing lowercased into a new string.
        const NAMES: [(&str, Encoding); 6] = [
            ("", Encoding::Identity),
            ("identity", Encoding::Identity),
            ("gzip", Encoding::Gzip),
            ("x-gzip", Encoding::Gzip),
            ("deflate", Encoding::Deflate),
            ("br", Encoding::Brotli),
        ];
        let name = name.trim();
        NAMES
            .iter()
            .find(|(known, _)| known.eq_ignore_ascii_case(name))
            .map(|&(_, e)| e)
    }

    /// The encoding of an answer; `None` for one penstock cannot read (an
    /// unknown coding, or several stacked).
    pub(crate) fn of(headers: &HeaderMap) -> Option<Encoding> {
        let mut codings = headers
            .get_all(CONTENT_ENCODING)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .filter(|c| !c.trim().is_empty() && !c.trim().eq_ignore_ascii_case("identity"));
        match (codings.next(), codings.next()) {
            (None, _) => Some(Encoding::Identity),
            (Some(c), None) => Encoding::parse(c),
            _ => None,
        }
    }
}

/// What goes upstream as `Accept-Encoding`: penstock reads what it must of
/// every answer, so the upstream may compress only in codings it can decode.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Accept {
    /// Every coding the client names is one penstock reads: the header goes as
    /// it came, copied nowhere.
    AsSent,
    /// The client's codings restricted to those penstock reads (`gzip, br`).
    Only(String),
    /// No readable compression named (or no header): `identity`, and the
    /// upstream answers uncompressed.
    Identity,
}

/// The items of the client's `Accept-Encoding`, trimmed, each `coding` with
/// its parameters; a value that is not text is one item no coding matches.
fn accept_items<'a>(values: &GetAll<'a, HeaderValue>) -> impl Iterator<Item = &'a str> + use<'a> {
    values
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
}

/// An item's coding, without its parameters.
fn coding(item: &str) -> &str {
    item.split_once(';')
        .map_or(item, |(coding, _)| coding)
        .trim()
}

/// The `Accept-Encoding` the upstream gets for the client's `headers` (the
/// header looked up once).
pub(crate) fn upstream_accept(headers: &HeaderMap) -> Accept {
    let values = headers.get_all(ACCEPT_ENCODING);
    if values.iter().next().is_none() {
        return Accept::Identity;
    }
    let readable = |item: &str| Encoding::parse(coding(item));
    // A value gives at least one item: `all` is not true of nothing here.
    if accept_items(&values).all(|item| readable(item).is_some()) {
        return Accept::AsSent;
    }
    let kept: Vec<&str> = accept_items(&values)
        .filter(|item| {
            matches!(
                readable(item),
                Some(Encoding::Gzip | Encoding::Deflate | Encoding::Brotli)
            )
        })
        .collect();
    match kept.is_empty() {
        true => Accept::Identity,
        false => Accept::Only(kept.join(", ")),
    }
}

/// Whether a client accepts answers in `encoding` (RFC 9110 12.5.3: identity
/// is acceptable unless refused, `*` stands for the rest, `q=0` refuses).
pub(crate) fn accepts(headers: &HeaderMap, encoding: Encoding) -> bool {
    let name = match encoding {
        Encoding::Identity => "identity",
        Encoding::Gzip => "gzip",
        Encoding::Deflate => "deflate",
        Encoding::Brotli => "br",
    };
    let mut star = None;
    for item in accept_items(&headers.get_all(ACCEPT_ENCODING)) {
        let coding = coding(item);
        let refused = item.split(';').skip(1).any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        if coding.eq_ignore_ascii_case(name)
            || (encoding == Encoding::Gzip && coding.eq_ignore_ascii_case("x-gzip"))
        {
            return !refused;
        }
        if coding == "*" {
            star = Some(!refused);
        }
    }
    star.unwrap_or(encoding == Encoding::Identity)
}

/// Decodes a whole (small) body, up to `max` decoded bytes; `None` when it is
/// broken, larger, or in a coding penstock cannot read.
pub(crate) fn decode_all(encoding: Option<Encoding>, body: &[u8], max: usize) -> Option<Vec<u8>> {
    let reader: Box<dyn Read + '_> = match encoding? {
        Encoding::Identity => return (body.len() <= max).then(|| body.to_vec()),
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
        Encoding::Deflate => Box::new(flate2::read::ZlibDecoder::new(body)),
        Encoding::Brotli => Box::new(brotli_decompressor::Decompressor::new(body, 4096)),
    };
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    reader.take(limit).read_to_end(&mut out).ok()?;
    (out.len() <= max).then_some(out)
}

/// The decoded bytes kept of a body: its last [`usage::TAIL`] bytes, and a count
/// that stops the decoding of a body that inflates beyond reason.
struct Kept {
    tail: Vec<u8>,
    decoded: u64,
    max: u64,
}

impl Kept {
    fn new(max: u64) -> Kept {
        Kept {
            tail: Vec::new(),
            decoded: 0,
            max,
        }
    }
}

impl Write for Kept {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.decoded = self.decoded.saturating_add(data.len() as u64);
        if self.decoded > self.max {
            return Err(std::io::Error::other("decoded body over the bound"));
        }
        usage::keep_tail(&mut self.tail, data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Decoder {
    /// Not coded, and one chunk seen at most: that chunk, shared rather than
    /// copied (most answers arrive in one), and the bound on decoded bytes.
    Whole(Option<Bytes>, u64),
    Identity(Kept),
    Gzip(Box<flate2::write::MultiGzDecoder<Kept>>),
    Deflate(Box<flate2::write::ZlibDecoder<Kept>>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Kept>>),
    /// Undecodable or over the bound: nothing more is learned from this body.
    Gone,
}

/// The decoded end of a body, fed its chunks as they pass to the client.
pub(crate) struct Tail(Decoder);

impl Tail {
    /// Decoding stops once `max_decoded` bytes came out.
    pub(crate) fn new(encoding: Option<Encoding>, max_decoded: u64) -> Tail {
        let kept = Kept::new(max_decoded);
        Tail(match encoding {
            Some(Encoding::Identity) => Decoder::Whole(None, max_decoded),
            Some(Encoding::Gzip) => {
                Decoder::Gzip(Box::new(flate2::write::MultiGzDecoder::new(kept)))
            }
            Some(Encoding::Deflate) => {
                Decoder::Deflate(Box::new(flate2::write::ZlibDecoder::new(kept)))
            }
            Some(Encoding::Brotli) => Decoder::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(kept, 4096),
            )),
            None => Decoder::Gone,
        })
    }

    pub(crate) fn push(&mut self, chunk: &Bytes) {
        let ok = match &mut self.0 {
            Decoder::Whole(seen @ None, max) => {
                *seen = Some(chunk.clone());
                chunk.len() as u64 <= *max
            }
            Decoder::Whole(Some(first), max) => {
                // A second chunk: from here the end is kept by copying.
                let mut kept = Kept::new(*max);
                let ok = kept.write_all(first).is_ok() && kept.write_all(chunk).is_ok();
                self.0 = Decoder::Identity(kept);
                ok
            }
            Decoder::Identity(k) => k.write_all(chunk).is_ok(),
            Decoder::Gzip(d) => d.write_all(chunk).is_ok(),
            Decoder::Deflate(d) => d.write_all(chunk).is_ok(),
            Decoder::Brotli(d) => d.write_all(chunk).is_ok(),
            Decoder::Gone => true,
        };
        if !ok {
            self.0 = Decoder::Gone;
        }
    }

    /// The decoded tail so far (a stream's usage may be read before its end).
    pub(crate) fn decoded(&mut self) -> &[u8] {
        let kept = match &mut self.0 {
            Decoder::Whole(seen, _) => {
                let whole = seen.as_deref().unwrap_or_default();
                return &whole[whole.len().saturating_sub(usage::TAIL)..];
            }
            Decoder::Identity(k) => Some(k),
            Decoder::Gzip(d) => d.flush().ok().map(|_| d.get_mut()),
            Decoder::Deflate(d) => d.flush().ok().map(|_| d.get_mut()),
            Decoder::Brotli(d) => d.flush().ok().map(|_| d.get_mut()),
            Decoder::Gone => None,
        };
        kept.map_or(&[], |k| &k.tail[..])
    }

    /// The `usage` at the decoded end, if any.
    pub(crate) fn usage(&mut self) -> Option<usage::Usage> {
        usage::find(self.decoded())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn headers(name: http::HeaderName, v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn a_gzipped_stream_gives_its_usage_chunk_by_chunk() {
        let body = br#"{"data":[{"b64_json":"AAAA"}],"usage":{"input_tokens":5,"output_tokens":272,"total_tokens":277}}"#;
        let z = gzip(body);
        let mut tail = Tail::new(Some(Encoding::Gzip), 1 << 20);
        for chunk in z.chunks(7) {
            tail.push(&Bytes::copy_from_slice(chunk));
        }
        assert_eq!(tail.usage().map(|u| u.total), Some(277));
    }

    /// A plain body's end is the same whether it came in one chunk (kept
    /// shared) or in many (copied), and a body over the bound teaches nothing.
    #[test]
    fn a_plain_body_gives_its_end_in_one_chunk_or_many() {
        let mut body = vec![b'x'; usage::TAIL + 100];
        body.extend_from_slice(br#"{"usage":{"total_tokens":9}}"#);
        let end = &body[body.len() - usage::TAIL..];
        let mut one = Tail::new(Some(Encoding::Identity), 1 << 20);
        one.push(&Bytes::copy_from_slice(&body));
        assert_eq!(one.decoded(), end);
        assert_eq!(one.usage().map(|u| u.total), Some(9));
        for size in [1, 7, 1000, usage::TAIL] {
            let mut many = Tail::new(Some(Encoding::Identity), 1 << 20);
            for chunk in body.chunks(size) {
                many.push(&Bytes::copy_from_slice(chunk));
            }
            assert_eq!(many.decoded(), end, "chunks of {size}");
        }
        let small = Bytes::from_static(br#"{"usage":{"total_tokens":9}}"#);
        let mut empty = Tail::new(Some(Encoding::Identity), 1 << 20);
        assert!(empty.decoded().is_empty());
        empty.push(&small);
        assert_eq!(empty.decoded(), &small[..]);
        for chunks in [&[small.clone()][..], &[small.slice(..5), small.slice(5..)]] {
            let mut over = Tail::new(Some(Encoding::Identity), 10);
            for c in chunks {
                over.push(c);
            }
            assert!(over.decoded().is_empty(), "{chunks:?}");
        }
    }

    #[test]
    fn a_body_that_inflates_beyond_the_bound_is_given_up() {
        let z = gzip(&vec![b'a'; 1 << 20]);
        let mut tail = Tail::new(Some(Encoding::Gzip), 1000);
        tail.push(&Bytes::from(z.clone()));
        assert!(tail.decoded().is_empty());
        assert_eq!(decode_all(Some(Encoding::Gzip), &z, 1000), None);
        assert_eq!(
            decode_all(Some(Encoding::Gzip), &z, 2 << 20).map(|d| d.len()),
            Some(1 << 20)
        );
        assert_eq!(decode_all(Some(Encoding::Gzip), b"not gzip", 1000), None);
    }

    #[test]
    fn codings_are_read_from_headers() {
        assert_eq!(Encoding::of(&HeaderMap::new()), Some(Encoding::Identity));
        assert_eq!(
            Encoding::of(&headers(CONTENT_ENCODING, "br")),
            Some(Encoding::Brotli)
        );
        assert_eq!(Encoding::of(&headers(CONTENT_ENCODING, "zstd")), None);
        assert_eq!(Encoding::of(&headers(CONTENT_ENCODING, "gzip, br")), None);
        assert_eq!(
            Encoding::of(&headers(CONTENT_ENCODING, "X-GZIP")),
            Some(Encoding::Gzip)
        );
        for (sent, upstream) in [
            (
                "gzip, deflate;q=0.5, BR, zstd",
                Accept::Only("gzip, deflate;q=0.5, BR".into()),
            ),
            ("zstd", Accept::Identity),
            ("identity, zstd", Accept::Identity),
            ("gzip, deflate, br", Accept::AsSent),
            ("identity", Accept::AsSent),
        ] {
            let h = headers(ACCEPT_ENCODING, sent);
            assert_eq!(upstream_accept(&h), upstream, "{sent}");
        }
        assert_eq!(
            upstream_accept(&HeaderMap::new()),
            Accept::Identity,
            "nothing to pass on"
        );
        let h = headers(ACCEPT_ENCODING, "gzip, deflate;q=0.5, BR, zstd");
        assert!(accepts(&h, Encoding::Gzip) && accepts(&h, Encoding::Identity));
        assert!(
            accepts(&h, Encoding::Brotli),
            "names are compared without case"
        );
        let h = headers(ACCEPT_ENCODING, "gzip;q=0, *;q=0");
        assert!(!accepts(&h, Encoding::Gzip) && !accepts(&h, Encoding::Identity));
        assert!(!accepts(&HeaderMap::new(), Encoding::Gzip));
        assert!(accepts(&HeaderMap::new(), Encoding::Identity));
    }
}
