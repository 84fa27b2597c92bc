//! What each client has spent this UTC day and calendar month, in millionths
//! of a dollar: in Redis when configured (shared by every replica), else in
//! this process and a redb file (`spend.path`) written every second, so a
//! restart does not reset it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use redb::{ReadableTable, TableDefinition};

use crate::state::Redis;

const TOTALS: TableDefinition<&str, i64> = TableDefinition::new("spend");

/// How often the in-process totals are written to the file.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// A UTC day and month, as the keys of their totals name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Period {
    pub(crate) day: String,
    pub(crate) month: String,
    /// Until the day ends, and the month.
    pub(crate) day_left: Duration,
    pub(crate) month_left: Duration,
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl Period {
    pub(crate) fn at(now: SystemTime) -> Period {
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let secs = i64::try_from(secs).unwrap_or(i64::MAX / 2);
        let days = secs.div_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        let next_month = days_from_civil(ny, nm, 1) * 86_400;
        let left = |until: i64| Duration::from_secs(u64::try_from(until - secs).unwrap_or(0));
        Period {
            day: format!("{y:04}-{m:02}-{d:02}"),
            month: format!("{y:04}-{m:02}"),
            day_left: left((days + 1) * 86_400),
            month_left: left(next_month),
        }
    }
}

/// Where the totals are kept.
pub(crate) enum Ledger {
    Local(Arc<Local>),
    Redis(Arc<Redis>),
}

/// In this process, written to a redb file.
pub(crate) struct Local {
    totals: Mutex<HashMap<String, i64>>,
    dirty: Mutex<HashSet<String>>,
    db: Option<redb::Database>,
}

/// A refusal: which period's cap, and what was spent of it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Over {
    pub(crate) month: bool,
    pub(crate) spent: i64,
}

fn day_key(client: &str, p: &Period) -> String {
    format!("d:{}:{client}", p.day)
}

fn month_key(client: &str, p: &Period) -> String {
    format!("m:{}:{client}", p.month)
}

impl Ledger {
    /// Opens the file (`None`: in memory alone) and takes up its totals of
    /// this day and month; older ones are dropped.
    pub(crate) fn local(path: Option<&std::path::Path>) -> Result<Ledger, String> {
        let mut totals = HashMap::new();
        let db = match path {
            Some(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("spend.path: {}: {e}", dir.display()))?;
                }
                let db = redb::Database::create(path)
                    .map_err(|e| format!("spend.path: {}: {e}", path.display()))?;
                let now = Period::at(SystemTime::now());
                let txn = db.begin_write().map_err(|e| format!("spend.path: {e}"))?;
                {
                    let mut table = txn
                        .open_table(TOTALS)
                        .map_err(|e| format!("spend.path: {e}"))?;
                    let mut old = Vec::new();
                    for entry in table.iter().map_err(|e| format!("spend.path: {e}"))? {
                        let (k, v) = entry.map_err(|e| format!("spend.path: {e}"))?;
                        let k = k.value().to_string();
                        let current = k.starts_with(&format!("d:{}:", now.day))
                            || k.starts_with(&format!("m:{}:", now.month));
                        match current {
                            true => {
                                totals.insert(k, v.value());
                            }
                            false => old.push(k),
                        }
                    }
                    for k in old {
                        let _ = table.remove(k.as_str());
                    }
                }
                txn.commit().map_err(|e| format!("spend.path: {e}"))?;
                Some(db)
            }
            None => None,
        };
        let local = Arc::new(Local {
            totals: Mutex::new(totals),
            dirty: Mutex::new(HashSet::new()),
            db,
        });
        {
            // Also in memory alone: past days are forgotten.
            let weak = Arc::downgrade(&local);
            std::thread::Builder::new()
                .name("penstock-spend-flush".into())
                .spawn(move || flush_periodically(weak))
                .map_err(|e| format!("spend: {e}"))?;
        }
        Ok(Ledger::Local(local))
    }

    /// Adds `micros` to `client`'s day and month if both stay within `caps`;
    /// else says which is spent. Redis away: refused as the day (nothing
    /// spent is known), so no cap is ever passed.
    pub(crate) async fn reserve(
        &self,
        client: &str,
        p: &Period,
        micros: i64,
        caps: (Option<u64>, Option<u64>),
    ) -> Result<(), Option<Over>> {
        match self {
            Ledger::Local(l) => l.add(client, p, micros, Some(caps)).map(|_| ()),
            Ledger::Redis(r) => match r
                .spend(client, (&p.day, &p.month), micros, Some(caps))
                .await
            {
                Ok((1, ..)) => Ok(()),
                Ok((-2, _, m)) => Err(Some(Over {
                    month: true,
                    spent: m,
                })),
                Ok((_, d, _)) => Err(Some(Over {
                    month: false,
                    spent: d,
                })),
                Err(_) => Err(None),
            },
        }
    }

    /// Adds `delta` (what a call cost beyond or below its reservation).
    pub(crate) async fn settle(&self, client: &str, p: &Period, delta: i64) {
        if delta == 0 {
            return;
        }
        match self {
            Ledger::Local(l) => {
                let _ = l.add(client, p, delta, None);
            }
            Ledger::Redis(r) => {
                if r.spend(client, (&p.day, &p.month), delta, None)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        client,
                        delta_usd = delta as f64 / 1e6,
                        "redis unavailable: a call's spend was not settled"
                    );
                }
            }
        }
    }

    /// What `client` has spent this day and month (`None` where unknown).
    pub(crate) async fn spent(&self, client: &str, p: &Period) -> Option<(i64, i64)> {
        match self {
            Ledger::Local(l) => {
                let totals = l.totals.lock().unwrap_or_else(|e| e.into_inner());
                let get = |k: String| totals.get(&k).copied().unwrap_or(0);
                Some((get(day_key(client, p)), get(month_key(client, p))))
            }
            Ledger::Redis(r) => r
                .spend(client, (&p.day, &p.month), 0, None)
                .await
                .ok()
                .map(|(_, d, m)| (d, m)),
        }
    }
}

impl Local {
    fn add(
        &self,
        client: &str,
        p: &Period,
        delta: i64,
        caps: Option<(Option<u64>, Option<u64>)>,
    ) -> Result<(i64, i64), Option<Over>> {
        let (dk, mk) = (day_key(client, p), month_key(client, p));
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let d = totals.get(&dk).copied().unwrap_or(0);
        let m = totals.get(&mk).copied().unwrap_or(0);
        if let Some((dc, mc)) = caps {
            let over = |spent: i64, cap: Option<u64>| {
                cap.is_some_and(|c| i128::from(spent) + i128::from(delta) > i128::from(c))
            };
            if over(d, dc) {
                return Err(Some(Over {
                    month: false,
                    spent: d,
                }));
            }
            if over(m, mc) {
                return Err(Some(Over {
                    month: true,
                    spent: m,
                }));
            }
        }
        let (d, m) = (d.saturating_add(delta), m.saturating_add(delta));
        totals.insert(dk.clone(), d);
        totals.insert(mk.clone(), m);
        drop(totals);
        if self.db.is_some() {
            let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            dirty.insert(dk);
            dirty.insert(mk);
        }
        Ok((d, m))
    }

    /// Forgets the totals of days and months that are over (the file's
    /// too): a ledger running for months holds this day's and month's alone.
    fn forget_past(&self, now: &Period) -> Vec<String> {
        let current = |k: &str| {
            k.starts_with(&format!("d:{}:", now.day)) || k.starts_with(&format!("m:{}:", now.month))
        };
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let past: Vec<String> = totals.keys().filter(|k| !current(k)).cloned().collect();
        for k in &past {
            totals.remove(k);
        }
        past
    }

    /// Writes what changed since the last time, and forgets what is past.
    pub(crate) fn flush(&self) {
        let past = self.forget_past(&Period::at(SystemTime::now()));
        let Some(db) = &self.db else {
            return;
        };
        if !past.is_empty() {
            let removed = (|| -> Result<(), redb::Error> {
                let txn = db.begin_write()?;
                {
                    let mut table = txn.open_table(TOTALS)?;
                    for k in &past {
                        table.remove(k.as_str())?;
                    }
                }
                txn.commit()?;
                Ok(())
            })();
            if let Err(e) = removed {
                tracing::warn!(error = %e, "cannot drop past spend totals from the file");
            }
        }
        let keys: Vec<String> =
            std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        if keys.is_empty() {
            return;
        }
        let values: Vec<(String, i64)> = {
            let totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
            keys.into_iter()
                .map(|k| {
                    let v = totals.get(&k).copied().unwrap_or(0);
                    (k, v)
                })
                .collect()
        };
        let written = (|| -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(TOTALS)?;
                for (k, v) in &values {
                    table.insert(k.as_str(), v)?;
                }
            }
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot write spend totals: kept in memory, tried again");
            let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            dirty.extend(values.into_iter().map(|(k, _)| k));
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.flush();
    }
}

fn flush_periodically(local: Weak<Local>) {
    loop {
        std::thread::sleep(FLUSH_EVERY);
        let Some(local) = local.upgrade() else {
            return;
        };
        local.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_days_and_months() {
        let at = |s: u64| Period::at(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        let p = at(0);
        assert_eq!(
            (p.day.as_str(), p.month.as_str()),
            ("1970-01-01", "1970-01")
        );
        assert_eq!(p.day_left, Duration::from_secs(86_400));
        assert_eq!(p.month_left, Duration::from_secs(31 * 86_400));
        // 2026-12-07T06:00:00Z
        let p = at(1_796_623_200);
        assert_eq!(
            (p.day.as_str(), p.month.as_str()),
            ("2026-12-07", "2026-12")
        );
        assert_eq!(p.day_left, Duration::from_secs(18 * 3600));
        assert_eq!(p.month_left, Duration::from_secs((24 * 86_400) + 18 * 3600));
        // 2024-02-29 (a leap day), and its month's end.
        let p = at(1_709_164_800);
        assert_eq!(p.day, "2024-02-29");
        assert_eq!(p.month_left, Duration::from_secs(86_400));
        for days in [-1000i64, 0, 59, 365, 10_957, 20_000, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn past_days_and_months_are_forgotten() {
        let Ledger::Local(l) = Ledger::local(None).unwrap() else {
            unreachable!()
        };
        let at = |s: u64| Period::at(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        // Days of a month, then the next month: only the current ones stay.
        for day in 0..40u64 {
            for c in 0..10 {
                l.add(&format!("c{c}"), &at(day * 86_400), 1, None).unwrap();
            }
            l.forget_past(&at(day * 86_400));
            assert!(l.totals.lock().unwrap().len() <= 20, "day {day}");
        }
        let totals = l.totals.lock().unwrap();
        assert_eq!(totals.get("m:1970-02:c0"), Some(&9), "February's nine days");
        assert_eq!(totals.get("d:1970-02-09:c0"), Some(&1));
    }

    #[tokio::test]
    async fn caps_hold_and_totals_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spend.redb");
        let p = Period::at(SystemTime::now());
        let caps = (Some(1_000_000), Some(5_000_000));
        {
            let ledger = Ledger::local(Some(&path)).unwrap();
            assert!(ledger.reserve("a", &p, 600_000, caps).await.is_ok());
            let over = ledger
                .reserve("a", &p, 600_000, caps)
                .await
                .unwrap_err()
                .unwrap();
            assert!(!over.month);
            assert_eq!(over.spent, 600_000);
            ledger.settle("a", &p, -100_000).await;
            assert!(ledger.reserve("a", &p, 500_000, caps).await.is_ok());
            assert!(
                ledger.reserve("b", &p, 500_000, caps).await.is_ok(),
                "per client"
            );
            assert_eq!(ledger.spent("a", &p).await, Some((1_000_000, 1_000_000)));
        }
        // Dropped: written. Opened again: the same totals.
        let ledger = Ledger::local(Some(&path)).unwrap();
        assert_eq!(ledger.spent("a", &p).await, Some((1_000_000, 1_000_000)));
        assert!(ledger.reserve("a", &p, 1, caps).await.is_err());
        // Huge numbers saturate instead of wrapping.
        ledger.settle("c", &p, i64::MAX).await;
        ledger.settle("c", &p, i64::MAX).await;
        assert_eq!(ledger.spent("c", &p).await, Some((i64::MAX, i64::MAX)));
    }
}
