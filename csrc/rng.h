/* rng.h: the core's one random source. Counter-based (a hash of seed, stream,
 * index), so a value can be regenerated anywhere (e.g. a dropout mask in
 * backward) without storing it, and runs are bit-reproducible. No global state. */
#ifndef PF_RNG_H
#define PF_RNG_H
#include <stdint.h>

/* 64 random bits for (seed, stream, idx). */
uint64_t pf_rng_bits(uint64_t seed, uint64_t stream, uint64_t idx);
/* Uniform float in [0, 1) with 24 random bits. */
float pf_rng_u01(uint64_t seed, uint64_t stream, uint64_t idx);
#endif
