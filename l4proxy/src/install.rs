//! The kernel and routing state a policy needs, set up and kept equal to the
//! policy in force: the BPF maps and where `classify` is attached, the
//! listeners, the `local` routes of the prefixes this host takes, and the
//! policy routing of local delivery.
//!
//! [`Installation::apply`] changes only what differs from what is there, so
//! a reloaded policy takes effect without dropping a connection. It checks
//! what can be checked (interfaces, kernel settings) before it changes
//! anything: a policy it refuses leaves the running one in place.
//!
//! Order matters: listeners go into the socket map, and routes and routing
//! rules go in, before `steer` is attached, so the first steered SYN already
//! finds a socket; new rule entries go in before stale ones go out.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

use crate::{
    intercept::{
        ClassifyPlan, ClassifyRole, Family, InterceptError, Interceptor,
        delivery::{Delivery, DeliveryError, Mark},
        interfaces::{self, Interface},
        routes::{self, LocalRoutes, RouteError},
        rules::{self, RuleIndex},
        sysctl,
    },
    local_addrs::{self, LocalAddrs, LocalAddrsError},
    policy::{Bind, Policy},
    session::Active,
    upstream::Pool,
};

const LISTEN_BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Intercept(#[from] InterceptError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error(transparent)]
    LocalAddrs(#[from] LocalAddrsError),
    #[error("creating the {family:?} listener: {source}")]
    Listen { family: Family, source: io::Error },
    #[error("{path}: no interface {name:?} in this network namespace")]
    NoInterface { path: String, name: String },
    #[error(
        "{path}: interface {name:?} is a port of {master:?} (a bridge, bond or VRF): its IP traffic arrives on {master:?}; list that instead"
    )]
    Enslaved {
        path: String,
        name: String,
        master: String,
    },
    #[error("this host is not set up for the policy:\n  {}", .0.join("\n  "))]
    Sysctl(Vec<String>),
}

/// Everything this daemon set up in its network namespace.
pub struct Installation {
    interceptor: Interceptor,
    /// The listeners in the socket map, by family (IPv4, IPv6).
    listening: [bool; 2],
    local_routes: LocalRoutes,
    delivery: Delivery,
    local: Arc<LocalAddrs>,
    /// `steer` is attached once the first policy is in.
    attached: bool,
}

/// What applying a policy produced.
pub struct Applied {
    /// The policy in force, for new connections.
    pub active: Arc<Active>,
    /// Listeners created for it, for the caller to accept on.
    pub new_listeners: Vec<TcpListener>,
}

impl Installation {
    /// Loads the programs and starts watching this host's addresses; sets
    /// up nothing a policy asks for yet.
    pub async fn new(mark: Mark, routing_table: u32) -> Result<Self, InstallError> {
        let mut interceptor = Interceptor::load(mark)?;
        let mut local_map = interceptor
            .take_local_map()
            .expect("a freshly loaded interceptor has its map");
        let sink: local_addrs::Sink = Box::new(move |prefixes| {
            if let Err(e) = local_map.set(prefixes) {
                tracing::warn!(error = %e, "updating this host's addresses in the kernel");
            }
        });
        let local = LocalAddrs::load(&[], Some(sink)).await?;
        local.watch()?;
        Ok(Self {
            interceptor,
            listening: [false; 2],
            local_routes: LocalRoutes::new()?,
            delivery: Delivery::new(mark, routing_table)?,
            local,
            attached: false,
        })
    }

    /// This host's addresses, kept current.
    pub fn local_addrs(&self) -> &Arc<LocalAddrs> {
        &self.local
    }

    /// Makes the kernel state that of `policy`. Refuses, changing nothing,
    /// a policy whose interfaces are missing or whose kernel settings are
    /// wrong; an error after that (netlink, BPF maps) may leave part of it
    /// applied.
    pub async fn apply(&mut self, policy: Policy) -> Result<Applied, InstallError> {
        let classify = classify_plan(&policy, &interfaces::list().await?, &self.local)?;
        let marking: Vec<String> = classify.iter().map(|p| p.interface.name.clone()).collect();
        let findings = sysctl::check(&sysctl::Plan {
            gateway_v4: gateway_family(&policy, true),
            gateway_v6: gateway_family(&policy, false),
            marking: &marking,
        });
        for warning in &findings.warnings {
            tracing::warn!("{warning}");
        }
        if !findings.errors.is_empty() {
            return Err(InstallError::Sysctl(findings.errors));
        }

        let new_listeners = self.listen(&policy)?;
        let owned = owned_prefixes(&policy);
        self.local_routes.set(&owned).await?;
        self.local.set_owned(&owned).await?;
        let local_servers = local_transparent_servers(&policy, &self.local);
        self.delivery
            .set(
                !classify.is_empty() || !local_servers.is_empty(),
                &local_servers,
            )
            .await?;
        let entries = rules::compile(&policy);
        self.interceptor.set_upstream_servers(
            policy
                .upstreams
                .iter()
                .flat_map(|upstream| upstream.servers().iter().copied()),
        )?;
        self.interceptor.set_rules(&entries)?;
        self.interceptor.set_classify(&classify)?;
        if !self.attached {
            self.interceptor.attach()?;
            self.attached = true;
        }
        tracing::info!(
            rules = policy.rules.len(),
            kernel_entries = self.interceptor.rule_entries(),
            routes = ?self.local_routes.added(),
            tc_interfaces = ?self.interceptor.classify_interfaces(),
            local_servers = ?local_servers,
            "policy applied"
        );
        Ok(Applied {
            active: Arc::new(Active {
                rules: RuleIndex::new(&entries),
                pools: policy.upstreams.iter().map(Pool::new).collect(),
                policy,
            }),
            new_listeners,
        })
    }

    /// A listener per family the policy's rules take and that has none yet,
    /// bound to loopback on a free port (`sk_lookup` assigns it whatever the
    /// connection's destination). Transparent: a gateway connection's local
    /// address is not this host's, and the kernel sends the SYN-ACK from it
    /// only for a transparent socket.
    fn listen(&mut self, policy: &Policy) -> Result<Vec<TcpListener>, InstallError> {
        let mut listeners = Vec::new();
        for (slot, family, addr) in [
            (0, Family::V4, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            (1, Family::V6, SocketAddr::from((Ipv6Addr::LOCALHOST, 0))),
        ] {
            let wanted = policy
                .rules
                .iter()
                .flat_map(|rule| &rule.prefixes)
                .any(|prefix| prefix.addr().is_ipv4() == addr.is_ipv4());
            if !wanted || self.listening[slot] {
                continue;
            }
            let listener =
                listen(addr).map_err(|source| InstallError::Listen { family, source })?;
            self.interceptor.set_listener(family, &listener)?;
            self.listening[slot] = true;
            listeners.push(listener);
        }
        Ok(listeners)
    }

    /// Takes no new connection, keeps delivering the open ones' packets.
    pub fn drain(&mut self) -> Result<(), InstallError> {
        Ok(self.interceptor.drain()?)
    }

    /// Detaches the programs, logs their counters, removes the routes and
    /// rules.
    pub async fn remove(&mut self) -> Result<(), InstallError> {
        self.interceptor.detach()?;
        log_counters(&self.interceptor);
        self.delivery.remove().await?;
        self.local_routes.remove().await?;
        Ok(())
    }
}

/// Routes and rules a crashed daemon left in this namespace, removed.
pub async fn remove_leftovers() -> Result<(), InstallError> {
    let leftovers = routes::remove_leftovers().await?;
    if leftovers > 0 {
        tracing::warn!(
            routes = leftovers,
            "removed routes and rules left by an earlier daemon"
        );
    }
    Ok(())
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        // Each family has its own listener; never see IPv4-mapped addresses.
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_reuse_address(true)?;
    // Accepted sockets inherit it: one setsockopt here instead of one per
    // connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Where `classify` goes, and what it does there: every interface a gateway
/// rule lists (with those rules), and, when some upstream connection is made
/// from an address that is not this host's own (a client's, or a fixed one),
/// every interface but loopback whose packets it can read, since a server's
/// replies may come in on any.
fn classify_plan(
    policy: &Policy,
    all: &[Interface],
    local: &LocalAddrs,
) -> Result<Vec<ClassifyPlan>, InstallError> {
    let mut plan: Vec<ClassifyPlan> = Vec::new();
    for (r, rule) in policy.rules.iter().enumerate() {
        for (k, name) in rule.interfaces.iter().enumerate() {
            let path = || format!("intercept[{r}].interfaces[{k}]");
            let interface =
                all.iter()
                    .find(|i| &i.name == name)
                    .ok_or_else(|| InstallError::NoInterface {
                        path: path(),
                        name: name.clone(),
                    })?;
            // `steer` checks the interface a connection arrived on, which
            // for a port is its master, not the port `classify` ran on.
            if let Some(master) = interface.master {
                return Err(InstallError::Enslaved {
                    path: path(),
                    name: name.clone(),
                    master: all
                        .iter()
                        .find(|i| i.index == master)
                        .map_or_else(|| format!("ifindex {master}"), |i| i.name.clone()),
                });
            }
            match plan.iter_mut().find(|p| &p.interface == interface) {
                Some(planned) => planned.rules.push(r),
                None => plan.push(ClassifyPlan {
                    interface: interface.clone(),
                    role: ClassifyRole {
                        intercept: true,
                        replies: false,
                    },
                    rules: vec![r],
                }),
            }
        }
    }
    let spoofing = policy
        .bind_targets()
        .iter()
        .any(|target| spoofs(target.bind, local));
    if spoofing {
        let readable = all
            .iter()
            .filter(|i| !i.is_loopback() && i.l2_len.is_some());
        for interface in readable {
            match plan.iter_mut().find(|p| &p.interface == interface) {
                Some(planned) => planned.role.replies = true,
                None => plan.push(ClassifyPlan {
                    interface: interface.clone(),
                    role: ClassifyRole {
                        intercept: false,
                        replies: true,
                    },
                    rules: Vec::new(),
                }),
            }
        }
    }
    Ok(plan)
}

/// Whether connections under `bind` come from an address that is not this
/// host's, whose replies the kernel must be told to deliver here.
fn spoofs(bind: Bind, local: &LocalAddrs) -> bool {
    match bind {
        Bind::Proxy => false,
        Bind::ClientIp | Bind::Client => true,
        Bind::Address(ip) => !local.contains(ip),
    }
}

/// Whether gateway rules intercept prefixes of one family.
fn gateway_family(policy: &Policy, v4: bool) -> bool {
    policy
        .rules
        .iter()
        .filter(|rule| rule.is_gateway())
        .flat_map(|rule| &rule.prefixes)
        .any(|prefix| prefix.addr().is_ipv4() == v4)
}

/// Servers on this host that connections are made to from addresses that
/// are not this host's (a client's, or a fixed one): their replies need a
/// routing rule of their own.
fn local_transparent_servers(policy: &Policy, local: &LocalAddrs) -> Vec<SocketAddr> {
    let mut servers: Vec<SocketAddr> = policy
        .bind_targets()
        .iter()
        .filter(|target| spoofs(target.bind, local))
        .flat_map(|target| policy.upstreams[target.upstream.0].servers())
        .copied()
        .filter(|server| local.contains(server.ip()))
        .collect();
    servers.sort();
    servers.dedup();
    servers
}

/// The prefixes this host takes as its own (rules without `interfaces`):
/// they get `local` routes.
fn owned_prefixes(policy: &Policy) -> Vec<IpNet> {
    let mut prefixes: Vec<IpNet> = policy
        .rules
        .iter()
        .filter(|r| !r.is_gateway())
        .flat_map(|r| r.prefixes.iter().copied())
        .collect();
    prefixes.sort();
    prefixes.dedup();
    prefixes
}

fn log_counters(interceptor: &Interceptor) {
    match interceptor.counters() {
        Ok(counters) => {
            let summary: Vec<String> = counters
                .iter()
                .map(|(c, n)| format!("{}={n}", c.name()))
                .collect();
            tracing::info!(counters = %summary.join(" "), "kernel counters");
        }
        Err(e) => tracing::warn!(error = %e, "reading kernel counters"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sessions rely on it: sockets accepted from our listeners have
    /// `TCP_NODELAY` without a setsockopt of their own.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let listener = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
