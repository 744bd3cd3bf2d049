//! The one exponential backoff of shardmesh: the operator's per-object retries, the sidecar's
//! request retries, Lease renewals and shard-map watches all grow their delays here, and differ
//! only in base, cap and jitter.

use std::time::Duration;

/// `base · 2^(n-1)` for the `n`-th consecutive failure (n ≥ 1; 0 counts as 1), at most `cap`.
pub fn ceiling(base: Duration, cap: Duration, n: u32) -> Duration {
    base.saturating_mul(1u32 << n.saturating_sub(1).min(30))
        .min(cap)
}

/// Full jitter: uniform in `[0, ceiling]`, `unit` a uniform sample in `[0, 1)`. Spreads retries
/// of many clients the most; the right choice where an early retry is harmless.
pub fn full_jitter(base: Duration, cap: Duration, n: u32, unit: f64) -> Duration {
    ceiling(base, cap, n).mul_f64(unit.clamp(0.0, 1.0))
}

/// Half jitter: uniform in `[ceiling / 2, ceiling]`. Still spreads a fleet, but never retries
/// much sooner than the ceiling (renewals against a recovering API server).
pub fn half_jitter(base: Duration, cap: Duration, n: u32, unit: f64) -> Duration {
    ceiling(base, cap, n).mul_f64(1.0 - 0.5 * unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn grows_doubling_and_caps() {
        assert_eq!(ceiling(2 * S, 300 * S, 0), 2 * S);
        assert_eq!(ceiling(2 * S, 300 * S, 1), 2 * S);
        assert_eq!(ceiling(2 * S, 300 * S, 5), 32 * S);
        assert_eq!(ceiling(2 * S, 300 * S, 40), 300 * S);
        assert_eq!(ceiling(Duration::MAX, 300 * S, 40), 300 * S);
    }

    #[test]
    fn jitters_stay_in_their_ranges() {
        for unit in [0.0, 0.3, 0.999, 7.0, -1.0] {
            let f = full_jitter(S, 10 * S, 3, unit);
            assert!(f <= 4 * S, "{f:?}");
            let h = half_jitter(S, 10 * S, 3, unit);
            assert!((2 * S..=4 * S).contains(&h), "{h:?}");
        }
        assert_eq!(full_jitter(S, 10 * S, 3, 0.0), Duration::ZERO);
        assert_eq!(half_jitter(S, 10 * S, 3, 0.0), 4 * S);
    }
}
