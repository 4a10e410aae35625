//! HTTP to other people's servers (a bot's file URL, a device's push endpoint) that must not
//! reach the server's own network: loopback, private, link-local and other non-public addresses
//! are refused, whether named by the URL, by a redirect, or by a name that resolves there.

use std::net::{IpAddr, SocketAddr};

/// `builder` made to reach public addresses only, following at most `max_redirects` redirects
/// (each checked too). No proxy: it would resolve names itself, past the check.
pub fn public_only(builder: reqwest::ClientBuilder, max_redirects: usize) -> reqwest::ClientBuilder {
    builder.no_proxy().dns_resolver(std::sync::Arc::new(PublicOnly)).redirect(reqwest::redirect::Policy::custom(
        move |attempt| {
            if attempt.previous().len() >= max_redirects || !host_may_be_public(attempt.url()) {
                attempt.stop()
            } else {
                attempt.follow()
            }
        },
    ))
}

/// False for a URL whose host is an address that is not public (names are checked when
/// they resolve, by [`PublicOnly`]).
pub fn host_may_be_public(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => is_public(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => is_public(IpAddr::V6(ip)),
        Some(url::Host::Domain(name)) => !name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            let shared = a == 100 && (b & 0xc0) == 64;
            let benchmarking = a == 198 && (b & 0xfe) == 18;
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || shared
                || benchmarking
                || a == 0
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded =
                |hi: u16, lo: u16| IpAddr::V4(std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
            if v6.is_loopback() || v6.is_unspecified() {
                return false;
            }
            // Addresses that carry an IPv4 one: mapped, compatible (`::a.b.c.d`), NAT64, 6to4.
            if let Some(v4) = v6.to_ipv4() {
                return is_public(IpAddr::V4(v4));
            }
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public(embedded(s[6], s[7]));
            }
            if s[0] == 0x2002 {
                return is_public(embedded(s[1], s[2]));
            }
            !(v6.is_multicast() || (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Resolves names to their public addresses only.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.filter(|a| is_public(a.ip())).collect();
            if found.is_empty() {
                return Err("the host has no public address".into());
            }
            Ok(Box::new(found.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_fetched_by_default() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "198.18.0.1",
            "240.0.0.1",
            "224.0.0.1",
            "::1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "ff02::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        assert!(is_public("8.8.8.8".parse().unwrap()));
        assert!(is_public("2606:4700::1111".parse().unwrap()));
        let url = |u: &str| reqwest::Url::parse(u).ok();
        assert_eq!(url("http://localhost:8080/x").map(|u| host_may_be_public(&u)), Some(false));
        assert_eq!(url("http://[::1]/x").map(|u| host_may_be_public(&u)), Some(false));
        assert_eq!(url("https://example.org/x").map(|u| host_may_be_public(&u)), Some(true));
    }
}
