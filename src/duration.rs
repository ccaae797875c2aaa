//! Durations for people: the one formatter every message uses, at the bottom of the crate so
//! that errors, queries and the supervisor can all reach it without reaching up.

use std::time::Duration;

/// A duration for people: `250ms`, `2.0s`, `90s`, `5m 3s`. Exact values belong in JSON fields.
pub(crate) fn short(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 10_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else if d.as_secs() < 120 {
        format!("{}s", d.as_secs_f64().round() as u64)
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_durations_read_like_people_write_them() {
        assert_eq!(short(Duration::from_micros(250_400)), "250ms");
        assert_eq!(short(Duration::new(2, 1_604_459)), "2.0s");
        assert_eq!(short(Duration::from_millis(9_960)), "10.0s");
        assert_eq!(short(Duration::from_millis(60_003)), "60s");
        assert_eq!(short(Duration::from_secs(303)), "5m 3s");
    }
}
