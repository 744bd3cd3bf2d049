//! The order of operations of a change of the shard count, as pure functions of the published
//! map, the spec and the clock (no client): which shard count keys are routed by, which shards
//! are listed, when the handoff window closes, and what status says about it.
//!
//! Growing N → M: the new shards are listed (their members visible) but own no key until
//! every one of them has a live member; then one map moves the keys (`count` M, `previous` N
//! for the handoff window). Shrinking M → N: one map moves the removed shards' keys at once;
//! the removed shards stay listed, serving handoff reads, until the window closes, and only
//! when a map no longer lists them are their workloads deleted. One change at a time: a new
//! `spec.shards` waits for the open window to close.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use shardmesh_api::{
    shardmap::{Previous, ShardMap},
    v1alpha1::ReshardingStatus,
};

/// Phase names of `status.resharding.phase`.
pub mod phase {
    /// New shards start; keys stay where they are until each has a ready member.
    pub const ADDING: &str = "AddingShards";
    /// Keys moved to new shards; previous owners serve reads that miss.
    pub const HANDOFF: &str = "Handoff";
    /// Keys of removed shards moved; the removed shards serve reads that miss until the window
    /// closes, then they are deleted.
    pub const DRAINING: &str = "Draining";
}

/// The layout of the next map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Shard count keys are routed by.
    pub count: u32,
    /// Shards listed in the map (at least `count`).
    pub listed: u32,
    /// The previous layout while its handoff window is open.
    pub previous: Option<Previous>,
    /// When to look again without any event (the window's end).
    pub wake_at: Option<Timestamp>,
}

/// The number of shards whose members a map of `prev` at `spec_shards` must collect: every
/// shard that is routed to, was routed to in the open window, or is wanted.
pub fn shards_to_collect(prev: Option<&ShardMap>, spec_shards: u32) -> u32 {
    let Some(p) = prev else {
        return spec_shards;
    };
    let previous = p.previous.as_ref().map_or(0, |pr| pr.count);
    spec_shards.max(p.count()).max(previous)
}

fn until_of(previous: &Previous) -> Option<Timestamp> {
    previous.until.parse().ok()
}

/// The next layout. `has_member(i)` says whether shard `i` has a live member now; `window` is
/// `spec.resharding.handoffWindow`. A service with no live member at all (no sidecars
/// registering, or every pod down) has nobody routing by its map or serving handoffs: its
/// layout follows the spec at once.
pub fn next_layout(
    prev: Option<&ShardMap>,
    spec_shards: u32,
    has_member: impl Fn(u32) -> bool,
    window: Duration,
    now: Timestamp,
) -> Layout {
    // Only a consistent map is a layout to continue from: its counts bound the work below.
    let prev = prev.filter(|p| p.check().is_ok());
    let anyone = prev.is_some() && (0..shards_to_collect(prev, spec_shards)).any(&has_member);
    let window = if anyone { window } else { Duration::ZERO };
    let spec_shards = spec_shards.max(1);
    let steady = |count: u32| Layout {
        count,
        listed: count.max(spec_shards),
        previous: None,
        wake_at: None,
    };
    let Some(p) = prev else {
        return steady(spec_shards);
    };
    let count = p.count().max(1);
    if let Some(pr) = &p.previous {
        match until_of(pr) {
            // The window is open: nothing else changes until it closes.
            Some(until) if now < until => {
                return Layout {
                    count,
                    listed: count.max(pr.count).max(spec_shards),
                    previous: Some(pr.clone()),
                    wake_at: Some(until),
                }
            }
            // Closed (or unreadable, which cannot be honoured): drop the previous layout; a
            // pending change starts from the next map.
            _ => return steady(count),
        }
    }
    let open = |from: u32| {
        let until = SignedDuration::try_from(window)
            .ok()
            .and_then(|w| now.checked_add(w).ok())
            .filter(|_| !window.is_zero());
        until.map(|until| Previous {
            count: from,
            until: until.to_string(),
        })
    };
    if spec_shards > count {
        if !anyone || (count..spec_shards).all(&has_member) {
            let previous = open(count);
            let wake_at = previous.as_ref().and_then(until_of);
            return Layout {
                count: spec_shards,
                listed: spec_shards,
                previous,
                wake_at,
            };
        }
        return steady(count);
    }
    if spec_shards < count {
        let previous = open(count);
        let wake_at = previous.as_ref().and_then(until_of);
        let listed = if previous.is_some() {
            count
        } else {
            spec_shards
        };
        return Layout {
            count: spec_shards,
            listed,
            previous,
            wake_at,
        };
    }
    steady(count)
}

/// The number of shards whose workloads must exist: every wanted shard and every shard the
/// published map lists, `listed` (a removed shard serves handoff reads until a map drops it).
pub fn workload_shards(listed: u32, spec_shards: u32) -> u32 {
    spec_shards.max(listed)
}

/// `status.resharding` from the published map and the spec; `None` when the shard count is
/// settled.
pub fn status(map: Option<&ShardMap>, spec_shards: u32) -> Option<ReshardingStatus> {
    let map = map?;
    let count = map.count();
    let to_i32 = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    if let Some(pr) = &map.previous {
        return Some(ReshardingStatus {
            phase: if count < pr.count {
                phase::DRAINING
            } else {
                phase::HANDOFF
            }
            .into(),
            from: to_i32(pr.count),
            to: to_i32(count),
            until: Some(pr.until.clone()),
        });
    }
    let listed = u32::try_from(map.shards.len()).unwrap_or(u32::MAX);
    if spec_shards > count {
        return Some(ReshardingStatus {
            phase: phase::ADDING.into(),
            from: to_i32(count),
            to: to_i32(spec_shards),
            until: None,
        });
    }
    if spec_shards < count || listed > count.max(spec_shards) {
        return Some(ReshardingStatus {
            phase: phase::DRAINING.into(),
            from: to_i32(count.max(listed)),
            to: to_i32(spec_shards),
            until: None,
        });
    }
    None
}

/// The message of the `Resharding` condition for a change in progress.
pub fn message(r: &ReshardingStatus) -> String {
    match r.phase.as_str() {
        phase::ADDING if r.to - r.from == 1 => format!(
            "adding shard {}: keys move once it has a ready member",
            r.from
        ),
        phase::ADDING => format!(
            "adding shards {}-{}: keys move once every new shard has a ready member",
            r.from,
            r.to - 1
        ),
        phase::HANDOFF => format!(
            "shards {} -> {}: keys moved; their previous owners serve reads that miss until {}",
            r.from,
            r.to,
            r.until.as_deref().unwrap_or("the window closes")
        ),
        _ => format!(
            "shards {} -> {}: the removed shards serve reads of their former keys until {}, then \
             they are deleted",
            r.from,
            r.to,
            r.until.as_deref().unwrap_or("their keys have moved")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmesh_api::shardmap::Shard;

    #[test]
    fn messages_name_the_added_shards() {
        let adding = |from, to| ReshardingStatus {
            phase: phase::ADDING.into(),
            from,
            to,
            until: None,
        };
        assert!(message(&adding(3, 4)).starts_with("adding shard 3:"));
        assert!(message(&adding(3, 6)).starts_with("adding shards 3-5:"));
    }

    fn map(count: u32, listed: u32, previous: Option<(u32, Timestamp)>) -> ShardMap {
        ShardMap {
            epoch: 5,
            routing_count: Some(count),
            shards: (0..listed)
                .map(|index| Shard {
                    index,
                    members: Vec::new(),
                    leader: None,
                })
                .collect(),
            previous: previous.map(|(count, until)| Previous {
                count,
                until: until.to_string(),
            }),
        }
    }

    const W: Duration = Duration::from_secs(120);

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("in range")
    }

    #[test]
    fn first_map_routes_by_the_spec() {
        let l = next_layout(None, 3, |_| false, W, t(0));
        assert_eq!((l.count, l.listed, l.previous), (3, 3, None));
    }

    #[test]
    fn growth_waits_for_a_member_in_every_new_shard_then_opens_the_window() {
        let m = map(3, 3, None);
        // Shard 3 has a member, shard 4 not yet: keys stay, both new shards are listed.
        let l = next_layout(Some(&m), 5, |i| i != 4, W, t(0));
        assert_eq!((l.count, l.listed, l.previous.clone()), (3, 5, None));
        assert_eq!(
            status(Some(&map(3, 5, None)), 5).unwrap().phase,
            phase::ADDING
        );
        let l = next_layout(Some(&map(3, 5, None)), 5, |_| true, W, t(0));
        assert_eq!((l.count, l.listed), (5, 5));
        assert_eq!(l.previous.as_ref().map(|p| p.count), Some(3));
        assert_eq!(l.wake_at, Some(t(120)));
    }

    #[test]
    fn the_window_holds_until_it_closes_and_changes_wait_for_it() {
        let m = map(4, 4, Some((3, t(120))));
        assert_eq!(status(Some(&m), 4).unwrap().phase, phase::HANDOFF);
        // A new spec during the window waits.
        let l = next_layout(Some(&m), 2, |_| true, W, t(60));
        assert_eq!((l.count, l.listed), (4, 4));
        assert_eq!(l.previous, m.previous);
        // Closed: the previous layout goes; the pending shrink starts from the next map.
        let l = next_layout(Some(&m), 2, |_| true, W, t(120));
        assert_eq!((l.count, l.listed, l.previous.clone()), (4, 4, None));
        let l = next_layout(Some(&map(4, 4, None)), 3, |_| true, W, t(121));
        assert_eq!((l.count, l.listed), (3, 4));
        assert_eq!(l.previous.as_ref().map(|p| p.count), Some(4));
    }

    #[test]
    fn shrink_keeps_the_removed_shards_listed_through_the_window() {
        let m = map(3, 4, Some((4, t(120))));
        let s = status(Some(&m), 3).unwrap();
        assert_eq!((s.phase.as_str(), s.from, s.to), (phase::DRAINING, 4, 3));
        assert_eq!(shards_to_collect(Some(&m), 3), 4);
        assert_eq!(workload_shards(m.shards.len() as u32, 3), 4);
        let l = next_layout(Some(&m), 3, |_| true, W, t(200));
        assert_eq!((l.count, l.listed, l.previous.clone()), (3, 3, None));
        let settled = map(3, 3, None);
        assert_eq!(workload_shards(settled.shards.len() as u32, 3), 3);
        assert_eq!(status(Some(&settled), 3), None);
    }

    #[test]
    fn a_zero_window_moves_keys_without_handoff() {
        let l = next_layout(Some(&map(3, 4, None)), 4, |_| true, Duration::ZERO, t(0));
        assert_eq!((l.count, l.listed, l.previous), (4, 4, None));
        let l = next_layout(Some(&map(4, 4, None)), 3, |_| true, Duration::ZERO, t(0));
        assert_eq!((l.count, l.listed, l.previous), (3, 3, None));
    }

    #[test]
    fn without_any_member_the_layout_follows_the_spec_at_once() {
        let l = next_layout(Some(&map(3, 3, None)), 4, |_| false, W, t(0));
        assert_eq!((l.count, l.listed, l.previous), (4, 4, None));
        let l = next_layout(Some(&map(4, 4, None)), 3, |_| false, W, t(0));
        assert_eq!((l.count, l.listed, l.previous), (3, 3, None));
    }

    #[test]
    fn an_unreadable_window_end_closes_the_window() {
        let mut m = map(4, 4, Some((3, t(120))));
        if let Some(p) = m.previous.as_mut() {
            p.until = "tomorrow".into();
        }
        let l = next_layout(Some(&m), 4, |_| true, W, t(0));
        assert_eq!(l.previous, None);
    }

    #[test]
    fn maps_of_earlier_releases_route_by_their_listed_shards() {
        let mut m = map(3, 3, None);
        m.routing_count = None;
        let l = next_layout(Some(&m), 3, |_| true, W, t(0));
        assert_eq!((l.count, l.listed, l.previous), (3, 3, None));
    }

    /// One step of a random history: a new `spec.shards`, which shards have a live member, and
    /// how far the clock moves before the next map is computed.
    #[derive(Clone, Debug)]
    struct Step {
        spec: u32,
        members: u8,
        advance: i64,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        (1u32..6, any::<u8>(), 0i64..200).prop_map(|(spec, members, advance)| Step {
            spec,
            members,
            advance,
        })
    }

    proptest::proptest! {
        /// Over any history of spec changes, member churn and time, the published layouts keep
        /// the invariants routing and handoff rely on.
        #[test]
        fn layouts_stay_consistent_over_random_histories(
            steps in proptest::collection::vec(step(), 1..40)
        ) {
            let mut now = 0i64;
            let mut prev: Option<ShardMap> = None;
            for s in steps {
                now += s.advance;
                let has = |i: u32| i < 8 && s.members & (1 << i) != 0;
                let l = next_layout(prev.as_ref(), s.spec, has, W, t(now));
                let before = prev.as_ref();
                // Routing count within the listed shards, previous layout distinct and listed.
                proptest::prop_assert!(l.count >= 1 && l.listed >= l.count);
                if let Some(p) = &l.previous {
                    proptest::prop_assert!(p.count != l.count && p.count <= l.listed);
                }
                if let Some(b) = before {
                    let open = b.previous.as_ref().and_then(until_of).is_some_and(|u| t(now) < u);
                    // Nothing changes inside an open window, and it is never extended.
                    if open {
                        proptest::prop_assert_eq!(l.count, b.count());
                        proptest::prop_assert_eq!(&l.previous, &b.previous);
                    }
                    // A layout change always opens a window from the layout before it (when
                    // someone is serving), so a moved key always has a previous owner listed.
                    // Members are only collected for shards the service has.
                    let anyone = (0..shards_to_collect(Some(b), s.spec)).any(has);
                    if l.count != b.count() && anyone {
                        proptest::prop_assert_eq!(l.previous.as_ref().map(|p| p.count), Some(b.count()));
                    }
                    // Keys only move to new shards once each has a live member.
                    if l.count > b.count() && anyone {
                        proptest::prop_assert!((b.count()..l.count).all(has));
                    }
                    // The removed shards stay listed while the window is open.
                    if let Some(p) = &l.previous {
                        proptest::prop_assert!(l.listed >= p.count);
                    }
                }
                // Every shard the spec wants is listed, so its members are visible.
                proptest::prop_assert!(l.listed >= s.spec);
                let shards = (0..l.listed)
                    .map(|index| shardmesh_api::shardmap::Shard {
                        index,
                        members: Vec::new(),
                        leader: None,
                    })
                    .collect();
                let map = ShardMap {
                    epoch: before.map_or(1, |b| b.epoch + 1),
                    routing_count: Some(l.count),
                    shards,
                    previous: l.previous.clone(),
                };
                proptest::prop_assert_eq!(map.check(), Ok(()));
                prev = Some(map);
            }
        }
    }
}
