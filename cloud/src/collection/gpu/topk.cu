// tiervec GPU exact search: device kernels, compiled at run time with NVRTC (no headers: the
// f16 conversion is one PTX instruction, so cuda_fp16.h is not needed).
//
// Layout (see gpu/device.rs): `scores` is the GEMM output, row-major [queries][ld]: scores[q][r]
// is dot(query q, row r of the chunk). The distance is derived here, with the formulas of
// shared/src/metric.rs: cosine 1 - dot (rows and queries are normalised), l2 the squared
// distance ||x||^2 - 2 x.q + ||q||^2 from precomputed norms, dot -dot.
//
// topk_select: grid (queries, segments), block THREADS. Block (q, s) scans rows
// [s*seg_len, min(rows, (s+1)*seg_len)) of query q: each thread keeps a sorted list of its k
// best (distance, row) in local memory over rows tid, tid+THREADS, ...; then k rounds of a
// block-wide argmin over the threads' list heads (warp shuffles, then one value per warp in
// shared memory) write the block's k best, nearest first, ties by row (the CPU's order). Dead
// rows (live[r] == 0) are skipped. Fewer than k live rows: the rest are (+inf, -1).

#define THREADS 256
#define WARPS (THREADS / 32)
#define EMPTY_ROW 0x7fffffff

__device__ __forceinline__ bool nearer(float d1, int r1, float d2, int r2) {
    return d1 < d2 || (d1 == d2 && r1 < r2);
}

template <int KMAX>
__device__ __forceinline__ void topk_impl(
    const float* __restrict__ scores, long long ld, int rows, int seg_len,
    const float* __restrict__ x_norms, const float* __restrict__ q_norms,
    const unsigned char* __restrict__ live, int metric, int k,
    float* __restrict__ out_dist, int* __restrict__ out_row)
{
    const int q = blockIdx.x;
    const int seg = blockIdx.y;
    const int begin = seg * seg_len;
    const int end = min(rows, begin + seg_len);
    const float* s = scores + (long long)q * ld;
    const float qn = q_norms[q];

    float best_d[KMAX];
    int best_r[KMAX];
    int n = 0;
    for (int r = begin + (int)threadIdx.x; r < end; r += THREADS) {
        if (!live[r]) continue;
        const float dot = s[r];
        float d;
        if (metric == 0) d = 1.0f - dot;
        else if (metric == 1) d = x_norms[r] - 2.0f * dot + qn;
        else d = -dot;
        if (n == k && !nearer(d, r, best_d[k - 1], best_r[k - 1])) continue;
        // Insertion into the sorted list; when full, the last (farthest) entry falls off.
        int pos = n < k ? n : k - 1;
        while (pos > 0 && nearer(d, r, best_d[pos - 1], best_r[pos - 1])) {
            best_d[pos] = best_d[pos - 1];
            best_r[pos] = best_r[pos - 1];
            --pos;
        }
        best_d[pos] = d;
        best_r[pos] = r;
        if (n < k) ++n;
    }

    __shared__ float warp_d[WARPS];
    __shared__ int warp_r[WARPS];
    __shared__ int warp_t[WARPS];
    __shared__ int winner;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const long long out = ((long long)q * gridDim.y + seg) * k;
    int head = 0;
    for (int i = 0; i < k; ++i) {
        float d = head < n ? best_d[head] : __int_as_float(0x7f800000);
        int r = head < n ? best_r[head] : EMPTY_ROW;
        int t = threadIdx.x;
        for (int off = 16; off > 0; off >>= 1) {
            const float d2 = __shfl_down_sync(0xffffffffu, d, off);
            const int r2 = __shfl_down_sync(0xffffffffu, r, off);
            const int t2 = __shfl_down_sync(0xffffffffu, t, off);
            if (nearer(d2, r2, d, r)) { d = d2; r = r2; t = t2; }
        }
        if (lane == 0) { warp_d[warp] = d; warp_r[warp] = r; warp_t[warp] = t; }
        __syncthreads();
        if (threadIdx.x == 0) {
            // Thread 0 holds warp 0's winner already.
            for (int w = 1; w < WARPS; ++w) {
                if (nearer(warp_d[w], warp_r[w], d, r)) { d = warp_d[w]; r = warp_r[w]; t = warp_t[w]; }
            }
            out_dist[out + i] = d;
            out_row[out + i] = r == EMPTY_ROW ? -1 : r;
            winner = r == EMPTY_ROW ? -1 : t;
        }
        __syncthreads();
        if ((int)threadIdx.x == winner) ++head;
        // `winner` is next written after the next round's first __syncthreads, which every
        // thread reaches only after this read.
    }
}

extern "C" __global__ void __launch_bounds__(THREADS) topk_select_32(
    const float* scores, long long ld, int rows, int seg_len, const float* x_norms,
    const float* q_norms, const unsigned char* live, int metric, int k, float* out_dist,
    int* out_row)
{
    topk_impl<32>(scores, ld, rows, seg_len, x_norms, q_norms, live, metric, k, out_dist, out_row);
}

extern "C" __global__ void __launch_bounds__(THREADS) topk_select_128(
    const float* scores, long long ld, int rows, int seg_len, const float* x_norms,
    const float* q_norms, const unsigned char* live, int metric, int k, float* out_dist,
    int* out_row)
{
    topk_impl<128>(scores, ld, rows, seg_len, x_norms, q_norms, live, metric, k, out_dist, out_row);
}

// f32 -> f16 (round to nearest even) for the FP16 corpus copy and queries; grid-stride loop.
extern "C" __global__ void f32_to_f16(const float* src, unsigned short* dst, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(src[i]));
        dst[i] = h;
    }
}
