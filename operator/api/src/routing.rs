//! Key → shard mapping shared by the sidecar (to route) and applications (to check ownership).
//!
//! A key is hashed with a fixed 64-bit hash (FNV-1a with a SplitMix64 finalizer, stable across
//! releases and platforms) and mapped to a shard with jump consistent hashing (Lamping & Veach):
//! the result depends only on the key and the shard count, never on pod addresses, and going from
//! N to N+1 shards moves only ~1/(N+1) of the keys.

/// Stable 64-bit hash of a key.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // SplitMix64 finalizer: FNV's low bits are weak for short keys.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Jump consistent hash: the bucket in `0..buckets` for a 64-bit key hash.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let buckets = i64::from(buckets.max(1));
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The shard owning `key` among `shards` shards.
pub fn shard_for_key(key: &[u8], shards: u32) -> u32 {
    jump_hash(key_hash(key), shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> impl Iterator<Item = String> {
        (0..n).map(|i| format!("user-{i}-{}", i.wrapping_mul(2_654_435_761) % 1_000_003))
    }

    #[test]
    fn deterministic_and_in_range() {
        for n in 1..=64 {
            for k in keys(200) {
                let s = shard_for_key(k.as_bytes(), n);
                assert!(s < n);
                assert_eq!(s, shard_for_key(k.as_bytes(), n));
            }
        }
        // Pinned values: a change of the hash would silently move every key in production.
        assert_eq!(
            [b"alice".as_slice(), b"bob", b"carol", b"dave"].map(|k| shard_for_key(k, 8)),
            PINNED
        );
    }

    /// Computed once by an independent implementation of the same algorithm.
    const PINNED: [u32; 4] = [5, 2, 5, 7];

    #[test]
    fn balanced_within_ten_percent() {
        const N: usize = 100_000;
        for shards in 1..=64u32 {
            let mut counts = vec![0usize; shards as usize];
            for k in keys(N) {
                counts[shard_for_key(k.as_bytes(), shards) as usize] += 1;
            }
            let share = N as f64 / f64::from(shards);
            for (i, c) in counts.iter().enumerate() {
                let dev = (*c as f64 - share).abs() / share;
                assert!(
                    dev <= 0.10,
                    "{shards} shards: shard {i} has {c}, share {share:.0}"
                );
            }
        }
    }

    #[test]
    fn growing_moves_only_the_new_shards_share() {
        const N: usize = 100_000;
        for n in 1..=64u32 {
            let moved = keys(N)
                .filter(|k| shard_for_key(k.as_bytes(), n) != shard_for_key(k.as_bytes(), n + 1))
                .count();
            let bound = 1.0 / f64::from(n + 1) + 0.02;
            assert!(
                (moved as f64 / N as f64) <= bound,
                "{n}->{}: moved {moved} of {N}",
                n + 1
            );
            // Every moved key moves to the new shard.
            assert!(keys(2000)
                .filter(|k| shard_for_key(k.as_bytes(), n) != shard_for_key(k.as_bytes(), n + 1))
                .all(|k| shard_for_key(k.as_bytes(), n + 1) == n));
        }
    }
}
