//! The wait for budget: one FIFO lane per client, served fairly by what each
//! request spends, not by count. Each request gets a virtual finish time (start
//! fair queueing): its lane's last finish, or the queue's clock if later, plus
//! its weight (its cost as a share of the pool's burst capacity in its dearest
//! dimension); the earliest finish goes next. A client asking for ten images a
//! call gets its turn a tenth as often as one asking for one. Each lane keeps
//! running cost totals, so "what is ahead of a new request" is O(clients · log).
//!
//! Two classes wait apart: interactive lanes go first, batch lanes after, but
//! batch keeps a minimum share of turns (`queue.batch_min_share`) while both
//! wait, so it never starves; within a class, fairness is as above.

use std::collections::{BTreeMap, VecDeque};

use foldhash::HashMap;
use std::sync::Arc;

use crate::vocab::cost::{Cost, Priority};

struct Item<T> {
    id: u64,
    cost: Cost,
    weight: u64,
    /// Virtual finish time.
    tag: u64,
    /// Total cost pushed into the lane up to and including this item.
    cumulative: Cost,
    value: T,
}

struct Lane<T> {
    items: VecDeque<Item<T>>,
    pushed: Cost,
    /// Total cost that has left the lane (served or removed).
    gone: Cost,
    /// Virtual finish of the lane's last item.
    last_tag: u64,
    class: Priority,
}

fn slot(class: Priority) -> usize {
    match class {
        Priority::Interactive => 0,
        Priority::Batch => 1,
    }
}

impl<T> Lane<T> {
    /// Cost of the first `n` items.
    fn prefix(&self, n: usize) -> Cost {
        match n.checked_sub(1).and_then(|i| self.items.get(i)) {
            Some(item) => sub(&item.cumulative, &self.gone),
            None if n == 0 => Cost::default(),
            None => sub(&self.pushed, &self.gone),
        }
    }
}

fn sub(a: &Cost, b: &Cost) -> Cost {
    Cost {
        requests: a.requests.saturating_sub(b.requests),
        tokens: a.tokens.saturating_sub(b.tokens),
        images: a.images.saturating_sub(b.images),
    }
}

pub(crate) use crate::vocab::cost::DEFAULT_BATCH_SHARE;

/// One turn in how many for a share (0: none).
fn batch_every(share: f64) -> u32 {
    if share.is_nan() || share <= 0.0 {
        0
    } else {
        (1.0 / share.min(1.0)).ceil().min(f64::from(u32::MAX)) as u32
    }
}

/// A request's weight: its cost as millionths of `caps` (a pool's burst
/// capacity per dimension), in its dearest dimension; at least 1.
pub(crate) fn weight(cost: &Cost, caps: &[u64; 3]) -> u64 {
    cost.dims()
        .iter()
        .zip(caps)
        .filter(|(_, cap)| **cap > 0 && **cap < u64::MAX)
        .map(|(c, cap)| {
            let w = (u128::from(*c) * 1_000_000).div_ceil(u128::from(*cap));
            u64::try_from(w).unwrap_or(u64::MAX)
        })
        .max()
        .unwrap_or(1)
        .max(1)
}

pub(crate) struct FairQueue<T> {
    lanes: HashMap<Arc<str>, Lane<T>>,
    /// The head of every lane, by (virtual finish, arrival): interactive
    /// lanes', then batch lanes'.
    heads: [BTreeMap<(u64, u64), Arc<str>>; 2],
    /// Interactive turns taken in a row while batch waited.
    since_batch: u32,
    /// Batch takes one turn in this many while both wait (0: none owed).
    batch_every: u32,
    /// Requests waiting per class.
    waiting: [usize; 2],
    /// Virtual time: the start of the last request served.
    clock: u64,
    /// Burst capacity per dimension, to weigh requests; all zero weighs each
    /// request as one.
    caps: [u64; 3],
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue::new([0; 3])
    }
}

impl<T> FairQueue<T> {
    pub(crate) fn new(caps: [u64; 3]) -> Self {
        FairQueue {
            lanes: HashMap::default(),
            heads: [BTreeMap::new(), BTreeMap::new()],
            since_batch: 0,
            batch_every: batch_every(DEFAULT_BATCH_SHARE),
            waiting: [0; 2],
            clock: 0,
            caps,
            len: 0,
        }
    }

    /// The share of turns batch keeps while interactive requests wait too
    /// (0: none, batch waits until no interactive request does).
    pub(crate) fn set_batch_min_share(&mut self, share: f64) {
        self.batch_every = batch_every(share);
    }

    /// Requests of `class` waiting.
    pub(crate) fn len_of(&self, class: Priority) -> usize {
        self.waiting[slot(class)]
    }

    /// Whose turn it is: interactive, unless only batch waits or batch is
    /// owed its share.
    fn next_class(&self) -> usize {
        match (self.heads[0].is_empty(), self.heads[1].is_empty()) {
            (true, _) => 1,
            (false, true) => 0,
            (false, false) if self.batch_owed() => 1,
            _ => 0,
        }
    }

    /// Batch takes one turn in this many while both classes wait (0: none).
    pub(crate) fn batch_every(&self) -> u32 {
        self.batch_every
    }

    fn batch_owed(&self) -> bool {
        self.batch_every > 0 && self.since_batch.saturating_add(1) >= self.batch_every
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// New burst capacities, for requests that arrive from now on.
    pub(crate) fn set_caps(&mut self, caps: [u64; 3]) {
        self.caps = caps;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn tag_for(&self, client: &Arc<str>, cost: &Cost) -> (u64, u64) {
        let w = weight(cost, &self.caps);
        let last = self.lanes.get(client).map_or(0, |l| l.last_tag);
        (w, last.max(self.clock).saturating_add(w))
    }

    #[cfg(test)]
    pub(crate) fn push(&mut self, client: &Arc<str>, id: u64, cost: Cost, value: T) {
        self.push_as(client, Priority::Interactive, id, cost, value)
    }

    /// Queues a request of `class` in `client`'s lane (a lane has one class:
    /// a client sending both has a lane for each, under different names).
    pub(crate) fn push_as(
        &mut self,
        client: &Arc<str>,
        class: Priority,
        id: u64,
        cost: Cost,
        value: T,
    ) {
        let (weight, tag) = self.tag_for(client, &cost);
        let lane = self.lanes.entry(client.clone()).or_insert_with(|| Lane {
            items: VecDeque::new(),
            pushed: Cost::default(),
            gone: Cost::default(),
            last_tag: 0,
            class,
        });
        let class = lane.class;
        lane.pushed.add(&cost);
        lane.last_tag = tag;
        if lane.items.is_empty() {
            self.heads[slot(class)].insert((tag, id), client.clone());
        }
        lane.items.push_back(Item {
            id,
            cost,
            weight,
            tag,
            cumulative: lane.pushed,
            value,
        });
        self.len += 1;
        self.waiting[slot(class)] += 1;
    }

    /// The request whose turn it is.
    pub(crate) fn front(&self) -> Option<(&Cost, &T)> {
        let (_, client) = self.heads[self.next_class()].first_key_value()?;
        let lane = self.lanes.get(client)?;
        lane.items.front().map(|i| (&i.cost, &i.value))
    }

    /// Takes the request whose turn it is.
    pub(crate) fn pop(&mut self) -> Option<T> {
        let (_, client) = self.heads[self.next_class()].first_key_value()?;
        let client = client.clone();
        self.pop_lane(&client)
    }

    /// The first request of each client's lane, with its client, its place
    /// in this queue's own order, and whether it may go before batch lanes
    /// elsewhere (interactive, or batch owed its share): those whose turn
    /// comes first in this queue come first.
    pub(crate) fn lane_heads(
        &self,
    ) -> impl Iterator<Item = (&Arc<str>, &Cost, &T, (u64, u64), bool)> {
        let first = self.next_class();
        let owed = self.batch_owed();
        [first, 1 - first].into_iter().flat_map(move |class| {
            self.heads[class].iter().filter_map(move |(order, client)| {
                let item = self.lanes.get(client)?.items.front()?;
                Some((client, &item.cost, &item.value, *order, class == 0 || owed))
            })
        })
    }

    /// Takes the first request of `client`'s lane (another order than this
    /// queue's own may pick it: the fair order across replicas).
    pub(crate) fn pop_lane(&mut self, client: &Arc<str>) -> Option<T> {
        let lane = self.lanes.get_mut(client)?;
        let item = lane.items.pop_front()?;
        let class = slot(lane.class);
        self.heads[class].remove(&(item.tag, item.id));
        lane.gone.add(&item.cost);
        self.clock = self.clock.max(item.tag.saturating_sub(item.weight));
        match lane.items.front() {
            Some(next) => {
                self.heads[class].insert((next.tag, next.id), client.clone());
            }
            None => {
                self.lanes.remove(client);
            }
        }
        self.len -= 1;
        self.waiting[class] -= 1;
        // Batch's share: counted in turns taken while batch waited.
        match class {
            0 if self.waiting[1] > 0 => self.since_batch = self.since_batch.saturating_add(1),
            0 => self.since_batch = 0,
            _ => self.since_batch = 0,
        }
        if self.len == 0 {
            // Nothing waits: virtual time can start over.
            self.clock = 0;
        }
        Some(item.value)
    }

    /// Removes a request that no longer waits (its client left).
    pub(crate) fn remove(&mut self, client: &Arc<str>, id: u64) -> Option<T> {
        let lane = self.lanes.get_mut(client)?;
        let pos = lane.items.iter().position(|i| i.id == id)?;
        let item = lane.items.remove(pos)?;
        let class = slot(lane.class);
        if pos == 0 {
            self.heads[class].remove(&(item.tag, item.id));
        }
        // Later items counted it in their totals and finish times: take it out.
        for later in lane.items.iter_mut().skip(pos) {
            later.cumulative = sub(&later.cumulative, &item.cost);
            later.tag = later.tag.saturating_sub(item.weight);
        }
        lane.pushed = sub(&lane.pushed, &item.cost);
        lane.last_tag = lane.last_tag.saturating_sub(item.weight);
        match lane.items.front() {
            Some(next) if pos == 0 => {
                self.heads[class].insert((next.tag, next.id), client.clone());
            }
            Some(_) => {}
            None => {
                self.lanes.remove(client);
            }
        }
        self.len -= 1;
        self.waiting[class] -= 1;
        if self.len == 0 {
            self.clock = 0;
        }
        Some(item.value)
    }

    /// Cost served before a request of `cost` that `client` would add now: its
    /// own lane, and from every other lane what finishes no later than it would.
    #[cfg(test)]
    pub(crate) fn ahead_of_new(&self, client: &Arc<str>, cost: &Cost) -> Cost {
        self.ahead_of_new_as(client, Priority::Interactive, cost)
    }

    /// [`FairQueue::ahead_of_new`] for a request of `class`: an interactive
    /// one waits for interactive lanes alone (batch's share aside), a batch
    /// one for every interactive request and the batch lanes before it.
    pub(crate) fn ahead_of_new_as(&self, client: &Arc<str>, class: Priority, cost: &Cost) -> Cost {
        let (_, tag) = self.tag_for(client, cost);
        let mut total = Cost::default();
        for (c, lane) in &self.lanes {
            let n = if c == client {
                lane.items.len()
            } else if lane.class == class {
                lane.items.partition_point(|i| i.tag <= tag)
            } else if lane.class == Priority::Interactive {
                lane.items.len()
            } else {
                0
            };
            total.add(&lane.prefix(n));
        }
        total
    }

    /// Everything waiting.
    pub(crate) fn total(&self) -> Cost {
        let mut total = Cost::default();
        for lane in self.lanes.values() {
            total.add(&sub(&lane.pushed, &lane.gone));
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(tokens: u64) -> Cost {
        Cost {
            requests: 1,
            tokens,
            images: 0,
        }
    }

    #[test]
    fn clients_take_turns_and_each_lane_is_fifo() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut q = FairQueue::default();
        for i in 0..100 {
            q.push(&a, i, c(1), format!("a{i}"));
        }
        q.push(&b, 100, c(1), "b0".to_string());
        // b's single request waits for at most one of a's.
        assert_eq!(q.pop().unwrap(), "a0");
        assert_eq!(q.pop().unwrap(), "b0");
        assert_eq!(q.pop().unwrap(), "a1");
        assert_eq!(q.pop().unwrap(), "a2");
        assert_eq!(q.len(), 97);
    }

    #[test]
    fn interactive_goes_first_and_batch_keeps_its_share() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "batch:b".into());
        let mut q = FairQueue::default();
        for i in 0..30 {
            q.push_as(&b, Priority::Batch, i, c(1), format!("b{i}"));
        }
        for i in 0..30 {
            q.push_as(&a, Priority::Interactive, 100 + i, c(1), format!("a{i}"));
        }
        assert_eq!(
            (q.len_of(Priority::Interactive), q.len_of(Priority::Batch)),
            (30, 30)
        );
        let order: Vec<String> = (0..30).map(|_| q.pop().unwrap()).collect();
        // Nine interactive turns, then one batch: 10 % while both wait.
        let batch: Vec<usize> = order
            .iter()
            .enumerate()
            .filter(|(_, v)| v.starts_with('b'))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(batch, [9, 19, 29], "{order:?}");
        // A new interactive request waits for interactive ones alone; a
        // batch one for every interactive one too.
        let ahead = q.ahead_of_new_as(&"x".into(), Priority::Interactive, &c(1));
        assert_eq!(ahead.requests, 0, "batch is not ahead of interactive");
        let ahead = q.ahead_of_new_as(&"y".into(), Priority::Batch, &c(1));
        assert!(ahead.requests >= 3, "{ahead:?}");
        // Interactive gone: batch alone is served in order.
        while q.len_of(Priority::Interactive) > 0 {
            q.pop();
        }
        assert_eq!(q.pop().unwrap(), "b3");
        // With no share, batch waits until interactive is gone.
        let mut q = FairQueue::default();
        q.set_batch_min_share(0.0);
        for i in 0..20 {
            q.push_as(&b, Priority::Batch, i, c(1), i);
            q.push_as(&a, Priority::Interactive, 100 + i, c(1), 100 + i);
        }
        let first: Vec<u64> = (0..20).map(|_| q.pop().unwrap()).collect();
        assert!(first.iter().all(|v| *v >= 100), "{first:?}");
    }

    #[test]
    fn removal_keeps_order_and_totals() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut q = FairQueue::default();
        q.push(&a, 1, c(10), 1);
        q.push(&a, 2, c(20), 2);
        q.push(&a, 3, c(30), 3);
        q.push(&b, 4, c(5), 4);
        assert_eq!(q.remove(&a, 2), Some(2));
        assert_eq!(
            q.total(),
            Cost {
                requests: 3,
                tokens: 45,
                images: 0
            }
        );
        // a new request from b: b's 1 + two of a's (10 + 30).
        assert_eq!(q.ahead_of_new(&b, &c(1)).tokens, 45);
        assert_eq!(
            q.ahead_of_new(&"c".into(), &c(1)).tokens,
            15,
            "one of each lane"
        );
        assert_eq!(q.remove(&b, 4), Some(4));
        assert_eq!(q.remove(&b, 4), None);
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.ahead_of_new(&a, &c(1)).tokens, 30);
        assert_eq!(q.pop(), Some(3));
        assert!(q.is_empty() && q.front().is_none());
        assert_eq!(q.total(), Cost::default());
    }

    #[test]
    fn turns_follow_what_requests_spend_not_their_count() {
        // Burst capacity of 10 images: a ten-image request weighs ten ones.
        let (big, small): (Arc<str>, Arc<str>) = ("big".into(), "small".into());
        let mut q = FairQueue::new([0, 0, 10]);
        let images = |n| Cost {
            requests: 1,
            tokens: 0,
            images: n,
        };
        for i in 0..3 {
            q.push(&big, i, images(10), format!("big{i}"));
        }
        for i in 0..20 {
            q.push(&small, 100 + i, images(1), format!("small{i}"));
        }
        // In the first 21 turns: two tens and nineteen ones, about as many
        // images for each client.
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).take(21).collect();
        let bigs = order.iter().filter(|o| o.starts_with("big")).count();
        assert_eq!(bigs, 2, "{order:?}");
        assert_eq!(order[0], "small0", "a ten does not go before a one");
        assert_eq!(weight(&images(10), &[0, 0, 10]), 1_000_000);
        assert_eq!(weight(&images(1), &[0, 0, 0]), 1, "no caps: by count");
    }
}
