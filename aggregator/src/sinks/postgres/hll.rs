//! HyperLogLog sketches of user ids: how `/v1/stats` counts distinct users
//! without reading the events. 2^14 registers (relative standard error
//! 0.81 %), a 64-bit XXH3 hash of the user id, and Ertl's improved raw
//! estimator ("New cardinality estimation algorithms for HyperLogLog
//! sketches", 2017), which needs no bias tables and holds its error from
//! a few thousand users to billions. Below that a sketch is sparse, as in
//! HyperLogLog++: it keeps the hashes' first 25 bits (and the rank of the
//! rest), so small counts are linear counting over 2^25 cells — exact
//! unless two users share 25 bits — and it becomes dense past 4,096
//! entries, where the dense form is smaller.
//!
//! Sketches merge by taking each register's maximum, so adding a user
//! twice, or a batch twice, changes nothing: that is what makes them safe
//! to rebuild from the rows and to merge across hours and clients.
//!
//! Stored form (ours, so it cannot change under us with a crate version):
//! one tag byte, then either the sparse entries as big-endian u32s
//! (`index25 << 6 | rank`, ascending) or all 2^14 registers, one byte
//! each.

/// Bits of the hash that pick a dense register.
pub const PRECISION: u32 = 14;
/// Registers in a dense sketch.
pub const REGISTERS: usize = 1 << PRECISION;
/// Bits of the hash a sparse entry keeps as its index.
const SPARSE_PRECISION: u32 = 25;
/// Largest rank a dense register can hold.
const MAX_RANK: u8 = (64 - PRECISION + 1) as u8;
/// Largest rank a sparse entry can hold.
const MAX_SPARSE_RANK: u32 = 64 - SPARSE_PRECISION + 1;
/// Past this many entries the sparse form (4 bytes an entry) is larger
/// than the dense one (one byte a register): switch.
const SPARSE_MAX: usize = REGISTERS / 4;

const TAG_SPARSE: u8 = 1;
const TAG_DENSE: u8 = 2;

/// Longest stored sketch ([`Sketch::decode`] refuses anything longer).
pub const MAX_ENCODED: usize = 1 + REGISTERS;

/// The hash a user id is sketched by. XXH3 is specified and stable across
/// versions and machines, which stored sketches need.
pub fn hash(user_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(user_id.as_bytes())
}

/// A hash's sparse entry: its first 25 bits, and the rank of the rest.
fn sparse_entry(hash: u64) -> u32 {
    let index = (hash >> (64 - SPARSE_PRECISION)) as u32;
    let rank = (hash << SPARSE_PRECISION)
        .leading_zeros()
        .min(64 - SPARSE_PRECISION)
        + 1;
    (index << 6) | rank
}

/// The dense register a sparse entry updates and the rank it offers it:
/// the same as the hash itself would give.
fn dense_place(entry: u32) -> (u16, u8) {
    let index25 = entry >> 6;
    let rank = entry & 0x3f;
    // The 11 bits between the dense index and the sparse one.
    let between = index25 & ((1 << (SPARSE_PRECISION - PRECISION)) - 1);
    let dense_rank = if between != 0 {
        (between << (32 - (SPARSE_PRECISION - PRECISION))).leading_zeros() + 1
    } else {
        SPARSE_PRECISION - PRECISION + rank
    };
    // 2^14 registers: the index fits 16 bits; ranks are at most 51.
    (
        (index25 >> (SPARSE_PRECISION - PRECISION)) as u16,
        dense_rank as u8,
    )
}

/// A sketch: sparse entries sorted by index, or every dense register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sketch {
    /// Few users: `index25 << 6 | rank`, one per index, ascending.
    Sparse(Vec<u32>),
    /// Every register, one byte each.
    Dense(Box<[u8]>),
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch::Sparse(Vec::new())
    }
}

/// Why stored bytes are not a sketch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a user sketch: {0}")]
pub struct SketchError(&'static str);

impl Sketch {
    /// Adds the user with this [`hash`].
    pub fn add_hash(&mut self, hash: u64) {
        self.add_entry(sparse_entry(hash));
    }

    fn add_entry(&mut self, entry: u32) {
        match self {
            Sketch::Dense(regs) => {
                let (index, rank) = dense_place(entry);
                let r = &mut regs[usize::from(index)];
                *r = (*r).max(rank);
            }
            Sketch::Sparse(entries) => {
                match entries.binary_search_by_key(&(entry >> 6), |e| e >> 6) {
                    Ok(at) => {
                        if entry & 0x3f > entries[at] & 0x3f {
                            entries[at] = entry;
                        }
                    }
                    Err(at) => {
                        entries.insert(at, entry);
                        if entries.len() > SPARSE_MAX {
                            self.densify();
                        }
                    }
                }
            }
        }
    }

    fn densify(&mut self) {
        if let Sketch::Sparse(entries) = self {
            let mut regs = vec![0u8; REGISTERS].into_boxed_slice();
            for e in entries.iter() {
                let (index, rank) = dense_place(*e);
                let r = &mut regs[usize::from(index)];
                *r = (*r).max(rank);
            }
            *self = Sketch::Dense(regs);
        }
    }

    /// Takes in every user of `other` (register-wise maximum).
    pub fn merge(&mut self, other: &Sketch) {
        match other {
            Sketch::Sparse(entries) => {
                for e in entries {
                    self.add_entry(*e);
                }
            }
            Sketch::Dense(theirs) => {
                self.densify();
                if let Sketch::Dense(ours) = self {
                    for (a, b) in ours.iter_mut().zip(theirs.iter()) {
                        *a = (*a).max(*b);
                    }
                }
            }
        }
    }

    /// Whether no user was added.
    pub fn is_empty(&self) -> bool {
        match self {
            Sketch::Sparse(e) => e.is_empty(),
            Sketch::Dense(regs) => regs.iter().all(|r| *r == 0),
        }
    }

    /// Bytes this sketch holds in memory (for the pending bound).
    pub fn heap_bytes(&self) -> usize {
        match self {
            Sketch::Sparse(e) => e.capacity() * 4,
            Sketch::Dense(_) => REGISTERS,
        }
    }

    /// The estimated number of distinct users.
    pub fn estimate(&self) -> f64 {
        let regs = match self {
            Sketch::Sparse(entries) => {
                // Linear counting over the 2^25 cells.
                let cells = (1u64 << SPARSE_PRECISION) as f64;
                let empty = cells - entries.len() as f64;
                return cells * (cells / empty).ln();
            }
            Sketch::Dense(regs) => regs,
        };
        // How many registers hold each rank 0..=MAX_RANK.
        let mut counts = [0u32; MAX_RANK as usize + 1];
        for r in regs.iter() {
            counts[usize::from(*r)] += 1;
        }
        let m = REGISTERS as f64;
        let q = usize::from(MAX_RANK) - 1;
        let mut z = m * tau(1.0 - f64::from(counts[q + 1]) / m);
        for k in (1..=q).rev() {
            z = 0.5 * (z + f64::from(counts[k]));
        }
        z += m * sigma(f64::from(counts[0]) / m);
        // α∞ = 1 / (2 ln 2)
        let alpha = 1.0 / (2.0 * std::f64::consts::LN_2);
        alpha * m * m / z
    }

    /// The estimate rounded to a whole number of users.
    pub fn users(&self) -> i64 {
        self.estimate().round() as i64
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Sketch::Sparse(entries) => {
                let mut out = Vec::with_capacity(1 + 4 * entries.len());
                out.push(TAG_SPARSE);
                for e in entries {
                    out.extend_from_slice(&e.to_be_bytes());
                }
                out
            }
            Sketch::Dense(regs) => {
                let mut out = Vec::with_capacity(MAX_ENCODED);
                out.push(TAG_DENSE);
                out.extend_from_slice(regs);
                out
            }
        }
    }

    /// Reads the stored form, checking every entry: indexes in range and
    /// ascending, ranks a hash can give, the exact length.
    pub fn decode(bytes: &[u8]) -> Result<Sketch, SketchError> {
        if bytes.len() > MAX_ENCODED {
            return Err(SketchError("too long"));
        }
        match bytes.split_first() {
            Some((&TAG_SPARSE, rest)) => {
                if rest.len() % 4 != 0 {
                    return Err(SketchError("truncated entry"));
                }
                let mut entries = Vec::with_capacity(rest.len() / 4);
                let mut last: Option<u32> = None;
                for chunk in rest.chunks_exact(4) {
                    let entry = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    let (index, rank) = (entry >> 6, entry & 0x3f);
                    if index >= 1 << SPARSE_PRECISION {
                        return Err(SketchError("index out of range"));
                    }
                    if rank == 0 || rank > MAX_SPARSE_RANK {
                        return Err(SketchError("rank out of range"));
                    }
                    if last.is_some_and(|l| l >= index) {
                        return Err(SketchError("entries not in ascending order"));
                    }
                    last = Some(index);
                    entries.push(entry);
                }
                let dense = entries.len() > SPARSE_MAX;
                let mut sketch = Sketch::Sparse(entries);
                if dense {
                    sketch.densify();
                }
                Ok(sketch)
            }
            Some((&TAG_DENSE, rest)) => {
                if rest.len() != REGISTERS {
                    return Err(SketchError("wrong number of registers"));
                }
                if rest.iter().any(|r| *r > MAX_RANK) {
                    return Err(SketchError("rank out of range"));
                }
                Ok(Sketch::Dense(rest.into()))
            }
            Some(_) => Err(SketchError("unknown format")),
            None => Err(SketchError("empty")),
        }
    }
}

/// Ertl's σ(x) = x + Σ_{k≥1} x^(2^k) 2^(k−1), for the registers still 0.
fn sigma(mut x: f64) -> f64 {
    if x == 1.0 {
        return f64::INFINITY;
    }
    let (mut y, mut z) = (1.0, x);
    loop {
        x *= x;
        let before = z;
        z += x * y;
        y += y;
        if z == before {
            return z;
        }
    }
}

/// Ertl's τ(x), for the registers at the largest rank.
fn tau(mut x: f64) -> f64 {
    if x == 0.0 || x == 1.0 {
        return 0.0;
    }
    let (mut y, mut z) = (1.0, 1.0 - x);
    loop {
        x = x.sqrt();
        let before = z;
        y *= 0.5;
        z -= (1.0 - x).powi(2) * y;
        if z == before {
            return z / 3.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(users: impl IntoIterator<Item = String>) -> Sketch {
        let mut s = Sketch::default();
        for u in users {
            s.add_hash(hash(&u));
        }
        s
    }

    #[test]
    fn the_estimate_is_within_two_percent_from_one_user_to_a_million() {
        for n in [
            1usize, 2, 10, 100, 1_000, 5_000, 10_000, 20_000, 40_000, 50_000, 80_000, 200_000,
            1_000_000,
        ] {
            let s = of((0..n).map(|i| format!("user-{i}")));
            let est = s.estimate();
            let err = (est - n as f64).abs() / n as f64;
            assert!(
                err < 0.02,
                "{n} users estimated as {est:.1} ({:.2} %)",
                err * 100.0
            );
        }
    }

    #[test]
    fn small_counts_are_exact() {
        for n in 0..=1_000usize {
            let s = of((0..n).map(|i| format!("u{i}")));
            assert_eq!(s.users(), n as i64, "{n} users");
        }
    }

    #[test]
    fn a_sparse_entry_lands_where_its_hash_would_in_a_dense_sketch() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Also hashes whose bits after the dense index are mostly zero.
            for h in [rng, rng & !((1u64 << 50) - 1) | (rng & 0xff)] {
                let index = (h >> (64 - PRECISION)) as u16;
                let rank = ((h << PRECISION).leading_zeros().min(64 - PRECISION) + 1) as u8;
                assert_eq!(dense_place(sparse_entry(h)), (index, rank), "{h:#x}");
            }
        }
        assert_eq!(dense_place(sparse_entry(0)), (0, MAX_RANK));
        assert_eq!(
            dense_place(sparse_entry(u64::MAX)),
            ((REGISTERS - 1) as u16, 1)
        );
    }

    #[test]
    fn adding_a_user_again_or_merging_twice_changes_nothing() {
        let a = of((0..3_000).map(|i| format!("a{i}")));
        let mut again = a.clone();
        for i in 0..3_000 {
            again.add_hash(hash(&format!("a{i}")));
        }
        assert_eq!(again, a);
        let b = of((0..7_000).map(|i| format!("b{i}")));
        let mut ab = a.clone();
        ab.merge(&b);
        let once = ab.clone();
        ab.merge(&b);
        ab.merge(&a);
        assert_eq!(ab, once);
        // The union of disjoint sets counts both.
        let err = (ab.estimate() - 10_000.0).abs() / 10_000.0;
        assert!(err < 0.02, "{}", ab.estimate());
    }

    #[test]
    fn merging_sparse_into_dense_and_back_gives_the_same_registers() {
        let small = of((0..50).map(|i| format!("s{i}")));
        let big = of((0..100_000).map(|i| format!("b{i}")));
        assert!(matches!(small, Sketch::Sparse(_)));
        assert!(matches!(big, Sketch::Dense(_)));
        let mut x = small.clone();
        x.merge(&big);
        let mut y = big.clone();
        y.merge(&small);
        assert_eq!(x, y);
    }

    #[test]
    fn the_stored_form_reads_back_the_same_sparse_and_dense() {
        for n in [0usize, 1, 300, SPARSE_MAX, SPARSE_MAX + 1, 60_000] {
            let s = of((0..n).map(|i| format!("x{i}")));
            let bytes = s.encode();
            assert!(bytes.len() <= MAX_ENCODED);
            let back = Sketch::decode(&bytes).unwrap();
            assert_eq!(back.estimate(), s.estimate(), "{n}");
            assert_eq!(back.encode(), bytes);
        }
    }

    #[test]
    fn malformed_truncated_and_hostile_bytes_are_refused() {
        let good = of((0..10).map(|i| format!("x{i}"))).encode();
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "empty"),
            (vec![9], "unknown format"),
            (good[..good.len() - 1].to_vec(), "truncated entry"),
            (vec![TAG_SPARSE, 0x80, 0, 0, 1], "index out of range"),
            (vec![TAG_SPARSE, 0, 0, 1, 0], "rank out of range"),
            (vec![TAG_SPARSE, 0, 0, 1, 41], "rank out of range"),
            (
                vec![TAG_SPARSE, 0, 0, 2, 1, 0, 0, 1, 1],
                "entries not in ascending order",
            ),
            (
                vec![TAG_SPARSE, 0, 0, 1, 1, 0, 0, 1, 2],
                "entries not in ascending order",
            ),
            (vec![TAG_DENSE; REGISTERS], "wrong number of registers"),
            (vec![TAG_DENSE; MAX_ENCODED + 1], "too long"),
        ];
        let mut dense = vec![0u8; MAX_ENCODED];
        dense[0] = TAG_DENSE;
        dense[77] = MAX_RANK + 1;
        cases.push((dense, "rank out of range"));
        for (bytes, why) in cases {
            assert_eq!(Sketch::decode(&bytes), Err(SketchError(why)), "{bytes:?}");
        }
    }
}
