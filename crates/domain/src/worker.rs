//! The worker protocol's rules: how many steps a worker may claim at once, how long a lease
//! and a long-poll may last, what a worker id and a retry delay may be. The API checks its
//! input against these and the engine honours the same numbers, so they are written once.

use crate::Problem;

/// An integer field of the protocol: its default when omitted and the range it must be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounded {
    pub default: u32,
    pub min: u32,
    pub max: u32,
}

impl Bounded {
    /// The value, or the default when omitted; a problem at `path` when out of range.
    pub fn check(&self, value: Option<i32>, path: &str) -> Result<u32, Problem> {
        let Some(value) = value else {
            return Ok(self.default);
        };
        match u32::try_from(value) {
            Ok(value) if (self.min..=self.max).contains(&value) => Ok(value),
            _ => Err(Problem::new(
                path,
                format!("must be between {} and {}, got {value}", self.min, self.max),
            )),
        }
    }
}

/// Steps one claim may lease.
pub const CLAIM_LIMIT: Bounded = Bounded {
    default: 10,
    min: 1,
    max: 100,
};

/// Seconds a lease lasts before another worker may take the step.
pub const LEASE_SECONDS: Bounded = Bounded {
    default: 60,
    min: 1,
    max: 3600,
};

/// Seconds a claim may wait for work to appear.
pub const WAIT_SECONDS: Bounded = Bounded {
    default: 0,
    min: 0,
    max: 60,
};

/// Characters a worker id may have.
pub const MAX_WORKER_ID_CHARS: usize = 255;

/// A worker id names the holder of a lease: 1 to 255 characters, not only blanks.
pub fn check_worker_id(worker_id: &str, path: &str) -> Result<(), Problem> {
    if worker_id.trim().is_empty() || worker_id.chars().count() > MAX_WORKER_ID_CHARS {
        return Err(Problem::new(
            path,
            format!("must have 1 to {MAX_WORKER_ID_CHARS} characters"),
        ));
    }
    Ok(())
}

/// A worker's "retry after" is a number of seconds from 0 to the longest delay a template
/// may declare.
pub fn check_retry_after(seconds: f64, path: &str) -> Result<(), Problem> {
    if crate::template::seconds_in_range(seconds) {
        Ok(())
    } else {
        Err(Problem::new(
            path,
            format!(
                "must be a number of seconds from 0 to {} ({} days)",
                crate::template::MAX_SECONDS,
                crate::template::MAX_SECONDS / 86_400.0
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_fields_default_and_refuse_what_is_out_of_range() {
        assert_eq!(CLAIM_LIMIT.check(None, "limit"), Ok(10));
        assert_eq!(CLAIM_LIMIT.check(Some(100), "limit"), Ok(100));
        assert_eq!(WAIT_SECONDS.check(Some(0), "wait"), Ok(0));
        for bad in [0, 101, -1, i32::MIN] {
            let problem = CLAIM_LIMIT.check(Some(bad), "input.limit").unwrap_err();
            assert_eq!(problem.path, "input.limit");
            assert!(problem.message.contains("between 1 and 100"), "{problem}");
        }
    }

    #[test]
    fn worker_ids_and_retry_delays_are_checked() {
        assert!(check_worker_id("w-1", "id").is_ok());
        assert!(check_worker_id("   ", "id").is_err());
        assert!(check_worker_id(&"x".repeat(256), "id").is_err());
        assert!(check_worker_id(&"é".repeat(255), "id").is_ok());
        assert!(check_retry_after(0.0, "s").is_ok());
        for bad in [-1.0, f64::NAN, f64::INFINITY, 31.0 * 86_400.0] {
            assert!(check_retry_after(bad, "s").is_err(), "{bad}");
        }
    }
}
