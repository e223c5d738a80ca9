/* quant.h: dequantisation of GGUF (ggml) tensor data to float32.
 *
 * Supported ggml types (id: block elements / block bytes):
 *   F32 0: 1/4   F16 1: 1/2   BF16 30: 1/2
 *   Q4_0 2: 32/18   Q4_1 3: 32/20   Q5_0 6: 32/22   Q5_1 7: 32/24   Q8_0 8: 32/34
 *   Q4_K 12: 256/144   Q6_K 14: 256/210   IQ4_NL 20: 32/18
 * Block layouts follow ggml-common.h (see docs/reference/c-and-file-formats.md
 * section 2.6). Everything is little-endian; reads are byte-wise, so `src`
 * needs no alignment. Pure C, no global state. */
#ifndef PF_QUANT_H
#define PF_QUANT_H
#include <stddef.h>
#include <stdint.h>

#include "common.h"

enum {
    PF_GGML_F32 = 0,
    PF_GGML_F16 = 1,
    PF_GGML_Q4_0 = 2,
    PF_GGML_Q4_1 = 3,
    PF_GGML_Q5_0 = 6,
    PF_GGML_Q5_1 = 7,
    PF_GGML_Q8_0 = 8,
    PF_GGML_Q4_K = 12,
    PF_GGML_Q6_K = 14,
    PF_GGML_IQ4_NL = 20,
    PF_GGML_BF16 = 30,
};

/* Block geometry of a supported type: elements per block and bytes per block.
 * Returns 0, or PF_EUNSUPPORTED (message names the type id) for anything else. */
int pf_ggml_type_info(int ggml_type, size_t *block_elems, size_t *block_bytes, pf_status *st);

/* Name of a ggml type id ("Q4_1", ...) for messages; "unknown" if not a ggml id. */
const char *pf_ggml_type_name(int ggml_type);

/* Bytes needed to store n_elements of ggml_type. PF_EINVAL if n_elements is not a
 * multiple of the block size or the byte count overflows size_t. */
int pf_ggml_nbytes(int ggml_type, size_t n_elements, size_t *nbytes, pf_status *st);

/* dst[n_elements] = dequantised src[src_nbytes]. src_nbytes must equal
 * pf_ggml_nbytes(ggml_type, n_elements) exactly: no read past src, no write past dst. */
int pf_dequantize(int ggml_type, const uint8_t *src, size_t src_nbytes, float *dst,
                  size_t n_elements, pf_status *st);

/* IEEE binary16 / bfloat16 bit patterns to float32 (exact). */
float pf_f16_to_f32(uint16_t h);
float pf_bf16_to_f32(uint16_t h);

#endif
