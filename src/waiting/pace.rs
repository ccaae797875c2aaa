//! How often a waiter polls: quickly on a kept connection, gently when it reconnects for every
//! poll, and more gently still on a crowded server, whose connections the migration and the apps
//! need more than the waiters do.

use std::time::Duration;

/// Shortest polling delay.
pub(super) const POLL_MIN: Duration = Duration::from_millis(20);
/// Longest polling delay of a waiter that `LISTEN`s: the notification is the fast path, the
/// poll only catches a holder that died (its lock frees without a notification).
pub(super) const POLL_LISTENING_MAX: Duration = Duration::from_millis(1000);
/// Longest polling delay of a waiter that keeps its connection without `LISTEN` (behind a
/// transaction pooler): a query on an open connection is cheap, and hand-off latency is this
/// delay.
pub(super) const POLL_FAST_MAX: Duration = Duration::from_millis(100);
/// Longest polling delay of a waiter that reconnects for each poll: a new connection costs the
/// server a process and an authentication, so hundreds of these must poll gently.
pub(super) const POLL_SLOW_MAX: Duration = Duration::from_millis(500);
/// Longest polling delay of a reconnecting waiter when nearly all of the server's connections
/// are in use: the migration and the apps need them more than we do.
pub(super) const POLL_CROWDED_MAX: Duration = Duration::from_millis(8000);
/// Share of `max_connections` in use above which reconnecting waiters slow down, linearly up to
/// [`POLL_CROWDED_MAX`] at [`PACKED`].
pub(super) const CROWDED: f64 = 0.5;
/// Share of `max_connections` in use at which reconnecting waiters poll most gently.
pub(super) const PACKED: f64 = 0.9;

/// The polling delay of a reconnecting waiter on a crowded server: from [`POLL_SLOW_MAX`] when
/// [`CROWDED`] to [`POLL_CROWDED_MAX`] when [`PACKED`], jittered over its upper half so that a
/// fleet spreads its reconnections.
pub(super) fn crowded_delay(pressure: f64) -> Duration {
    let f = ((pressure - CROWDED) / (PACKED - CROWDED)).clamp(0.0, 1.0);
    let cap = POLL_SLOW_MAX.as_secs_f64() + f * (POLL_CROWDED_MAX - POLL_SLOW_MAX).as_secs_f64();
    Duration::from_secs_f64(cap * (0.5 + 0.5 * fastrand::f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crowded_delay_grows_with_pressure_and_stays_within_its_bounds() {
        for _ in 0..200 {
            let calm = crowded_delay(0.5);
            assert!(
                calm >= POLL_SLOW_MAX / 2 && calm <= POLL_SLOW_MAX,
                "{calm:?}"
            );
            let packed = crowded_delay(0.95);
            assert!(
                packed >= POLL_CROWDED_MAX / 2 && packed <= POLL_CROWDED_MAX,
                "{packed:?}"
            );
        }
        let mid: Duration = (0..200).map(|_| crowded_delay(0.7)).sum::<Duration>() / 200;
        assert!(mid > POLL_SLOW_MAX && mid < POLL_CROWDED_MAX, "{mid:?}");
    }
}
