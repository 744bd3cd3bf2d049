//! Property tests of the circuit-breaker state machine and the retry-budget arithmetic.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use shardmesh_sidecar::{
    breaker::{Admission, Breaker, BreakerConfig, BreakerState, JITTER_FRACTION},
    budget::{BudgetConfig, BudgetWindow, BUCKETS},
};

#[derive(Clone, Debug)]
enum Op {
    Advance(u64),
    Acquire,
    Finish {
        ok: bool,
        may_open: bool,
        jitter: f64,
    },
    Cancel,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..3_000).prop_map(Op::Advance),
        Just(Op::Acquire),
        (any::<bool>(), any::<bool>(), 0.0f64..1.0).prop_map(|(ok, may_open, jitter)| Op::Finish {
            ok,
            may_open,
            jitter
        }),
        Just(Op::Cancel),
    ]
}

fn cfg_strategy() -> impl Strategy<Value = BreakerConfig> {
    (
        1u32..6,
        1u32..101,
        1u32..20,
        1u64..5,
        10u64..2_000,
        1u32..4,
        1u32..5,
    )
        .prop_map(
            |(consecutive, rate, min_requests, window_s, open_ms, grow, probes)| BreakerConfig {
                consecutive_failures: consecutive,
                failure_rate_percent: rate,
                min_requests,
                window: Duration::from_secs(window_s),
                open_duration: Duration::from_millis(open_ms),
                max_open_duration: Duration::from_millis(open_ms * u64::from(grow) * 2),
                half_open_probes: probes,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Failures are reported with their minimal input; nothing is written into the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn breaker_state_machine(cfg in cfg_strategy(), ops in proptest::collection::vec(op(), 1..200)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut b = Breaker::new(cfg, now);
        let mut admitted: Vec<Admission> = Vec::new();
        for op in ops {
            let before = b.state();
            match op {
                Op::Advance(ms) => now += Duration::from_millis(ms),
                Op::Acquire => {
                    let was_open_unexpired = before == BreakerState::Open && now < b.open_until();
                    let probes_before = b.probes_in_flight();
                    let (a, t) = b.try_acquire(now);
                    if was_open_unexpired {
                        prop_assert_eq!(a, None, "an open breaker rejects until its time is up");
                    }
                    if let Some(t) = t {
                        prop_assert_eq!((before, t), (BreakerState::Open, BreakerState::HalfOpen));
                    }
                    match a {
                        Some(Admission::Normal) => prop_assert_eq!(b.state(), BreakerState::Closed),
                        Some(Admission::Probe) => prop_assert_eq!(b.state(), BreakerState::HalfOpen),
                        None => if before == BreakerState::HalfOpen {
                            prop_assert_eq!(probes_before, cfg.half_open_probes, "rejected only when probes are exhausted");
                        },
                    }
                    if let Some(a) = a { admitted.push(a); }
                }
                Op::Finish { ok, may_open, jitter } => {
                    let Some(a) = admitted.pop() else { continue };
                    let would_trip = {
                        let mut probe = b.clone();
                        // Evaluate the trip condition on the counters after recording.
                        probe.on_result(now, a, ok, true, jitter) == Some(BreakerState::Open)
                    };
                    let opens_before = b.opens();
                    let t = b.on_result(now, a, ok, may_open, jitter);
                    match (a, before, t) {
                        (Admission::Probe, BreakerState::HalfOpen, Some(BreakerState::Closed)) => prop_assert!(ok),
                        (Admission::Probe, BreakerState::HalfOpen, Some(BreakerState::Open)) => prop_assert!(!ok),
                        (Admission::Probe, BreakerState::HalfOpen, other) => prop_assert!(false, "a probe must decide: {:?}", other),
                        (Admission::Normal, BreakerState::Closed, Some(BreakerState::Open)) => {
                            prop_assert!(!ok && may_open && would_trip);
                        }
                        (Admission::Normal, BreakerState::Closed, None) => prop_assert!(ok || !may_open || !would_trip),
                        (_, _, None) => {}
                        (a, s, t) => prop_assert!(false, "unexpected {:?} from {:?} for {:?}", t, s, a),
                    }
                    if t == Some(BreakerState::Open) {
                        // Growth with bounded jitter, never past the cap.
                        let base = Breaker::open_duration_for(&cfg, opens_before);
                        let d = b.last_open_duration();
                        prop_assert!(d <= base && d <= cfg.max_open_duration);
                        prop_assert!(d >= base.mul_f64(1.0 - JITTER_FRACTION) - Duration::from_nanos(1));
                        prop_assert_eq!(b.opens(), opens_before + 1);
                    }
                    if t == Some(BreakerState::Closed) {
                        prop_assert_eq!(b.opens(), 0);
                    }
                }
                Op::Cancel => {
                    if let Some(Admission::Probe) = admitted.pop() {
                        b.release_probe();
                    }
                }
            }
            prop_assert!(b.probes_in_flight() <= cfg.half_open_probes, "bounded half-open probes");
            if b.state() == BreakerState::Closed {
                prop_assert_eq!(b.probes_in_flight(), 0);
            }
        }
    }

    #[test]
    fn budget_never_exceeds_percent_plus_floor(
        percent in 0u32..101,
        min_per_second in 0u32..5,
        ops in proptest::collection::vec((0u64..1_500, any::<bool>()), 1..400),
    ) {
        let cfg = BudgetConfig { percent, min_per_second, window: Duration::from_secs(10) };
        let mut w = BudgetWindow::new(cfg);
        let mut now = 0u64;
        let (mut total_requests, mut total_retries) = (0u64, 0u64);
        for (dt, is_request) in ops {
            now += dt;
            if is_request {
                w.deposit(now);
                total_requests += 1;
            } else {
                let (req, ret) = w.totals();
                let granted = w.try_withdraw(now);
                // Granted exactly when there is room (the window may have slid first).
                let (req_after, ret_after) = w.totals();
                prop_assert!(req_after <= req && ret_after <= ret + u64::from(granted));
                prop_assert_eq!(granted, ret_after - u64::from(granted) < cfg.allowance(req_after));
                total_retries += u64::from(granted);
            }
            // No per-step "retries <= allowance" check: when old requests slide out, the
            // window may hold more retries than it would now allow; it then grants none until
            // there is room again, which the grant check above covers.
        }
        // Over the whole run: each started window adds at most one floor; each request is
        // counted by at most two consecutive aligned windows' worth of checks.
        let windows = now / 10_000 + 1;
        prop_assert!(total_retries <= cfg.floor() * windows * 2 + 2 * total_requests * u64::from(percent) / 100 + 1);
        if now < 10_000 - 10_000 / BUCKETS as u64 {
            // Within one window nothing expires: exactly the simple formula bounds the run.
            prop_assert!(total_retries <= cfg.allowance(total_requests));
        }
    }
}
