//! The config kinds mesh-ctrl streams to agents, as one table: each kind's name, its objects'
//! key, where its changes go in a [`ConfigUpdate`], and its place in a [`ConfigSet`]. mesh-ctrl
//! publishes a `ConfigSet` and puts every kind's changes into updates through it; the agent
//! takes and converts every kind through it and dumps what it holds as one. A new kind
//! (HTTPRoute, Gateway) is its proto fields and one line of the table here.

use std::collections::BTreeMap;

use crate::config::{
    AuthorizationPolicy, ConfigUpdate, DestinationRule, PeerAuthentication, RequestAuthentication, Route, Service,
    TrafficPolicy, Waypoint, Workload,
};

/// A kind of config object carried by [`ConfigUpdate`].
pub trait ConfigKind: Clone + PartialEq + Sized {
    /// The kind's name, as operators read it (`AuthorizationPolicy`).
    const KIND: &'static str;
    /// The object's key within its kind: a workload's UID, else `namespace/name`.
    fn key(&self) -> String;
    /// The update's objects of this kind that were added or changed (all of them in a snapshot).
    fn upserted(update: &mut ConfigUpdate) -> &mut Vec<Self>;
    /// The update's keys of this kind that no longer exist (deltas only).
    fn removed(update: &mut ConfigUpdate) -> &mut Vec<String>;
    /// The set's objects of this kind, by key.
    fn of(set: &ConfigSet) -> &BTreeMap<String, Self>;
    /// The same, to change.
    fn of_mut(set: &mut ConfigSet) -> &mut BTreeMap<String, Self>;
}

macro_rules! kinds {
    ($($kind:ident => $field:ident, $upserted:ident, $removed:ident, |$o:ident| $key:expr;)*) => {
        /// Every config object of the mesh in wire form, by kind and key: what mesh-ctrl
        /// publishes to agents and what an agent's dump holds.
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct ConfigSet {
            $(
                #[doc = concat!("Every ", stringify!($kind), ", by key.")]
                pub $field: BTreeMap<String, $kind>,
            )*
        }

        impl ConfigSet {
            /// Puts into `update` what brings an agent holding `sent` (None: nothing; the update
            /// is then a snapshot carrying everything) to this set, for every kind.
            pub fn put_changes(&self, sent: Option<&ConfigSet>, update: &mut ConfigUpdate) {
                $(put_changes(update, sent.map(|s| &s.$field), &self.$field);)*
            }

            /// The set as one snapshot update (its version and trust left unset).
            pub fn to_snapshot(&self) -> ConfigUpdate {
                let mut update = ConfigUpdate { snapshot: true, ..Default::default() };
                self.put_changes(None, &mut update);
                update
            }

            /// The objects `update` adds or changes, of every kind (all of them, for a snapshot).
            pub fn from_update(mut update: ConfigUpdate) -> Self {
                let mut set = Self::default();
                $(set.extend(take_changes::<$kind>(&mut update).0);)*
                set
            }

            /// How many objects of each kind it holds: (kind, count).
            pub fn counts(&self) -> Vec<(&'static str, usize)> {
                vec![$(($kind::KIND, self.$field.len()),)*]
            }
        }

        $(impl ConfigKind for $kind {
            const KIND: &'static str = stringify!($kind);
            fn key(&self) -> String {
                let $o = self;
                $key
            }
            fn upserted(update: &mut ConfigUpdate) -> &mut Vec<Self> {
                &mut update.$upserted
            }
            fn removed(update: &mut ConfigUpdate) -> &mut Vec<String> {
                &mut update.$removed
            }
            fn of(set: &ConfigSet) -> &BTreeMap<String, Self> {
                &set.$field
            }
            fn of_mut(set: &mut ConfigSet) -> &mut BTreeMap<String, Self> {
                &mut set.$field
            }
        })*
    };
}

kinds! {
    Workload => workloads, upserted, removed, |w| w.uid.clone();
    AuthorizationPolicy => authorization_policies, authorization_policies, removed_authorization_policies,
        |p| format!("{}/{}", p.namespace, p.name);
    PeerAuthentication => peer_authentications, peer_authentications, removed_peer_authentications,
        |p| format!("{}/{}", p.namespace, p.name);
    Service => services, services, removed_services, |s| format!("{}/{}", s.namespace, s.name);
    Route => routes, routes, removed_routes, |r| format!("{} {}/{}", r.kind, r.namespace, r.name);
    Waypoint => waypoints, waypoints, removed_waypoints, |w| format!("{}/{}", w.namespace, w.name);
    TrafficPolicy => traffic_policies, traffic_policies, removed_traffic_policies,
        |p| format!("{}/{}", p.namespace, p.name);
    DestinationRule => destination_rules, destination_rules, removed_destination_rules,
        |r| format!("{}/{}", r.namespace, r.name);
    RequestAuthentication => request_authentications, request_authentications, removed_request_authentications,
        |p| format!("{}/{}", p.namespace, p.name);
}

impl ConfigSet {
    /// Adds (or replaces) `object` under its key.
    pub fn insert<K: ConfigKind>(&mut self, object: K) {
        K::of_mut(self).insert(object.key(), object);
    }
}

impl<K: ConfigKind> FromIterator<K> for ConfigSet {
    fn from_iter<I: IntoIterator<Item = K>>(objects: I) -> Self {
        let mut set = ConfigSet::default();
        set.extend(objects);
        set
    }
}

impl<K: ConfigKind> Extend<K> for ConfigSet {
    fn extend<I: IntoIterator<Item = K>>(&mut self, objects: I) {
        for object in objects {
            self.insert(object);
        }
    }
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

    #[test]
    fn a_config_set_keys_each_kind_and_diffs_every_kind_at_once() {
        let workload =
            Workload { uid: "uid-a".into(), name: "a".into(), namespace: "shop".into(), ..Default::default() };
        let policy = AuthorizationPolicy { namespace: "shop".into(), name: "deny".into(), ..Default::default() };
        let mut sent: ConfigSet = [service("a", "10.96.0.1"), service("b", "10.96.0.2")].into_iter().collect();
        sent.insert(workload.clone());
        assert_eq!(sent.services.keys().collect::<Vec<_>>(), ["shop/a", "shop/b"]);
        assert_eq!(sent.workloads.keys().collect::<Vec<_>>(), ["uid-a"], "a workload is keyed by its UID");

        let mut current = sent.clone();
        current.services.remove("shop/b");
        current.insert(policy);
        let mut delta = ConfigUpdate::default();
        current.put_changes(Some(&sent), &mut delta);
        assert_eq!(delta.removed_services, ["shop/b"]);
        assert_eq!(delta.authorization_policies.len(), 1);
        assert!(delta.upserted.is_empty() && delta.services.is_empty(), "unchanged objects are not resent");

        let snapshot = current.to_snapshot();
        assert!(snapshot.snapshot);
        assert_eq!(ConfigSet::from_update(snapshot.clone()), current, "a snapshot carries the whole set");
        assert_eq!(
            (snapshot.upserted.len(), snapshot.services.len(), snapshot.authorization_policies.len()),
            (1, 1, 1)
        );
        assert_eq!(
            current.counts(),
            [
                ("Workload", 1),
                ("AuthorizationPolicy", 1),
                ("PeerAuthentication", 0),
                ("Service", 1),
                ("Route", 0),
                ("Waypoint", 0),
                ("TrafficPolicy", 0),
                ("DestinationRule", 0),
                ("RequestAuthentication", 0)
            ]
        );
    }
}
