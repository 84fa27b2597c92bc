//! The wait for budget: one FIFO lane per client, served in turns, so one client's
//! burst cannot starve another. Each lane keeps running cost totals, so "what is
//! ahead of a new request" is O(clients), not O(queue).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::vocab::cost::Cost;

struct Item<T> {
    id: u64,
    cost: Cost,
    /// Total cost pushed into the lane up to and including this item.
    cumulative: Cost,
    value: T,
}

struct Lane<T> {
    items: VecDeque<Item<T>>,
    pushed: Cost,
    /// Total cost that has left the lane (served or removed).
    gone: Cost,
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
        requests: a.requests - b.requests,
        tokens: a.tokens - b.tokens,
        images: a.images - b.images,
    }
}

pub struct FairQueue<T> {
    lanes: HashMap<Arc<str>, Lane<T>>,
    /// Whose turn is next: front first.
    turns: VecDeque<Arc<str>>,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue {
            lanes: HashMap::new(),
            turns: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> FairQueue<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, client: &Arc<str>, id: u64, cost: Cost, value: T) {
        let lane = self.lanes.entry(client.clone()).or_insert_with(|| {
            self.turns.push_back(client.clone());
            Lane {
                items: VecDeque::new(),
                pushed: Cost::default(),
                gone: Cost::default(),
            }
        });
        lane.pushed.add(&cost);
        lane.items.push_back(Item {
            id,
            cost,
            cumulative: lane.pushed,
            value,
        });
        self.len += 1;
    }

    /// The request whose turn it is.
    pub fn front(&self) -> Option<(&Cost, &T)> {
        let lane = self.lanes.get(self.turns.front()?)?;
        lane.items.front().map(|i| (&i.cost, &i.value))
    }

    /// Takes the request whose turn it is; its client goes to the back of the turns.
    pub fn pop(&mut self) -> Option<T> {
        let client = self.turns.pop_front()?;
        let lane = self.lanes.get_mut(&client)?;
        let item = lane.items.pop_front()?;
        lane.gone.add(&item.cost);
        if lane.items.is_empty() {
            self.lanes.remove(&client);
        } else {
            self.turns.push_back(client);
        }
        self.len -= 1;
        Some(item.value)
    }

    /// Removes a request that no longer waits (its client left).
    pub fn remove(&mut self, client: &Arc<str>, id: u64) -> Option<T> {
        let lane = self.lanes.get_mut(client)?;
        let pos = lane.items.iter().position(|i| i.id == id)?;
        let item = lane.items.remove(pos)?;
        // Later items' running totals counted it: take it out of them.
        for later in lane.items.iter_mut().skip(pos) {
            later.cumulative = sub(&later.cumulative, &item.cost);
        }
        lane.pushed = sub(&lane.pushed, &item.cost);
        if lane.items.is_empty() {
            self.lanes.remove(client);
            self.turns.retain(|c| c != client);
        }
        self.len -= 1;
        Some(item.value)
    }

    /// Cost served before a request that `client` would add now: its own lane, and
    /// from every other lane as many as one more than its own lane holds.
    pub fn ahead_of_new(&self, client: &Arc<str>) -> Cost {
        let own = self.lanes.get(client).map_or(0, |l| l.items.len());
        let mut total = Cost::default();
        for (c, lane) in &self.lanes {
            let n = if c == client {
                own
            } else {
                lane.items.len().min(own + 1)
            };
            total.add(&lane.prefix(n));
        }
        total
    }

    /// Everything waiting.
    pub fn total(&self) -> Cost {
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
        assert_eq!(q.ahead_of_new(&b).tokens, 45);
        assert_eq!(q.ahead_of_new(&"c".into()).tokens, 15, "one of each lane");
        assert_eq!(q.remove(&b, 4), Some(4));
        assert_eq!(q.remove(&b, 4), None);
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.ahead_of_new(&a).tokens, 30);
        assert_eq!(q.pop(), Some(3));
        assert!(q.is_empty() && q.front().is_none());
        assert_eq!(q.total(), Cost::default());
    }
}
