//! A weekly timetable of upload bandwidth limits (`upload.bandwidth_schedule`),
//! in the form rclone's `--bwlimit` timetable made familiar:
//!
//! ```yaml
//! upload:
//!   bandwidth_schedule:
//!     - "Mon-Fri 08:00 10MiB"   # working days from 08:00: 10 MiB/s
//!     - "19:00 off"             # every evening from 19:00: no limit
//! ```
//!
//! Each entry is `[DAYS] HH:MM LIMIT`:
//!
//! - DAYS, optional: a day (`Mon` or `Monday`, any case) or a range of days
//!   (`Mon-Fri`); a range may wrap (`Fri-Mon` is Friday, Saturday, Sunday and
//!   Monday). An entry without days is for every day.
//! - HH:MM: a wall-clock time from `00:00` to `23:59` (`8:00` is `08:00`).
//! - LIMIT: bytes per second in the size syntax of [`crate::config::units`]
//!   (`10MiB`, `512KiB`, `1048576`; a trailing `/s` is allowed), or `off`,
//!   `unlimited` or `0` for no limit.
//!
//! An entry takes effect at its time on each of its days and lasts until the
//! next entry takes effect, in week order. The week wraps around: before the
//! first entry of the week, the last entry of the week is in force (above,
//! from Friday 19:00 to Monday 08:00 uploads are unlimited). A day and time can
//! be set by one entry only: `08:00 …` with `Mon 08:00 …` is an error.
//!
//! Times are wall-clock times in the zone of the [`ZonedDateTime`] asked about;
//! the daemon asks with [`ZonedDateTime::now`], which is in the system's zone
//! (`TZ`, else `/etc/localtime`, re-read by jiff every few minutes).
//!
//! Daylight saving time: an entry takes effect at the first instant at which
//! the clock reads its time or later. So:
//!
//! - Spring forward: an entry whose time is skipped (02:30 in Berlin on the
//!   last Sunday of March) takes effect at the first instant after the gap
//!   (03:00 CEST). Entries that land on the same instant that way apply in
//!   week order, so the last of them is the one in force (with entries at
//!   02:30 and 03:00, the 02:30 one applies for no time that day).
//! - Fall back: an entry whose time happens twice (02:30 in Berlin on the last
//!   Sunday of October) takes effect at its first occurrence only (02:30
//!   CEST). While the clock repeats the hour nothing takes effect again: the
//!   limit in force at the end of the first pass stays until the next entry
//!   after the repeated hour. Each entry thus takes effect once on its day, as
//!   a person reading the table expects, and the limit never flips back to an
//!   earlier entry's.

use std::fmt;
use std::num::NonZeroU64;

use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{Span, Timestamp, ZonedDateTime};

use crate::config::units::parse_size;

/// How far ahead [`Timetable::next_change_after`] looks: two weeks and a day,
/// so that a change is found even when a DST gap hides one week's occurrence.
const LOOK_AHEAD_DAYS: i64 = 15;

/// An upload bandwidth limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    Unlimited,
    BytesPerSec(NonZeroU64),
}

impl Limit {
    /// From the flat form's convention (`upload.bandwidth_limit`): `0` is
    /// unlimited.
    pub fn from_bytes_per_sec(bytes_per_sec: u64) -> Limit {
        NonZeroU64::new(bytes_per_sec).map_or(Limit::Unlimited, Limit::BytesPerSec)
    }

    /// Bytes per second with `0` for unlimited, as the pacer and the
    /// `bandwidth_limit_bytes_per_second` gauge take it.
    pub fn bytes_per_sec(self) -> u64 {
        match self {
            Limit::Unlimited => 0,
            Limit::BytesPerSec(n) => n.get(),
        }
    }
}

/// `unlimited`, or the rate in the largest unit that divides it exactly:
/// `10 MiB/s`, `512 KiB/s`, `3 MB/s`, `1500 B/s`.
impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        const UNITS: [(u64, &str); 8] = [
            (1 << 10, "KiB"),
            (1 << 20, "MiB"),
            (1 << 30, "GiB"),
            (1 << 40, "TiB"),
            (1_000, "KB"),
            (1_000_000, "MB"),
            (1_000_000_000, "GB"),
            (1_000_000_000_000, "TB"),
        ];
        let n = match self {
            Limit::Unlimited => return f.write_str("unlimited"),
            Limit::BytesPerSec(n) => n.get(),
        };
        let (size, unit) = UNITS
            .iter()
            .filter(|(size, _)| n % size == 0)
            .max_by_key(|(size, _)| *size)
            .copied()
            .unwrap_or((1, "B"));
        write!(f, "{} {unit}/s", n / size)
    }
}

/// A parsed `upload.bandwidth_schedule`: limits by day of the week and time of
/// day. See the module documentation for the format and the rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timetable {
    /// The entries of each day, Monday first, each day's sorted by time.
    days: [Vec<Slot>; 7],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    time: Time,
    limit: Limit,
}

impl Timetable {
    /// Parses the entries in their configured order; the error names the
    /// first bad entry.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Timetable, TimetableError> {
        // Per day, Monday first: (time, limit, index of the entry that set it).
        let mut days: [Vec<(Time, Limit, usize)>; 7] = Default::default();
        for (i, text) in entries.iter().enumerate() {
            let text = text.as_ref();
            let error = |problem| TimetableError {
                index: i + 1,
                entry: text.to_string(),
                problem,
            };
            let entry = Entry::parse(text).map_err(error)?;
            for day in entry.days.iter() {
                let slots = &mut days[day_index(day)];
                if let Some(&(_, _, first)) = slots.iter().find(|(time, ..)| *time == entry.time) {
                    return Err(error(Problem::Duplicate {
                        day,
                        time: entry.time,
                        first_index: first + 1,
                        first_entry: entries[first].as_ref().to_string(),
                    }));
                }
                slots.push((entry.time, entry.limit, i));
            }
        }
        Ok(Timetable {
            days: days.map(|mut slots| {
                slots.sort_by_key(|&(time, ..)| time);
                slots
                    .into_iter()
                    .map(|(time, limit, _)| Slot { time, limit })
                    .collect()
            }),
        })
    }

    /// Whether there are no entries (then the limit is always unlimited).
    pub fn is_empty(&self) -> bool {
        self.days.iter().all(Vec::is_empty)
    }

    /// The limit in force at `at`, reading the timetable in `at`'s time zone;
    /// [`Limit::Unlimited`] for an empty timetable. An entry is in force from
    /// the very instant it takes effect.
    pub fn limit_at(&self, at: &ZonedDateTime) -> Limit {
        let now = at.timestamp();
        let tz = at.time_zone();
        // The latest entry that has taken effect. The instant an entry takes
        // effect never decreases with its wall-clock time, so going back in
        // wall-clock order, the first one that has taken effect is it. Some
        // entry's wall-clock time lies in the week before `at`'s; entries up
        // to two days later are looked at because the clock can read a later
        // time before `at` when it has since been turned back.
        for date in dates(at.date(), -7..=2).rev() {
            for slot in self.slots_on(date.weekday()).iter().rev() {
                if takes_effect(tz, date.to_datetime(slot.time)).is_some_and(|t| t <= now) {
                    return slot.limit;
                }
            }
        }
        Limit::Unlimited
    }

    /// The next instant after `at` at which the limit changes, in `at`'s time
    /// zone; at that instant [`Timetable::limit_at`] gives the new limit.
    /// Entries that set the limit already in force are passed over. `None`
    /// when the limit never changes: an empty timetable, or one limit in
    /// every entry.
    ///
    /// The answer holds while the time zone's rules stay as they are: a
    /// sleeper should wake at least every few minutes to ask again, since the
    /// system's zone or clock may change meanwhile.
    pub fn next_change_after(&self, at: &ZonedDateTime) -> Option<ZonedDateTime> {
        let now = at.timestamp();
        let tz = at.time_zone();
        let current = self.limit_at(at);
        let changes_to = |(t, limit): (Timestamp, Limit)| {
            (limit != current).then(|| t.to_zoned_datetime(tz.clone()))
        };
        // Entries that take effect after `at`, in order; of those that take
        // effect at the same instant (in a DST gap) the last one counts. An
        // entry after `at` has a later wall-clock time, so on `at`'s date or
        // later.
        let mut pending: Option<(Timestamp, Limit)> = None;
        for date in dates(at.date(), 0..=LOOK_AHEAD_DAYS) {
            for slot in self.slots_on(date.weekday()) {
                let Some(t) = takes_effect(tz, date.to_datetime(slot.time)) else {
                    continue;
                };
                if t <= now {
                    continue;
                }
                if let Some(earlier) = pending.filter(|&(p, _)| p < t) {
                    if let Some(change) = changes_to(earlier) {
                        return Some(change);
                    }
                }
                pending = Some((t, slot.limit));
            }
        }
        pending.and_then(changes_to)
    }

    fn slots_on(&self, day: Weekday) -> &[Slot] {
        &self.days[day_index(day)]
    }
}

/// The instant at which the wall-clock time `local` takes effect in `tz`: the
/// first instant at which the clock reads `local` or later. `None` only at the
/// ends of the representable range.
fn takes_effect(tz: &TimeZone, local: DateTime) -> Option<Timestamp> {
    match tz.to_ambiguous_timestamp(local).offset() {
        AmbiguousOffset::Unambiguous { offset } => offset.to_timestamp(local).ok(),
        // Read twice: the first time.
        AmbiguousOffset::Fold { before, .. } => before.to_timestamp(local).ok(),
        // Skipped: the clock passes it at the transition that opens the gap.
        // Read with the offset after the gap, `local` is an instant shortly
        // before that transition.
        AmbiguousOffset::Gap { after, .. } => {
            let before_gap = after.to_timestamp(local).ok()?;
            tz.following(before_gap).next().map(|t| t.timestamp())
        }
    }
}

/// The dates `days` days from `center`, in order (skipping any out of range).
fn dates(
    center: Date,
    days: std::ops::RangeInclusive<i64>,
) -> impl DoubleEndedIterator<Item = Date> {
    days.filter_map(move |n| center.checked_add(Span::new().days(n)).ok())
}

fn day_index(day: Weekday) -> usize {
    day.to_monday_zero_offset() as usize
}

/// One entry, parsed.
struct Entry {
    days: Days,
    time: Time,
    limit: Limit,
}

/// The days of an entry: `first` to `last` in week order, wrapping past
/// Sunday; every day is Monday to Sunday.
#[derive(Clone, Copy)]
struct Days {
    first: Weekday,
    last: Weekday,
}

impl Days {
    const EVERY: Days = Days {
        first: Weekday::Monday,
        last: Weekday::Sunday,
    };

    fn iter(self) -> impl Iterator<Item = Weekday> {
        let count = (day_index(self.last) + 7 - day_index(self.first)) % 7 + 1;
        std::iter::successors(Some(self.first), |d| Some(d.next())).take(count)
    }
}

impl Entry {
    fn parse(text: &str) -> Result<Entry, Problem> {
        let (first, rest) = next_word(text);
        if first.is_empty() {
            return Err(Problem::Empty);
        }
        // Days start with a letter, times with a digit.
        let (days, time, rest) = if first.starts_with(|c: char| c.is_ascii_alphabetic()) {
            let days = parse_days(first)?;
            let (time, rest) = next_word(rest);
            if time.is_empty() {
                return Err(Problem::NoTime);
            }
            (days, time, rest)
        } else {
            (Days::EVERY, first, rest)
        };
        let time = parse_time(time)?;
        if rest.is_empty() {
            return Err(Problem::NoLimit);
        }
        // The limit is the rest, so `10 MiB` is read as units.rs reads it.
        let limit = parse_limit(rest)?;
        Ok(Entry { days, time, limit })
    }
}

/// The first word of `s` and the rest, both trimmed.
fn next_word(s: &str) -> (&str, &str) {
    let s = s.trim();
    match s.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (s, ""),
    }
}

fn parse_days(s: &str) -> Result<Days, Problem> {
    let bad = || Problem::Days(s.to_string());
    let (first, last) = match s.split_once('-') {
        Some((first, last)) => (first, last),
        None => (s, s),
    };
    let first = parse_day(first).ok_or_else(bad)?;
    let last = parse_day(last).ok_or_else(bad)?;
    if first == last && s.contains('-') {
        return Err(Problem::SameDayRange(s.to_string()));
    }
    Ok(Days { first, last })
}

/// The days' names, Monday first.
const DAY_NAMES: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// `Mon` or `Monday`, any case.
fn parse_day(s: &str) -> Option<Weekday> {
    let index = DAY_NAMES
        .iter()
        .position(|name| s.eq_ignore_ascii_case(name) || s.eq_ignore_ascii_case(&name[..3]))?;
    Weekday::from_monday_zero_offset(index as i8).ok()
}

/// `HH:MM` (or `H:MM`) from 00:00 to 23:59.
fn parse_time(s: &str) -> Result<Time, Problem> {
    let bad = || Problem::Time(s.to_string());
    let (hour, minute) = s.split_once(':').ok_or_else(bad)?;
    let digits = |part: &str, lengths: std::ops::RangeInclusive<usize>| {
        lengths.contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(hour, 1..=2) || !digits(minute, 2..=2) {
        return Err(bad());
    }
    let hour: i8 = hour.parse().map_err(|_| bad())?;
    let minute: i8 = minute.parse().map_err(|_| bad())?;
    Time::new(hour, minute, 0, 0).map_err(|_| bad())
}

fn parse_limit(s: &str) -> Result<Limit, Problem> {
    if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("unlimited") {
        return Ok(Limit::Unlimited);
    }
    let size = s.strip_suffix("/s").unwrap_or(s);
    parse_size(size)
        .map(Limit::from_bytes_per_sec)
        .map_err(|_| Problem::Limit(s.to_string()))
}

/// A bad `upload.bandwidth_schedule` entry: which one and what is wrong, in
/// one sentence that says how to write it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bandwidth_schedule entry {index} `{entry}`: {problem}")]
pub struct TimetableError {
    /// Counted from 1, as a person counts the list's items.
    pub index: usize,
    /// The entry as written.
    pub entry: String,
    problem: Problem,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Problem {
    Empty,
    Days(String),
    SameDayRange(String),
    NoTime,
    Time(String),
    NoLimit,
    Limit(String),
    Duplicate {
        day: Weekday,
        time: Time,
        first_index: usize,
        first_entry: String,
    },
}

const EXAMPLE: &str = "e.g. `Mon-Fri 08:00 10MiB`";

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Problem::Empty => write!(f, "the entry is empty; write `[DAYS] HH:MM LIMIT`, {EXAMPLE}"),
            Problem::Days(s) => write!(f, "`{s}` is not a day or a range of days; write {EXAMPLE}"),
            Problem::SameDayRange(s) => write!(
                f,
                "`{s}` starts and ends on the same day; write one day alone (`Mon`), or no days for every day"
            ),
            Problem::NoTime => write!(f, "there is no time of day; write `[DAYS] HH:MM LIMIT`, {EXAMPLE}"),
            Problem::Time(s) => write!(
                f,
                "`{s}` is not a time of day; write HH:MM from 00:00 to 23:59, {EXAMPLE}"
            ),
            Problem::NoLimit => write!(f, "there is no limit after the time; write `[DAYS] HH:MM LIMIT`, {EXAMPLE} or `19:00 off`"),
            Problem::Limit(s) => write!(
                f,
                "`{s}` is not a limit; write bytes per second (`10MiB`, `512KiB`, `1048576`) or `off` for no limit"
            ),
            Problem::Duplicate {
                day,
                time,
                first_index,
                first_entry,
            } => write!(
                f,
                "{} {} is already set by entry {first_index} `{first_entry}`; give each day and time one entry",
                DAY_NAMES[day_index(*day)],
                time.strftime("%H:%M")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::tz::TimeZoneDatabase;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const BERLIN: &str = "Europe/Berlin";
    const NEW_YORK: &str = "America/New_York";

    fn tt(entries: &[&str]) -> Timetable {
        Timetable::parse(entries).unwrap_or_else(|e| panic!("{e}"))
    }

    fn bps(n: u64) -> Limit {
        Limit::BytesPerSec(NonZeroU64::new(n).unwrap())
    }

    /// The bundled tzdb, so that no test depends on the machine's zoneinfo
    /// or its `TZ`.
    fn zone(name: &str) -> TimeZone {
        TimeZoneDatabase::bundled().get(name).unwrap()
    }

    /// An instant written as `YYYY-MM-DDTHH:MM:SS±HH:MM` (the offset picks the
    /// pass through a repeated hour), seen in `zone_name`. Checks that the
    /// zone shows it as written, so a wrong offset in a test is caught.
    fn at(local_with_offset: &str, zone_name: &str) -> ZonedDateTime {
        let z = local_with_offset
            .parse::<Timestamp>()
            .unwrap()
            .to_zoned_datetime(zone(zone_name));
        assert_eq!(z.to_string(), format!("{local_with_offset}[{zone_name}]"));
        z
    }

    fn next(t: &Timetable, from: &ZonedDateTime) -> String {
        t.next_change_after(from)
            .map_or_else(|| "never".to_string(), |z| z.to_string())
    }

    fn error(entries: &[&str]) -> String {
        Timetable::parse(entries).unwrap_err().to_string()
    }

    // ---- Limit ----

    #[test]
    fn limit_display_and_conversions() {
        assert_eq!(Limit::Unlimited.to_string(), "unlimited");
        assert_eq!(bps(10 * MIB).to_string(), "10 MiB/s");
        assert_eq!(bps(512 * KIB).to_string(), "512 KiB/s");
        assert_eq!(bps(1536 * MIB).to_string(), "1536 MiB/s");
        assert_eq!(bps(2 << 30).to_string(), "2 GiB/s");
        assert_eq!(bps(1 << 40).to_string(), "1 TiB/s");
        assert_eq!(bps(3_000_000).to_string(), "3 MB/s");
        assert_eq!(bps(1_000_000_000_000).to_string(), "1 TB/s");
        assert_eq!(bps(1000 * KIB).to_string(), "1000 KiB/s");
        assert_eq!(bps(1500).to_string(), "1500 B/s");
        assert_eq!(bps(1).to_string(), "1 B/s");
        assert_eq!(Limit::from_bytes_per_sec(0), Limit::Unlimited);
        assert_eq!(Limit::from_bytes_per_sec(MIB), bps(MIB));
        assert_eq!(Limit::Unlimited.bytes_per_sec(), 0);
        assert_eq!(bps(MIB).bytes_per_sec(), MIB);
    }

    // ---- parsing ----

    #[test]
    fn parses_days_times_and_limits() {
        let t = tt(&[
            "Mon-Fri 08:00 10MiB",
            "19:00 off",
            "sat 9:30 512KiB",
            "SUNDAY 10:00 1048576",
            "Wednesday 12:00 10 MiB/s",
            "Tue 12:00 0",
            "Thu 12:00 UNLIMITED",
            "  Fri\t12:00   2MB  ",
        ]);
        let slots = |d: usize| -> Vec<(String, Limit)> {
            t.days[d]
                .iter()
                .map(|s| (s.time.strftime("%H:%M").to_string(), s.limit))
                .collect()
        };
        let s = |time: &str, limit| (time.to_string(), limit);
        let off = Limit::Unlimited;
        assert_eq!(slots(0), [s("08:00", bps(10 * MIB)), s("19:00", off)]);
        assert_eq!(
            slots(1),
            [s("08:00", bps(10 * MIB)), s("12:00", off), s("19:00", off)]
        );
        assert_eq!(
            slots(2),
            [
                s("08:00", bps(10 * MIB)),
                s("12:00", bps(10 * MIB)),
                s("19:00", off)
            ]
        );
        assert_eq!(
            slots(3),
            [s("08:00", bps(10 * MIB)), s("12:00", off), s("19:00", off)]
        );
        assert_eq!(
            slots(4),
            [
                s("08:00", bps(10 * MIB)),
                s("12:00", bps(2_000_000)),
                s("19:00", off)
            ]
        );
        assert_eq!(slots(5), [s("09:30", bps(512 * KIB)), s("19:00", off)]);
        assert_eq!(slots(6), [s("10:00", bps(MIB)), s("19:00", off)]);
        assert!(!t.is_empty());
    }

    #[test]
    fn day_ranges_wrap_past_sunday() {
        let days_of = |entry: &str| -> Vec<usize> {
            let t = tt(&[entry]);
            (0..7).filter(|&d| !t.days[d].is_empty()).collect()
        };
        assert_eq!(days_of("Mon-Fri 08:00 1MiB"), [0, 1, 2, 3, 4]);
        assert_eq!(days_of("Fri-Mon 08:00 1MiB"), [0, 4, 5, 6]);
        assert_eq!(days_of("Sun-Mon 08:00 1MiB"), [0, 6]);
        assert_eq!(days_of("Sat-Sun 08:00 1MiB"), [5, 6]);
        assert_eq!(days_of("Tue-Mon 08:00 1MiB"), [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(days_of("Thu 08:00 1MiB"), [3]);
        assert_eq!(days_of("08:00 1MiB"), [0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn an_empty_list_is_an_empty_timetable() {
        let t = Timetable::parse::<String>(&[]).unwrap();
        assert!(t.is_empty());
        assert_eq!(t, Timetable::default());
        let now = at("2026-01-05T12:00:00+01:00", BERLIN);
        assert_eq!(t.limit_at(&now), Limit::Unlimited);
        assert_eq!(t.next_change_after(&now), None);
    }

    #[test]
    fn takes_owned_strings_as_configured() {
        let entries = vec!["Mon-Fri 08:00 10MiB".to_string(), "19:00 off".to_string()];
        assert_eq!(
            Timetable::parse(&entries).unwrap(),
            tt(&["Mon-Fri 08:00 10MiB", "19:00 off"])
        );
    }

    #[test]
    fn parse_errors_name_the_entry_and_say_how_to_write_it() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["19:00 off", "Mon-Fr 08:00 10MiB"],
                "bandwidth_schedule entry 2 `Mon-Fr 08:00 10MiB`: `Mon-Fr` is not a day or a range of days; write e.g. `Mon-Fri 08:00 10MiB`",
            ),
            (
                &["Mnday 08:00 10MiB"],
                "bandwidth_schedule entry 1 `Mnday 08:00 10MiB`: `Mnday` is not a day or a range of days; write e.g. `Mon-Fri 08:00 10MiB`",
            ),
            (
                &["Mon-Fri-Sat 08:00 10MiB"],
                "bandwidth_schedule entry 1 `Mon-Fri-Sat 08:00 10MiB`: `Mon-Fri-Sat` is not a day or a range of days; write e.g. `Mon-Fri 08:00 10MiB`",
            ),
            (
                &["off 08:00"],
                "bandwidth_schedule entry 1 `off 08:00`: `off` is not a day or a range of days; write e.g. `Mon-Fri 08:00 10MiB`",
            ),
            (
                &["Mon-mon 08:00 10MiB"],
                "bandwidth_schedule entry 1 `Mon-mon 08:00 10MiB`: `Mon-mon` starts and ends on the same day; write one day alone (`Mon`), or no days for every day",
            ),
            (
                &["  "],
                "bandwidth_schedule entry 1 `  `: the entry is empty; write `[DAYS] HH:MM LIMIT`, e.g. `Mon-Fri 08:00 10MiB`",
            ),
            (
                &["Mon-Fri"],
                "bandwidth_schedule entry 1 `Mon-Fri`: there is no time of day; write `[DAYS] HH:MM LIMIT`, e.g. `Mon-Fri 08:00 10MiB`",
            ),
            (
                &["24:00 off"],
                "bandwidth_schedule entry 1 `24:00 off`: `24:00` is not a time of day; write HH:MM from 00:00 to 23:59, e.g. `Mon-Fri 08:00 10MiB`",
            ),
            (
                &["Mon 12:60 off"],
                "bandwidth_schedule entry 1 `Mon 12:60 off`: `12:60` is not a time of day; write HH:MM from 00:00 to 23:59, e.g. `Mon-Fri 08:00 10MiB`",
            ),
            (
                &["10MiB"],
                "bandwidth_schedule entry 1 `10MiB`: `10MiB` is not a time of day; write HH:MM from 00:00 to 23:59, e.g. `Mon-Fri 08:00 10MiB`",
            ),
            (
                &["Mon Fri 08:00 10MiB"],
                "bandwidth_schedule entry 1 `Mon Fri 08:00 10MiB`: `Fri` is not a time of day; write HH:MM from 00:00 to 23:59, e.g. `Mon-Fri 08:00 10MiB`",
            ),
            (
                &["08:00"],
                "bandwidth_schedule entry 1 `08:00`: there is no limit after the time; write `[DAYS] HH:MM LIMIT`, e.g. `Mon-Fri 08:00 10MiB` or `19:00 off`",
            ),
            (
                &["08:00 fast"],
                "bandwidth_schedule entry 1 `08:00 fast`: `fast` is not a limit; write bytes per second (`10MiB`, `512KiB`, `1048576`) or `off` for no limit",
            ),
            (
                &["08:00 10mib"],
                "bandwidth_schedule entry 1 `08:00 10mib`: `10mib` is not a limit; write bytes per second (`10MiB`, `512KiB`, `1048576`) or `off` for no limit",
            ),
            (
                &["08:00 10MiB 20:00 off"],
                "bandwidth_schedule entry 1 `08:00 10MiB 20:00 off`: `10MiB 20:00 off` is not a limit; write bytes per second (`10MiB`, `512KiB`, `1048576`) or `off` for no limit",
            ),
            (
                &["08:00 -1"],
                "bandwidth_schedule entry 1 `08:00 -1`: `-1` is not a limit; write bytes per second (`10MiB`, `512KiB`, `1048576`) or `off` for no limit",
            ),
        ];
        for (entries, message) in cases {
            assert_eq!(error(entries), *message, "{entries:?}");
        }
        for time in [
            "8", "8:0", "008:00", "08.00", "08:00:00", "-1:00", "+8:00", "12:5x",
        ] {
            let entry = format!("{time} off");
            assert_eq!(
                error(&[&entry]),
                format!("bandwidth_schedule entry 1 `{entry}`: `{time}` is not a time of day; write HH:MM from 00:00 to 23:59, e.g. `Mon-Fri 08:00 10MiB`"),
            );
        }
    }

    #[test]
    fn one_entry_per_day_and_time() {
        assert_eq!(
            error(&["08:00 10MiB", "Mon-Fri 19:00 off", "Sat 08:00 1MiB"]),
            "bandwidth_schedule entry 3 `Sat 08:00 1MiB`: Saturday 08:00 is already set by entry 1 `08:00 10MiB`; give each day and time one entry"
        );
        assert_eq!(
            error(&["Mon-Fri 08:00 10MiB", "Fri-Mon 08:00 1MiB"]),
            "bandwidth_schedule entry 2 `Fri-Mon 08:00 1MiB`: Friday 08:00 is already set by entry 1 `Mon-Fri 08:00 10MiB`; give each day and time one entry"
        );
        assert_eq!(
            error(&["Sun 8:00 off", "sunday 08:00 off"]),
            "bandwidth_schedule entry 2 `sunday 08:00 off`: Sunday 08:00 is already set by entry 1 `Sun 8:00 off`; give each day and time one entry"
        );
        let e = Timetable::parse(&["Sun 8:00 off", "sunday 08:00 off"]).unwrap_err();
        assert_eq!((e.index, e.entry.as_str()), (2, "sunday 08:00 off"));
        // Same time on other days, other times on the same day: fine.
        tt(&["Mon-Fri 08:00 10MiB", "Sat-Sun 08:00 1MiB", "Mon 08:01 off"]);
    }

    // ---- the limit in force (a winter week in Berlin: no DST change) ----
    // 2026-01-05 is a Monday.

    #[test]
    fn every_day_entries_across_midnight() {
        let t = tt(&["08:00 10MiB", "20:00 512KiB"]);
        let cases = [
            ("2026-01-07T07:59:59+01:00", bps(512 * KIB)),
            ("2026-01-07T08:00:00+01:00", bps(10 * MIB)),
            ("2026-01-07T19:59:59+01:00", bps(10 * MIB)),
            ("2026-01-07T20:00:00+01:00", bps(512 * KIB)),
            ("2026-01-07T23:59:59+01:00", bps(512 * KIB)),
            ("2026-01-08T00:00:00+01:00", bps(512 * KIB)),
            ("2026-01-08T03:00:00+01:00", bps(512 * KIB)),
        ];
        for (when, limit) in cases {
            assert_eq!(t.limit_at(&at(when, BERLIN)), limit, "{when}");
        }
    }

    #[test]
    fn exactly_at_an_entrys_time_the_entry_is_in_force() {
        let t = tt(&["00:00 1MiB", "12:00 off"]);
        let midnight = at("2026-01-06T00:00:00+01:00", BERLIN);
        assert_eq!(t.limit_at(&midnight), bps(MIB));
        let just_before = (midnight.timestamp() - jiff::SignedDuration::from_nanos(1))
            .to_zoned_datetime(midnight.time_zone().clone());
        assert_eq!(
            just_before.to_string(),
            "2026-01-05T23:59:59.999999999+01:00[Europe/Berlin]"
        );
        assert_eq!(t.limit_at(&just_before), Limit::Unlimited);
        assert_eq!(
            next(&t, &just_before),
            "2026-01-06T00:00:00+01:00[Europe/Berlin]"
        );
        // From the very instant of a change, the next change is the one after.
        assert_eq!(
            next(&t, &midnight),
            "2026-01-06T12:00:00+01:00[Europe/Berlin]"
        );
    }

    #[test]
    fn day_ranges_and_the_weekend() {
        let t = tt(&[
            "Mon-Fri 08:00 10MiB",
            "Mon-Fri 19:00 off",
            "Sat-Sun 10:00 1MiB",
            "Sat-Sun 16:00 off",
        ]);
        let cases = [
            ("2026-01-05T07:59:00+01:00", Limit::Unlimited), // Monday, from Sunday 16:00
            ("2026-01-05T08:00:00+01:00", bps(10 * MIB)),
            ("2026-01-09T18:59:00+01:00", bps(10 * MIB)), // Friday
            ("2026-01-09T19:00:00+01:00", Limit::Unlimited),
            ("2026-01-10T08:00:00+01:00", Limit::Unlimited), // Saturday: no 08:00
            ("2026-01-10T10:00:00+01:00", bps(MIB)),
            ("2026-01-11T15:59:59+01:00", bps(MIB)), // Sunday
            ("2026-01-11T16:00:00+01:00", Limit::Unlimited),
        ];
        for (when, limit) in cases {
            assert_eq!(t.limit_at(&at(when, BERLIN)), limit, "{when}");
        }
    }

    #[test]
    fn a_wrapping_range_runs_through_the_weekend() {
        // Friday to Monday at 20:00, Tuesday to Thursday at 06:00.
        let t = tt(&["Fri-Mon 20:00 1MiB", "Tue-Thu 06:00 off"]);
        let cases = [
            ("2026-01-05T19:59:00+01:00", bps(MIB)), // Monday: since Sunday 20:00
            ("2026-01-05T20:00:00+01:00", bps(MIB)),
            ("2026-01-06T05:59:00+01:00", bps(MIB)), // Tuesday
            ("2026-01-06T06:00:00+01:00", Limit::Unlimited),
            ("2026-01-09T19:59:00+01:00", Limit::Unlimited), // Friday
            ("2026-01-09T20:00:00+01:00", bps(MIB)),
            ("2026-01-10T12:00:00+01:00", bps(MIB)), // Saturday
        ];
        for (when, limit) in cases {
            assert_eq!(t.limit_at(&at(when, BERLIN)), limit, "{when}");
        }
        assert_eq!(
            next(&t, &at("2026-01-09T20:00:00+01:00", BERLIN)),
            "2026-01-13T06:00:00+01:00[Europe/Berlin]"
        );
    }

    #[test]
    fn the_week_wraps_sunday_night_into_monday_morning() {
        // Listed out of week order: the last entry of the week is Saturday's.
        let t = tt(&["Sat 00:00 off", "Mon 08:00 1MiB", "Wed 12:00 2MiB"]);
        let cases = [
            ("2026-01-05T00:00:00+01:00", Limit::Unlimited), // Monday, from Saturday
            ("2026-01-05T07:59:59+01:00", Limit::Unlimited),
            ("2026-01-05T08:00:00+01:00", bps(MIB)),
            ("2026-01-07T11:59:00+01:00", bps(MIB)),
            ("2026-01-07T12:00:00+01:00", bps(2 * MIB)),
            ("2026-01-09T23:59:59+01:00", bps(2 * MIB)), // Friday night
            ("2026-01-10T00:00:00+01:00", Limit::Unlimited),
            ("2026-01-11T23:59:59+01:00", Limit::Unlimited), // Sunday night
        ];
        for (when, limit) in cases {
            assert_eq!(t.limit_at(&at(when, BERLIN)), limit, "{when}");
        }
        // Sunday night: the next change is Monday morning.
        assert_eq!(
            next(&t, &at("2026-01-11T23:59:59+01:00", BERLIN)),
            "2026-01-12T08:00:00+01:00[Europe/Berlin]"
        );
    }

    #[test]
    fn a_single_entry_is_in_force_all_week() {
        let t = tt(&["Wed 12:00 3MB"]);
        for when in [
            "2026-01-05T00:00:00+01:00",
            "2026-01-07T11:59:59+01:00",
            "2026-01-07T12:00:00+01:00",
            "2026-01-11T23:59:59+01:00",
        ] {
            assert_eq!(t.limit_at(&at(when, BERLIN)), bps(3_000_000), "{when}");
        }
        assert_eq!(next(&t, &at("2026-01-07T12:00:00+01:00", BERLIN)), "never");
    }

    // ---- when the limit changes next ----

    #[test]
    fn next_change_over_day_and_week_boundaries() {
        let t = tt(&[
            "Mon-Fri 08:00 10MiB",
            "Mon-Fri 19:00 off",
            "Sat 10:00 1MiB",
            "Sat 14:00 off",
        ]);
        let cases = [
            // Same day.
            (
                "2026-01-05T07:00:00+01:00",
                "2026-01-05T08:00:00+01:00[Europe/Berlin]",
            ),
            (
                "2026-01-05T08:00:00+01:00",
                "2026-01-05T19:00:00+01:00[Europe/Berlin]",
            ),
            // Over midnight.
            (
                "2026-01-05T19:00:00+01:00",
                "2026-01-06T08:00:00+01:00[Europe/Berlin]",
            ),
            (
                "2026-01-05T23:59:59+01:00",
                "2026-01-06T08:00:00+01:00[Europe/Berlin]",
            ),
            // Friday evening to Saturday.
            (
                "2026-01-09T19:00:00+01:00",
                "2026-01-10T10:00:00+01:00[Europe/Berlin]",
            ),
            // Saturday afternoon to Monday morning: over the week's end.
            (
                "2026-01-10T14:00:00+01:00",
                "2026-01-12T08:00:00+01:00[Europe/Berlin]",
            ),
            (
                "2026-01-11T12:00:00+01:00",
                "2026-01-12T08:00:00+01:00[Europe/Berlin]",
            ),
        ];
        for (from, expected) in cases {
            assert_eq!(next(&t, &at(from, BERLIN)), expected, "{from}");
        }
    }

    #[test]
    fn entries_that_keep_the_limit_are_not_changes() {
        let t = tt(&["08:00 1MiB", "12:00 1MiB", "Fri 18:00 off"]);
        assert_eq!(
            next(&t, &at("2026-01-05T09:00:00+01:00", BERLIN)),
            "2026-01-09T18:00:00+01:00[Europe/Berlin]"
        );
        // Friday 18:00 off lasts to Saturday 08:00.
        assert_eq!(
            next(&t, &at("2026-01-09T18:00:00+01:00", BERLIN)),
            "2026-01-10T08:00:00+01:00[Europe/Berlin]"
        );
        let same = tt(&["08:00 1MiB", "Mon 12:00 1024KiB"]);
        assert_eq!(
            next(&same, &at("2026-01-05T09:00:00+01:00", BERLIN)),
            "never"
        );
    }

    #[test]
    fn the_time_zone_is_the_one_asked_in() {
        // 08:00 in Berlin is 02:00 in New York: each zone reads its own clock.
        let t = tt(&["08:00 1MiB", "20:00 off"]);
        let instant: Timestamp = "2026-01-05T07:30:00Z".parse().unwrap();
        let berlin = instant.to_zoned_datetime(zone(BERLIN));
        let new_york = instant.to_zoned_datetime(zone(NEW_YORK));
        assert_eq!(t.limit_at(&berlin), bps(MIB));
        assert_eq!(t.limit_at(&new_york), Limit::Unlimited);
        assert_eq!(
            next(&t, &new_york),
            "2026-01-05T08:00:00-05:00[America/New_York]"
        );
        let utc = instant.to_zoned_datetime(TimeZone::UTC);
        assert_eq!(t.limit_at(&utc), Limit::Unlimited);
        assert_eq!(next(&t, &utc), "2026-01-05T08:00:00+00:00[UTC]");
    }

    // ---- daylight saving time ----
    // Europe/Berlin, 2026: on Sunday 03-29 02:00 CET becomes 03:00 CEST; on
    // Sunday 10-25 03:00 CEST becomes 02:00 CET.
    // America/New_York, 2026: on Sunday 03-08 02:00 EST becomes 03:00 EDT; on
    // Sunday 11-01 02:00 EDT becomes 01:00 EST.

    #[test]
    fn spring_forward_around_the_change() {
        let t = tt(&["01:00 1MiB", "03:00 2MiB", "04:00 off"]);
        let cases = [
            ("2026-03-29T01:59:59+01:00", BERLIN, bps(MIB)),
            ("2026-03-29T03:00:00+02:00", BERLIN, bps(2 * MIB)), // one second later
            ("2026-03-29T03:59:59+02:00", BERLIN, bps(2 * MIB)),
            ("2026-03-29T04:00:00+02:00", BERLIN, Limit::Unlimited),
            ("2026-03-08T01:59:59-05:00", NEW_YORK, bps(MIB)),
            ("2026-03-08T03:00:00-04:00", NEW_YORK, bps(2 * MIB)),
        ];
        for (when, zone_name, limit) in cases {
            assert_eq!(t.limit_at(&at(when, zone_name)), limit, "{when}");
        }
        assert_eq!(
            next(&t, &at("2026-03-29T01:00:00+01:00", BERLIN)),
            "2026-03-29T03:00:00+02:00[Europe/Berlin]"
        );
        assert_eq!(
            next(&t, &at("2026-03-08T01:00:00-05:00", NEW_YORK)),
            "2026-03-08T03:00:00-04:00[America/New_York]"
        );
    }

    #[test]
    fn spring_forward_an_entry_in_the_skipped_hour_takes_effect_after_the_gap() {
        for (zone_name, before, gap_end, later) in [
            (
                BERLIN,
                "2026-03-29T01:59:59+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-29T05:00:00+02:00",
            ),
            (
                NEW_YORK,
                "2026-03-08T01:59:59-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T05:00:00-04:00",
            ),
        ] {
            // 02:30 does not exist on that day: it takes effect at 03:00.
            let t = tt(&["01:00 1MiB", "02:30 2MiB", "05:00 off"]);
            assert_eq!(t.limit_at(&at(before, zone_name)), bps(MIB), "{zone_name}");
            assert_eq!(
                t.limit_at(&at(gap_end, zone_name)),
                bps(2 * MIB),
                "{zone_name}"
            );
            assert_eq!(
                next(&t, &at(before, zone_name)),
                format!("{gap_end}[{zone_name}]")
            );
            assert_eq!(
                next(&t, &at(gap_end, zone_name)),
                format!("{later}[{zone_name}]")
            );
            // 02:00, the gap's first minute, too.
            let t = tt(&["01:00 1MiB", "02:00 2MiB"]);
            assert_eq!(t.limit_at(&at(before, zone_name)), bps(MIB), "{zone_name}");
            assert_eq!(
                t.limit_at(&at(gap_end, zone_name)),
                bps(2 * MIB),
                "{zone_name}"
            );
            assert_eq!(
                next(&t, &at(before, zone_name)),
                format!("{gap_end}[{zone_name}]")
            );
            // With an entry at 03:00 as well, both take effect at 03:00 and the
            // later one in the week is in force; the next change is past them.
            let t = tt(&["01:00 1MiB", "02:30 2MiB", "03:00 3MiB", "05:00 off"]);
            assert_eq!(
                t.limit_at(&at(gap_end, zone_name)),
                bps(3 * MIB),
                "{zone_name}"
            );
            assert_eq!(
                next(&t, &at(before, zone_name)),
                format!("{gap_end}[{zone_name}]")
            );
            assert_eq!(
                next(&t, &at(gap_end, zone_name)),
                format!("{later}[{zone_name}]")
            );
        }
        // The day before and after, 02:30 exists and takes effect at 02:30.
        let t = tt(&["01:00 1MiB", "02:30 2MiB", "05:00 off"]);
        assert_eq!(
            next(&t, &at("2026-03-28T01:00:00+01:00", BERLIN)),
            "2026-03-28T02:30:00+01:00[Europe/Berlin]"
        );
        assert_eq!(
            next(&t, &at("2026-03-30T01:00:00+02:00", BERLIN)),
            "2026-03-30T02:30:00+02:00[Europe/Berlin]"
        );
    }

    #[test]
    fn fall_back_around_the_change() {
        let t = tt(&["01:00 1MiB", "03:00 2MiB"]);
        // Berlin: 02:00-02:59 twice; 03:00 comes once, after the second pass.
        let cases = [
            ("2026-10-25T02:59:59+02:00", BERLIN, bps(MIB)),
            ("2026-10-25T02:00:00+01:00", BERLIN, bps(MIB)), // one second later
            ("2026-10-25T02:59:59+01:00", BERLIN, bps(MIB)),
            ("2026-10-25T03:00:00+01:00", BERLIN, bps(2 * MIB)),
        ];
        for (when, zone_name, limit) in cases {
            assert_eq!(t.limit_at(&at(when, zone_name)), limit, "{when}");
        }
        assert_eq!(
            next(&t, &at("2026-10-25T02:30:00+02:00", BERLIN)),
            "2026-10-25T03:00:00+01:00[Europe/Berlin]"
        );
        // New York: 01:00-01:59 twice; an entry at 01:00 fires on the first
        // pass only, one at 02:00 after the second.
        let t = tt(&["00:00 off", "01:00 1MiB", "02:00 2MiB"]);
        let cases = [
            ("2026-11-01T00:59:59-04:00", Limit::Unlimited),
            ("2026-11-01T01:00:00-04:00", bps(MIB)),
            ("2026-11-01T01:00:00-05:00", bps(MIB)),
            ("2026-11-01T01:59:59-05:00", bps(MIB)),
            ("2026-11-01T02:00:00-05:00", bps(2 * MIB)),
        ];
        for (when, limit) in cases {
            assert_eq!(t.limit_at(&at(when, NEW_YORK)), limit, "{when}");
        }
        assert_eq!(
            next(&t, &at("2026-11-01T01:30:00-04:00", NEW_YORK)),
            "2026-11-01T02:00:00-05:00[America/New_York]"
        );
    }

    #[test]
    fn fall_back_an_entry_in_the_repeated_hour_takes_effect_once() {
        for (zone_name, first_pass, second_pass, after) in [
            (
                BERLIN,
                ["2026-10-25T02:00:00+02:00", "2026-10-25T02:30:00+02:00"],
                ["2026-10-25T02:00:00+01:00", "2026-10-25T02:30:00+01:00"],
                "2026-10-25T03:00:00+01:00",
            ),
            (
                NEW_YORK,
                ["2026-11-01T01:00:00-04:00", "2026-11-01T01:30:00-04:00"],
                ["2026-11-01T01:00:00-05:00", "2026-11-01T01:30:00-05:00"],
                "2026-11-01T02:00:00-05:00",
            ),
        ] {
            let hh = |s: &str| s[11..13].to_string();
            // Entries at the repeated hour's :00 and :30, and one after it.
            let entries = [
                format!("{}:00 1MiB", hh(first_pass[0])),
                format!("{}:30 2MiB", hh(first_pass[0])),
                format!("{}:00 off", hh(after)),
                "12:00 3MiB".to_string(),
            ];
            let t = Timetable::parse(&entries).unwrap();
            let limit = |s: &str| t.limit_at(&at(s, zone_name));
            assert_eq!(limit(first_pass[0]), bps(MIB), "{zone_name}");
            assert_eq!(limit(first_pass[1]), bps(2 * MIB), "{zone_name}");
            // Second pass: :00 does not take effect again; :30 stays in force.
            assert_eq!(limit(second_pass[0]), bps(2 * MIB), "{zone_name}");
            assert_eq!(limit(second_pass[1]), bps(2 * MIB), "{zone_name}");
            assert_eq!(limit(after), Limit::Unlimited, "{zone_name}");
            // From the first pass, the next changes skip the second.
            assert_eq!(
                next(&t, &at(first_pass[0], zone_name)),
                format!("{}[{zone_name}]", first_pass[1])
            );
            assert_eq!(
                next(&t, &at(first_pass[1], zone_name)),
                format!("{after}[{zone_name}]")
            );
            assert_eq!(
                next(&t, &at(second_pass[0], zone_name)),
                format!("{after}[{zone_name}]")
            );
        }
    }

    #[test]
    fn next_change_across_the_dst_change_counts_the_real_hours() {
        let t = tt(&["08:00 1MiB", "20:00 off"]);
        let cases = [
            // Saturday 20:00 to Sunday 08:00: 11 hours in spring, 13 in autumn.
            (
                BERLIN,
                "2026-03-28T20:00:00+01:00",
                "2026-03-29T08:00:00+02:00",
                11,
            ),
            (
                BERLIN,
                "2026-10-24T20:00:00+02:00",
                "2026-10-25T08:00:00+01:00",
                13,
            ),
            (
                NEW_YORK,
                "2026-03-07T20:00:00-05:00",
                "2026-03-08T08:00:00-04:00",
                11,
            ),
            (
                NEW_YORK,
                "2026-10-31T20:00:00-04:00",
                "2026-11-01T08:00:00-05:00",
                13,
            ),
        ];
        for (zone_name, from, to, hours) in cases {
            let from = at(from, zone_name);
            let change = t.next_change_after(&from).unwrap();
            assert_eq!(change.to_string(), format!("{to}[{zone_name}]"));
            assert_eq!(
                (change.timestamp() - from.timestamp()).as_secs(),
                hours * 3600
            );
            assert_eq!(t.limit_at(&change), bps(MIB));
        }
        // Weekly entries: from Saturday 21:00 to the next Saturday 20:00 is
        // 167 wall-clock hours, 166 real ones over spring forward and 168 over
        // fall back.
        let t = tt(&["Sat 20:00 off", "Sat 21:00 1MiB"]);
        let from = at("2026-03-28T20:30:00+01:00", BERLIN);
        let change = t.next_change_after(&from).unwrap();
        assert_eq!(
            change.to_string(),
            "2026-03-28T21:00:00+01:00[Europe/Berlin]"
        );
        let from = change;
        let change = t.next_change_after(&from).unwrap();
        assert_eq!(
            change.to_string(),
            "2026-04-04T20:00:00+02:00[Europe/Berlin]"
        );
        assert_eq!(
            (change.timestamp() - from.timestamp()).as_secs(),
            166 * 3600
        );
        let from = at("2026-10-24T21:00:00+02:00", BERLIN);
        let change = t.next_change_after(&from).unwrap();
        assert_eq!(
            change.to_string(),
            "2026-10-31T20:00:00+01:00[Europe/Berlin]"
        );
        assert_eq!(
            (change.timestamp() - from.timestamp()).as_secs(),
            168 * 3600
        );
    }

    /// Walks every minute from Friday noon over the DST weekends to Tuesday
    /// and checks that the limit changes exactly at the instants
    /// `next_change_after` names, and how many there are: Saturday 6,
    /// Sunday 5 in spring (02:00 and 02:30 fall in the gap and take effect
    /// with 03:00) or 7 in autumn (each entry of the repeated hour once),
    /// Monday 6, Tuesday 5, and the first one after the walk.
    #[test]
    fn next_change_agrees_with_limit_at_minute_by_minute() {
        let t = tt(&[
            "00:30 1MiB",
            "01:30 2MiB",
            "02:00 3MiB",
            "02:30 4MiB",
            "03:00 5MiB",
            "Sun 03:30 6MiB",
            "Sat-Sun 12:00 off",
            "Mon 00:00 7MiB",
        ]);
        for (zone_name, start, expected_changes) in [
            (BERLIN, "2026-03-27T12:00:00+01:00", 23),
            (BERLIN, "2026-10-23T12:00:00+02:00", 25),
            (NEW_YORK, "2026-03-06T12:00:00-05:00", 23),
            (NEW_YORK, "2026-10-30T12:00:00-04:00", 25),
        ] {
            let mut now = at(start, zone_name);
            let end = now.timestamp() + jiff::SignedDuration::from_hours(4 * 24);
            let mut changes = 0;
            while now.timestamp() < end {
                let limit = t.limit_at(&now);
                let change = t.next_change_after(&now).unwrap();
                assert_ne!(t.limit_at(&change), limit, "{change}");
                let mut minute = now.timestamp() + jiff::SignedDuration::from_mins(1);
                while minute < change.timestamp() {
                    let z = minute.to_zoned_datetime(now.time_zone().clone());
                    assert_eq!(t.limit_at(&z), limit, "{z} before {change}");
                    minute += jiff::SignedDuration::from_mins(1);
                }
                now = change;
                changes += 1;
            }
            assert_eq!(changes, expected_changes, "{zone_name} {start}");
        }
    }
}
