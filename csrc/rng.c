/* rng.c: counter-based random bits (see rng.h).
 *
 * pf_rng_bits hashes (seed, stream, idx) through three rounds of the
 * splitmix64 finaliser (Stafford's "Mix13" variant), each round absorbing one
 * input word. The function is pure: no state, so any value can be recomputed
 * in any order, e.g. a dropout keep-mask in backward. */
#include "rng.h"

static inline uint64_t pf_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t pf_rng_bits(uint64_t seed, uint64_t stream, uint64_t idx) {
    const uint64_t golden = 0x9e3779b97f4a7c15ULL;
    uint64_t h = pf_mix64(seed + golden);
    h = pf_mix64(h ^ (stream * 0xd1b54a32d192ed03ULL + golden));
    h = pf_mix64(h ^ (idx * 0xaef17502108ef2d9ULL + golden));
    return h;
}

float pf_rng_u01(uint64_t seed, uint64_t stream, uint64_t idx) {
    /* top 24 bits -> [0, 1) exactly representable in float32 */
    return (float)(pf_rng_bits(seed, stream, idx) >> 40) * (1.0f / 16777216.0f);
}
