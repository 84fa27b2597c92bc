//! A JSON request body as penstock reads it: parsed once, its strings and keys
//! borrowed from the body's bytes wherever they hold no escapes, its objects
//! kept as lists. `serde_json::Value` copied every string and key and built a
//! tree map per object; on a chat completion that was most of the edge's work.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;

/// A JSON value. An object keeps its members in the order sent, a key sent
/// twice included; [`Json::get`] answers with the last, as JSON parsers do.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'a> Json<'a> {
    /// An object's member (the last of that name), else `None`.
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(members) => members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    pub(crate) fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub(crate) fn as_array(&self) -> Option<&[Json<'a>]> {
        match self {
            Json::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The same value owning its text, to outlive the body it was read from.
    #[cfg(test)]
    pub(crate) fn into_owned(self) -> Json<'static> {
        let own = |s: Cow<'a, str>| Cow::Owned(s.into_owned());
        match self {
            Json::Null => Json::Null,
            Json::Bool(b) => Json::Bool(b),
            Json::Number(n) => Json::Number(n),
            Json::String(s) => Json::String(own(s)),
            Json::Array(a) => Json::Array(a.into_iter().map(Json::into_owned).collect()),
            Json::Object(o) => Json::Object(
                o.into_iter()
                    .map(|(k, v)| (own(k), v.into_owned()))
                    .collect(),
            ),
        }
    }
}

impl fmt::Display for Json<'_> {
    /// Compact JSON text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(t) => s.serialize_str(t),
            Json::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for x in a {
                    seq.serialize_element(x)?;
                }
                seq.end()
            }
            Json::Object(o) => {
                let mut map = s.serialize_map(Some(o.len()))?;
                for (k, v) in o {
                    map.serialize_entry(k.as_ref(), v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Json<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor(PhantomData))
    }
}

/// Most members an object or array is given room for before it is read: a
/// length hint comes from the sender.
const MOST_RESERVED: usize = 64;

struct ValueVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for ValueVisitor<'a> {
    type Value = Json<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Json<'a>, E> {
        Ok(Json::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Json<'a>, E> {
        Ok(Json::Number(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Json<'a>, E> {
        Ok(Json::Number(n.into()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Json<'a>, E> {
        Ok(Number::from_f64(n).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Json<'a>, E> {
        Ok(Json::String(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Json<'a>, E> {
        Ok(Json::String(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Json<'a>, E> {
        Ok(Json::String(Cow::Owned(s)))
    }

    fn visit_unit<E>(self) -> Result<Json<'a>, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Json<'a>, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json<'a>, D::Error> {
        Json::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'a>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MOST_RESERVED));
        while let Some(x) = seq.next_element()? {
            items.push(x);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'a>, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0).min(MOST_RESERVED));
        while let Some(Key(k)) = map.next_key()? {
            members.push((k, map.next_value()?));
        }
        Ok(Json::Object(members))
    }
}

/// An object's key, borrowed when it can be (serde's own `Cow` always copies).
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for KeyVisitor<'a> {
            type Value = Key<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        d.deserialize_str(KeyVisitor(PhantomData))
    }
}

/// `body` with the string value of its top-level member `key` replaced by
/// `to`, the rest byte for byte; `None` when it has no such member.
pub(crate) fn with_top_level_string(body: &[u8], key: &str, to: &str) -> Option<Vec<u8>> {
    let at = top_level_string(body, key)?;
    let quoted = serde_json::to_string(to).ok()?;
    let mut out = Vec::with_capacity(body.len() + quoted.len());
    out.extend_from_slice(&body[..at.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[at.end..]);
    Some(out)
}

/// Where the top-level member `key`'s value lies in the JSON object `body`
/// (a string value, its quotes included), found without parsing the rest:
/// penstock rewrites one value of a body it otherwise sends as it came.
/// `None` when `body` is not an object or has no such string member.
pub(crate) fn top_level_string(body: &[u8], key: &str) -> Option<std::ops::Range<usize>> {
    let mut depth = 0usize;
    let mut i = 0;
    let mut expect_key = false;
    let mut found = None;
    while i < body.len() {
        match body[i] {
            b'"' => {
                let start = i;
                i += 1;
                while i < body.len() && body[i] != b'"' {
                    i += if body[i] == b'\\' { 2 } else { 1 };
                }
                let end = (i + 1).min(body.len());
                if depth == 1 && expect_key {
                    expect_key = false;
                    let is_key = body.get(start + 1..end.saturating_sub(1)) == Some(key.as_bytes());
                    found = is_key.then_some(());
                } else if depth == 1 && found.take().is_some() {
                    return Some(start..end);
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth == 1 {
                    expect_key = body[i] == b'{';
                }
                found = None;
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => {
                expect_key = true;
                found = None;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_borrowed_unless_escaped_and_the_last_key_wins() {
        let body = r#"{"model":"gpt-4o","n":2,"x":-1.5,"m":[{"content":"a\"b"}],"n":3,"ok":true,"z":null}"#;
        let v: Json = serde_json::from_str(body).unwrap();
        assert!(matches!(
            v.get("model"),
            Some(Json::String(Cow::Borrowed("gpt-4o")))
        ));
        assert_eq!(
            v.get("n").and_then(Json::as_u64),
            Some(3),
            "the last of two"
        );
        let content = v.get("m").and_then(Json::as_array).unwrap()[0].get("content");
        assert!(matches!(content, Some(Json::String(Cow::Owned(s))) if s == "a\"b"));
        assert_eq!(v.get("ok").and_then(Json::as_bool), Some(true));
        assert_eq!(v.get("z"), Some(&Json::Null));
        assert_eq!(v.get("missing"), None);
        // Written back, it is the same JSON as serde_json reads.
        let ours: serde_json::Value = serde_json::from_str(&v.to_string()).unwrap();
        let theirs: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(ours, theirs);
        assert_eq!(v.clone().into_owned(), v);
    }

    #[test]
    fn nesting_past_serde_json_s_limit_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(serde_json::from_str::<Json>(&deep).is_err());
    }

    #[test]
    fn a_top_level_string_is_found_and_nested_ones_are_not() {
        let body =
            br#"{"tools":[{"model":"inner"}],"n":1, "model" : "gpt-image-1","x":{"model":"y"}}"#;
        let at = top_level_string(body, "model").unwrap();
        assert_eq!(&body[at], br#""gpt-image-1""#);
        let body = br#"{"prompt":"say \"model\": no","model":"m"}"#;
        assert_eq!(&body[top_level_string(body, "model").unwrap()], br#""m""#);
        assert_eq!(top_level_string(br#"{"model":1}"#, "model"), None);
        assert_eq!(top_level_string(br#"["model","x"]"#, "model"), None);
        assert_eq!(top_level_string(b"", "model"), None);
    }
}
