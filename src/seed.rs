//! Derived seeds: every random draw in medvlm (sampling streams, LoRA initialisation and
//! dropout masks, data order, random weights) comes from the run's seed through these
//! functions, so a resumed run, a recomputed layer or a re-run command draws the same
//! numbers.
//!
//! They sit at the bottom of the crate (they use nothing of it) because every layer needs
//! them: the model (dropout masks), training (data order, LoRA init), generation (sampling
//! streams) and the tools that write random checkpoints.

/// The golden-ratio increment of SplitMix64 (Steele, Lea and Flood, 2014).
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser: a bijective, well-mixed 64-bit hash of `z` (nearby inputs give
/// unrelated outputs).
pub fn scramble(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An independent seed for counter `n` under `seed`: step `s` of a run draws from
/// `mix(seed, s)`, epoch `e`'s data order from `mix(seed, e)`.
pub fn mix(seed: u64, n: u64) -> u64 {
    scramble(seed ^ n.wrapping_mul(GOLDEN))
}

/// A stable 64-bit name hash (FNV-1a), to give a named thing (a layer's module path, a
/// tensor name) its own random stream.
pub fn of_name(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values of SplitMix64 (the generator `scramble` finalises): seeded with 0,
    /// its first outputs are 0xE220A8397B1DCDAF and 0x6E789E6AA1B965F4 (Vigna's
    /// splitmix64.c), i.e. `scramble(k * GOLDEN)` for k = 1, 2.
    #[test]
    fn scramble_is_splitmix64() {
        assert_eq!(scramble(GOLDEN), 0xE220_A839_7B1D_CDAF);
        assert_eq!(scramble(GOLDEN.wrapping_mul(2)), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(mix(0, 1), 0xE220_A839_7B1D_CDAF);
    }

    /// FNV-1a's published test vectors (64-bit): "" and "a".
    #[test]
    fn of_name_is_fnv1a() {
        assert_eq!(of_name(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(of_name("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
