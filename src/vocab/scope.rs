//! Which organization a key's calls are billed to when they name none.
//! OpenAI answers every call with `openai-organization`; a call that names
//! its key's own organization in `OpenAI-Organization` spends the same limits
//! as one that names none, so both must pay into one pool.

use std::sync::{Arc, Mutex};

/// Keys remembered at most (a key's id and its organization's name, bounded
/// in length by the caller).
const MOST: usize = 10_000;

/// Each key's own organization, as its answers named it.
#[derive(Debug, Default)]
pub(crate) struct OwnOrgs(Mutex<foldhash::HashMap<Arc<str>, Arc<str>>>);

impl OwnOrgs {
    /// A call of `key` that named no organization was billed to `org`.
    pub(crate) fn learn(&self, key: &Arc<str>, org: &str) {
        if org.is_empty() || org.len() > 64 {
            return;
        }
        let mut known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if known.get(key).is_some_and(|o| &**o == org) {
            return;
        }
        if known.len() >= MOST {
            known.clear();
        }
        known.insert(key.clone(), org.into());
    }

    /// Whether `org` is `key`'s own organization.
    pub(crate) fn is_own(&self, key: &str, org: &str) -> bool {
        let known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        known.get(key).is_some_and(|o| &**o == org)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_own_organization_is_remembered_and_bounded() {
        let orgs = OwnOrgs::default();
        let key: Arc<str> = "key:a".into();
        assert!(!orgs.is_own("key:a", "org-a"));
        orgs.learn(&key, "org-a");
        assert!(orgs.is_own("key:a", "org-a"));
        assert!(!orgs.is_own("key:a", "org-b"));
        assert!(!orgs.is_own("key:b", "org-a"));
        orgs.learn(&key, &"x".repeat(65));
        assert!(
            orgs.is_own("key:a", "org-a"),
            "an overlong name is not kept"
        );
        for i in 0..MOST + 10 {
            orgs.learn(&format!("key:{i}").into(), "org");
        }
        assert!(orgs.0.lock().unwrap().len() <= MOST);
    }
}
