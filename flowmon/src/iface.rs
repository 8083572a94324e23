//! Network interfaces: the default-route interface, names and indexes.

use std::{collections::HashMap, ffi::CString, fs, io};

/// The interface that holds the IPv4 default route, else the IPv6 one.
pub fn default_route() -> io::Result<Option<String>> {
    if let Ok(route) = fs::read_to_string("/proc/net/route")
        && let Some(name) = default_v4(&route)
    {
        return Ok(Some(name));
    }
    match fs::read_to_string("/proc/net/ipv6_route") {
        Ok(route) => Ok(default_v6(&route)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses /proc/net/route: `Iface Destination Gateway Flags ... Mask ...`.
/// The default route has destination and mask 0; the lowest metric wins.
fn default_v4(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let up = u32::from_str_radix(f.get(3)?, 16).ok()? & 1 != 0;
            (f.get(1)? == &"00000000" && f.get(7)? == &"00000000" && up)
                .then(|| Some((f.get(6)?.parse::<u32>().ok()?, f[0].to_string())))
                .flatten()
        })
        .min()
        .map(|(_, name)| name)
}

/// Parses /proc/net/ipv6_route: `dest plen src plen nexthop metric refcnt use flags iface`.
fn default_v6(table: &str) -> Option<String> {
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = *f.get(9)?;
            (f[0].chars().all(|c| c == '0') && f.get(1)? == &"00" && name != "lo")
                .then(|| Some((u32::from_str_radix(f.get(5)?, 16).ok()?, name.to_string())))
                .flatten()
        })
        .min()
        .map(|(_, name)| name)
}

/// The index of interface `name` in this thread's network namespace.
pub fn index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // Safety: `c` is a valid NUL-terminated string for the call's duration.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Names of all interfaces in this network namespace, by index.
pub fn names() -> HashMap<u32, String> {
    let mut map = HashMap::new();
    if let Ok(dir) = fs::read_dir("/sys/class/net") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(i) = fs::read_to_string(entry.path().join("ifindex"))
                && let Ok(i) = i.trim().parse()
            {
                map.insert(i, name);
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth1\t00000000\t0102A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0
eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
";

    #[test]
    fn lowest_metric_default_route_wins() {
        assert_eq!(default_v4(ROUTE).as_deref(), Some("eth0"));
    }

    #[test]
    fn no_default_route() {
        assert_eq!(
            default_v4(
                ROUTE
                    .lines()
                    .take(1)
                    .chain(ROUTE.lines().skip(3))
                    .collect::<Vec<_>>()
                    .join("\n")
                    .as_str()
            ),
            None
        );
    }

    #[test]
    fn ipv6_default_route() {
        let t = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00450003     wlan0\n\
                 00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        assert_eq!(default_v6(t).as_deref(), Some("wlan0"));
    }
}
