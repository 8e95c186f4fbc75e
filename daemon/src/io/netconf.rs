//! Interface configuration over netlink (rtnetlink): the overlay address and prefix route on the
//! TUN device, link state, and the host's own addresses for endpoint candidates.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::LinkFlags;
use rtnetlink::{Handle, LinkUnspec};

#[derive(Clone)]
pub struct NetConf {
    handle: Handle,
}

fn nl_err(what: &str, e: rtnetlink::Error) -> io::Error {
    io::Error::other(format!("netlink: cannot {what}: {e}"))
}

impl NetConf {
    /// Opens a netlink connection (its driver runs on the current tokio runtime).
    pub fn new() -> io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(NetConf { handle })
    }

    pub async fn link_index(&self, name: &str) -> io::Result<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("interface {name} does not exist"),
            )),
            Err(e) => Err(nl_err(&format!("find interface {name}"), e)),
        }
    }

    async fn addresses(&self) -> io::Result<Vec<AddressMessage>> {
        self.handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("list addresses", e))
    }

    /// Makes `ip/prefix_len` and `extra/32` (the overlay resolver's address, which every node
    /// holds for its own host) the only IPv4 addresses of the link (the kernel adds the prefix
    /// route with the first) and sets the link up.
    pub async fn configure(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix_len: u8,
        extra: Option<Ipv4Addr>,
    ) -> io::Result<()> {
        let wanted = |a: Ipv4Addr| a == ip || Some(a) == extra;
        for msg in self.addresses().await? {
            if msg.header.index == index && ipv4_of(&msg).is_some_and(|a| !wanted(a)) {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|e| nl_err("remove old overlay address", e))?;
            }
        }
        let present: Vec<Ipv4Addr> = self
            .addresses()
            .await?
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(ipv4_of)
            .collect();
        let mut add = vec![(ip, prefix_len)];
        add.extend(extra.map(|e| (e, 32)));
        for (a, len) in add {
            if !present.contains(&a) {
                self.handle
                    .address()
                    .add(index, IpAddr::V4(a), len)
                    .execute()
                    .await
                    .map_err(|e| nl_err(&format!("add overlay address {a}/{len}"), e))?;
            }
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| nl_err("set the interface up", e))
    }

    /// Makes `ip/prefix_len` the only IPv6 address of the link besides link-local ones (the
    /// kernel adds the prefix route with it), with no duplicate address detection: the address
    /// is the node key's, and the link is point-to-point.
    pub async fn configure6(&self, index: u32, ip: Ipv6Addr, prefix_len: u8) -> io::Result<()> {
        use rtnetlink::packet_route::address::AddressHeaderFlags;
        for msg in self.addresses().await? {
            if msg.header.index == index
                && ipv6_of(&msg).is_some_and(|a| a != ip && !a.is_unicast_link_local())
            {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|e| nl_err("remove old IPv6 overlay address", e))?;
            }
        }
        let present = self
            .addresses()
            .await?
            .iter()
            .any(|m| m.header.index == index && ipv6_of(m) == Some(ip));
        if !present {
            let mut req = self.handle.address().add(index, IpAddr::V6(ip), prefix_len);
            req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
            req.execute()
                .await
                .map_err(|e| nl_err("add IPv6 overlay address", e))?;
        }
        Ok(())
    }

    /// The host's IPv4 addresses other than loopback and the overlay interface: the local
    /// candidates a node publishes.
    ///
    /// Point-to-point links (other tunnels: another a2a, WireGuard, a VPN) are skipped: an
    /// address there reaches a peer only through that other tunnel, and a path found through
    /// it would nest one tunnel inside another.
    pub async fn local_ipv4(&self, exclude_index: Option<u32>) -> io::Result<Vec<Ipv4Addr>> {
        Ok(self
            .candidate_addresses(exclude_index)
            .await?
            .iter()
            .filter_map(ipv4_of)
            .filter(|ip| !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified())
            .collect())
    }

    /// The host's IPv6 addresses a node publishes ([`publishable_v6`]: global and unique-local,
    /// never link-local), with the same exclusions as [`local_ipv4`](Self::local_ipv4), and
    /// none the kernel does not use yet or any more (tentative, failed duplicate detection,
    /// deprecated).
    ///
    /// [`publishable_v6`]: crate::core::family::publishable_v6
    pub async fn local_ipv6(&self, exclude_index: Option<u32>) -> io::Result<Vec<Ipv6Addr>> {
        use rtnetlink::packet_route::address::AddressHeaderFlags;
        let unusable = AddressHeaderFlags::Tentative
            | AddressHeaderFlags::Dadfailed
            | AddressHeaderFlags::Deprecated;
        Ok(self
            .candidate_addresses(exclude_index)
            .await?
            .iter()
            .filter(|m| !m.header.flags.intersects(unusable))
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V6(ip)) => Some(*ip),
                    _ => None,
                })
            })
            .filter(crate::core::family::publishable_v6)
            .collect())
    }

    /// The addresses of every link but `exclude_index` and point-to-point ones.
    async fn candidate_addresses(
        &self,
        exclude_index: Option<u32>,
    ) -> io::Result<Vec<AddressMessage>> {
        let tunnels: Vec<u32> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| nl_err("list links", e))?
            .into_iter()
            .filter(|l| l.header.flags.contains(LinkFlags::Pointopoint))
            .map(|l| l.header.index)
            .collect();
        Ok(self
            .addresses()
            .await?
            .iter()
            .filter(|m| Some(m.header.index) != exclude_index)
            .filter(|m| !tunnels.contains(&m.header.index))
            .cloned()
            .collect())
    }
}

fn ipv4_of(msg: &AddressMessage) -> Option<Ipv4Addr> {
    msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    })
}

fn ipv6_of(msg: &AddressMessage) -> Option<Ipv6Addr> {
    msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(IpAddr::V6(ip)) => Some(*ip),
        _ => None,
    })
}
