//! How urgent work is, and how waiting makes any work urgent in the end.
//!
//! Tasks and steps have a priority from 1 (low) to 4 (urgent); 2 when nobody chose one. A
//! claim takes the claimable steps in the order of their *claim rank*: the moment each became
//! claimable, minus [`AGING_MS`] for each level of priority. A step of priority 4 therefore
//! goes before a step of priority 1 that became claimable less than 3 × [`AGING_MS`] earlier,
//! and a step that has waited that long goes before anything that arrives after it: low
//! priority work is delayed, never starved, however much urgent work keeps coming.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A task's or step's priority: 1 (low) to 4 (urgent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Priority(u8);

/// How long a wait weighs as much as one level of priority, in milliseconds.
pub const AGING_MS: i64 = 60_000;

impl Priority {
    pub const LOWEST: Priority = Priority(1);
    /// What a task gets when neither its template nor its creator chose.
    pub const DEFAULT: Priority = Priority(2);
    pub const HIGHEST: Priority = Priority(4);

    /// The priority `value`, or a message saying which values are allowed.
    pub fn new(value: i64) -> Result<Priority, String> {
        match u8::try_from(value) {
            Ok(level) if (Self::LOWEST.0..=Self::HIGHEST.0).contains(&level) => Ok(Priority(level)),
            _ => Err(format!(
                "must be a whole number from {} (low) to {} (urgent), found {value}",
                Self::LOWEST.0,
                Self::HIGHEST.0
            )),
        }
    }

    /// The level, 1 to 4.
    pub fn level(self) -> u8 {
        self.0
    }

    /// How much earlier than its real claimable time a step of this priority ranks.
    pub fn head_start_ms(self) -> i64 {
        i64::from(self.0) * AGING_MS
    }
}

impl Default for Priority {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<i64> for Priority {
    type Error = String;

    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Priority::new(value)
    }
}

impl From<Priority> for i64 {
    fn from(priority: Priority) -> i64 {
        i64::from(priority.0)
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::{AGING_MS, Priority};

    #[test]
    fn only_one_to_four_are_priorities() {
        assert!(Priority::new(0).is_err());
        assert!(Priority::new(5).is_err());
        assert!(Priority::new(-1).is_err());
        assert!(Priority::new(i64::MAX).is_err());
        assert_eq!(Priority::new(4).map(Priority::level), Ok(4));
        assert_eq!(Priority::default(), Priority::new(2).unwrap());
    }

    #[test]
    fn a_level_of_priority_weighs_one_aging_period_of_waiting() {
        let rank =
            |since_ms: i64, level: i64| since_ms - Priority::new(level).unwrap().head_start_ms();
        // Urgent work that arrives within 3 periods goes first; after that, the old low one.
        assert!(rank(10 * AGING_MS, 4) < rank(8 * AGING_MS, 1));
        assert!(rank(10 * AGING_MS, 4) > rank(6 * AGING_MS, 1));
    }
}
