//! The timeout options shared by the commands that classify connections.

use std::time::Duration;

use flowmon::close::Timeouts;

use super::run::parse_duration;

#[derive(clap::Args, Debug)]
pub struct TimeoutArgs {
    /// A SYN with no reply after this long is "unanswered".
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    syn_timeout: Duration,
    /// One FIN and nothing from the other side after this long is "half-closed".
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    close_timeout: Duration,
    /// An established connection silent this long is "idle" (and expired live).
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Silence after the close before a connection is final (trailing ACKs and RSTs belong to it).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    linger: Duration,
}

impl TimeoutArgs {
    pub fn resolve(&self) -> Timeouts {
        Timeouts {
            syn: self.syn_timeout,
            close: self.close_timeout,
            idle: self.idle_timeout,
            linger: self.linger,
        }
    }
}
