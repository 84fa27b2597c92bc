//! Finished answers, in-flight leases and the quota breaker in Redis.
//!
//! An answer is stored as a small head (status, headers, body length) and its
//! body in pieces of at most [`PIECE`] bytes, each its own command: a body of
//! tens of megabytes never holds Redis (or this replica's connection) for the
//! time of one large write. The head is written last and names the pieces by a
//! version of their own, so a reader never mixes two writes. A leader holds a
//! lease on its call's key; the lease is renewed while the call runs, so a
//! replica that dies leading a call blocks the key for one lease at most.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use redis::AsyncCommands;
use std::time::Duration;

use super::client::{Redis, Unavailable};

/// The largest piece of a body written or read in one command.
const PIECE: usize = 512 * 1024;

const MAGIC: &[u8; 4] = b"PSA1";

/// A complete answer as it is shared between replicas.
#[derive(Debug, Clone)]
pub struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// The head of a stored answer, and where its pieces are.
struct Head {
    status: StatusCode,
    headers: HeaderMap,
    len: u64,
    /// The body itself when it fits one piece; else the pieces' version.
    inline: Option<Bytes>,
    version: u64,
}

fn encode(answer: &Answer, version: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + answer.headers.len() * 48);
    out.put_slice(MAGIC);
    out.put_u16(answer.status.as_u16());
    out.put_u32(answer.headers.len() as u32);
    for (name, value) in &answer.headers {
        out.put_u16(name.as_str().len() as u16);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
    out.put_u64(answer.body.len() as u64);
    out.put_u64(version);
    if answer.body.len() <= PIECE {
        out.put_u8(1);
        out.put_slice(&answer.body);
    } else {
        out.put_u8(0);
    }
    out.freeze()
}

/// Reads a head; anything malformed (another version's layout, a truncated
/// value) is no answer at all.
fn decode(mut b: Bytes) -> Option<Head> {
    let take = |b: &mut Bytes, n: usize| (b.remaining() >= n).then(|| b.split_to(n));
    if take(&mut b, 4)?.as_ref() != MAGIC {
        return None;
    }
    let status = StatusCode::from_u16(take(&mut b, 2)?.get_u16()).ok()?;
    let count = take(&mut b, 4)?.get_u32();
    let mut headers = HeaderMap::new();
    for _ in 0..count {
        let n = take(&mut b, 2)?.get_u16() as usize;
        let name = HeaderName::from_bytes(&take(&mut b, n)?).ok()?;
        let n = take(&mut b, 4)?.get_u32() as usize;
        let value = HeaderValue::from_maybe_shared(take(&mut b, n)?).ok()?;
        headers.append(name, value);
    }
    let len = take(&mut b, 8)?.get_u64();
    let version = take(&mut b, 8)?.get_u64();
    let inline = match take(&mut b, 1)?.get_u8() {
        1 if b.remaining() as u64 == len => Some(b),
        0 => None,
        _ => return None,
    };
    Some(Head {
        status,
        headers,
        len,
        inline,
        version,
    })
}

/// Which store a key belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// The response cache: successful answers for `cache.ttl`.
    Cache,
    /// A finished shared call's answer, for the followers on other replicas.
    Result,
    /// An async job's request body.
    JobBody,
    /// An async job's answer body.
    JobResult,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Cache => "cache",
            Kind::Result => "result",
            Kind::JobBody => "jobbody",
            Kind::JobResult => "jobresult",
        }
    }
}

/// A held lease on a shared call.
#[derive(Debug, Clone)]
pub struct Lease {
    key: String,
    token: String,
}

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// KEYS: the cache's index, its byte count. ARGV: the new entry (`len:
/// version:pieces:head key`), its length, its ttl ms, the byte budget.
/// Indexes a stored answer; forgets entries past their expiry; then, while
/// the cache holds more than its budget, takes the oldest entries out of the
/// index and returns them for the caller to delete (their keys live in
/// other hash slots).
const ACCOUNT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local function len(m) return tonumber(string.match(m, '^(%d+):')) or 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('INCRBY', KEYS[2], ARGV[2])
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('DECRBY', KEYS[2], len(m))
  redis.call('ZREM', KEYS[1], m)
end
local out = {}
while #out < 1000 and tonumber(redis.call('GET', KEYS[2]) or '0') > tonumber(ARGV[4]) do
  local first = redis.call('ZPOPMIN', KEYS[1])
  if #first == 0 then
    redis.call('SET', KEYS[2], 0)
    break
  end
  redis.call('DECRBY', KEYS[2], len(first[1]))
  table.insert(out, first[1])
end
if tonumber(redis.call('GET', KEYS[2]) or '0') < 0 then redis.call('SET', KEYS[2], 0) end
redis.call('PEXPIRE', KEYS[1], ttl + 60000)
redis.call('PEXPIRE', KEYS[2], ttl + 60000)
return out
"#;

/// Renew, release, account.
static LEASE_SCRIPTS: std::sync::LazyLock<[redis::Script; 3]> =
    std::sync::LazyLock::new(|| [RENEW, RELEASE, ACCOUNT].map(redis::Script::new));

impl Redis {
    pub(crate) fn answer_key(&self, kind: Kind, key: &str) -> String {
        format!("{}{}:{{{key}}}", self.base, kind.name())
    }

    fn piece_key(head: &str, version: u64, i: usize) -> String {
        format!("{head}:{version:016x}:{i}")
    }

    /// Stores `answer` under `key` for `ttl`.
    pub(crate) async fn put(
        &self,
        kind: Kind,
        key: &str,
        answer: &Answer,
        ttl: Duration,
    ) -> Result<(), Unavailable> {
        self.put_version(kind, key, answer, ttl, fastrand::u64(..))
            .await
    }

    /// As [`Redis::put`], naming the pieces' version: a write tried again
    /// with the same version overwrites its pieces rather than leave the
    /// first try's behind.
    pub(crate) async fn put_version(
        &self,
        kind: Kind,
        key: &str,
        answer: &Answer,
        ttl: Duration,
        version: u64,
    ) -> Result<(), Unavailable> {
        let mut conn = self.bulk_conn()?;
        let head_key = self.answer_key(kind, key);
        let ttl_ms = ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
        if answer.body.len() > PIECE {
            // Pieces outlive the head a little, so a head never names a piece
            // already gone.
            for (i, piece) in answer.body.chunks(PIECE).enumerate() {
                let k = Self::piece_key(&head_key, version, i);
                let set = conn.pset_ex::<_, _, ()>(k, piece, ttl_ms.saturating_add(5_000));
                self.timed_bulk(set, piece.len()).await?;
            }
        }
        let head = encode(answer, version);
        let set = conn.pset_ex::<_, _, ()>(head_key, head.as_ref(), ttl_ms);
        self.timed_bulk(set, head.len()).await
    }

    /// Stores a cacheable answer for every replica, within `budget` bytes
    /// in all: the oldest entries go first. A failure to write (Redis at its
    /// memory limit, say) is the cache's alone: it says nothing of Redis's
    /// health, and budgets keep being shared.
    pub(crate) async fn put_cached(
        &self,
        key: &str,
        answer: &Answer,
        ttl: Duration,
        budget: u64,
    ) -> Result<(), Unavailable> {
        let len = answer.body.len() as u64;
        if len > budget {
            return Ok(());
        }
        let mut conn = self.conn()?;
        let mut bulk = self.bulk_conn()?;
        let head_key = self.answer_key(Kind::Cache, key);
        let version = fastrand::u64(..);
        let ttl_ms = ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
        let pieces = if answer.body.len() > PIECE {
            answer.body.len().div_ceil(PIECE)
        } else {
            0
        };
        // Its bytes are counted (and older entries made room for) before
        // they are written: replicas writing at once never overshoot.
        // One hash tag: a Cluster runs the script on one node.
        let index = format!("{}{{cache}}:index", self.base);
        let member = format!("{len}:{version:016x}:{pieces}:{head_key}");
        let mut inv = LEASE_SCRIPTS[2].prepare_invoke();
        inv.key(&index)
            .key(format!("{}{{cache}}:bytes", self.base))
            .arg(&member)
            .arg(len)
            .arg(ttl_ms)
            .arg(budget);
        let evicted: Vec<String> = match self.timed_quietly(inv.invoke_async(&mut conn)).await? {
            Ok(v) => v,
            Err(_) => return Ok(()),
        };
        for entry in evicted {
            let mut parts = entry.splitn(4, ':');
            let (_, version, pieces, head) =
                (parts.next(), parts.next(), parts.next(), parts.next());
            let (Some(version), Some(pieces), Some(head)) = (
                version.and_then(|v| u64::from_str_radix(v, 16).ok()),
                pieces.and_then(|p| p.parse::<usize>().ok()),
                head,
            ) else {
                continue;
            };
            let mut keys = vec![head.to_string()];
            keys.extend((0..pieces.min(1 << 16)).map(|i| Self::piece_key(head, version, i)));
            // On the control connection: small commands, not queued behind
            // the bulk transfers (an eviction that failed would leave its
            // keys until they expire).
            let _ = self.timed_quietly(conn.unlink::<_, ()>(keys)).await?;
        }
        // A write that fails (Redis at its memory limit) leaves its entry
        // counted until it expires or is evicted: the count errs high.
        for (i, piece) in answer.body.chunks(PIECE).enumerate().take(pieces) {
            let k = Self::piece_key(&head_key, version, i);
            let set = bulk.pset_ex::<_, _, ()>(k, piece, ttl_ms.saturating_add(5_000));
            if self.timed_bulk(set, piece.len()).await.is_err() {
                return Ok(());
            }
        }
        let head = encode(answer, version);
        let set = bulk.pset_ex::<_, _, ()>(&head_key, head.as_ref(), ttl_ms);
        let _ = self.timed_bulk(set, head.len()).await;
        // Evicted while it was being written (by a replica making room for
        // its own): the eviction found nothing to delete yet, so this does.
        let kept: Option<f64> = match self.timed_quietly(conn.zscore(&index, &member)).await? {
            Ok(score) => score,
            Err(_) => return Ok(()),
        };
        if kept.is_none() {
            let mut keys = vec![head_key.clone()];
            keys.extend((0..pieces).map(|i| Self::piece_key(&head_key, version, i)));
            let _ = self.timed_quietly(conn.unlink::<_, ()>(keys)).await?;
        }
        Ok(())
    }

    /// The answer stored under `key`, if it is whole.
    pub(crate) async fn get(&self, kind: Kind, key: &str) -> Result<Option<Answer>, Unavailable> {
        let mut conn = self.bulk_conn()?;
        let head_key = self.answer_key(kind, key);
        let raw: Option<Vec<u8>> = self.timed_bulk(conn.get(&head_key), PIECE).await?;
        let Some(head) = raw.and_then(|r| decode(Bytes::from(r))) else {
            return Ok(None);
        };
        let body = match head.inline {
            Some(body) => body,
            None => {
                let pieces = head.len.div_ceil(PIECE as u64) as usize;
                let mut body = BytesMut::with_capacity(head.len.min(1 << 30) as usize);
                for i in 0..pieces {
                    let k = Self::piece_key(&head_key, head.version, i);
                    let piece: Option<Vec<u8>> = self.timed_bulk(conn.get(k), PIECE).await?;
                    let Some(piece) = piece else {
                        return Ok(None);
                    };
                    body.extend_from_slice(&piece);
                }
                if body.len() as u64 != head.len {
                    return Ok(None);
                }
                body.freeze()
            }
        };
        Ok(Some(Answer {
            status: head.status,
            headers: head.headers,
            body,
        }))
    }

    /// Takes the lease on the shared call for `key`, if no replica holds it.
    pub(crate) async fn take_lease(&self, key: &str) -> Result<Option<Lease>, Unavailable> {
        let mut conn = self.conn()?;
        let lease = Lease {
            key: format!("{}lease:{{{key}}}", self.base),
            token: format!("{}:{:016x}", self.replica, fastrand::u64(..)),
        };
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::PX(self.lease.as_millis() as u64));
        let set = conn.set_options::<_, _, Option<String>>(&lease.key, &lease.token, opts);
        Ok(self.timed(set).await?.map(|_| lease))
    }

    /// Whether some replica holds the lease for `key`.
    pub(crate) async fn leased(&self, key: &str) -> Result<bool, Unavailable> {
        let mut conn = self.conn()?;
        let k = format!("{}lease:{{{key}}}", self.base);
        self.timed(conn.exists(k)).await
    }

    /// Extends a held lease by another lease period; false if it was lost.
    pub(crate) async fn renew(&self, lease: &Lease) -> Result<bool, Unavailable> {
        let mut conn = self.conn()?;
        let mut inv = LEASE_SCRIPTS[0].prepare_invoke();
        inv.key(&lease.key)
            .arg(&lease.token)
            .arg(self.lease.as_millis() as u64);
        Ok(self.timed(inv.invoke_async::<i64>(&mut conn)).await? == 1)
    }

    /// Gives a held lease up, if it is still this replica's.
    pub(crate) async fn release(&self, lease: &Lease) -> Result<(), Unavailable> {
        let mut conn = self.conn()?;
        let mut inv = LEASE_SCRIPTS[1].prepare_invoke();
        inv.key(&lease.key).arg(&lease.token);
        self.timed(inv.invoke_async::<i64>(&mut conn)).await?;
        Ok(())
    }

    /// Keeps `answer` under `key` until `cooldown` ends, its body cut to one
    /// piece: a quota breaker's answer to repeat, open for every replica.
    pub(crate) async fn trip(
        &self,
        key: &str,
        answer: &Answer,
        cooldown: Duration,
    ) -> Result<(), Unavailable> {
        let mut conn = self.conn()?;
        let mut small = answer.clone();
        small.body.truncate(PIECE);
        let ms = cooldown.as_millis().clamp(1, u64::MAX as u128) as u64;
        let head = encode(&small, 0);
        let set = conn.pset_ex::<_, _, ()>(key, head.as_ref(), ms);
        self.timed(set).await
    }

    /// The answer kept by [`Redis::trip`] under `key`, and for how long more.
    pub(crate) async fn tripped(
        &self,
        key: &str,
    ) -> Result<Option<(Answer, Duration)>, Unavailable> {
        let mut conn = self.conn()?;
        let (raw, ttl): (Option<Vec<u8>>, i64) = self
            .timed(redis::pipe().get(key).pttl(key).query_async(&mut conn))
            .await?;
        let Some(head) = raw.and_then(|r| decode(Bytes::from(r))) else {
            return Ok(None);
        };
        if ttl <= 0 {
            return Ok(None);
        }
        Ok(Some((
            Answer {
                status: head.status,
                headers: head.headers,
                body: head.inline.unwrap_or_default(),
            },
            Duration::from_millis(ttl as u64),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_reads_back_as_written_and_garbage_reads_as_nothing() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-b", HeaderValue::from_bytes(b"\xff\x80 ok").unwrap());
        let answer = Answer {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(b"{\"ok\":true}"),
        };
        let head = decode(encode(&answer, 7)).unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(head.headers, answer.headers);
        assert_eq!(head.inline.unwrap(), answer.body);
        let big = Answer {
            body: Bytes::from(vec![1u8; PIECE + 1]),
            ..answer.clone()
        };
        let head = decode(encode(&big, 9)).unwrap();
        assert_eq!((head.len, head.version), (PIECE as u64 + 1, 9));
        assert!(head.inline.is_none());
        let whole = encode(&answer, 1);
        for cut in 0..whole.len() {
            assert!(decode(whole.slice(..cut)).is_none(), "cut at {cut}");
        }
        assert!(decode(Bytes::from_static(b"nonsense")).is_none());
    }
}
