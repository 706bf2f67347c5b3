//! `local` routes for intercepted prefixes, over rtnetlink.
//!
//! `sk_lookup` only runs for packets the stack delivers locally, so every
//! prefix of a rule without `interfaces` needs `ip route add local PREFIX dev
//! lo` (table local). We mark ours, and the routing rules of `delivery`, with
//! [`ROUTE_PROTOCOL`] so that exactly ours are removed on exit, and so
//! leftovers of a crashed daemon can be found and removed later.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use foldhash::{HashMap, HashSet};
use futures::{StreamExt, TryStreamExt, stream};
use ipnet::IpNet;
use rtnetlink::{
    Handle, IpVersion, RouteMessageBuilder,
    packet_core::ErrorMessage,
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
        rule::{RuleAttribute, RuleMessage},
    },
};
use tokio::task::JoinHandle;

use super::netlink_batch::{self, Refusals};

/// Route protocol number that marks l4proxy's routes (`ip route show proto 244`).
/// Unassigned in the kernel's `RTPROT_*` list and iproute2's rt_protos.
pub const ROUTE_PROTOCOL: u8 = 244;

/// Table `local`, where the kernel looks for local-delivery routes first.
const TABLE_LOCAL: u32 = 255;

/// The loopback interface always has index 1 in a network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

const EEXIST: i32 = libc::EEXIST;

/// Netlink requests sent before the first answer is awaited.
const IN_FLIGHT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("adding local route {prefix}: {source}")]
    Add {
        prefix: IpNet,
        source: rtnetlink::Error,
    },
    #[error("adding routing rule {rule}: {source}")]
    AddRule {
        rule: String,
        source: rtnetlink::Error,
    },
    #[error("removing route {route}: {source}")]
    Remove {
        route: String,
        source: rtnetlink::Error,
    },
    #[error("listing routes: {0}")]
    List(rtnetlink::Error),
    #[error("adding or removing local routes over netlink: {0}")]
    Netlink(std::io::Error),
}

/// The routes this daemon added, removed again by [`LocalRoutes::remove`].
#[derive(Default)]
pub struct LocalRoutes {
    added: Vec<IpNet>,
    /// Prefixes that were local before we came: left alone.
    found: Vec<IpNet>,
}

/// Routes [`LocalRoutes::begin`] is adding, for [`LocalRoutes::finish`].
pub struct Adding {
    wanted: HashSet<IpNet>,
    /// The prefixes whose routes are being added, in the requests' order.
    missing: Vec<IpNet>,
    job: Option<JoinHandle<io::Result<Refusals>>>,
}

/// Opens an rtnetlink connection in the calling thread's network namespace and
/// drives it on the current tokio runtime.
pub(super) fn connect() -> Result<Handle, RouteError> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    Ok(handle)
}

impl LocalRoutes {
    /// Makes `prefixes` local: [`LocalRoutes::begin`], then
    /// [`LocalRoutes::finish`].
    pub async fn set(&mut self, prefixes: &[IpNet]) -> Result<(), RouteError> {
        let adding = self.begin(prefixes)?;
        self.finish(adding).await
    }

    /// Starts adding a `local` route for each prefix of `prefixes` that has
    /// none, on a thread of its own (in the calling thread's network
    /// namespace), so that the caller can write the kernel's maps meanwhile:
    /// at 100 000 prefixes each takes a second or more.
    pub fn begin(&mut self, prefixes: &[IpNet]) -> Result<Adding, RouteError> {
        // Sets, not list scans: a policy may have 100 000 prefixes.
        let wanted: HashSet<IpNet> = prefixes.iter().copied().collect();
        self.found.retain(|prefix| wanted.contains(prefix));
        let mut known: HashSet<IpNet> = self.added.iter().chain(&self.found).copied().collect();
        let missing: Vec<IpNet> = prefixes
            .iter()
            .copied()
            .filter(|&prefix| known.insert(prefix))
            .collect();
        let job = if missing.is_empty() {
            None
        } else {
            let requests = missing
                .iter()
                .map(|&prefix| RouteNetlinkMessage::NewRoute(local_route(prefix, TABLE_LOCAL)))
                .collect();
            Some(netlink_batch::in_background(requests).map_err(RouteError::Socket)?)
        };
        Ok(Adding {
            wanted,
            missing,
            job,
        })
    }

    /// Waits for the routes `adding` adds, then removes the routes this
    /// daemon added for prefixes no longer wanted. A prefix that is already
    /// local (a route the operator made) is left alone and not removed on
    /// exit. On an error the routes `adding` added are undone.
    pub async fn finish(&mut self, adding: Adding) -> Result<(), RouteError> {
        let Adding {
            wanted,
            missing,
            job,
        } = adding;
        let refused = match job {
            Some(job) => netlink_batch::finished(job).await,
            None => Ok(Vec::new()),
        };
        let mut refused: HashMap<usize, ErrorMessage> = match refused {
            Ok(refused) => refused.into_iter().collect(),
            Err(e) => {
                // Which of them were added is unknown: ours carry our
                // protocol, so deleting them all removes no one else's.
                self.undo(missing).await;
                return Err(RouteError::Netlink(e));
            }
        };
        let mut new = Vec::new();
        let mut failed = None;
        for (index, prefix) in missing.into_iter().enumerate() {
            match refused.remove(&index) {
                None => new.push(prefix),
                Some(e) if e.raw_code() == -EEXIST => {
                    tracing::info!(%prefix, "local route already present; leaving it as it is");
                    self.found.push(prefix);
                }
                Some(e) => {
                    failed.get_or_insert((prefix, rtnetlink::Error::NetlinkError(e)));
                }
            }
        }
        if let Some((prefix, source)) = failed {
            self.undo(new).await;
            return Err(RouteError::Add { prefix, source });
        }
        let (kept, stale): (Vec<IpNet>, Vec<IpNet>) = std::mem::take(&mut self.added)
            .into_iter()
            .partition(|prefix| wanted.contains(prefix));
        // A stale route that cannot be removed stays on the list, for the
        // next call (or the guard) to remove.
        let (left, error) = delete_local(stale).await;
        self.added = kept;
        self.added.extend(new);
        self.added.extend(left);
        error.map_or(Ok(()), Err)
    }

    /// Removes the routes of a change that failed.
    async fn undo(&self, added: Vec<IpNet>) {
        if let (_, Some(e)) = delete_local(added).await {
            tracing::warn!(error = %e, "removing the routes of a failed change");
        }
    }

    pub fn added(&self) -> &[IpNet] {
        &self.added
    }

    /// Takes `prefixes` as its own: the routes a predecessor added (a
    /// takeover), which this daemon removes from now on when unwanted.
    pub fn adopt(&mut self, prefixes: &[IpNet]) {
        let mut known: HashSet<IpNet> = self.added.iter().copied().collect();
        self.added.extend(
            prefixes
                .iter()
                .copied()
                .filter(|&prefix| known.insert(prefix)),
        );
    }

    /// Forgets `prefixes`: their routes stay, for whoever owns them now
    /// (a successor, or a predecessor whose takeover failed).
    pub fn disown(&mut self, prefixes: &[IpNet]) {
        let gone: HashSet<&IpNet> = prefixes.iter().collect();
        self.added.retain(|prefix| !gone.contains(prefix));
    }

    /// Whether `route` is a local route it relies on: one it added, or one
    /// it found (which may be a proto-244 route another daemon left).
    pub fn keeps(&self) -> impl Fn(&RouteMessage) -> bool {
        // A set: a policy may have 100 000 prefixes.
        let kept: HashSet<IpNet> = self.added.iter().chain(&self.found).copied().collect();
        move |route| {
            route_key(route)
                .is_some_and(|(table, prefix)| table == TABLE_LOCAL && kept.contains(&prefix))
        }
    }

    /// Removes exactly the routes it added.
    pub async fn remove(&mut self) -> Result<(), RouteError> {
        self.set(&[]).await
    }
}

/// Deletes the `local` routes of `prefixes` that carry our protocol, many
/// per send; a route someone already removed is removed. Returns the
/// prefixes whose routes could not be deleted, and the first error.
async fn delete_local(prefixes: Vec<IpNet>) -> (Vec<IpNet>, Option<RouteError>) {
    if prefixes.is_empty() {
        return (prefixes, None);
    }
    let requests = prefixes
        .iter()
        .map(|&prefix| RouteNetlinkMessage::DelRoute(local_route(prefix, TABLE_LOCAL)))
        .collect();
    let refused = match netlink_batch::in_background(requests) {
        Ok(job) => netlink_batch::finished(job).await,
        Err(e) => Err(e),
    };
    let refused = match refused {
        Ok(refused) => refused,
        Err(e) => return (prefixes, Some(RouteError::Netlink(e))),
    };
    let mut left = Vec::new();
    let mut first_error = None;
    for (index, e) in refused {
        let prefix = prefixes[index];
        if let Err(e) = removed(
            Err(rtnetlink::Error::NetlinkError(e)),
            format!("local {prefix}"),
        ) {
            left.push(prefix);
            first_error.get_or_insert(e);
        }
    }
    (left, first_error)
}

/// The IP versions of this network namespace's routing: IPv6 only where
/// `lo` has it. A host booted with `ipv6.disable=1` has no IPv6 routing at
/// all, and one with `disable_ipv6` on `lo` refuses IPv6 routes through
/// it: there the IPv6 half of what l4proxy installs is not asked for (an
/// IPv6 policy fails on its first IPv6 route or listener, saying so).
pub fn ip_versions() -> &'static [IpVersion] {
    let ipv6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
        .is_ok_and(|disabled| disabled.trim() == "0");
    if ipv6 {
        &[IpVersion::V4, IpVersion::V6]
    } else {
        &[IpVersion::V4]
    }
}

/// The address family of `version`'s routes.
pub(super) fn family_of(version: &IpVersion) -> AddressFamily {
    match version {
        IpVersion::V4 => AddressFamily::Inet,
        IpVersion::V6 => AddressFamily::Inet6,
    }
}

/// Removes every route and routing rule marked with [`ROUTE_PROTOCOL`] in
/// the calling thread's network namespace: what a daemon that died without
/// cleaning up left behind. Returns how many were removed, or the first
/// error.
pub async fn remove_leftovers() -> Result<usize, RouteError> {
    remove_ours_except(|_| false, |_| false).await
}

/// Removes the routes and routing rules marked with [`ROUTE_PROTOCOL`] that
/// `keep_route` and `keep_rule` do not keep. Tries every one whatever
/// fails, a listing too (one left is no reason to leave the others);
/// returns how many were removed, or the first error.
pub async fn remove_ours_except(
    keep_route: impl Fn(&RouteMessage) -> bool,
    keep_rule: impl Fn(&RuleMessage) -> bool,
) -> Result<usize, RouteError> {
    let handle = connect()?;
    let mut removed = 0;
    let mut first_error = None;
    let mut tally = |count: usize, error: Option<RouteError>| {
        removed += count;
        first_error = first_error.take().or(error);
    };
    let versions = ip_versions();
    for version in versions {
        match rules(&handle, version.clone()).await {
            Ok(all) => {
                let ours: Vec<RuleMessage> = all
                    .into_iter()
                    .filter(|rule| is_ours(rule) && !keep_rule(rule))
                    .collect();
                let found = ours.len();
                let (left, error) =
                    delete_each(ours, async |rule| delete_rule(&handle, rule).await).await;
                tally(found - left.len(), error);
            }
            Err(e) => tally(0, Some(e)),
        }
    }
    for family in versions.iter().map(family_of) {
        match routes(&handle, family).await {
            Ok(all) => {
                let ours: Vec<RouteMessage> = all
                    .into_iter()
                    .filter(|route| {
                        route.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
                            && !keep_route(route)
                    })
                    .collect();
                let found = ours.len();
                let (left, error) =
                    delete_each(ours, async |route| delete_route(&handle, route).await).await;
                tally(found - left.len(), error);
            }
            Err(e) => tally(0, Some(e)),
        }
    }
    first_error.map_or(Ok(removed), Err)
}

/// Deletes each of `items`, trying all of them whatever fails; returns the
/// ones that could not be deleted, and the first error.
pub(super) async fn delete_each<T>(
    items: Vec<T>,
    delete: impl AsyncFn(T) -> Result<(), RouteError>,
) -> (Vec<T>, Option<RouteError>)
where
    T: Clone,
{
    let delete = &delete;
    let results: Vec<(T, Result<(), RouteError>)> = stream::iter(items)
        .map(|item| async move { (item.clone(), delete(item).await) })
        .buffered(IN_FLIGHT)
        .collect()
        .await;
    let mut left = Vec::new();
    let mut first_error = None;
    for (item, result) in results {
        if let Err(e) = result {
            left.push(item);
            first_error.get_or_insert(e);
        }
    }
    (left, first_error)
}

/// `ip route del`; a route someone already removed is removed.
pub(super) async fn delete_route(handle: &Handle, route: RouteMessage) -> Result<(), RouteError> {
    let description = format!("{:?}", route.attributes);
    removed(handle.route().del(route).execute().await, description)
}

/// `ip rule del`; a rule someone already removed is removed.
pub(super) async fn delete_rule(handle: &Handle, rule: RuleMessage) -> Result<(), RouteError> {
    let description = format!("{:?}", rule.attributes);
    removed(handle.rule().del(rule).execute().await, description)
}

fn removed(result: Result<(), rtnetlink::Error>, description: String) -> Result<(), RouteError> {
    match result {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e))
            if [-libc::ESRCH, -libc::ENOENT].contains(&e.raw_code()) =>
        {
            Ok(())
        }
        Err(source) => Err(RouteError::Remove {
            route: description,
            source,
        }),
    }
}

/// Every routing rule of one family.
pub(super) async fn rules(
    handle: &Handle,
    version: IpVersion,
) -> Result<Vec<RuleMessage>, RouteError> {
    handle
        .rule()
        .get(version)
        .execute()
        .try_collect()
        .await
        .map_err(RouteError::List)
}

/// Whether a routing rule carries [`ROUTE_PROTOCOL`].
pub(super) fn is_ours(rule: &RuleMessage) -> bool {
    rule.attributes
        .contains(&RuleAttribute::Protocol(RouteProtocol::Other(
            ROUTE_PROTOCOL,
        )))
}

/// Every route of one family, in every table.
pub(super) async fn routes(
    handle: &Handle,
    family: AddressFamily,
) -> Result<Vec<RouteMessage>, RouteError> {
    let mut query = RouteMessage::default();
    query.header.address_family = family;
    handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(RouteError::List)
}

/// A route's table and destination, as the kernel lists it: what tells
/// one of ours from another (all are `local` routes through `lo`).
pub(super) fn route_key(route: &RouteMessage) -> Option<(u32, IpNet)> {
    let length = route.header.destination_prefix_length;
    let address = route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        });
    // A default route may come without its all-zero destination.
    let address = match (address, route.header.address_family) {
        (Some(address), _) => address,
        (None, AddressFamily::Inet) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        (None, _) => return None,
    };
    Some((table_of(route), IpNet::new(address, length).ok()?))
}

/// A route's table; tables above 255 are only in the attribute.
pub(super) fn table_of(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// `ip route add local PREFIX dev lo table TABLE proto 244`.
pub(super) fn local_route(prefix: IpNet, table: u32) -> RouteMessage {
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(prefix.addr(), prefix.prefix_len())
        .expect("an IpNet's length is valid for its family")
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .table_id(table)
        .output_interface(LOOPBACK_IFINDEX)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route is told by its table and destination, a default route also
    /// when the kernel lists it without its all-zero destination.
    #[test]
    fn a_route_is_told_by_its_table_and_destination() {
        let prefix: IpNet = "2001:db8:a::/64".parse().unwrap();
        assert_eq!(
            route_key(&local_route(prefix, TABLE_LOCAL)),
            Some((TABLE_LOCAL, prefix))
        );
        let default: IpNet = "0.0.0.0/0".parse().unwrap();
        let mut listed = local_route(default, 1000);
        listed
            .attributes
            .retain(|attribute| !matches!(attribute, RouteAttribute::Destination(_)));
        assert_eq!(route_key(&listed), Some((1000, default)));
    }
}
