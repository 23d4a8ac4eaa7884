//! Schedules: a cron expression in a time zone (or one time, `runAt`) that starts a task from
//! a template with a context, and what to do with the ticks a stopped server missed.
//!
//! The rules here are pure: which ticks are due at `now`, given the first tick not fired yet,
//! and the next one after. Firing each tick exactly once is the store's part.

use crate::problem::Problem;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use std::str::FromStr;

/// A tick fired within this long after its time is on time; older ones were missed (the
/// server was down, or the maintenance loop was held up) and follow the catch-up policy.
pub const ON_TIME_MS: i64 = 60_000;
/// The most ticks one sweep fires for one schedule (`run_all` after a long outage goes on in
/// the next sweeps).
pub const MAX_TICKS_PER_SWEEP: usize = 100;
/// The longest cron expression accepted.
const MAX_EXPRESSION_LEN: usize = 200;

/// What happens to ticks missed while no server ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// Missed ticks are dropped; the schedule goes on from the next one.
    Skip,
    /// One task for all the missed ticks (for the latest of them).
    #[default]
    RunOnce,
    /// One task per missed tick, oldest first.
    RunAll,
}

impl CatchUp {
    pub const ALL: [CatchUp; 3] = [CatchUp::Skip, CatchUp::RunOnce, CatchUp::RunAll];

    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::Skip => "skip",
            CatchUp::RunOnce => "run_once",
            CatchUp::RunAll => "run_all",
        }
    }

    pub fn parse(name: &str) -> Option<CatchUp> {
        Self::ALL.into_iter().find(|policy| policy.as_str() == name)
    }
}

/// A parsed cron expression and its time zone.
#[derive(Debug, Clone)]
pub struct Cron {
    cron: croner::Cron,
    zone: Tz,
}

impl Cron {
    /// Reads `expression` (five fields, minute to weekday, or `@daily` and the like) in the
    /// IANA time zone `zone` (`Europe/Berlin`; `UTC`). Problems are reported at `cron` and
    /// `timezone`.
    pub fn parse(expression: &str, zone: &str) -> Result<Cron, Vec<Problem>> {
        let mut problems = Vec::new();
        let cron = if expression.len() > MAX_EXPRESSION_LEN {
            problems.push(Problem::new(
                "cron",
                format!("is longer than {MAX_EXPRESSION_LEN} characters"),
            ));
            None
        } else {
            croner::Cron::from_str(expression.trim())
                .map_err(|err| {
                    problems.push(Problem::new(
                        "cron",
                        format!(
                            "{expression:?} is not a cron expression ({err}); write five fields, minute hour day-of-month month day-of-week, such as \"0 2 * * *\""
                        ),
                    ));
                })
                .ok()
        };
        let zone = Tz::from_str(zone)
            .map_err(|_| {
                problems.push(Problem::new(
                    "timezone",
                    format!(
                        "{zone:?} is not an IANA time zone such as \"Europe/Berlin\" or \"UTC\""
                    ),
                ));
            })
            .ok();
        match (cron, zone) {
            (Some(cron), Some(zone)) if problems.is_empty() => {
                let probe = Cron { cron, zone };
                // A pattern that can never match (31 February) is refused now, not at its
                // first tick.
                if probe.next_after(Utc::now()).is_none() {
                    return Err(vec![Problem::new(
                        "cron",
                        format!("{expression:?} never matches a date"),
                    )]);
                }
                Ok(probe)
            }
            _ => Err(problems),
        }
    }

    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.zone);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|next| next.with_timezone(&Utc))
    }

    /// The last tick at or before `at`.
    pub fn latest_at_or_before(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = at.with_timezone(&self.zone);
        self.cron
            .find_previous_occurrence(&local, true)
            .ok()
            .map(|tick| tick.with_timezone(&Utc))
    }

    /// The next `count` ticks after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        let mut ticks = Vec::with_capacity(count);
        let mut from = after;
        while ticks.len() < count {
            let Some(next) = self.next_after(from) else {
                break;
            };
            ticks.push(next);
            from = next;
        }
        ticks
    }
}

/// What a sweep does for one schedule at `now`.
#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    /// The ticks to start a task for, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// Ticks dropped by the catch-up policy.
    pub skipped: usize,
    /// The first tick not handled yet; `None`: the schedule has no more (a one-time run).
    pub next: Option<DateTime<Utc>>,
}

/// The ticks due at `now`, counting from `first` (the first tick not fired yet), under
/// `catch_up`; `cron` gives the ticks after it (`None`: a one-time schedule).
pub fn due(
    first: DateTime<Utc>,
    cron: Option<&Cron>,
    catch_up: CatchUp,
    now: DateTime<Utc>,
) -> Firing {
    let mut due = Vec::new();
    let mut next = Some(first);
    let mut passed_over = 0;
    while let Some(tick) = next.filter(|tick| *tick <= now) {
        if due.len() >= MAX_TICKS_PER_SWEEP {
            if catch_up == CatchUp::RunAll {
                break;
            }
            // A long outage under skip or run_once: straight to the latest tick.
            passed_over = due.len();
            due.clear();
            due.extend(cron.and_then(|cron| cron.latest_at_or_before(now)));
            next = cron.and_then(|cron| cron.next_after(now));
            break;
        }
        due.push(tick);
        next = cron.and_then(|cron| cron.next_after(tick));
    }
    let total = due.len();
    let fire: Vec<DateTime<Utc>> = match catch_up {
        CatchUp::RunAll => due,
        CatchUp::RunOnce => due.last().copied().into_iter().collect(),
        CatchUp::Skip => due
            .into_iter()
            .filter(|tick| (now - *tick).num_milliseconds() <= ON_TIME_MS)
            .collect(),
    };
    Firing {
        skipped: (total + passed_over).saturating_sub(fire.len()),
        fire,
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn ticks_follow_the_time_zone_across_daylight_saving() {
        let nightly = Cron::parse("0 2 * * *", "Europe/Berlin").unwrap();
        // Winter: 02:00 in Berlin is 01:00 UTC; summer: 00:00 UTC.
        assert_eq!(
            nightly.next_after(at("2026-01-10T12:00:00Z")),
            Some(at("2026-01-11T01:00:00Z"))
        );
        assert_eq!(
            nightly.next_after(at("2026-07-10T12:00:00Z")),
            Some(at("2026-07-11T00:00:00Z"))
        );
        let upcoming = nightly.upcoming(at("2026-01-10T12:00:00Z"), 3);
        assert_eq!(upcoming.len(), 3);
        assert!(upcoming.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_with_their_path() {
        let problems = Cron::parse("every day", "Mars/Olympus").unwrap_err();
        let paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["cron", "timezone"]);
        assert!(
            Cron::parse("0 0 31 2 *", "UTC").unwrap_err()[0]
                .message
                .contains("never matches")
        );
        assert!(Cron::parse("@hourly", "UTC").is_ok());
    }

    #[test]
    fn catch_up_policies_after_an_outage() {
        let minutely = Cron::parse("* * * * *", "UTC").unwrap();
        let first = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let now = first + chrono::Duration::minutes(9) + chrono::Duration::seconds(5);
        let all = due(first, Some(&minutely), CatchUp::RunAll, now);
        assert_eq!(all.fire.len(), 10);
        assert_eq!(all.next, Some(first + chrono::Duration::minutes(10)));
        let once = due(first, Some(&minutely), CatchUp::RunOnce, now);
        assert_eq!(once.fire, [first + chrono::Duration::minutes(9)]);
        assert_eq!(once.skipped, 9);
        let skip = due(first, Some(&minutely), CatchUp::Skip, now);
        assert_eq!(
            skip.fire,
            [first + chrono::Duration::minutes(9)],
            "the tick of 5 s ago is on time"
        );
        let hourly = Cron::parse("0 * * * *", "UTC").unwrap();
        let later = first + chrono::Duration::minutes(330);
        let late = due(first, Some(&hourly), CatchUp::Skip, later);
        assert!(late.fire.is_empty(), "every tick is over a minute old");
        assert_eq!(late.skipped, 6);
        assert_eq!(late.next, Some(first + chrono::Duration::hours(6)));

        // On time: one tick, whatever the policy.
        let on_time = due(first, Some(&minutely), CatchUp::Skip, first);
        assert_eq!(on_time.fire, [first]);
        // A one-time run fires once and has no next tick.
        let once_only = due(first, None, CatchUp::RunOnce, now);
        assert_eq!((once_only.fire, once_only.next), (vec![first], None));
        // Not yet due.
        let early = due(
            first,
            Some(&minutely),
            CatchUp::RunAll,
            first - chrono::Duration::seconds(1),
        );
        assert!(early.fire.is_empty());
        assert_eq!(early.next, Some(first));
    }

    #[test]
    fn a_year_long_outage_does_not_walk_every_tick() {
        let minutely = Cron::parse("* * * * *", "UTC").unwrap();
        let first = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        let now = first + chrono::Duration::days(365);
        let once = due(first, Some(&minutely), CatchUp::RunOnce, now);
        assert_eq!(once.fire, [now]);
        assert_eq!(once.next, Some(now + chrono::Duration::minutes(1)));
        let all = due(first, Some(&minutely), CatchUp::RunAll, now);
        assert_eq!(all.fire.len(), MAX_TICKS_PER_SWEEP);
        assert_eq!(all.next, Some(first + chrono::Duration::minutes(100)));
    }
}
