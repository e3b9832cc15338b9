//! Who counts as one client for the per-address limits: an IPv4 address, or an IPv6 /64 (one
//! subscriber's network, which hands its hosts as many addresses as they like), with
//! IPv4-mapped IPv6 addresses counted as the IPv4 address they carry.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};

/// The unit of the per-address limits (connection share, enrollment rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ClientAddress {
    /// One IPv4 address.
    V4(Ipv4Addr),
    /// The first 64 bits of an IPv6 address.
    V6Prefix(u64),
}

impl From<IpAddr> for ClientAddress {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4),
                None => Self::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl fmt::Display for ClientAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(v4) => v4.fmt(f),
            Self::V6Prefix(prefix) => {
                write!(f, "{}/64", Ipv6Addr::from(u128::from(*prefix) << 64))
            }
        }
    }
}

/// How many connections each [`ClientAddress`] has open on one listener, capped.
#[derive(Debug)]
pub(crate) struct AddressShares {
    open: Mutex<HashMap<ClientAddress, usize>>,
    per_address_max: usize,
}

impl AddressShares {
    pub(crate) fn new(per_address_max: usize) -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::new(HashMap::new()),
            per_address_max,
        })
    }

    /// A share for one more connection from `address`, or `None` when it has its
    /// `per_address_max` open already.
    pub(crate) fn claim(self: &Arc<Self>, address: ClientAddress) -> Option<AddressShare> {
        // Every update leaves a whole map: a poisoned lock still holds a valid one.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(address).or_insert(0);
        if *count >= self.per_address_max {
            return None;
        }
        *count += 1;
        Some(AddressShare {
            shares: Arc::clone(self),
            address,
        })
    }

    #[cfg(test)]
    fn open(&self, address: ClientAddress) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&address).copied().unwrap_or(0)
    }
}

/// One open connection's part of its address's share; given back when dropped.
#[derive(Debug)]
pub(crate) struct AddressShare {
    shares: Arc<AddressShares>,
    address: ClientAddress,
}

impl Drop for AddressShare {
    fn drop(&mut self) {
        let mut open = self
            .shares
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> ClientAddress {
        ClientAddress::from(text.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn an_ipv6_slash_64_is_one_client() {
        assert_eq!(
            address("2001:db8:1:2::1"),
            address("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_ne!(address("2001:db8:1:2::1"), address("2001:db8:1:3::1"));
        assert_eq!(address("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn ipv4_and_ipv4_mapped_are_the_same_client() {
        assert_eq!(address("192.0.2.7"), address("::ffff:192.0.2.7"));
        assert_ne!(address("192.0.2.7"), address("192.0.2.8"));
        assert_eq!(address("::ffff:192.0.2.7").to_string(), "192.0.2.7");
    }

    #[test]
    fn shares_are_capped_per_address_and_given_back() {
        let shares = AddressShares::new(2);
        let first = address("192.0.2.1");
        let other = address("2001:db8::1");
        let a = shares.claim(first).unwrap();
        let b = shares.claim(first).unwrap();
        assert!(shares.claim(first).is_none());
        // Another client is not affected.
        let c = shares.claim(other).unwrap();
        drop(a);
        assert_eq!(shares.open(first), 1);
        let d = shares.claim(first).unwrap();
        drop((b, c, d));
        assert_eq!(shares.open(first), 0);
        assert!(shares.open.lock().unwrap().is_empty());
    }
}
