//! The paged latent KV cache: a fixed pool of 64-token blocks, sequences that grow by
//! appending latent rows, prefix sharing with copy-on-write. (Implemented next.)

pub struct KvCache;
pub struct KvCacheConfig;
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqId(pub u64);
