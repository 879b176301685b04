//! Kademlia's record store with a cap on the provider records each other node may hold in
//! it: libp2p's `MemoryStore` bounds records per key and keys in all, so one member
//! announcing millions of keys could fill the store of every node (and crowd out the
//! others' records). Here a member past its cap is refused further keys until some of its
//! records are withdrawn or expire. This node's own records are not capped.

use std::borrow::Cow;
use std::collections::HashMap;

use libp2p::PeerId;
use libp2p::kad::store::{self, MemoryStore, RecordStore};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use std::time::Instant;

pub(crate) struct CappedStore {
    inner: MemoryStore,
    local: PeerId,
    max_per_peer: usize,
    /// The keys each other node provides in `inner`, with the record's expiry.
    by_peer: HashMap<PeerId, HashMap<RecordKey, Option<Instant>>>,
}

impl CappedStore {
    pub(crate) fn new(inner: MemoryStore, local: PeerId, max_per_peer: usize) -> CappedStore {
        CappedStore {
            inner,
            local,
            max_per_peer,
            by_peer: HashMap::new(),
        }
    }
}

impl RecordStore for CappedStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.inner.get(k)
    }

    fn put(&mut self, r: Record) -> store::Result<()> {
        self.inner.put(r)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.inner.remove(k)
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.inner.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        let provider = record.provider;
        if provider == self.local {
            return self.inner.add_provider(record);
        }
        let (key, expires) = (record.key.clone(), record.expires);
        let keys = self.by_peer.entry(provider).or_default();
        if !keys.contains_key(&key) && keys.len() >= self.max_per_peer {
            // Expired records are dropped by Kademlia only when read: forget them here first.
            let now = Instant::now();
            keys.retain(|_, e| e.is_none_or(|e| e > now));
            if keys.len() >= self.max_per_peer {
                tracing::debug!(peer = %provider, cap = self.max_per_peer, "provider record refused: this node holds the most records it keeps for that peer");
                return Err(store::Error::MaxProvidedKeys);
            }
        }
        self.inner.add_provider(record)?;
        // MemoryStore ignores a provider when the key already has its most providers.
        if self
            .inner
            .providers(&key)
            .iter()
            .any(|p| p.provider == provider)
        {
            keys.insert(key, expires);
        }
        if keys.is_empty() {
            self.by_peer.remove(&provider);
        }
        Ok(())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.inner.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.inner.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.inner.remove_provider(k, p);
        if let Some(keys) = self.by_peer.get_mut(p) {
            keys.remove(k);
            if keys.is_empty() {
                self.by_peer.remove(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::kad::store::MemoryStoreConfig;
    use std::time::Duration;

    fn record(key: &str, provider: PeerId, expires: Option<Instant>) -> ProviderRecord {
        ProviderRecord {
            key: RecordKey::new(&key),
            provider,
            expires,
            addresses: vec![],
        }
    }

    fn held(s: &CappedStore, key: &str, p: PeerId) -> bool {
        s.providers(&RecordKey::new(&key))
            .iter()
            .any(|r| r.provider == p)
    }

    /// Finding 2d: one member's provider records are capped; other members and this node
    /// are not affected; a withdrawn or expired record frees its place.
    #[test]
    fn provider_records_are_capped_per_peer() {
        let (local, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut s = CappedStore::new(
            MemoryStore::with_config(local, MemoryStoreConfig::default()),
            local,
            3,
        );
        let later = Some(Instant::now() + Duration::from_secs(600));
        for i in 0..3 {
            s.add_provider(record(&format!("k{i}"), a, later)).unwrap();
        }
        assert!(s.add_provider(record("k3", a, later)).is_err());
        assert!(!held(&s, "k3", a));
        // Refreshing a record it already has is fine.
        s.add_provider(record("k0", a, later)).unwrap();
        // Another member and this node are not limited by a's cap.
        for i in 0..3 {
            s.add_provider(record(&format!("k{i}"), b, later)).unwrap();
        }
        for i in 0..10 {
            s.add_provider(record(&format!("own{i}"), local, None))
                .unwrap();
        }
        assert_eq!(s.provided().count(), 10);
        // A withdrawn record frees a place.
        s.remove_provider(&RecordKey::new(&"k1"), &a);
        s.add_provider(record("k3", a, later)).unwrap();
        assert!(held(&s, "k3", a));
        assert!(s.add_provider(record("k4", a, later)).is_err());
        // So does an expired one.
        let past = Some(Instant::now() - Duration::from_secs(1));
        let mut s2 = CappedStore::new(
            MemoryStore::with_config(local, MemoryStoreConfig::default()),
            local,
            2,
        );
        s2.add_provider(record("x0", a, past)).unwrap();
        s2.add_provider(record("x1", a, later)).unwrap();
        s2.add_provider(record("x2", a, later)).unwrap();
        assert!(held(&s2, "x2", a));
        assert!(s2.add_provider(record("x3", a, later)).is_err());
    }
}
