//! Load balancing of Service endpoints: power of two choices on work in progress (the node
//! agent counts connections, a waypoint counts requests). Two distinct ready endpoints are
//! drawn at random and the one with less in progress wins (ties at random), which spreads
//! sequential work evenly and steers new work away from busy endpoints without global
//! coordination.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::state::ServiceEndpoint;

/// Connections (or requests) in progress per endpoint IP.
#[derive(Debug, Default)]
pub struct Balancer {
    active: Mutex<HashMap<IpAddr, usize>>,
}

/// Counts a connection (or request) to an endpoint as in progress until dropped.
#[derive(Debug)]
pub struct Active {
    balancer: Arc<Balancer>,
    ip: IpAddr,
}

impl Drop for Active {
    fn drop(&mut self) {
        let mut active = self.balancer.active.lock().expect("balancer lock");
        if let Some(n) = active.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                active.remove(&self.ip);
            }
        }
    }
}

impl Balancer {
    /// Picks among `candidates` by power of two choices on work in progress.
    pub fn pick<'a>(&self, candidates: &[&'a ServiceEndpoint]) -> Option<&'a ServiceEndpoint> {
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            n => {
                let i = rand::random_range(0..n);
                let j = (i + rand::random_range(1..n)) % n;
                let active = self.active.lock().expect("balancer lock");
                let load = |e: &ServiceEndpoint| active.get(&e.ip).copied().unwrap_or(0);
                let (a, b) = (candidates[i], candidates[j]);
                Some(match load(a).cmp(&load(b)) {
                    std::cmp::Ordering::Less => a,
                    std::cmp::Ordering::Greater => b,
                    std::cmp::Ordering::Equal => {
                        if rand::random() {
                            a
                        } else {
                            b
                        }
                    }
                })
            }
        }
    }

    /// Marks a connection (or request) to `ip` in progress.
    pub fn start(self: &Arc<Self>, ip: IpAddr) -> Active {
        *self.active.lock().expect("balancer lock").entry(ip).or_default() += 1;
        Active { balancer: self.clone(), ip }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(last: u8) -> ServiceEndpoint {
        ServiceEndpoint {
            workload_uid: last.to_string(),
            ip: IpAddr::from([10, 0, 0, last]),
            ready: true,
            target_ports: HashMap::new(),
        }
    }

    #[test]
    fn spreads_evenly_and_avoids_busy_endpoints() {
        let balancer = Arc::new(Balancer::default());
        let eps = [ep(1), ep(2), ep(3)];
        let refs: Vec<&ServiceEndpoint> = eps.iter().collect();
        let mut hits = HashMap::new();
        for _ in 0..3000 {
            *hits.entry(balancer.pick(&refs).unwrap().ip).or_insert(0) += 1;
        }
        for e in &eps {
            let n = hits[&e.ip];
            assert!((800..=1200).contains(&n), "{}: {n} of 3000", e.ip);
        }
        // Endpoint 1 is busy: it only wins when both draws are it, which P2C never does.
        let _busy: Vec<Active> = (0..5).map(|_| balancer.start(eps[0].ip)).collect();
        for _ in 0..300 {
            assert_ne!(balancer.pick(&refs).unwrap().ip, eps[0].ip);
        }
        assert!(balancer.pick(&[]).is_none());
    }

    #[test]
    fn active_counts_drop_with_their_guards() {
        let balancer = Arc::new(Balancer::default());
        let ip = IpAddr::from([10, 0, 0, 1]);
        let guard = balancer.start(ip);
        assert_eq!(balancer.active.lock().unwrap().get(&ip), Some(&1));
        drop(guard);
        assert!(balancer.active.lock().unwrap().is_empty());
    }
}
