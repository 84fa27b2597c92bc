//! A pool's ledger in Redis, shared by every replica: the same sliding windows
//! as the in-process ledger (`admission::ledger`), a minute and a burst window per
//! dimension, kept as two sorted sets of entries, their costs and running sums.
//!
//! Each admission is one script, atomic in Redis and timed by Redis's clock:
//! it reserves the estimate in every dimension at once, at the earliest moment
//! the windows, the upstream's last `x-ratelimit-remaining` and any pause
//! allow, if that moment is within the booking horizon; else it answers when
//! to ask again. A replica so never asks Redis in a loop: it sleeps until the
//! moment the script named. Entries are settled later (refund or debt), and
//! the upstream's 429 pauses the pool for every replica.

use std::time::Duration;

use crate::state::{Redis, Unavailable};
use crate::vocab::cost::{Cost, Limits};
use crate::vocab::headers::RateLimitHeaders;

/// The most one number sent to a script may be: Lua's numbers are doubles,
/// exact to 2^53, and a window sums many entries.
const MAX_NUMBER: u64 = 1 << 40;

/// A queue head not heard from for this long no longer holds others back: a
/// deferred head asks again much sooner, a replica gone never does.
pub(crate) const STALE_HEAD: Duration = Duration::from_millis(500);

/// The most queued requests a replica proposes in one admission.
pub(crate) const MAX_CANDIDATES: usize = 16;

/// The keys of one pool, all under one hash tag.
#[derive(Debug, Clone)]
pub struct PoolKey {
    keys: [String; 8],
}

/// A request a replica proposes for admission: its client, its weight in
/// the fair order, its cost.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub client: &'a str,
    pub weight: u64,
    pub cost: Cost,
    /// A batch request not owed its share: it goes after every replica's
    /// interactive (or owed) heads.
    pub batch: bool,
}

/// What the shared ledger said to a request for admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Booking {
    /// Reserved: the call may go `wait` from now. `id` settles it later; `at`
    /// is the reservation's time on Redis's clock.
    Booked { id: u64, wait: Duration, at: u64 },
    /// Not within the horizon: ask again in `wait`.
    Wait(Duration),
    /// Another replica's queue head goes first (its client is owed more).
    Deferred,
    /// The quota breaker is open for this long more.
    Tripped(Duration),
}

const LIB: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function parse(s)
  local a, b, c = string.match(s, '(%d+),(%d+),(%d+)')
  return {tonumber(a), tonumber(b), tonumber(c)}
end
-- A pool's keys live and die together: every script that writes any of them
-- gives all of them the same time to live (the breaker, KEYS[5], keeps its
-- own: the cool-down). None so outlives what it counts: running sums never
-- outlive the entries they sum.
local function keep_all()
  for k = 1, #KEYS do
    if k ~= 5 then redis.call('PEXPIRE', KEYS[k], 240000) end
  end
end
"#;

/// KEYS: state, burst, minute, cost, breaker, heads, seen, finish. ARGV:
/// mode (`book`, or `force` to record what was spent while Redis was away),
/// per-minute limits x3 (-1: none), burst ms, margin ms, horizon ms (force:
/// the charge's age), replica, stale ms, the number of candidates, the
/// safety fraction, burst caps x3, bucket depths x3, then per candidate:
/// client, weight, cost x3, batch (1: goes after interactive heads).
///
/// Fairness across replicas: each client has a virtual finish time here, as
/// in a replica's own fair queue (start-fair queueing weighted by cost), and
/// the sequence number of its last admission. A replica proposes the first
/// requests of its queue's lanes; the one whose client finishes first (on a
/// tie: was served longest ago) is the replica's head. A head defers to
/// another replica's live head that goes before it in that order. Batch
/// candidates (not owed their share) go after every interactive one: their
/// place in the order is offset by `BATCH_OFFSET`, their clients' finish
/// times are not.
///
/// Per dimension, as the in-process ledger: sliding burst and minute windows
/// (sorted sets of entries, running sums in the state hash), and a bucket
/// (`q1..q3`, drained at the sustained rate since `qt`) that carries a
/// window's unused fraction into the next.
const BOOK: &str = r#"
local force = ARGV[1] == 'force'
if not force then
  local br = redis.call('PTTL', KEYS[5])
  if br > 0 then return {-2, br} end
end
local replica, stale, n = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
local safety = tonumber(ARGV[11])
local C0 = 17
local vclock = tonumber(redis.call('HGET', KEYS[1], 'vclock')) or 0
-- The candidate whose client finishes first; on a tie, the client served
-- longest ago.
local BATCH_OFFSET = 1e15
local pick, start, finish, seq, place = 1, 0, 0, 0, 0
for i = 1, n do
  local b = C0 + (i - 1) * 6
  local c = ARGV[b + 1]
  local cf = tonumber(redis.call('HGET', KEYS[8], 'f:' .. c)) or 0
  local cs = tonumber(redis.call('HGET', KEYS[8], 's:' .. c)) or 0
  local s = math.max(vclock, cf)
  local f = s + tonumber(ARGV[b + 2])
  local p = f
  if ARGV[b + 6] == '1' then p = f + BATCH_OFFSET end
  if i == 1 or p < place or (p == place and cs < seq) then
    pick, start, finish, seq, place = i, s, f, cs, p
  end
end
local pb = C0 + (pick - 1) * 6
local client = ARGV[pb + 1]
local cost = {tonumber(ARGV[pb + 3]), tonumber(ARGV[pb + 4]), tonumber(ARGV[pb + 5])}
-- Registers this replica's head, so that others defer to it while it waits.
local function register()
  redis.call('ZADD', KEYS[6], place, replica)
  redis.call('ZADD', KEYS[7], now, replica)
  redis.call('HSET', KEYS[8], 'h:' .. replica, seq, 'c:' .. replica, client)
  keep_all()
end
if not force and redis.call('ZCARD', KEYS[6]) > 0 then
  local gone = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now - stale)
  for _, r in ipairs(gone) do
    redis.call('ZREM', KEYS[6], r)
    redis.call('ZREM', KEYS[7], r)
    redis.call('HDEL', KEYS[8], 'h:' .. r, 'c:' .. r)
  end
  -- Another replica's head goes first if its client finishes earlier, or as
  -- early and was served longer ago (the same client's heads do not wait on
  -- each other).
  local ahead = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', place, 'WITHSCORES')
  for i = 1, #ahead, 2 do
    local r = ahead[i]
    if r ~= replica then
      local rf = tonumber(ahead[i + 1])
      local rc = redis.call('HGET', KEYS[8], 'c:' .. r)
      local rs = tonumber(redis.call('HGET', KEYS[8], 'h:' .. r)) or 0
      if rf < place or (rc ~= client and (rs < seq or (rs == seq and r < replica))) then
        register()
        return {-3, 0, pick}
      end
    end
  end
end
local lim = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])}
local bcap = {tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])}
local depth = {tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])}
local burst = tonumber(ARGV[5])
local margin = tonumber(ARGV[6])
local bw = burst + margin
local mw = 60000 + margin
local function expire(z, window, f, last)
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', now - window)
  for _, id in ipairs(old) do
    local c = redis.call('HGET', KEYS[4], id)
    if c then
      local v = parse(c)
      for d = 1, 3 do
        if v[d] > 0 then redis.call('HINCRBY', KEYS[1], f .. d, -v[d]) end
      end
      if last then redis.call('HDEL', KEYS[4], id) end
    end
  end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now - window) end
end
expire(KEYS[2], bw, 'b', false)
expire(KEYS[3], mw, 'm', true)
-- An empty window sums to nothing, whatever a sum says.
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[1], 'b1', 0, 'b2', 0, 'b3', 0)
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[1], 'm1', 0, 'm2', 0, 'm3', 0)
  redis.call('DEL', KEYS[4])
end
local st = redis.call('HMGET', KEYS[1], 'b1', 'b2', 'b3', 'm1', 'm2', 'm3', 'paused',
  'h1r', 'h1u', 'h2r', 'h2u', 'h3r', 'h3u', 'qt', 'q1', 'q2', 'q3')
-- The buckets, drained to `base` at each dimension's rate (a unit per ms).
local qt = tonumber(st[14]) or now
local base = math.max(now, qt)
local rate, lvl, charge = {0, 0, 0}, {0, 0, 0}, {0, 0, 0}
for d = 1, 3 do
  if lim[d] >= 0 then
    rate[d] = lim[d] * safety / 60000
    lvl[d] = math.max(0, (tonumber(st[14 + d]) or 0) - rate[d] * (base - qt))
  end
  charge[d] = cost[d]
  local hr = tonumber(st[6 + 2 * d])
  local hu = tonumber(st[7 + 2 * d])
  -- Room the upstream confirms: the safety fraction need not hold it back.
  if not force and safety < 1 and hr and hu and hu > now and hr >= cost[d] then
    charge[d] = cost[d] * safety
  end
end
local at = now
local paused = tonumber(st[7]) or 0
if paused > at then at = paused end
if not force then
  for d = 1, 3 do
    if lim[d] >= 0 and cost[d] > 0 then
      local wins = {{tonumber(st[d]) or 0, bcap[d], KEYS[2], bw}, {tonumber(st[3 + d]) or 0, lim[d], KEYS[3], mw}}
      for _, w in ipairs(wins) do
        local used, cap = w[1], w[2]
        if used + cost[d] > cap then
          local need = used + cost[d] - cap
          if cost[d] > cap then need = used end
          local freed = 0
          local found = false
          local es = redis.call('ZRANGE', w[3], 0, -1, 'WITHSCORES')
          for i = 1, #es, 2 do
            local c = redis.call('HGET', KEYS[4], es[i])
            if c then freed = freed + parse(c)[d] end
            if freed >= need then
              local when = tonumber(es[i + 1]) + w[4]
              if when > at then at = when end
              found = true
              break
            end
          end
          if not found and now + w[4] > at then at = now + w[4] end
        end
      end
      if rate[d] > 0 and lvl[d] + charge[d] > depth[d] + 0.000001 then
        local over = lvl[d] + charge[d] - depth[d]
        if charge[d] > depth[d] then over = lvl[d] end
        local when = base + math.ceil(over / rate[d])
        if when > at then at = when end
      end
    end
    -- What the upstream says is left paces every dimension it announces,
    -- limited here or not.
    local hr = tonumber(st[6 + 2 * d])
    local hu = tonumber(st[7 + 2 * d])
    if cost[d] > 0 and hr and hu and hu > now and hr < cost[d] and hu > at then at = hu end
  end
  if at > now + tonumber(ARGV[7]) then
    register()
    return {0, at - now, pick}
  end
end
local when = at
if force then
  when = now - tonumber(ARGV[7])
else
  -- Clients' places are history: a pool busy for days with ever new
  -- clients starts that history over rather than grow without end.
  if redis.call('HLEN', KEYS[8]) > 40000 then redis.call('DEL', KEYS[8]) end
  local served = redis.call('HINCRBY', KEYS[1], 'served', 1)
  redis.call('HSET', KEYS[8], 'f:' .. client, finish, 's:' .. client, served)
  redis.call('HSET', KEYS[1], 'vclock', start)
  if redis.call('ZREM', KEYS[6], replica) > 0 then
    redis.call('ZREM', KEYS[7], replica)
    redis.call('HDEL', KEYS[8], 'h:' .. replica, 'c:' .. replica)
  end
end
local id = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('ZADD', KEYS[2], when, id)
redis.call('ZADD', KEYS[3], when, id)
redis.call('HSET', KEYS[4], id, string.format('%d,%d,%d', cost[1], cost[2], cost[3]))
local qnew = math.max(base, when)
for d = 1, 3 do
  if cost[d] > 0 then
    redis.call('HINCRBY', KEYS[1], 'b' .. d, cost[d])
    redis.call('HINCRBY', KEYS[1], 'm' .. d, cost[d])
    local hr = tonumber(st[6 + 2 * d])
    if hr then redis.call('HSET', KEYS[1], 'h' .. d .. 'r', math.max(0, hr - cost[d])) end
  end
  local l = lvl[d]
  if rate[d] > 0 then l = math.max(0, l - rate[d] * (qnew - base)) + charge[d] end
  redis.call('HSET', KEYS[1], 'q' .. d, string.format('%.6f', l))
end
redis.call('HSET', KEYS[1], 'qt', qnew)
keep_all()
return {1, id, at - now, when, pick}
"#;

/// KEYS: state, burst, minute, cost, breaker, heads, seen, finish. ARGV: id,
/// cost x3.
const SETTLE: &str = r#"
local old = redis.call('HGET', KEYS[4], ARGV[1])
if not old then return 0 end
local o = parse(old)
local n = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])}
local in_burst = redis.call('ZSCORE', KEYS[2], ARGV[1])
for d = 1, 3 do
  local delta = n[d] - o[d]
  if delta ~= 0 then
    redis.call('HINCRBY', KEYS[1], 'm' .. d, delta)
    if in_burst then redis.call('HINCRBY', KEYS[1], 'b' .. d, delta) end
    -- The bucket: what drained of the old charge stays drained.
    local q = tonumber(redis.call('HGET', KEYS[1], 'q' .. d)) or 0
    redis.call('HSET', KEYS[1], 'q' .. d, string.format('%.6f', math.max(0, q + delta)))
  end
end
redis.call('HSET', KEYS[4], ARGV[1], string.format('%d,%d,%d', n[1], n[2], n[3]))
keep_all()
return 1
"#;

/// KEYS: state, burst, minute, cost, breaker, heads, seen, finish. ARGV: the
/// observed call's booking time, margin ms, then per dimension remaining and
/// reset ms (-1: not announced).
const OBSERVE: &str = r#"
local seen = tonumber(ARGV[1])
local margin = tonumber(ARGV[2])
for d = 1, 3 do
  local rem = tonumber(ARGV[1 + 2 * d])
  local reset = tonumber(ARGV[2 + 2 * d])
  if rem >= 0 then
    local untl = seen + reset + margin
    local cur = tonumber(redis.call('HGET', KEYS[1], 'h' .. d .. 's')) or -1
    if untl > now and cur <= seen then
      -- Calls booked since were not in the upstream's figure.
      local since = 0
      local es = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. seen, '+inf')
      for _, id in ipairs(es) do
        local c = redis.call('HGET', KEYS[4], id)
        if c then since = since + parse(c)[d] end
      end
      redis.call('HSET', KEYS[1], 'h' .. d .. 'r', math.max(0, rem - since),
        'h' .. d .. 'u', untl, 'h' .. d .. 's', seen)
    end
  end
end
keep_all()
return 1
"#;

/// KEYS: state, burst, minute, cost, breaker, heads, seen, finish. ARGV:
/// delay ms (margin included).
const PAUSE: &str = r#"
local untl = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('HGET', KEYS[1], 'paused')) or 0
if untl > cur then redis.call('HSET', KEYS[1], 'paused', untl) end
keep_all()
return 1
"#;

/// KEYS: state, burst, minute, cost, breaker, heads, seen, finish. ARGV: id,
/// how late the call left (ms). The call counts from when it left: its
/// entries move later in both windows (back into the burst window, sums
/// and all, if it had already left it).
const REDATE: &str = r#"
local id = ARGV[1]
local late = tonumber(ARGV[2])
local s = redis.call('ZSCORE', KEYS[3], id)
local c = redis.call('HGET', KEYS[4], id)
if not s or not c or late <= 0 then return 0 end
local at = tonumber(s) + late
if not redis.call('ZSCORE', KEYS[2], id) then
  local v = parse(c)
  for d = 1, 3 do
    if v[d] > 0 then redis.call('HINCRBY', KEYS[1], 'b' .. d, v[d]) end
  end
end
redis.call('ZADD', KEYS[2], at, id)
redis.call('ZADD', KEYS[3], at, id)
keep_all()
return 1
"#;

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{LIB}{body}"))
}

fn ms(d: Duration) -> u64 {
    (d.as_millis().min(MAX_NUMBER as u128)) as u64
}

fn number(n: u64) -> u64 {
    n.min(MAX_NUMBER)
}

fn costs(cost: &Cost) -> [u64; 3] {
    cost.dims().map(number)
}

static SCRIPTS: std::sync::LazyLock<[redis::Script; 5]> =
    std::sync::LazyLock::new(|| [BOOK, SETTLE, OBSERVE, PAUSE, REDATE].map(script));

fn book() -> &'static redis::Script {
    &SCRIPTS[0]
}

impl Redis {
    /// The keys of the pool `name` paid by `credential` (a hash, never a key).
    pub fn pool_key(&self, name: &str, credential: &str) -> PoolKey {
        let mut h = blake3::Hasher::new();
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update(credential.as_bytes());
        let id = &h.finalize().to_hex()[..20];
        let base = format!("{}pool:{{{id}}}:", self.base);
        PoolKey {
            keys: [
                "state", "burst", "minute", "cost", "breaker", "heads", "seen", "finish",
            ]
            .map(|k| format!("{base}{k}")),
        }
    }

    /// Asks the shared ledger to reserve a slot within `horizon` for one of
    /// `candidates` (at most [`MAX_CANDIDATES`]): the one whose client is owed
    /// the most in the order shared by all replicas. Answers which one.
    pub async fn book(
        &self,
        pool: &PoolKey,
        candidates: &[Candidate<'_>],
        limits: &Limits,
        horizon: Duration,
    ) -> Result<(Booking, usize), Unavailable> {
        let candidates = &candidates[..candidates.len().min(MAX_CANDIDATES)];
        if candidates.is_empty() {
            return Ok((Booking::Wait(horizon), 0));
        }
        let reply: Vec<i64> = self
            .run_book(pool, "book", candidates, limits, ms(horizon))
            .await?;
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
        let picked = |i: usize| (at(i) as usize).clamp(1, candidates.len()) - 1;
        Ok(match reply.first().copied() {
            Some(1) => (
                Booking::Booked {
                    id: at(1),
                    wait: Duration::from_millis(at(2)),
                    at: at(3),
                },
                picked(4),
            ),
            Some(-2) => (Booking::Tripped(Duration::from_millis(at(1))), 0),
            Some(-3) => (Booking::Deferred, picked(2)),
            _ => (Booking::Wait(Duration::from_millis(at(1))), picked(2)),
        })
    }

    /// Records in the shared ledger what this replica spent on its own while
    /// Redis was away, `age` ago, so rejoining is not a burst.
    pub(crate) async fn replay(
        &self,
        pool: &PoolKey,
        spent: &[(Duration, Cost)],
        limits: &Limits,
    ) -> Result<(), Unavailable> {
        for (age, cost) in spent {
            let alone = Candidate {
                client: "",
                weight: 0,
                cost: *cost,
                batch: false,
            };
            self.run_book(pool, "force", &[alone], limits, ms(*age))
                .await?;
        }
        Ok(())
    }

    async fn run_book(
        &self,
        pool: &PoolKey,
        mode: &str,
        candidates: &[Candidate<'_>],
        limits: &Limits,
        last: u64,
    ) -> Result<Vec<i64>, Unavailable> {
        let mut conn = self.conn()?;
        let lim = limits
            .per_minute
            .map(|l| l.map_or(-1, |l| number(l) as i64));
        let mut inv = book().prepare_invoke();
        for k in &pool.keys {
            inv.key(k);
        }
        inv.arg(mode)
            .arg(lim[0])
            .arg(lim[1])
            .arg(lim[2])
            .arg(ms(limits.burst))
            .arg(ms(limits.margin))
            .arg(last)
            .arg(&self.replica)
            .arg(ms(STALE_HEAD))
            .arg(candidates.len())
            .arg(limits.safety_fraction());
        for cap in limits.burst_caps() {
            inv.arg(number(cap));
        }
        for depth in limits.depths() {
            inv.arg(depth.min(MAX_NUMBER as f64));
        }
        for c in candidates {
            let cost = costs(&c.cost);
            inv.arg(c.client)
                .arg(number(c.weight))
                .arg(cost[0])
                .arg(cost[1])
                .arg(cost[2])
                .arg(if c.batch { "1" } else { "0" });
        }
        self.timed(inv.invoke_async(&mut conn)).await
    }

    /// Replaces what a booked call counts as, once its real cost is known.
    pub async fn settle(&self, pool: &PoolKey, id: u64, cost: &Cost) -> Result<(), Unavailable> {
        let mut conn = self.conn()?;
        let c = costs(cost);
        let mut inv = SCRIPTS[1].prepare_invoke();
        for k in &pool.keys {
            inv.key(k);
        }
        inv.arg(id).arg(c[0]).arg(c[1]).arg(c[2]);
        self.timed(inv.invoke_async::<i64>(&mut conn)).await?;
        Ok(())
    }

    /// The booked call `id` left `late` ms after its reservation: it counts
    /// from then.
    pub async fn redate(&self, pool: &PoolKey, id: u64, late: u64) -> Result<(), Unavailable> {
        let mut conn = self.conn()?;
        let mut inv = SCRIPTS[4].prepare_invoke();
        for k in &pool.keys {
            inv.key(k);
        }
        inv.arg(id).arg(number(late));
        self.timed(inv.invoke_async::<i64>(&mut conn)).await?;
        Ok(())
    }

    /// Folds in the upstream's `x-ratelimit-remaining-*` seen on the answer to
    /// the call booked at `at` (Redis's clock).
    pub async fn observe(
        &self,
        pool: &PoolKey,
        at: u64,
        margin: Duration,
        headers: &RateLimitHeaders,
    ) -> Result<(), Unavailable> {
        let mut conn = self.conn()?;
        let mut inv = SCRIPTS[2].prepare_invoke();
        for k in &pool.keys {
            inv.key(k);
        }
        inv.arg(at).arg(ms(margin));
        for dim in [headers.requests, headers.tokens, headers.images] {
            match dim {
                Some(r) => inv.arg(number(r.remaining) as i64).arg(ms(r.reset) as i64),
                None => inv.arg(-1i64).arg(-1i64),
            };
        }
        self.timed(inv.invoke_async::<i64>(&mut conn)).await?;
        Ok(())
    }

    /// This replica's queue is empty: its head no longer holds others back.
    pub(crate) async fn leave(&self, pool: &PoolKey) -> Result<(), Unavailable> {
        let mut conn = self.conn()?;
        let pipe = redis::pipe()
            .zrem(&pool.keys[5], &self.replica)
            .ignore()
            .zrem(&pool.keys[6], &self.replica)
            .ignore()
            .hdel(
                &pool.keys[7],
                &[format!("h:{}", self.replica), format!("c:{}", self.replica)],
            )
            .ignore()
            .to_owned();
        self.timed(pipe.query_async::<()>(&mut conn)).await
    }

    /// Pauses the pool for every replica: the upstream said it is rate limited.
    pub async fn pause(&self, pool: &PoolKey, delay: Duration) -> Result<(), Unavailable> {
        let mut conn = self.conn()?;
        let mut inv = SCRIPTS[3].prepare_invoke();
        for k in &pool.keys {
            inv.key(k);
        }
        inv.arg(ms(delay));
        self.timed(inv.invoke_async::<i64>(&mut conn)).await?;
        Ok(())
    }
}

impl PoolKey {
    /// The key of the pool's quota breaker.
    pub(super) fn breaker(&self) -> &str {
        &self.keys[4]
    }
}
