//! Limits of the host: the open-file limit and what it allows.
//!
//! A device with k targets costs the daemon 1 + k descriptors, so the soft
//! limit is raised to the hard limit at start and the resulting room for
//! devices is logged; running out later is handled at accept.

use std::io;

/// Descriptors kept for the listeners, the log files, the poll instances.
const RESERVED_DESCRIPTORS: u64 = 64;

/// Raises the soft open-file limit to the hard limit; returns the new soft
/// limit.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
    }
    Ok(limit.rlim_cur)
}

/// How many devices fit in `descriptors` when each has `targets` targets.
pub fn devices_allowed(descriptors: u64, targets: usize) -> u64 {
    descriptors.saturating_sub(RESERVED_DESCRIPTORS) / (1 + targets as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_device_costs_one_descriptor_plus_one_per_target() {
        assert_eq!(devices_allowed(20_000, 1), 9_968);
        assert_eq!(devices_allowed(20_000, 3), 4_984);
        assert_eq!(devices_allowed(10, 3), 0);
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let soft = raise_open_file_limit().expect("getrlimit works here");
        assert!(soft >= 64);
    }
}
