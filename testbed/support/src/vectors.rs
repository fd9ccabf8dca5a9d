//! Deterministic test vectors from a hash of `(family, i, d)`: no RNG crate, no state, the same
//! numbers on every platform (the WASM guest's tests included). Components are uniform in
//! `[-0.5, 0.5)` with 24 bits each, and distinct ids give unrelated vectors (no period, unlike
//! formulas built on `sin`, which repeat and make near-duplicates that tie in search).

/// The splitmix64 finaliser of `x + φ·2⁶⁴`: a bijection that mixes every input bit into every
/// output bit.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Vector `i` of `family`, `dim` components in `[-0.5, 0.5)`. Families are independent: use one
/// per version (or per seed) where a test needs the same id written with different contents.
pub fn family_vector(family: u64, i: u64, dim: usize) -> Vec<f32> {
    let seed = mix(mix(family) ^ i);
    (0..dim as u64)
        .map(|d| (mix(seed ^ d) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect()
}

/// Vector `i` of family 0: `family_vector(0, i, dim)`.
pub fn vector(i: u64, dim: usize) -> Vec<f32> {
    family_vector(0, i, dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_in_range_and_distinct() {
        assert_eq!(vector(7, 16), vector(7, 16));
        assert_eq!(vector(7, 16), family_vector(0, 7, 16));
        assert_eq!(
            vector(7, 8)[..],
            vector(7, 16)[..8],
            "a prefix of a longer one"
        );
        let all: Vec<Vec<f32>> = (0..1_000).map(|i| vector(i, 16)).collect();
        for v in &all {
            assert!(v.iter().all(|x| (-0.5..0.5).contains(x)), "{v:?}");
        }
        let distinct: std::collections::HashSet<Vec<u32>> = all
            .iter()
            .map(|v| v.iter().map(|x| x.to_bits()).collect())
            .collect();
        assert_eq!(distinct.len(), all.len(), "no two ids give the same vector");
        assert_ne!(family_vector(1, 7, 16), family_vector(2, 7, 16));
        // Dimensions past 256 do not repeat the first ones (as a `d << 56` key would).
        let long = vector(3, 512);
        assert_ne!(long[..256], long[256..]);
        let mean = all.iter().flatten().sum::<f32>() / (16 * 1_000) as f32;
        assert!(mean.abs() < 0.01, "components centred on 0, mean {mean}");
    }
}
