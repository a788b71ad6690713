//! Enrollment: makes the set of captured pods of this node match the state store. Enrolling a
//! pod = its certificate, listeners inside its netns (15001, 15006, 15008, for IPv4 and, when
//! the pod has an IPv6 address, IPv6), the inbound listener of each pod IP in the sk_lookup
//! map, sk_lookup attached to its netns (pinned), its netns cookie in ENROLLED. Unenrolling
//! undoes the eBPF part; the connections already proxied keep running. No pod restart either
//! way, and a failed enrollment leaves nothing behind.
//!
//! A pod can be held closed before it is enrolled: the CNI plugin asks, while the pod's sandbox
//! is set up (before any of its containers runs), and a pod of a namespace in the mesh gets its
//! netns in ENROLLED and sk_lookup attached (pinned) at once, with no listener yet, so its
//! connects and the SYNs to it are refused until it is enrolled (which adopts that pin). A held
//! pod that turns out not to be captured (it opted out) is released once mesh-ctrl says so.
//!
//! The eBPF part outlives the agent: when the enroller stops it only closes its listeners, so
//! a pod stays captured, and closed, until the next agent enrolls it again (adopting its pinned
//! sk_lookup link). Pods an earlier agent captured that are no longer to be captured are
//! released once a config from mesh-ctrl says so.

mod pod_netns;

pub use pod_netns::{Listeners, PodListeners};

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::cni;
use crate::handover::{Offer, OfferRequest};

use crate::discover::{self, DiscoverError};
use crate::ebpf::{DatapathError, SkLookupAttachment};
use crate::identity::{Identity, IdentityError};
use crate::netns::Netns;
use crate::proxy::hbone;
use crate::proxy::{inbound, outbound, PodContext, ProxyContext};
use crate::state::Workload;
use crate::tls::{self, CurrentCert};

/// How often enrollments that failed are retried even without a config change.
const RETRY: Duration = Duration::from_secs(2);
/// How long enrollment waits for the pod's first certificate.
const CERT_WAIT: Duration = Duration::from_secs(3);

/// Why a pod could not be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The netns could not be entered or set up.
    #[error("{0}")]
    Netns(#[from] std::io::Error),
    /// An eBPF map or attachment failed.
    #[error("{0}")]
    Datapath(#[from] DatapathError),
    /// The pod's certificate could not be obtained.
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// The pod's netns could not be found.
    #[error("{0}")]
    Discover(#[from] DiscoverError),
    /// The pod's TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The netns named for the pod is not the pod's (the node's, or another pod's): capturing
    /// it would close the node's inbound connections or take another pod's traffic.
    #[error("refused to enroll {path} as the pod's network namespace: {why}")]
    NotThePods {
        /// The netns path named (by annotation, discovery or the CNI plugin).
        path: std::path::PathBuf,
        /// Why it is not the pod's.
        why: String,
    },
}

/// Namespaces no pod ever lives in: the agent's own and the host's.
const NODE_NAMESPACES: [(&str, &str); 2] =
    [("/proc/self/ns/net", "the agent's own network namespace"), ("/proc/1/ns/net", "the host's (that of /proc/1)")];

/// Refuses `netns` (opened from `path`) when it is the agent's own or the host's.
fn refuse_node_netns(netns: &Netns, path: &std::path::Path) -> Result<(), EnrollError> {
    let id = netns.id()?;
    for (node, what) in NODE_NAMESPACES {
        if Netns::open(std::path::Path::new(node)).and_then(|n| n.id()).is_ok_and(|node| node == id) {
            return Err(EnrollError::NotThePods { path: path.into(), why: format!("it is {what}") });
        }
    }
    Ok(())
}

/// A pod the agent captures.
#[derive(Debug)]
pub struct EnrolledPod {
    /// The pod as its accept loops see it.
    pub pod: Arc<PodContext>,
    /// The sk_lookup link of the pod's netns.
    pub sk_lookup: SkLookupAttachment,
    tasks: Vec<JoinHandle<()>>,
    /// Second descriptors of the pod's listeners (15001, 15006 and 15008 of IPv4, then of
    /// IPv6 if it has them), to hand to a successor.
    listeners: Vec<OwnedFd>,
}

/// Reconciles enrolled pods with the state store.
#[derive(Debug)]
pub struct Enroller {
    ctx: Arc<ProxyContext>,
    enrolled: HashMap<String, EnrolledPod>,
    failures: HashMap<String, String>,
    /// Published after each reconcile: what is enrolled now (for the admin API).
    published: watch::Sender<Vec<EnrolledSummary>>,
    /// Listeners the agent before this one handed over, by pod UID, until enrolled.
    handed: HashMap<String, PodListeners>,
    /// Pods enrolled on handed-over listeners.
    took: Vec<String>,
    /// Told, once the first config is applied, which pods were taken over.
    taken: Option<oneshot::Sender<Vec<String>>>,
    /// Requests for the enrolled pods' listeners, from this agent's handover server.
    offers: mpsc::Receiver<OfferRequest>,
    /// The pods an earlier agent pinned and no longer desired have been released (once: from
    /// then on this agent's own unenrolling keeps the pins in step).
    stale_released: bool,
    /// Requests of the CNI plugin.
    cni: mpsc::Receiver<cni::Asked>,
    /// Pods held closed on the CNI plugin's ADD and not enrolled yet, by UID.
    held: HashMap<String, Held>,
    /// Where /proc/sys/net is mounted writable (`--proc-sys-net`).
    sysctl: Arc<std::path::Path>,
}

/// A pod held closed until it is enrolled: its (pinned) sk_lookup link.
#[derive(Debug)]
struct Held {
    link: SkLookupAttachment,
    /// `namespace/name`, for logs.
    pod: String,
}

/// The enroller's channels: what it enrolls, and where requests for it go.
#[derive(Debug)]
pub struct Channels {
    /// What is enrolled, after each reconcile.
    pub enrolled: watch::Receiver<Vec<EnrolledSummary>>,
    /// Requests for the enrolled pods' listeners (the handover server).
    pub offers: mpsc::Sender<OfferRequest>,
    /// Requests of the CNI plugin (the CNI server).
    pub cni: mpsc::Sender<cni::Asked>,
}

/// One address family's listeners of a pod, registered with tokio.
struct Served {
    v6: bool,
    outbound: TcpListener,
    inbound: TcpListener,
    hbone: TcpListener,
}

impl Served {
    fn new(listeners: Listeners) -> std::io::Result<Self> {
        Ok(Self {
            v6: listeners.outbound.local_addr()?.is_ipv6(),
            outbound: TcpListener::from_std(listeners.outbound)?,
            inbound: TcpListener::from_std(listeners.inbound)?,
            hbone: TcpListener::from_std(listeners.hbone)?,
        })
    }
}

/// What the admin API shows of an enrolled pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledSummary {
    /// Namespace of the pod.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod IP.
    pub ip: IpAddr,
    /// Its other IPs (IPv6, when dual-stack).
    pub other_ips: Vec<IpAddr>,
    /// Netns cookie.
    pub netns_cookie: u64,
    /// sk_lookup link id.
    pub sk_lookup_link_id: u32,
    /// The pod's sk_lookup link was pinned by an earlier agent and adopted.
    pub adopted: bool,
}

impl Enroller {
    /// An enroller with nothing enrolled, the listeners a predecessor handed over (`taken`
    /// hears which pods were enrolled on them once the first config is applied), writing pod
    /// sysctls under `sysctl` (a mount of /proc/sys/net), and its channels.
    pub fn new(
        ctx: Arc<ProxyContext>,
        handed: HashMap<String, PodListeners>,
        taken: Option<oneshot::Sender<Vec<String>>>,
        sysctl: &std::path::Path,
    ) -> (Self, Channels) {
        let (published, rx) = watch::channel(Vec::new());
        let (offer_tx, offers) = mpsc::channel(1);
        let (cni_tx, cni) = mpsc::channel(16);
        let enroller = Self {
            ctx,
            enrolled: HashMap::new(),
            failures: HashMap::new(),
            published,
            handed,
            took: Vec::new(),
            taken,
            offers,
            stale_released: false,
            cni,
            held: HashMap::new(),
            sysctl: sysctl.into(),
        };
        (enroller, Channels { enrolled: rx, offers: offer_tx, cni: cni_tx })
    }

    /// Second descriptors of every enrolled pod's listeners.
    fn offer(&self) -> Vec<Offer> {
        self.enrolled
            .iter()
            .filter_map(|(uid, e)| {
                let listeners = e.listeners.iter().map(OwnedFd::try_clone).collect::<Result<_, _>>().ok()?;
                Some(Offer { uid: uid.clone(), cookie: e.pod.cookie, listeners })
            })
            .collect()
    }

    /// Reconciles on every state change (and every few seconds while something failed) until
    /// `shutdown` fires, then stops accepting on every pod's listeners and leaves the eBPF
    /// state as it is: the pods stay captured, and closed until an agent serves them again.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.ctx.state.subscribe();
        loop {
            self.reconcile().await;
            let retry = async {
                if self.failures.is_empty() {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(RETRY).await
                }
            };
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = retry => {}
                _ = shutdown.changed() => break,
                Some(request) = self.offers.recv() => {
                    let _ = request.send(self.offer());
                }
                Some((request, reply)) = self.cni.recv() => {
                    let answer = self.on_cni(request).await;
                    let _ = reply.send(answer);
                }
            }
        }
        for enrolled in self.enrolled.values() {
            for task in &enrolled.tasks {
                task.abort();
            }
        }
        self.enrolled.clear();
        self.publish();
    }

    async fn reconcile(&mut self) {
        let desired = self.ctx.state.captured_on(&self.ctx.node);
        let stale: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(uid, e)| {
                desired.get(*uid).is_none_or(|w| {
                    w.ip != e.pod.workload.ip
                        || w.other_ips != e.pod.workload.other_ips
                        || w.netns != e.pod.workload.netns
                })
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in stale {
            self.unenroll(&uid);
        }
        self.failures.retain(|uid, _| desired.contains_key(uid));
        self.release_uncaptured_holds();
        let identities: Vec<Identity> = desired.values().map(|w| w.identity()).collect();
        self.ctx.identities.retain(&identities);
        for (uid, workload) in desired {
            if self.enrolled.contains_key(&uid) {
                continue;
            }
            let pod = format!("{}/{}", workload.namespace, workload.name);
            let handed = self.handed.remove(&uid);
            let took = handed.is_some();
            match self.enroll(workload, handed).await {
                Ok(enrolled) => {
                    let how = if took { "pod enrolled on the listeners handed over" } else { "pod enrolled" };
                    tracing::info!(%pod, cookie = enrolled.pod.cookie, "{how}");
                    if took {
                        self.took.push(uid.clone());
                    }
                    // Enrolling adopted the pin of the hold; the hold's own link handle goes.
                    self.held.remove(&uid);
                    self.failures.remove(&uid);
                    self.enrolled.insert(uid, enrolled);
                }
                Err(e) => {
                    let message = e.to_string();
                    if self.failures.get(&uid) != Some(&message) {
                        tracing::warn!(%pod, "cannot enroll pod: {message}");
                    }
                    self.failures.insert(uid, message);
                }
            }
        }
        self.release_stale_pins();
        self.publish();
        if self.ctx.state.ctrl_status().1 > 0 {
            if let Some(taken) = self.taken.take() {
                // Listeners of pods no longer to be captured close here.
                self.handed.clear();
                let _ = taken.send(std::mem::take(&mut self.took));
            }
        }
    }

    /// Releases, once, the pods an earlier agent pinned that are not to be captured any more:
    /// when mesh-ctrl's config is held (before it, "nothing desired" means "not known yet") and
    /// every desired pod is enrolled (a pod failing to enroll stays closed, not open). It walks
    /// ENROLLED under the datapath lock, which accepts take too, so not on every reconcile.
    fn release_stale_pins(&mut self) {
        let (_, config_version) = self.ctx.state.ctrl_status();
        if self.stale_released || config_version == 0 || !self.failures.is_empty() {
            return;
        }
        self.stale_released = true;
        let keep = self
            .enrolled
            .values()
            .map(|e| e.pod.cookie)
            .chain(self.held.values().map(|h| h.link.netns_cookie))
            .collect();
        let released = self.ctx.datapath.lock().expect("datapath lock").release_other_pods(&keep);
        if !released.is_empty() {
            tracing::info!(?released, "released pod netns captured by an earlier agent and no longer enrolled");
        }
    }

    /// Answers the CNI plugin: on `add`, holds the pod closed when it is to be captured (its
    /// workload says so, or, before mesh-ctrl knows the pod, its namespace is in the mesh); on
    /// `del`, releases a hold. Without a config from mesh-ctrl it cannot tell: the plugin is
    /// told to try again (the pod does not start meanwhile).
    async fn on_cni(&mut self, request: cni::Request) -> cni::Answer {
        let uid = request.key();
        let pod = format!("{}/{}", request.namespace, request.name);
        if request.op == "del" {
            if let Some(held) = self.held.remove(&uid) {
                tracing::info!(%pod, "CNI DEL: hold released");
                self.release(held);
            }
            return cni::Answer::Done { held: false };
        }
        if self.ctx.state.ctrl_status().1 == 0 {
            return cni::Answer::Failed { error: "no config from mesh-ctrl yet".into(), retry: true };
        }
        if self.enrolled.contains_key(&uid) || self.held.contains_key(&uid) {
            return cni::Answer::Done { held: true };
        }
        let captured = match self.ctx.state.workload(&uid) {
            Some(workload) => workload.captured && workload.node == self.ctx.node,
            None => self.ctx.state.namespace_captured(&request.namespace),
        };
        if !captured {
            return cni::Answer::Done { held: false };
        }
        match self.hold(&request.netns).await {
            Ok(link) => {
                tracing::info!(%pod, cookie = link.netns_cookie, "CNI ADD: pod held closed until enrolled");
                self.held.insert(uid, Held { link, pod });
                cni::Answer::Done { held: true }
            }
            Err(e) => cni::Answer::Failed { error: format!("cannot hold {pod} closed: {e}"), retry: true },
        }
    }

    /// Puts the netns at `path` in ENROLLED with sk_lookup attached (pinned) and no listener:
    /// closed both ways.
    async fn hold(&self, path: &std::path::Path) -> Result<SkLookupAttachment, EnrollError> {
        let netns = Netns::open(path)?;
        refuse_node_netns(&netns, path)?;
        let cookie = self.ctx.runner.run(&netns, crate::netns::current_cookie).await?;
        Ok(self.ctx.datapath.lock().expect("datapath lock").capture_netns(&netns, cookie)?)
    }

    /// Releases the holds of pods mesh-ctrl now knows are not to be captured here.
    fn release_uncaptured_holds(&mut self) {
        let node = &self.ctx.node;
        let state = &self.ctx.state;
        let released: Vec<String> = self
            .held
            .keys()
            .filter(|uid| state.workload(uid).is_some_and(|w| !w.captured || &w.node != node))
            .cloned()
            .collect();
        for uid in released {
            if let Some(held) = self.held.remove(&uid) {
                tracing::info!(pod = %held.pod, "hold released: the pod is not captured");
                self.release(held);
            }
        }
    }

    fn release(&self, held: Held) {
        self.ctx.datapath.lock().expect("datapath lock").release_netns(held.link);
    }

    fn publish(&self) {
        let mut summary: Vec<EnrolledSummary> = self
            .enrolled
            .values()
            .map(|e| EnrolledSummary {
                namespace: e.pod.workload.namespace.clone(),
                name: e.pod.workload.name.clone(),
                ip: e.pod.workload.ip,
                other_ips: e.pod.workload.other_ips.clone(),
                netns_cookie: e.pod.cookie,
                sk_lookup_link_id: e.sk_lookup.link_id,
                adopted: e.sk_lookup.adopted,
            })
            .collect();
        summary.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.published.send_replace(summary);
    }

    async fn enroll(&self, workload: Arc<Workload>, handed: Option<PodListeners>) -> Result<EnrolledPod, EnrollError> {
        let identity = workload.identity();
        // The pod's certificate first: its 15008 listeners must present it from the start.
        let tls = if self.ctx.identities.enabled() {
            self.ctx.identities.cert(&identity, CERT_WAIT).await?;
            let resolver =
                Arc::new(CurrentCert { identities: self.ctx.identities.clone(), identity: identity.clone() });
            let trust = self.ctx.identities.trust();
            Some(Arc::new(tls::server_config(resolver, trust, &self.ctx.identities.trust_domain())?))
        } else {
            None
        };
        // Local mode names the netns by annotation; otherwise it is found by the pod's cgroup.
        let netns_path = match workload.netns.as_os_str().is_empty() {
            true => discover::pod_netns(&workload.uid)?,
            false => workload.netns.clone(),
        };
        let netns = Netns::open(&netns_path)?;
        self.check_pods_netns(&workload, &netns, &netns_path).await?;
        let v6 = workload.ipv6().is_some();
        let listeners = match handed {
            Some(handed) => {
                let sysctl = self.sysctl.clone();
                self.ctx.runner.run(&netns, move || pod_netns::adopt(handed, v6, &sysctl)).await?
            }
            None => {
                let sysctl = self.sysctl.clone();
                self.ctx.runner.run(&netns, move || pod_netns::setup(v6, &sysctl)).await?
            }
        };
        let kept = listeners.each().map(|l| l.as_fd().try_clone_to_owned()).collect::<Result<Vec<_>, _>>()?;
        let PodListeners { v4, v6, cookie } = listeners;
        let families = [Some(v4), v6].into_iter().flatten().map(Served::new).collect::<Result<Vec<_>, _>>()?;
        // Each pod IP's inbound listener: the one of its family.
        let inbound: Vec<(IpAddr, &TcpListener)> = workload
            .addresses()
            .filter_map(|ip| Some((ip, &families.iter().find(|f| f.v6 == ip.is_ipv6())?.inbound)))
            .collect();
        let sk_lookup = {
            let mut datapath = self.ctx.datapath.lock().expect("datapath lock");
            let captured = inbound
                .iter()
                .try_for_each(|(ip, listener)| datapath.add_inbound_listener(*ip, *listener))
                .and_then(|()| datapath.capture_netns(&netns, cookie));
            match captured {
                Ok(link) => link,
                Err(e) => {
                    for (ip, _) in &inbound {
                        datapath.remove_inbound_listener(*ip);
                    }
                    return Err(e.into());
                }
            }
        };
        let pod = Arc::new(PodContext { workload, netns, cookie, identity });
        self.ctx.local_pods.insert(pod.clone());
        let mut tasks = Vec::new();
        for family in families {
            tasks.push(tokio::spawn(outbound::serve(family.outbound, pod.clone(), self.ctx.clone())));
            tasks.push(tokio::spawn(inbound::serve(family.inbound, pod.clone(), self.ctx.clone())));
            if let Some(tls) = &tls {
                tasks.push(tokio::spawn(hbone::serve(family.hbone, tls.clone(), pod.clone(), self.ctx.clone())));
            }
        }
        Ok(EnrolledPod { pod, sk_lookup, tasks, listeners: kept })
    }

    /// Refuses a netns that is not `workload`'s before anything is set up in it: the agent's
    /// own or the host's; one whose interfaces do not hold the pod's IP (the node's, another
    /// pod's); one other than the netns the CNI plugin held closed for this pod.
    async fn check_pods_netns(
        &self,
        workload: &Workload,
        netns: &Netns,
        path: &std::path::Path,
    ) -> Result<(), EnrollError> {
        refuse_node_netns(netns, path)?;
        let ip = workload.ip;
        let (holds, cookie) = self
            .ctx
            .runner
            .run(netns, move || Ok((crate::netns::holds_address(ip)?, crate::netns::current_cookie()?)))
            .await?;
        let refused = |why: String| Err(EnrollError::NotThePods { path: path.into(), why });
        if !holds {
            return refused(format!("no interface there holds the pod's IP {ip}"));
        }
        match self.held.get(&workload.uid) {
            Some(held) if held.link.netns_cookie != cookie => {
                refused("it is not the netns the CNI plugin held closed for the pod".into())
            }
            _ => Ok(()),
        }
    }

    fn unenroll(&mut self, uid: &str) {
        let Some(enrolled) = self.enrolled.remove(uid) else {
            return;
        };
        self.ctx.local_pods.remove(&enrolled.pod);
        {
            let mut datapath = self.ctx.datapath.lock().expect("datapath lock");
            // sk_lookup goes before the listener entry, so no SYN meanwhile finds the hook
            // without a listener (and is refused).
            datapath.release_netns(enrolled.sk_lookup);
            for ip in enrolled.pod.workload.addresses() {
                datapath.remove_inbound_listener(ip);
            }
        }
        // Aborting the accept loops closes the listeners; relays run on their own tasks and
        // finish normally.
        for task in &enrolled.tasks {
            task.abort();
        }
        tracing::info!(pod = %format!("{}/{}", enrolled.pod.workload.namespace, enrolled.pod.workload.name), "pod unenrolled");
    }
}
