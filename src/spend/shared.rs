//! What each client has spent, shared by every replica: per UTC day and
//! calendar month, in millionths of a dollar, under one hash tag per client.
//! A reservation is checked against the caps and added in one script, so
//! replicas together never admit past a cap; a settlement adds the
//! difference between what was reserved and what the call cost.

use std::sync::LazyLock;

use crate::state::{Redis, Unavailable};

/// KEYS: the day's total, the month's. ARGV: delta (micro-USD, may be
/// negative), day cap, month cap (-1: none), day ttl ms, month ttl ms, mode
/// (`reserve` checks the caps, `settle` does not). Returns {1 | -1 (the day
/// is spent) | -2 (the month is), day total, month total}.
const SPEND: &str = r#"
local d = tonumber(redis.call('GET', KEYS[1]) or '0')
local m = tonumber(redis.call('GET', KEYS[2]) or '0')
local delta = tonumber(ARGV[1])
if ARGV[6] == 'reserve' then
  local dc, mc = tonumber(ARGV[2]), tonumber(ARGV[3])
  if dc >= 0 and d + delta > dc then return {-1, d, m} end
  if mc >= 0 and m + delta > mc then return {-2, d, m} end
end
d = redis.call('INCRBY', KEYS[1], delta)
m = redis.call('INCRBY', KEYS[2], delta)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {1, d, m}
"#;

static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SPEND));

/// Keys are kept a while past their period, for `/status`.
const DAY_TTL_MS: u64 = 2 * 86_400_000;
const MONTH_TTL_MS: u64 = 32 * 86_400_000;

impl Redis {
    fn spend_keys(&self, client: &str, day: &str, month: &str) -> [String; 2] {
        // The client's id is hashed: it may hold any character, braces too.
        let tag = &blake3::hash(client.as_bytes()).to_hex()[..16];
        [
            format!("{}spend:{{{tag}}}:d:{day}", self.base),
            format!("{}spend:{{{tag}}}:m:{month}", self.base),
        ]
    }

    /// Adds `delta` to `client`'s day and month; with `caps`, only if both
    /// stay within them. Returns whether it was added, and the totals.
    pub(crate) async fn spend(
        &self,
        client: &str,
        (day, month): (&str, &str),
        delta: i64,
        caps: Option<(Option<u64>, Option<u64>)>,
    ) -> Result<(i64, i64, i64), Unavailable> {
        let mut conn = self.conn()?;
        let keys = self.spend_keys(client, day, month);
        let cap = |c: Option<u64>| c.map_or(-1, |c| i64::try_from(c).unwrap_or(i64::MAX));
        let (dc, mc, mode) = match caps {
            Some((d, m)) => (cap(d), cap(m), "reserve"),
            None => (-1, -1, "settle"),
        };
        let mut inv = SCRIPT.prepare_invoke();
        inv.key(&keys[0])
            .key(&keys[1])
            .arg(delta)
            .arg(dc)
            .arg(mc)
            .arg(DAY_TTL_MS)
            .arg(MONTH_TTL_MS)
            .arg(mode);
        let reply: Vec<i64> = self.timed(inv.invoke_async(&mut conn)).await?;
        let at = |i: usize| reply.get(i).copied().unwrap_or(0);
        Ok((at(0), at(1), at(2)))
    }
}
