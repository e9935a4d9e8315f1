//! Budget windows: the UTC day and the calendar month a moment falls in, and when each ends.

use std::time::SystemTime;

use time::{Date, Month, OffsetDateTime, Time};

/// A budget's reset period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// A UTC day: `2026-12-07`, ends at the next midnight UTC.
    Day,
    /// A calendar month in UTC: `2026-12`, ends at 00:00 UTC on the first of the next.
    Month,
}

/// The label of the window `now` falls in, and when that window ends.
pub fn window_of(now: SystemTime, window: Window) -> (String, SystemTime) {
    let at = OffsetDateTime::from(now);
    let date = at.date();
    match window {
        Window::Day => {
            let next = date.next_day().unwrap_or(date);
            (
                format!(
                    "{:04}-{:02}-{:02}",
                    date.year(),
                    u8::from(date.month()),
                    date.day()
                ),
                midnight(next),
            )
        }
        Window::Month => {
            let (year, month) = match date.month() {
                Month::December => (date.year() + 1, Month::January),
                m => (date.year(), m.next()),
            };
            let first = Date::from_calendar_date(year, month, 1).unwrap_or(date);
            (
                format!("{:04}-{:02}", date.year(), u8::from(date.month())),
                midnight(first),
            )
        }
    }
}

/// When the window `now` falls in began.
pub fn window_start(now: SystemTime, window: Window) -> SystemTime {
    let date = OffsetDateTime::from(now).date();
    match window {
        Window::Day => midnight(date),
        Window::Month => midnight(date.replace_day(1).unwrap_or(date)),
    }
}

fn midnight(date: Date) -> SystemTime {
    SystemTime::from(date.with_time(Time::MIDNIGHT).assume_utc())
}

/// `2026-12-08T00:00:00Z`.
pub fn rfc3339(at: SystemTime) -> String {
    let at = OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn days_and_months_end_at_utc_midnight() {
        // 2026-12-31T23:59:59Z
        let now = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        let (day, ends) = window_of(now, Window::Day);
        assert_eq!(day, "2026-12-31");
        assert_eq!(rfc3339(ends), "2027-01-01T00:00:00Z");
        let (month, ends) = window_of(now, Window::Month);
        assert_eq!(month, "2026-12");
        assert_eq!(rfc3339(ends), "2027-01-01T00:00:00Z");
        let (month, ends) = window_of(
            UNIX_EPOCH + Duration::from_secs(1_770_000_000),
            Window::Month,
        );
        assert_eq!(
            (month.as_str(), rfc3339(ends).as_str()),
            ("2026-02", "2026-03-01T00:00:00Z")
        );
        assert_eq!(
            rfc3339(window_start(now, Window::Day)),
            "2026-12-31T00:00:00Z"
        );
        assert_eq!(
            rfc3339(window_start(now, Window::Month)),
            "2026-12-01T00:00:00Z"
        );
    }
}
