//! The agent's privileges: checked before touching the kernel, so a missing
//! one gets a message that names it, and dropped once the programs are
//! attached.

use std::fs;

/// Linux capability numbers (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capabilities flowmon needs and lacks, by name; empty when all are held.
/// CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as the kernel allows.
pub fn missing() -> Vec<&'static str> {
    let eff = effective().unwrap_or(0);
    missing_from(eff)
}

/// The pure part of [`missing`], for a given effective capability mask.
pub fn missing_from(eff: u64) -> Vec<&'static str> {
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let sys_admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !sys_admin {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_PERFMON) && !sys_admin {
        missing.push("CAP_PERFMON");
    }
    missing
}

/// The effective capability mask of this process, from /proc/self/status.
fn effective() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

/// Drops every capability, the bounding set included, so nothing this
/// process runs can regain one. After attaching, the agent reads and updates
/// maps through descriptors it already holds, closes links (which detaches
/// them) and writes files it owns: none of that is checked against a
/// capability, so a compromised agent can no longer load programs, touch
/// other interfaces or read other processes' files.
pub fn drop_all() -> Result<(), caps::errors::CapsError> {
    use caps::CapSet;
    // The bounding set first: trimming it needs CAP_SETPCAP, dropped below.
    // Without it (a systemd unit's CapabilityBoundingSet leaves it out) the
    // bounding set is already what the service manager allowed, and empty
    // permitted and effective sets are enough: nothing here execs.
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP)? {
        for cap in caps::read(None, CapSet::Bounding)? {
            caps::drop(None, CapSet::Bounding, cap)?;
        }
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set)?;
    }
    Ok(())
}

/// The names of this process's effective capabilities, sorted.
pub fn effective_names() -> Vec<String> {
    let mut names: Vec<String> = caps::read(None, caps::CapSet::Effective)
        .map(|s| s.into_iter().map(|c| c.to_string()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything() {
        assert!(missing_from(u64::MAX).is_empty());
    }

    #[test]
    fn nothing_names_all_three() {
        assert_eq!(missing_from(0), ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
    }

    #[test]
    fn sys_admin_covers_bpf_and_perfmon() {
        assert_eq!(missing_from(1 << CAP_SYS_ADMIN), ["CAP_NET_ADMIN"]);
        assert!(
            missing_from((1 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_PERFMON)).is_empty()
        );
    }
}
