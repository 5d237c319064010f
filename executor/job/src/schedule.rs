//! A repository's schedule: the `/var/run/ci/crontab` its mkfile builds in the base OS, one job
//! per line — five cron fields (or an `@daily`-style nickname) then the mk targets to run.
//!
//! ```text
//! # minute hour day-of-month month day-of-week  targets
//! 0 3 * * *        nightly
//! */15 * * * MON-FRI  smoke lint
//! @weekly          audit
//! ```

use std::str::FromStr as _;

use chrono::{DateTime, TimeZone};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// One line of a schedule.
#[derive(Clone)]
pub struct Entry {
    /// The line as written (for messages and status).
    pub line: String,
    cron: Cron,
    pub targets: Vec<String>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The parsed pattern is a page of bitfields; the line says the same.
        write!(f, "Entry({:?})", self.line)
    }
}

impl Entry {
    /// Whether the entry fires in the minute of `time`.
    pub fn fires_at<Tz: TimeZone>(&self, time: &DateTime<Tz>) -> bool {
        use chrono::Timelike as _;
        // Five fields match whole minutes; the parsed pattern's seconds field is `0`.
        time.with_second(0)
            .and_then(|minute| minute.with_nanosecond(0))
            .is_some_and(|minute| self.cron.is_time_matching(&minute).unwrap_or(false))
    }

    /// When it fires next, after `time`.
    pub fn next_after<Tz: TimeZone>(&self, time: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        self.cron.find_next_occurrence(time, false).ok()
    }
}

/// Reads a schedule; the error names the first bad line and what is wrong with it.
pub fn parse(text: &str) -> Result<Vec<Entry>, String> {
    // Exactly the five classic fields: a sixth would otherwise be read as seconds, and a
    // schedule meant for cron would fire at other times than cron fires it.
    let parser = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build();
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let fields = if words[0].starts_with('@') { 1 } else { 5 };
        let bad = |why: String| format!("line {} `{line}`: {why}", index + 1);
        if words.len() <= fields {
            return Err(bad(format!(
                "expected {} then the mk targets to run",
                if fields == 1 {
                    "a nickname such as `@daily`"
                } else {
                    "five cron fields"
                }
            )));
        }
        let pattern = words[..fields].join(" ");
        let cron = parser
            .parse(&pattern)
            .map_err(|error| bad(error.to_string()))?;
        let targets: Vec<String> = words[fields..].iter().map(|&t| t.to_owned()).collect();
        if let Some(target) = targets
            .iter()
            .find(|target| target.starts_with('-') || target.contains(['=', '*']))
        {
            return Err(bad(format!(
                "`{target}` is not an mk target (a cron line has five fields)"
            )));
        }
        entries.push(Entry {
            line: line.to_owned(),
            cron,
            targets,
        });
    }
    Ok(entries)
}

/// Whether `text` parses as one cron pattern (for tests and messages).
pub fn is_pattern(text: &str) -> bool {
    Cron::from_str(text).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn entries_fire_in_their_minutes() {
        let entries = parse(
            "# nightly builds\n\n0 3 * * * nightly\n*/15 * * * MON-FRI smoke lint\n@weekly audit\n",
        )
        .expect("parse");
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].targets, ["smoke", "lint"]);
        // 2026-12-02 is a Wednesday.
        assert!(entries[0].fires_at(&at("2026-12-02T03:00:30Z")));
        assert!(!entries[0].fires_at(&at("2026-12-02T03:01:00Z")));
        assert!(entries[1].fires_at(&at("2026-12-02T10:45:00Z")));
        assert!(
            !entries[1].fires_at(&at("2026-12-05T10:45:00Z")),
            "a Saturday"
        );
        assert!(
            entries[2].fires_at(&at("2026-12-06T00:00:00Z")),
            "Sunday midnight"
        );
        assert_eq!(
            entries[0].next_after(&at("2026-12-02T03:00:00Z")),
            Some(at("2026-12-03T03:00:00Z"))
        );
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, expected) in [
            ("0 3 * * nightly\n", "line 1"),
            ("ok\n", "five cron fields"),
            ("0 3 * * *\n", "then the mk targets"),
            ("61 3 * * * nightly\n", "line 1"),
            ("0 0 3 * * * nightly\n", "`*` is not an mk target"),
            ("@daily\n", "nickname"),
            ("# fine\n@daily a\n0 25 * * * b\n", "line 3"),
            ("* * * * * -k\n", "`-k` is not an mk target"),
        ] {
            let error = parse(text).expect_err(text);
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        assert!(is_pattern("*/5 * * * *"));
    }
}
