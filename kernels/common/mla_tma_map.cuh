// The TMA tensor-map type alone, for the parameter blocks (mla_params.cuh): common code
// must not pull in the sm_90 inline assembly of sm90/tma.cuh.
#pragma once
#include <stdint.h>

namespace mla {

// A CUtensorMap, encoded on the host (crates/mla-core/src/gpu/tma.rs) and passed by value
// inside a __grid_constant__ parameter block. 64-byte alignment is what the TMA unit needs.
struct alignas(64) TmaMap {
    uint64_t opaque[16];
};

}  // namespace mla
