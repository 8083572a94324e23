//! Who is the client: turns a canonical flow entry into a client/server view.
//!
//! The kernel stores each connection with its endpoints in address order; this
//! module decides which side opened it. The client is the SYN sender; without a
//! SYN, the receiver of the SYN-ACK; without either (a connection seen
//! midstream) the side with the ephemeral port, and the view says the
//! direction was guessed.

use std::net::IpAddr;

use flowmon_common::flow::{DIR_A_TO_B, DIR_B_TO_A, DirStats, FlowKey, FlowValue};

/// Ports below this are "well known" for the midstream heuristic.
const WELL_KNOWN_PORT_LIMIT: u16 = 1024;

/// One connection seen from the client's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    pub key: FlowKey,
    pub value: FlowValue,
    /// Direction index of client-to-server packets.
    pub client_dir: usize,
    /// True when neither SYN nor SYN-ACK was seen and the client was guessed
    /// from the ports.
    pub direction_guessed: bool,
}

impl Conn {
    pub fn new(key: FlowKey, value: FlowValue) -> Self {
        let (client_dir, direction_guessed) = orient(&key, &value);
        Self {
            key,
            value,
            client_dir,
            direction_guessed,
        }
    }

    fn endpoint(&self, dir: usize) -> (IpAddr, u16) {
        if dir == DIR_A_TO_B {
            (self.key.ip_a(), self.key.port_a)
        } else {
            (self.key.ip_b(), self.key.port_b)
        }
    }

    pub fn client(&self) -> (IpAddr, u16) {
        self.endpoint(self.client_dir)
    }

    pub fn server(&self) -> (IpAddr, u16) {
        self.endpoint(1 - self.client_dir)
    }

    /// What the client sent.
    pub fn clt(&self) -> &DirStats {
        &self.value.dir[self.client_dir]
    }

    /// What the server sent.
    pub fn srv(&self) -> &DirStats {
        &self.value.dir[1 - self.client_dir]
    }
}

/// Returns the client's direction index and whether it was guessed.
pub fn orient(key: &FlowKey, v: &FlowValue) -> (usize, bool) {
    let (a, b) = (&v.dir[DIR_A_TO_B], &v.dir[DIR_B_TO_A]);
    match (a.syn > 0, b.syn > 0) {
        (true, false) => return (DIR_A_TO_B, false),
        (false, true) => return (DIR_B_TO_A, false),
        // Simultaneous open: the earlier SYN opened it.
        (true, true) => {
            return (
                if a.first_syn_ns <= b.first_syn_ns {
                    DIR_A_TO_B
                } else {
                    DIR_B_TO_A
                },
                false,
            );
        }
        (false, false) => {}
    }
    match (a.synack > 0, b.synack > 0) {
        (true, false) => return (DIR_B_TO_A, false),
        (false, true) => return (DIR_A_TO_B, false),
        _ => {}
    }
    (guess_by_port(key.port_a, key.port_b), true)
}

/// The server is the side with a well-known port when only one has one,
/// else the side with the lower port (ephemeral ports are allocated high).
fn guess_by_port(port_a: u16, port_b: u16) -> usize {
    let (wa, wb) = (
        port_a < WELL_KNOWN_PORT_LIMIT,
        port_b < WELL_KNOWN_PORT_LIMIT,
    );
    let a_is_server = match (wa, wb) {
        (true, false) => true,
        (false, true) => false,
        _ => port_a <= port_b,
    };
    if a_is_server { DIR_B_TO_A } else { DIR_A_TO_B }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port_a: u16, port_b: u16) -> FlowKey {
        FlowKey {
            port_a,
            port_b,
            family: 4,
            ..Default::default()
        }
    }

    #[test]
    fn syn_sender_is_client() {
        let mut v = FlowValue::default();
        v.dir[DIR_B_TO_A].syn = 1;
        v.dir[DIR_A_TO_B].synack = 1;
        assert_eq!(orient(&key(80, 40000), &v), (DIR_B_TO_A, false));
        let mut v = FlowValue::default();
        v.dir[DIR_A_TO_B].syn = 2;
        assert_eq!(orient(&key(80, 40000), &v), (DIR_A_TO_B, false));
    }

    #[test]
    fn synack_receiver_is_client_when_syn_was_missed() {
        let mut v = FlowValue::default();
        v.dir[DIR_B_TO_A].synack = 1;
        assert_eq!(orient(&key(80, 40000), &v), (DIR_A_TO_B, false));
    }

    #[test]
    fn simultaneous_open_takes_the_earlier_syn() {
        let mut v = FlowValue::default();
        v.dir[DIR_A_TO_B].syn = 1;
        v.dir[DIR_A_TO_B].first_syn_ns = 20;
        v.dir[DIR_B_TO_A].syn = 1;
        v.dir[DIR_B_TO_A].first_syn_ns = 10;
        assert_eq!(orient(&key(5000, 6000), &v), (DIR_B_TO_A, false));
    }

    #[test]
    fn midstream_guesses_by_port() {
        let v = FlowValue::default();
        assert_eq!(orient(&key(443, 51000), &v), (DIR_B_TO_A, true));
        assert_eq!(orient(&key(5000, 22), &v), (DIR_A_TO_B, true));
        assert_eq!(orient(&key(8080, 50000), &v), (DIR_B_TO_A, true));
    }
}
