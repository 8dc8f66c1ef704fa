//! Token budgets: so many tokens per calendar day, week or month (UTC), or ever.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How often a [`Budget`] starts again: on calendar boundaries in UTC (midnight; Monday
/// midnight, as ISO 8601 weeks; the first of the month), or never.
///
/// ```
/// use tower_gateway_auth::limit::BudgetPeriod;
///
/// // 2026-12-02T10:00:00Z, a Wednesday.
/// let t = 1_796_205_600;
/// assert_eq!(BudgetPeriod::Day.end_after(t), Some(1_796_256_000)); // 2026-12-03T00:00:00Z
/// assert_eq!(BudgetPeriod::Week.end_after(t), Some(1_796_601_600)); // Monday 2026-12-07
/// assert_eq!(BudgetPeriod::Month.end_after(t), Some(1_798_761_600)); // 2027-01-01
/// assert_eq!(BudgetPeriod::Never.end_after(t), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    /// From midnight UTC to the next.
    Day,
    /// From Monday midnight UTC to the next.
    Week,
    /// From the first of the month, midnight UTC, to the first of the next.
    #[default]
    Month,
    /// Never starts again.
    Never,
}

const DAY: u64 = 86_400;

impl BudgetPeriod {
    /// A number naming the period that holds `unix_secs` (equal for two times in one
    /// period): what a stored count is filed under.
    pub fn index(self, unix_secs: u64) -> u64 {
        let days = unix_secs / DAY;
        match self {
            BudgetPeriod::Day => days,
            // 1970-01-01 was a Thursday: three days after a Monday.
            BudgetPeriod::Week => (days + 3) / 7,
            BudgetPeriod::Month => {
                let (year, month) = year_month(unix_secs);
                year * 12 + month - 1
            }
            BudgetPeriod::Never => 0,
        }
    }

    /// The first second of the period after the one that holds `unix_secs`; `None` for
    /// [`Never`](Self::Never).
    pub fn end_after(self, unix_secs: u64) -> Option<u64> {
        let days = unix_secs / DAY;
        match self {
            BudgetPeriod::Day => Some((days + 1) * DAY),
            BudgetPeriod::Week => Some((((days + 3) / 7 + 1) * 7 - 3) * DAY),
            BudgetPeriod::Month => {
                let (year, month) = year_month(unix_secs);
                let (year, month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                Some(days_from_civil(year, month) * DAY)
            }
            BudgetPeriod::Never => None,
        }
    }

    /// The name in key records and configuration: `day`, `week`, `month`, `never`.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Week => "week",
            BudgetPeriod::Month => "month",
            BudgetPeriod::Never => "never",
        }
    }
}

impl fmt::Display for BudgetPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BudgetPeriod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "day" => Ok(BudgetPeriod::Day),
            "week" => Ok(BudgetPeriod::Week),
            "month" => Ok(BudgetPeriod::Month),
            "never" => Ok(BudgetPeriod::Never),
            other => Err(format!("`{other}` is not day, week, month or never")),
        }
    }
}

/// The civil year and month (1–12) of a Unix time, in UTC (Howard Hinnant's
/// `civil_from_days`, which holds for every day from the epoch on).
fn year_month(unix_secs: u64) -> (u64, u64) {
    let z = unix_secs / DAY + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month)
}

/// Days from the epoch to the first of `month` of `year` (`days_from_civil`).
fn days_from_civil(year: u64, month: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A key's token budget: at most `tokens` per [`BudgetPeriod`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Budget {
    tokens: u64,
    period: BudgetPeriod,
}

impl Budget {
    /// `tokens` per `period`. A budget of 0 refuses every request.
    pub fn new(tokens: u64, period: BudgetPeriod) -> Self {
        Budget { tokens, period }
    }

    /// Tokens per period.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// When it starts again.
    pub fn period(&self) -> BudgetPeriod {
        self.period
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: the `time` crate's calendar.
    fn reference(period: BudgetPeriod, t: u64) -> Option<u64> {
        use time::{Duration, OffsetDateTime, Weekday};
        let at = OffsetDateTime::from_unix_timestamp(t as i64).unwrap();
        let midnight = at.replace_time(time::Time::MIDNIGHT);
        let end = match period {
            BudgetPeriod::Day => midnight + Duration::days(1),
            BudgetPeriod::Week => {
                let from_monday = i64::from(at.weekday().number_days_from_monday());
                let _ = Weekday::Monday;
                midnight - Duration::days(from_monday) + Duration::days(7)
            }
            BudgetPeriod::Month => {
                let first = midnight.replace_day(1).unwrap();
                let (y, m) = (first.year(), first.month());
                let (y, m) = if m == time::Month::December {
                    (y + 1, time::Month::January)
                } else {
                    (y, m.next())
                };
                first.replace_year(y).unwrap().replace_month(m).unwrap()
            }
            BudgetPeriod::Never => return None,
        };
        Some(end.unix_timestamp() as u64)
    }

    #[test]
    fn periods_end_on_utc_calendar_boundaries() {
        let mut t = 0u64;
        // Every 7 hours and 13 minutes over ~120 years: every month end, leap days and
        // century rules on the way.
        while t < 3_800_000_000 {
            for period in [BudgetPeriod::Day, BudgetPeriod::Week, BudgetPeriod::Month] {
                let end = period.end_after(t).unwrap();
                assert_eq!(Some(end), reference(period, t), "{period} at {t}");
                assert!(end > t);
                assert_eq!(period.index(t), period.index(end - 1), "{period} at {t}");
                assert_eq!(period.index(end), period.index(t) + 1, "{period} at {t}");
            }
            t += 7 * 3600 + 13 * 60;
        }
        assert_eq!(BudgetPeriod::Never.index(t), BudgetPeriod::Never.index(0));
    }
}
