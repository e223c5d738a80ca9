/* quant.c: ggml block formats -> float32. See quant.h for the type table.
 * Each dequantiser takes one block `b` (block_bytes bytes) and writes its
 * block_elems floats to `y`. The driver pf_dequantize checks sizes once. */
#include "quant.h"

#include <string.h>

#define QK 32    /* elements per block of the legacy types */
#define QK_K 256 /* elements per K-quant super-block */

typedef struct {
    int type;
    const char *name;
    size_t block_elems, block_bytes;
} pf_ggml_traits;

static const pf_ggml_traits TRAITS[] = {
    {PF_GGML_F32, "F32", 1, 4},        {PF_GGML_F16, "F16", 1, 2},
    {PF_GGML_Q4_0, "Q4_0", QK, 18},    {PF_GGML_Q4_1, "Q4_1", QK, 20},
    {PF_GGML_Q5_0, "Q5_0", QK, 22},    {PF_GGML_Q5_1, "Q5_1", QK, 24},
    {PF_GGML_Q8_0, "Q8_0", QK, 34},    {PF_GGML_Q4_K, "Q4_K", QK_K, 144},
    {PF_GGML_Q6_K, "Q6_K", QK_K, 210}, {PF_GGML_IQ4_NL, "IQ4_NL", QK, 18},
    {PF_GGML_BF16, "BF16", 1, 2},
};
#define N_TRAITS (sizeof TRAITS / sizeof TRAITS[0])

/* Names of every ggml id (ggml.h), supported or not, for error messages. */
static const char *const GGML_NAMES[] = {
    "F32",     "F16",    "Q4_0",   "Q4_1",  "Q4_2(removed)", "Q4_3(removed)", "Q5_0",  "Q5_1",
    "Q8_0",    "Q8_1",   "Q2_K",   "Q3_K",  "Q4_K",          "Q5_K",          "Q6_K",  "Q8_K",
    "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",       "IQ3_S",         "IQ2_S", "IQ4_XS",
    "I8",      "I16",    "I32",    "I64",   "F64",           "IQ1_M",         "BF16",  "Q4_0_4_4",
    "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4",  "IQ4_NL_4_8",    "IQ4_NL_8_8", "MXFP4",
    "NVFP4",   "Q1_0",   "Q2_0",
};

const char *pf_ggml_type_name(int t) {
    if (t >= 0 && (size_t)t < sizeof GGML_NAMES / sizeof GGML_NAMES[0]) return GGML_NAMES[t];
    return "unknown";
}

static const pf_ggml_traits *find_traits(int t) {
    for (size_t i = 0; i < N_TRAITS; i++)
        if (TRAITS[i].type == t) return &TRAITS[i];
    return NULL;
}

int pf_ggml_type_info(int t, size_t *block_elems, size_t *block_bytes, pf_status *st) {
    const pf_ggml_traits *tr = find_traits(t);
    if (!tr)
        return pf_fail(st, PF_EUNSUPPORTED,
                       "unsupported ggml type %s (id %d): prefopt dequantises F32, F16, BF16, Q8_0, "
                       "Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K, IQ4_NL",
                       pf_ggml_type_name(t), t);
    if (block_elems) *block_elems = tr->block_elems;
    if (block_bytes) *block_bytes = tr->block_bytes;
    return PF_OK;
}

int pf_ggml_nbytes(int t, size_t n, size_t *nbytes, pf_status *st) {
    size_t be, bb;
    int rc = pf_ggml_type_info(t, &be, &bb, st);
    if (rc) return rc;
    if (n % be)
        return pf_fail(st, PF_EINVAL, "%zu elements is not a multiple of the %s block size %zu", n,
                       pf_ggml_type_name(t), be);
    size_t nblocks = n / be;
    if (nblocks > SIZE_MAX / bb)
        return pf_fail(st, PF_EINVAL, "%zu elements of %s overflow the byte count", n,
                       pf_ggml_type_name(t));
    *nbytes = nblocks * bb;
    return PF_OK;
}

/* ---- scalar conversions ---------------------------------------------------- */

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float pf_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    uint32_t u;
    if (exp == 0x1F) {                     /* inf / nan */
        u = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {                 /* normal: rebias 15 -> 127 */
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {                 /* signed zero */
        u = sign;
    } else {                               /* subnormal: man * 2^-24, exact in float32 */
        float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    return bits_to_f32(u);
}

float pf_bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

/* ---- block dequantisers: b -> y[block_elems] ------------------------------------ */

/* Q8_0 (34 B): d f16 @0, qs int8[32] @2; y[j] = qs[j] * d */
static void deq_q8_0(const uint8_t *b, float *y) {
    float d = pf_f16_to_f32(rd16(b));
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < QK; j++) y[j] = (float)qs[j] * d;
}

/* Q4_0 (18 B): d @0, qs u8[16] @2; low nibble of byte j -> y[j], high -> y[j+16]; (q-8)*d */
static void deq_q4_0(const uint8_t *b, float *y) {
    float d = pf_f16_to_f32(rd16(b));
    const uint8_t *qs = b + 2;
    for (int j = 0; j < QK / 2; j++) {
        y[j] = (float)((int)(qs[j] & 0x0F) - 8) * d;
        y[j + QK / 2] = (float)((int)(qs[j] >> 4) - 8) * d;
    }
}

/* Q4_1 (20 B): d @0, m @2, qs @4; y = q*d + m */
static void deq_q4_1(const uint8_t *b, float *y) {
    float d = pf_f16_to_f32(rd16(b)), m = pf_f16_to_f32(rd16(b + 2));
    const uint8_t *qs = b + 4;
    for (int j = 0; j < QK / 2; j++) {
        y[j] = (float)(qs[j] & 0x0F) * d + m;
        y[j + QK / 2] = (float)(qs[j] >> 4) * d + m;
    }
}

/* Q5_0 (22 B): d @0, qh u32 @2 (bit j = 5th bit of element j), qs @6; y = (q-16)*d */
static void deq_q5_0(const uint8_t *b, float *y) {
    float d = pf_f16_to_f32(rd16(b));
    uint32_t qh = rd32(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < QK / 2; j++) {
        int h0 = (int)((qh >> j) & 1u) << 4, h1 = (int)((qh >> (j + 16)) & 1u) << 4;
        y[j] = (float)(((qs[j] & 0x0F) | h0) - 16) * d;
        y[j + QK / 2] = (float)(((qs[j] >> 4) | h1) - 16) * d;
    }
}

/* Q5_1 (24 B): d @0, m @2, qh @4, qs @8; y = q*d + m */
static void deq_q5_1(const uint8_t *b, float *y) {
    float d = pf_f16_to_f32(rd16(b)), m = pf_f16_to_f32(rd16(b + 2));
    uint32_t qh = rd32(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < QK / 2; j++) {
        int h0 = (int)((qh >> j) & 1u) << 4, h1 = (int)((qh >> (j + 16)) & 1u) << 4;
        y[j] = (float)((qs[j] & 0x0F) | h0) * d + m;
        y[j + QK / 2] = (float)((qs[j] >> 4) | h1) * d + m;
    }
}

/* IQ4_NL (18 B): d @0, qs @2 (nibbles as Q4_0); y = d * table[nibble] */
static const int8_t IQ4NL_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                        1,    13,   25,  38,  53,  69,  89,  113};
static void deq_iq4_nl(const uint8_t *b, float *y) {
    float d = pf_f16_to_f32(rd16(b));
    const uint8_t *qs = b + 2;
    for (int j = 0; j < QK / 2; j++) {
        y[j] = d * (float)IQ4NL_VALUES[qs[j] & 0x0F];
        y[j + QK / 2] = d * (float)IQ4NL_VALUES[qs[j] >> 4];
    }
}

/* 6-bit scale and min of sub-block j (0..7) packed in 12 bytes s (Q4_K) */
static inline void scale_min_k4(int j, const uint8_t *s, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Q4_K (144 B / 256): d @0, dmin @2, scales u8[12] @4, qs u8[128] @16.
 * Chunk c (64 elements) uses qs[32c..32c+31]: low nibbles -> sub-block 2c, high -> 2c+1;
 * y = d*sc*q - dmin*m */
static void deq_q4_k(const uint8_t *b, float *y) {
    float d = pf_f16_to_f32(rd16(b)), dmin = pf_f16_to_f32(rd16(b + 2));
    const uint8_t *s = b + 4, *q = b + 16;
    for (int c = 0; c < 4; c++, q += 32, y += 64) {
        int sc, mn;
        scale_min_k4(2 * c, s, &sc, &mn);
        float d1 = d * (float)sc, m1 = dmin * (float)mn;
        scale_min_k4(2 * c + 1, s, &sc, &mn);
        float d2 = d * (float)sc, m2 = dmin * (float)mn;
        for (int l = 0; l < 32; l++) y[l] = d1 * (float)(q[l] & 0x0F) - m1;
        for (int l = 0; l < 32; l++) y[32 + l] = d2 * (float)(q[l] >> 4) - m2;
    }
}

/* Q6_K (210 B / 256): ql u8[128] @0 (low 4 bits), qh u8[64] @128 (high 2 bits),
 * scales int8[16] @192, d f16 @208. Two halves of 128; y = d*sc*(q-32). */
static void deq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = pf_f16_to_f32(rd16(b + 208));
    for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, y += 128) {
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            int q1 = (int)((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
            int q2 = (int)((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * (float)sc[is] * (float)q1;
            y[l + 32] = d * (float)sc[is + 2] * (float)q2;
            y[l + 64] = d * (float)sc[is + 4] * (float)q3;
            y[l + 96] = d * (float)sc[is + 6] * (float)q4;
        }
    }
}

/* ---- driver ------------------------------------------------------------------ */

int pf_dequantize(int t, const uint8_t *src, size_t src_nbytes, float *dst, size_t n,
                  pf_status *st) {
    size_t need;
    int rc = pf_ggml_nbytes(t, n, &need, st);
    if (rc) return rc;
    if (src_nbytes != need)
        return pf_fail(st, PF_EINVAL, "%zu elements of %s need %zu bytes, got %zu", n,
                       pf_ggml_type_name(t), need, src_nbytes);
    if (n && (!src || !dst)) return pf_fail(st, PF_EINVAL, "null buffer in pf_dequantize");
    switch (t) {
    case PF_GGML_F32:
        memcpy(dst, src, n * sizeof(float)); /* little-endian host assumed (x86/arm) */
        return PF_OK;
    case PF_GGML_F16:
        for (size_t i = 0; i < n; i++) dst[i] = pf_f16_to_f32(rd16(src + 2 * i));
        return PF_OK;
    case PF_GGML_BF16:
        for (size_t i = 0; i < n; i++) dst[i] = pf_bf16_to_f32(rd16(src + 2 * i));
        return PF_OK;
    default: break;
    }
    void (*deq)(const uint8_t *, float *) = NULL;
    size_t be = QK, bb = 0;
    switch (t) {
    case PF_GGML_Q8_0: deq = deq_q8_0; bb = 34; break;
    case PF_GGML_Q4_0: deq = deq_q4_0; bb = 18; break;
    case PF_GGML_Q4_1: deq = deq_q4_1; bb = 20; break;
    case PF_GGML_Q5_0: deq = deq_q5_0; bb = 22; break;
    case PF_GGML_Q5_1: deq = deq_q5_1; bb = 24; break;
    case PF_GGML_IQ4_NL: deq = deq_iq4_nl; bb = 18; break;
    case PF_GGML_Q4_K: deq = deq_q4_k; be = QK_K; bb = 144; break;
    case PF_GGML_Q6_K: deq = deq_q6_k; be = QK_K; bb = 210; break;
    default:
        return pf_fail(st, PF_EUNSUPPORTED, "no dequantiser for ggml type %s (id %d)",
                       pf_ggml_type_name(t), t);
    }
    size_t nblocks = n / be;
    for (size_t i = 0; i < nblocks; i++) deq(src + i * bb, dst + i * be);
    return PF_OK;
}
