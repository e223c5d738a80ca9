/* blas.h: the one place that names the BLAS. We link scipy-openblas32, whose
 * CBLAS symbols carry a "scipy_" prefix (cblas_sgemm -> scipy_cblas_sgemm). */
#ifndef PF_BLAS_H
#define PF_BLAS_H
#include <cblas.h>

#define pf_sgemm scipy_cblas_sgemm
#define pf_sgemv scipy_cblas_sgemv
#define pf_saxpy scipy_cblas_saxpy
#define pf_sdot  scipy_cblas_sdot
#define pf_openblas_set_num_threads scipy_openblas_set_num_threads
#define pf_openblas_get_num_threads scipy_openblas_get_num_threads
#define pf_openblas_get_config      scipy_openblas_get_config
#define pf_openblas_get_corename    scipy_openblas_get_corename
/* Runs a stretch of small GEMMs single-threaded: OpenBLAS otherwise hands part of
 * each tiny per-head product to a second thread and the hand-off dominates (measured
 * 0.26 ms on 1 thread vs 7.5 ms on 2 for a 300x64x300 sgemm on a busy 2-core machine).
 * The wheel exports no thread-local setter, so this saves and restores the process-wide
 * count; results do not depend on the thread count (tested), only speed does.
 * Returns the count to hand back to pf_blas_single_thread_end. */
static inline int pf_blas_single_thread_begin(void) {
    int prev = pf_openblas_get_num_threads();
    if (prev > 1) pf_openblas_set_num_threads(1);
    return prev;
}
static inline void pf_blas_single_thread_end(int prev) {
    if (prev > 1) pf_openblas_set_num_threads(prev);
}

/* Row-major C[M,N] (+)= A[M,K] @ B[K,N] with optional transposes, the only GEMM
 * shape helper the core uses. ta/tb: 0 = as stored, 1 = transposed.
 * lda/ldb/ldc are the row strides of the stored matrices. */
static inline void pf_gemm(int ta, int tb, int M, int N, int K, float alpha,
                           const float *A, int lda, const float *B, int ldb,
                           float beta, float *C, int ldc) {
    pf_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
             M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
#endif
