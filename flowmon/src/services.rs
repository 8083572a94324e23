//! Application names of TCP ports, from the system services database
//! (/etc/services): 22 ssh, 1194 openvpn.

use std::{collections::HashMap, path::Path};

/// Port number to service name, TCP only.
#[derive(Clone, Debug, Default)]
pub struct Services(HashMap<u16, String>);

impl Services {
    /// Reads /etc/services; an unreadable file gives an empty database (names
    /// then show as "-"), never an error: it only decorates.
    pub fn system() -> Self {
        Self::load(Path::new("/etc/services"))
    }

    pub fn load(path: &Path) -> Self {
        std::fs::read_to_string(path)
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    /// Parses the `name port/proto aliases... # comment` format; the first
    /// name listed for a port wins, as getservbyport(3) answers.
    pub fn parse(text: &str) -> Self {
        let mut m = HashMap::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let (Some(name), Some(pp)) = (words.next(), words.next()) else {
                continue;
            };
            let Some((port, proto)) = pp.split_once('/') else {
                continue;
            };
            if proto == "tcp"
                && let Ok(port) = port.parse()
            {
                m.entry(port).or_insert_with(|| name.to_string());
            }
        }
        Self(m)
    }

    pub fn name(&self, port: u16) -> Option<&str> {
        self.0.get(&port).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_names_first_wins() {
        let s = Services::parse(
            "# comment\nssh\t\t22/tcp\t\t\t# SSH\nopenvpn 1194/tcp\nopenvpn 1194/udp\nwww 80/tcp\nhttp 80/tcp\ndomain 53/udp\n",
        );
        assert_eq!(
            (s.name(22), s.name(1194), s.name(80), s.name(53)),
            (Some("ssh"), Some("openvpn"), Some("www"), None)
        );
    }
}
