//! Fuzz targets for the parsers of shardmesh-api that users and peers feed: the shard-map
//! ConfigMap payload, durations, ShardedService validation and key → shard hashing. Each must
//! answer Ok or Err (never panic) within a second, with errors that name the field.
//!
//! Seeds: `tests/corpus/<target>/` (see `tests/fuzzing/mod.rs` for the naming). Cases per
//! target are sized so that the fuzz suites of shardmesh-api, -sidecar and -operator together
//! run in about 35 s in a debug build; for a longer local run raise them all with e.g.
//! `PROPTEST_CASES=20000 cargo test -p shardmesh-api --test fuzz`.

mod fuzzing;

use std::time::Duration;

use fuzzing::{config, corpus, corpus_lines, expectation, inputs, within, Expect, Input};
use proptest::prelude::*;
use serde_json::{json, Value};
use shardmesh_api::{
    duration::{parse_duration, DurationString},
    routing::shard_for_key,
    shardmap::{Leader, Member, Previous, Shard, ShardMap},
    validate::{summarize, validate, validate_update, FieldError},
    ShardedService,
};

fn dir(target: &str) -> String {
    format!("{}/tests/corpus/{target}", env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------------
// Shard-map payload (ConfigMap `<service>-shardmap`, key `shardmap.json`)

/// What a consumer of a decoded map does with it: check, count, owners.
fn use_map(m: &ShardMap) {
    let count = m.count();
    let checked = m.check();
    for key in [&b""[..], b"alice", b"\xff\x00", &[7u8; 300]] {
        let owner = m.owner(key);
        assert!(owner < count.max(1), "owner {owner} of count {count}");
        if let Some(before) = m.previous_owner(key) {
            assert_ne!(before, owner);
            let prev = m.previous.as_ref().expect("previous_owner needs previous");
            assert!(before < prev.count.max(1));
        }
        if checked.is_ok() {
            assert!(
                (owner as usize) < m.shards.len(),
                "a checked map lists every owner"
            );
        }
    }
    match checked {
        Ok(()) => assert!(count >= 1 && count as usize <= m.shards.len()),
        Err(e) => assert!(
            ["shards", "count", "previous.count"]
                .iter()
                .any(|f| e.starts_with(f)),
            "check errors start with the field: {e}"
        ),
    }
    let text = serde_json::to_string(m).expect("a map serializes");
    let back: ShardMap = serde_json::from_str(&text).expect("a serialized map parses");
    assert_eq!(&back, m, "serialize -> parse round trip");
}

fn decode_map(bytes: &[u8]) -> Result<ShardMap, String> {
    let map: Result<ShardMap, _> = serde_json::from_slice(bytes);
    match map {
        Ok(m) => {
            use_map(&m);
            m.check()?;
            Ok(m)
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            Err(msg)
        }
    }
}

/// Maps with absurd counts, epochs and layouts, built directly (not through JSON).
fn absurd_map() -> impl Strategy<Value = ShardMap> {
    let count = prop_oneof![
        Just(None),
        Just(Some(0)),
        Just(Some(u32::MAX)),
        any::<u32>().prop_map(Some),
        (0u32..10).prop_map(Some),
    ];
    let member =
        ("[a-z0-9-]{0,8}", prop::sample::select(fuzzing::WORDS)).prop_map(|(pod, a)| Member {
            pod,
            address: a.to_string(),
        });
    let shard = (
        prop_oneof![0u32..10, any::<u32>()],
        prop::collection::vec(member, 0..3),
        prop::option::of((any::<i64>(), prop::sample::select(fuzzing::WORDS))),
    )
        .prop_map(|(index, members, leader)| Shard {
            index,
            members,
            leader: leader.map(|(epoch, a)| Leader {
                pod: "p".into(),
                address: a.to_string(),
                epoch,
            }),
        });
    (
        any::<i64>(),
        count,
        prop::collection::vec(shard, 0..8),
        prop::option::of(prop_oneof![0u32..10, any::<u32>()]),
    )
        .prop_map(|(epoch, routing_count, shards, previous)| ShardMap {
            epoch,
            routing_count,
            shards,
            previous: previous.map(|count| Previous {
                count,
                until: "2026-01-01T00:00:00Z".into(),
            }),
        })
}

#[test]
fn shardmap_corpus() {
    for seed in corpus(&dir("shardmap")) {
        let bytes = seed.bytes.clone();
        let got = within(&seed.name, move || decode_map(&bytes));
        match expectation(&seed.name) {
            Expect::Accept => assert!(got.is_ok(), "{}: {got:?}", seed.name),
            Expect::Refuse => assert!(got.is_err(), "{}: accepted", seed.name),
            Expect::Answer => {}
        }
    }
}

proptest! {
    #![proptest_config(config(8000))]

    #[test]
    fn shardmap_payload(input in inputs(&corpus(&dir("shardmap")), &[])) {
        within("ShardMap", move || { let _ = decode_map(&input.0); });
    }
}

proptest! {
    #![proptest_config(config(4000))]

    #[test]
    fn shardmap_absurd_counts(map in absurd_map()) {
        within("ShardMap use", move || use_map(&map));
    }
}

// ---------------------------------------------------------------------------------------------
// Durations (`250ms`, `1m30s`; spec fields, flags, annotations)

/// The CRD's pattern `^([0-9]{1,9}(ms|s|m|h))+$`, by hand.
fn matches_pattern(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 9 {
            return false;
        }
        if b[i..].starts_with(b"ms") {
            i += 2;
        } else if i < b.len() && matches!(b[i], b's' | b'm' | b'h') {
            i += 1;
        } else {
            return false;
        }
    }
    !b.is_empty()
}

/// Longest duration any CRD field accepts (`handoffWindow`, `progressDeadline`).
const LONGEST_FIELD: Duration = Duration::from_secs(24 * 3600);

fn check_duration(s: &str) -> Result<Duration, String> {
    let got = parse_duration(s);
    assert_eq!(
        got.is_ok(),
        matches_pattern(s),
        "parse_duration accepts exactly the CRD pattern: {s:?} -> {got:?}"
    );
    assert_eq!(DurationString(s.to_string()).parse(), got);
    match got {
        Ok(d) => {
            assert_eq!(d.subsec_nanos() % 1_000_000, 0, "whole milliseconds");
            if d <= LONGEST_FIELD {
                let canonical = DurationString::from_duration(d);
                assert_eq!(canonical.parse(), Ok(d), "{s:?} -> {canonical}");
            }
            Ok(d)
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{s:?}")) && msg.contains("is not a duration"),
                "the error names the value: {msg}"
            );
            Err(msg)
        }
    }
}

#[test]
fn duration_corpus() {
    for (expect, s) in corpus_lines(&dir("duration")) {
        let input = s.clone();
        let got = within("duration", move || check_duration(&input));
        match expect {
            Expect::Accept => assert!(got.is_ok(), "{s:?}: {got:?}"),
            Expect::Refuse => assert!(got.is_err(), "{s:?}: accepted"),
            Expect::Answer => {}
        }
    }
}

fn duration_inputs() -> BoxedStrategy<Input> {
    let seeds: Vec<fuzzing::Seed> = corpus_lines(&dir("duration"))
        .into_iter()
        .map(|(_, s)| fuzzing::Seed {
            name: String::new(),
            bytes: s.into_bytes(),
        })
        .collect();
    prop_oneof![
        1 => inputs(&seeds, &["ms", "s", "m", "h", "d", "us", "000000000"]),
        // Near misses of the grammar: digits and units only.
        1 => "([0-9]{0,11}(ms|s|m|h|µs|)){1,6}".prop_map(|s| Input(s.into_bytes())),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(config(10000))]

    #[test]
    fn duration(input in duration_inputs()) {
        let s = input.text();
        within("parse_duration", move || { let _ = check_duration(&s); });
    }
}

proptest! {
    #![proptest_config(config(10000))]

    #[test]
    fn duration_canonical_round_trip(ms in 0u64..=LONGEST_FIELD.as_millis() as u64) {
        let d = Duration::from_millis(ms);
        prop_assert_eq!(DurationString::from_duration(d).parse(), Ok(d));
    }
}

/// `DurationString::from_duration` writes one count of the largest unit that divides a
/// duration, unless that count would have more than the 9 digits the parser and the CRD
/// pattern accept (`999999999h1ms` in milliseconds): then a sum of units, which parses back.
#[test]
fn duration_canonical_round_trip_of_long_durations() {
    let d = parse_duration("999999999h1ms").expect("a valid duration");
    let canonical = DurationString::from_duration(d);
    assert_eq!(canonical.parse(), Ok(d), "{canonical}");
}

// ---------------------------------------------------------------------------------------------
// ShardedService validation (webhook, reconciler and sidecar policy share `validate`)

fn assert_named(errors: &[FieldError]) {
    for e in errors {
        assert!(
            e.path.starts_with("spec.") || e.path.starts_with("metadata."),
            "an error path names a field: {e}"
        );
        assert!(!e.message.is_empty(), "{}: empty message", e.path);
    }
    assert_eq!(summarize(errors).is_empty(), errors.is_empty());
}

/// Decodes like the webhook (serde_json into the typed object), then validates it alone and as
/// an update of `old`.
fn check_service(bytes: &[u8], old: &ShardedService) -> Result<(), String> {
    let svc: ShardedService = serde_json::from_slice(bytes).map_err(|e| {
        let msg = e.to_string();
        assert!(!msg.is_empty());
        msg
    })?;
    let errors = validate(&svc);
    assert_named(&errors);
    assert_named(&validate_update(old, &svc));
    let v = serde_json::to_value(&svc).expect("a ShardedService serializes");
    let back: ShardedService = serde_json::from_value(v).expect("and parses back");
    assert_eq!(back.spec, svc.spec, "spec round trip");
    if errors.is_empty() {
        Ok(())
    } else {
        Err(summarize(&errors))
    }
}

/// The seeds as JSON (YAML ones converted, as kubectl does).
fn service_seeds() -> Vec<fuzzing::Seed> {
    corpus(&dir("shardedservice"))
        .into_iter()
        .map(|s| {
            let bytes = if s.name.ends_with(".yaml") {
                let v: Value =
                    serde_yaml::from_slice(&s.bytes).unwrap_or_else(|e| panic!("{}: {e}", s.name));
                serde_json::to_vec(&v).expect("json")
            } else {
                s.bytes
            };
            fuzzing::Seed {
                name: s.name,
                bytes,
            }
        })
        .collect()
}

fn base_service() -> ShardedService {
    serde_json::from_value(json!({
        "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
        "metadata": {"name": "orders", "namespace": "shop"},
        "spec": {"shards": 4, "replicasPerShard": 3, "port": 8080,
                 "template": {"spec": {"containers": [{"name": "app", "image": "demo:1"}]}}}
    }))
    .expect("base service")
}

#[test]
fn shardedservice_corpus() {
    for seed in service_seeds() {
        let bytes = seed.bytes.clone();
        let got = within(&seed.name, move || check_service(&bytes, &base_service()));
        match expectation(&seed.name) {
            Expect::Accept => assert!(got.is_ok(), "{}: {got:?}", seed.name),
            Expect::Refuse => assert!(got.is_err(), "{}: accepted", seed.name),
            Expect::Answer => {}
        }
    }
}

proptest! {
    #![proptest_config(config(8000))]

    #[test]
    fn shardedservice_validate(
        input in inputs(&service_seeds(), &[]),
        old_shards in prop_oneof![1i32..=1024, any::<i32>()],
        removal in any::<bool>(),
    ) {
        let mut old = base_service();
        old.spec.shards = old_shards;
        old.spec.rollout.allow_shard_removal = removal;
        within("validate", move || { let _ = check_service(&input.0, &old); });
    }
}

/// Shard counts at and around every edge `validate` and `validate_update` compare with.
fn shard_count() -> impl Strategy<Value = i32> {
    prop_oneof![
        1i32..=1024,
        -2i32..3,
        prop::sample::select(vec![
            i32::MIN,
            i32::MIN + 1,
            -1024,
            1025,
            i32::MAX - 1,
            i32::MAX
        ]),
        any::<i32>(),
    ]
}

proptest! {
    #![proptest_config(config(5000))]

    /// An update changing only `spec.shards`: refused exactly when it lowers the count
    /// without the override, naming the count to restore.
    #[test]
    fn shardedservice_update_shard_counts(
        old_shards in shard_count(),
        new_shards in shard_count(),
        removal in any::<bool>(),
    ) {
        let mut old = base_service();
        old.spec.shards = old_shards;
        let mut new = old.clone();
        new.spec.shards = new_shards;
        new.spec.rollout.allow_shard_removal = removal;
        let (o, n) = (old.clone(), new.clone());
        let errors = within("validate_update", move || validate_update(&o, &n));
        assert_named(&errors);
        let refused = errors
            .iter()
            .any(|e| e.path == "spec.shards" && e.message.contains("allowShardRemoval"));
        // A count below 1 is out of range (its own error), not a removal.
        prop_assert_eq!(
            refused,
            new_shards >= 1 && new_shards < old_shards && !removal,
            "{:?}",
            errors
        );
    }
}

/// An update from a positive shard count to a very negative one is refused as out of range,
/// without overflowing (`current - new` once panicked in debug builds and wrapped in release).
/// The CRD schema (1-1024) keeps such objects out of the API server, but the webhook endpoint
/// and the reconciler's update checks take any i32.
#[test]
fn validate_update_with_extreme_shard_counts() {
    let mut old = base_service();
    old.spec.shards = 1;
    let mut new = old.clone();
    new.spec.shards = i32::MIN;
    let errors = validate_update(&old, &new);
    assert!(errors.iter().any(|e| e.path == "spec.shards"), "{errors:?}");
}

// ---------------------------------------------------------------------------------------------
// Key -> shard hashing (any key a client sends, any count a map carries)

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn key_to_shard(
        key in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(any::<u8>(), 0..8192),
        ],
        count in prop_oneof![0u32..4, 1u32..1025, any::<u32>(), Just(u32::MAX)],
    ) {
        let (k, c) = (key.clone(), count);
        let shard = within("shard_for_key", move || shard_for_key(&k, c));
        prop_assert!(shard < count.max(1), "shard {} of {}", shard, count);
        prop_assert_eq!(shard, shard_for_key(&key, count), "deterministic");
        if count <= 1 {
            prop_assert_eq!(shard, 0);
        }
        if (1..u32::MAX).contains(&count) {
            // Consistent: one more shard moves a key only onto the new shard.
            let grown = shard_for_key(&key, count + 1);
            prop_assert!(grown == shard || grown == count, "{} -> {} of {}", shard, grown, count + 1);
        }
    }
}
