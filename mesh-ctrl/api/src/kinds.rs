//! The config kinds mesh-ctrl streams to agents, as one table: where each kind's changes go in a
//! [`ConfigUpdate`]. mesh-ctrl puts, and the agent takes, every kind's changes through it; a new
//! kind (HTTPRoute, Gateway) is its proto fields and one [`ConfigKind`] impl here.

use std::collections::BTreeMap;

use crate::config::{AuthorizationPolicy, ConfigUpdate, PeerAuthentication, Service, Workload};

/// A kind of config object carried by [`ConfigUpdate`].
pub trait ConfigKind: Clone + PartialEq + Sized {
    /// The update's objects of this kind that were added or changed (all of them in a snapshot).
    fn upserted(update: &mut ConfigUpdate) -> &mut Vec<Self>;
    /// The update's keys of this kind that no longer exist (deltas only).
    fn removed(update: &mut ConfigUpdate) -> &mut Vec<String>;
}

macro_rules! kinds {
    ($($kind:ty => $upserted:ident, $removed:ident;)*) => {
        $(impl ConfigKind for $kind {
            fn upserted(update: &mut ConfigUpdate) -> &mut Vec<Self> {
                &mut update.$upserted
            }
            fn removed(update: &mut ConfigUpdate) -> &mut Vec<String> {
                &mut update.$removed
            }
        })*
    };
}

kinds! {
    Workload => upserted, removed;
    AuthorizationPolicy => authorization_policies, removed_authorization_policies;
    PeerAuthentication => peer_authentications, removed_peer_authentications;
    Service => services, removed_services;
}

/// Puts into `update` what brings an agent holding `sent` of one kind (None: nothing; the update
/// is a snapshot and carries all of `current`) to `current`, both keyed alike.
pub fn put_changes<K: ConfigKind>(
    update: &mut ConfigUpdate,
    sent: Option<&BTreeMap<String, K>>,
    current: &BTreeMap<String, K>,
) {
    match sent {
        None => K::upserted(update).extend(current.values().cloned()),
        Some(sent) => {
            K::upserted(update)
                .extend(current.iter().filter(|(k, v)| sent.get(*k) != Some(*v)).map(|(_, v)| v.clone()));
            K::removed(update).extend(sent.keys().filter(|k| !current.contains_key(*k)).cloned());
        }
    }
}

/// Takes out of `update` its changes of one kind: (added or changed, keys removed).
pub fn take_changes<K: ConfigKind>(update: &mut ConfigUpdate) -> (Vec<K>, Vec<String>) {
    (std::mem::take(K::upserted(update)), std::mem::take(K::removed(update)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, vip: &str) -> Service {
        Service { namespace: "shop".into(), name: name.into(), vip: vip.into(), ..Default::default() }
    }

    #[test]
    fn a_snapshot_carries_everything_and_a_delta_only_the_changes() {
        let sent = BTreeMap::from([
            ("shop/a".to_string(), service("a", "10.96.0.1")),
            ("shop/b".to_string(), service("b", "10.96.0.2")),
        ]);
        let mut current = sent.clone();
        current.remove("shop/b");
        current.insert("shop/a".into(), service("a", "10.96.0.9"));
        current.insert("shop/c".into(), service("c", "10.96.0.3"));

        let mut snapshot = ConfigUpdate::default();
        put_changes(&mut snapshot, None, &current);
        assert_eq!(snapshot.services.len(), 2);
        assert!(snapshot.removed_services.is_empty());

        let mut delta = ConfigUpdate::default();
        put_changes(&mut delta, Some(&sent), &current);
        let names: Vec<&str> = delta.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(delta.removed_services, ["shop/b"]);
        assert!(delta.upserted.is_empty() && delta.authorization_policies.is_empty(), "other kinds untouched");

        let (upserted, removed) = take_changes::<Service>(&mut delta);
        assert_eq!((upserted.len(), removed), (2, vec!["shop/b".to_string()]));
        assert!(delta.services.is_empty() && delta.removed_services.is_empty());
    }
}
