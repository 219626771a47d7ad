//! A small per-thread cache of encoded TMA tensor maps, in front of [`super::tma`].
//!
//! `cuTensorMapEncodeTiled` is host work of about a microsecond per map, and a decode on
//! the TMA kernel encodes two (q and the KV cache) on every launch, although a serving loop
//! passes the same tensors step after step. A map is a pure function of its arguments
//! (address, dtype, extents, box), so an entry keyed by all of them is always valid: a
//! tensor freed and another allocated at the same address with the same extents gets the
//! same map. The cache holds [`ENTRIES`] maps per thread, replaced round robin.
//!
//! Same signatures as `tma::q_map` / `tma::kv_map`, so that `ops.rs` only imports this
//! module under the name `tma`. `MLA_TMA_CACHE=0` turns it off (every map encoded, as
//! before). `MLA_TMA_L2_PROMOTION` (a measuring knob of `tma.rs`) is read once per process
//! here and is part of the key: set it before the first decode.

use std::cell::RefCell;
use std::sync::OnceLock;

use super::params::TmaMap;
use super::tma;
use crate::dtype::DType;
use crate::error::Result;

/// Maps kept per thread (a serving loop uses 2 per distinct q / pool pair).
pub const ENTRIES: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    kind: u8,
    ptr: u64,
    dtype: DType,
    dims: [usize; 3],
    /// The L2-promotion setting the map was encoded under.
    l2: u8,
}

struct Cache {
    entries: [Option<(Key, TmaMap)>; ENTRIES],
    next: usize,
}

thread_local! {
    static CACHE: RefCell<Cache> = const { RefCell::new(Cache { entries: [None; ENTRIES], next: 0 }) };
}

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("MLA_TMA_CACHE").as_deref() != Ok("0"))
}

fn l2_setting() -> u8 {
    static L2: OnceLock<u8> = OnceLock::new();
    *L2.get_or_init(|| match std::env::var("MLA_TMA_L2_PROMOTION").as_deref() {
        Ok("64") => 1,
        Ok("128") => 2,
        Ok("256") => 3,
        _ => 0,
    })
}

fn cached(key: Key, encode: impl FnOnce() -> Result<TmaMap>) -> Result<TmaMap> {
    if !enabled() {
        return encode();
    }
    if let Some(m) = CACHE.with(|c| c.borrow().entries.iter().flatten().find(|(k, _)| *k == key).map(|(_, m)| *m)) {
        return Ok(m);
    }
    let m = encode()?;
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let i = c.next;
        c.entries[i] = Some((key, m));
        c.next = (i + 1) % ENTRIES;
    });
    Ok(m)
}

/// `tma::q_map`, cached.
pub fn q_map(ptr: u64, dtype: DType, b: usize, rows: usize, tile_rows: usize) -> Result<TmaMap> {
    let key = Key { kind: 0, ptr, dtype, dims: [b, rows, tile_rows], l2: l2_setting() };
    cached(key, || tma::q_map(ptr, dtype, b, rows, tile_rows))
}

/// `tma::kv_map`, cached.
pub fn kv_map(ptr: u64, dtype: DType, num_blocks: usize, box_rows: usize) -> Result<TmaMap> {
    let key = Key { kind: 1, ptr, dtype, dims: [num_blocks, box_rows, 0], l2: l2_setting() };
    cached(key, || tma::kv_map(ptr, dtype, num_blocks, box_rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct keys never share an entry, the same key hits, and old entries are replaced
    /// round robin (encoding itself needs a driver: a stand-in map per call here).
    #[test]
    fn entries_are_keyed_by_every_argument() {
        let n = std::cell::Cell::new(0u64);
        let fake = |key: Key| {
            cached(key, || {
                n.set(n.get() + 1);
                Ok(TmaMap([n.get(); 16]))
            })
            .unwrap()
            .0[0]
        };
        let k = Key { kind: 0, ptr: 0x1000, dtype: DType::BF16, dims: [1, 16, 16], l2: 0 };
        let first = fake(k);
        assert_eq!(fake(k), first, "the same key hits");
        for other in [Key { ptr: 0x2000, ..k }, Key { kind: 1, ..k }, Key { dtype: DType::F16, ..k }, Key { dims: [2, 16, 16], ..k }, Key { l2: 1, ..k }] {
            assert_ne!(fake(other), first, "a different argument is a different map");
        }
        for i in 0..ENTRIES as u64 {
            fake(Key { ptr: 0x10_0000 + i, ..k });
        }
        assert_ne!(fake(k), first, "evicted after ENTRIES newer maps");
    }
}
