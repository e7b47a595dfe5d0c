// ggml-cuda's flash-attention vector kernel, callable from Python (ctypes) on device pointers.
//
// Compiled once per K/V pair by tools/cuda_golden/fattn_build.sh (-DFA_TYPE_K=GGML_TYPE_Q4_0 ...) with
// ggml-cuda's CUDA_FLAGS, against the headers of llama-cpp-python 0.3.36's llama.cpp in .vendor_cuda/.
// Nothing here re-implements ggml: the kernels are fattn-vec.cuh's flash_attn_ext_vec (ncols = 1, no
// logit softcap: ggml_cuda_flash_attn_ext_vec_case for a one-token batch), fattn-common.cuh's
// flash_attn_combine_results, and cpy-utils.cuh's set_rows block writers. What launch_fattn does on the
// host is repeated here for a decode batch (Q->ne[1] == 1, no ALiBi, no sinks, no KV_max scan, which
// launch_fattn skips below 1024 query rows for one sequence): grid, block, split count
// (parallel_blocks, from occupancy with nbatch_fa = D) and the byte strides nb01..nb33.
//
// Layouts (all C-contiguous unless a stride says otherwise):
//   q    (B, H, D) float32                 = ggml Q [D, 1, H, B]
//   k, v ggml rows at byte strides nb11 (token), nb12 (KV head), nb13 (sequence)
//   mask null, or (B, n_kv) f16 (0 or -inf)  = ggml mask [n_kv, 1, 1, B]
//   dst  (B, H, D) float32; parts (B, H, splits, D) and meta (B, H, splits, 2) when splits > 1.
#include "common.cuh"
#include "fattn-vec.cuh"
#include "cpy-utils.cuh"

#ifndef FA_TYPE_K
#error "build with -DFA_TYPE_K=GGML_TYPE_... -DFA_TYPE_V=GGML_TYPE_..."
#endif

constexpr int NTHREADS = 128;  // ggml_cuda_fattn_vec_get_nthreads_host

template <int D>
static fattn_kernel_t vec_kernel() {
    return flash_attn_ext_vec<D, 1, FA_TYPE_K, FA_TYPE_V, false>;
}

// GGML_ASSERT's target (ggml.c is not linked): init_fastdiv_values asserts its divisor.
extern "C" void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "ggml_abort at %s:%d (%s)\n", file, line, fmt);
    abort();
}

// launch_fattn's parallel_blocks for the vector kernel (stream_k false, nbatch_fa = D); -2 on a CUDA error.
template <int D>
static int parallel_blocks(const int n_rows, const int n_kv) {
    int device = 0, nsm = 0, max_blocks_per_sm = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&max_blocks_per_sm, vec_kernel<D>(), NTHREADS, 0) != cudaSuccess) {
        return -2;
    }
    const int ntiles_KV = (n_kv + D - 1) / D;
    int blocks = std::min(max_blocks_per_sm, ntiles_KV);
    const int blocks_per_wave = nsm * max_blocks_per_sm;
    int nwaves_best = 0;
    int efficiency_percent_best = 0;
    for (int test = blocks; test <= ntiles_KV; ++test) {
        const int nblocks_total = n_rows * test;
        const int nwaves = (nblocks_total + blocks_per_wave - 1) / blocks_per_wave;
        const int efficiency_percent = 100 * nblocks_total / (nwaves * blocks_per_wave);
        if (efficiency_percent_best >= 95 && nwaves > nwaves_best) {
            break;
        }
        if (efficiency_percent > efficiency_percent_best) {
            nwaves_best = nwaves;
            efficiency_percent_best = efficiency_percent;
            blocks = test;
        }
    }
    return blocks;
}

// Enqueues the kernel (and the combine pass for splits > 1) on the default stream; no synchronization.
template <int D>
static int enqueue(const float * q, const char * k, const char * v, const half * mask, float * dst, float * parts,
                   float2 * meta, float scale, int B, int H, int Hkv, int n_kv,
                   int64_t nb11, int64_t nb12, int64_t nb13, int64_t nb21, int64_t nb22, int64_t nb23, int splits) {
    const int32_t nb01 = D * sizeof(float), nb02 = nb01, nb03 = H * nb02;   // Q [D, 1, H, B]
    const int32_t nb31 = n_kv * sizeof(half), nb32 = nb31;                   // mask [n_kv, 1, 1, B]
    const int64_t nb33 = nb31;
    const uint32_t n_head_log2 = 1u << uint32_t(floorf(log2f(float(H))));
    const float max_bias = 0.0f;
    const float m0 = powf(2.0f, -(max_bias) / n_head_log2);
    const float m1 = powf(2.0f, -(max_bias / 2.0f) / n_head_log2);
    const dim3 block(WARP_SIZE, NTHREADS / WARP_SIZE, 1);
    const dim3 grid(1, splits, H * B);   // ntiles_x = 1, parallel_blocks, ntiles_z_gqa*ne12*ne13 = H*B
    const fattn_kernel_t kernel = vec_kernel<D>();
    kernel<<<grid, block, 0>>>(
        (const char *) q, k, v, (const char *) mask, nullptr, nullptr, splits > 1 ? parts : dst, meta,
        scale, max_bias, m0, m1, n_head_log2, 0.0f,
        D, init_fastdiv_values(1), H, B, nb01, nb02, nb03,
        D, n_kv, Hkv, B, int32_t(nb11), int32_t(nb12), nb13,
        int32_t(nb21), int32_t(nb22), nb23,
        mask ? 1 : 0, mask ? 1 : 0, mask ? B : 0, mask ? nb31 : 0, mask ? nb32 : 0, mask ? nb33 : 0);
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess && splits > 1) {
        flash_attn_combine_results<D><<<dim3(1, H, B), D, splits * sizeof(float2)>>>(parts, meta, dst, splits);
        e = cudaGetLastError();
    }
    return int(e);
}

template <int D>
static int launch(const float * q, const char * k, const char * v, const half * mask, float * dst, float * parts,
                  float2 * meta, float scale, int B, int H, int Hkv, int n_kv,
                  int64_t nb11, int64_t nb12, int64_t nb13, int64_t nb21, int64_t nb22, int64_t nb23, int splits) {
    const int e = enqueue<D>(q, k, v, mask, dst, parts, meta, scale, B, H, Hkv, n_kv, nb11, nb12, nb13, nb21, nb22, nb23, splits);
    return e == 0 ? int(cudaDeviceSynchronize()) : e;
}

// repeat launches back to back between two CUDA events: milliseconds per launch into *ms.
template <int D>
static int timed(const float * q, const char * k, const char * v, const half * mask, float * dst, float * parts,
                 float2 * meta, float scale, int B, int H, int Hkv, int n_kv,
                 int64_t nb11, int64_t nb12, int64_t nb13, int64_t nb21, int64_t nb22, int64_t nb23, int splits,
                 int repeat, float * ms) {
    cudaEvent_t a, b;
    if (cudaEventCreate(&a) != cudaSuccess || cudaEventCreate(&b) != cudaSuccess) {
        return int(cudaGetLastError());
    }
    int e = int(cudaEventRecord(a));
    for (int r = 0; e == 0 && r < repeat; ++r) {
        e = enqueue<D>(q, k, v, mask, dst, parts, meta, scale, B, H, Hkv, n_kv, nb11, nb12, nb13, nb21, nb22, nb23, splits);
    }
    if (e == 0) e = int(cudaEventRecord(b));
    if (e == 0) e = int(cudaEventSynchronize(b));
    if (e == 0) e = int(cudaEventElapsedTime(ms, a, b));
    if (e == 0) *ms /= repeat;
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return e;
}

// k_set_rows / k_set_rows_quant: one thread per value (f16, bf16) or per 32-value block.
template <ggml_type type>
static __global__ void set_rows(const float * __restrict__ x, char * __restrict__ y, const int64_t n_units) {
    const int64_t i = int64_t(blockDim.x) * blockIdx.x + threadIdx.x;
    if (i >= n_units) {
        return;
    }
    if constexpr (type == GGML_TYPE_F16) {
        cpy_1_scalar<float, half>((const char *) (x + i), y + i * sizeof(half));
    } else if constexpr (type == GGML_TYPE_BF16) {
        cpy_1_scalar<float, nv_bfloat16>((const char *) (x + i), y + i * sizeof(nv_bfloat16));
    } else if constexpr (type == GGML_TYPE_Q4_0) {
        cpy_blck_f32_q4_0((const char *) (x + QK4_0 * i), y + i * sizeof(block_q4_0));
    } else if constexpr (type == GGML_TYPE_Q8_0) {
        cpy_blck_f32_q8_0((const char *) (x + QK8_0 * i), y + i * sizeof(block_q8_0));
    } else {
        static_assert(type == GGML_TYPE_F16, "set_rows: add the type");
    }
}

template <ggml_type type>
static int run_set_rows(const float * x, char * y, int64_t n_values) {
    const int64_t n_units = type == GGML_TYPE_F16 || type == GGML_TYPE_BF16 ? n_values : n_values / 32;
    set_rows<type><<<(n_units + 255) / 256, 256>>>(x, y, n_units);
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? int(cudaDeviceSynchronize()) : int(e);
}

extern "C" {

// The pair this library was built for: enum ggml_type values.
int fattn_type_k() { return FA_TYPE_K; }
int fattn_type_v() { return FA_TYPE_V; }

// launch_fattn's split count for n_rows = B*H query rows over n_kv tokens; -1 for an unsupported D.
int fattn_parallel_blocks(int D, int n_rows, int n_kv) {
    switch (D) {
        case  64: return parallel_blocks< 64>(n_rows, n_kv);
        case 128: return parallel_blocks<128>(n_rows, n_kv);
        case 256: return parallel_blocks<256>(n_rows, n_kv);
        default:  return -1;
    }
}

// Attention of q over the rows k, v (n_kv a multiple of 128: the kernel reads whole 128-token tiles
// unchecked, llama.cpp pads its cache to 256). Returns 0 or a cudaError_t; -1 for an unsupported D.
int fattn_vec(int D, const float * q, const char * k, const char * v, const half * mask, float * dst, float * parts,
              float * meta, float scale, int B, int H, int Hkv, int n_kv, int64_t nb11, int64_t nb12, int64_t nb13,
              int64_t nb21, int64_t nb22, int64_t nb23, int splits) {
    float2 * m = (float2 *) meta;
    switch (D) {
        case  64: return launch< 64>(q, k, v, mask, dst, parts, m, scale, B, H, Hkv, n_kv, nb11, nb12, nb13, nb21, nb22, nb23, splits);
        case 128: return launch<128>(q, k, v, mask, dst, parts, m, scale, B, H, Hkv, n_kv, nb11, nb12, nb13, nb21, nb22, nb23, splits);
        case 256: return launch<256>(q, k, v, mask, dst, parts, m, scale, B, H, Hkv, n_kv, nb11, nb12, nb13, nb21, nb22, nb23, splits);
        default:  return -1;
    }
}

// fattn_vec's launches timed: `repeat` of them back to back between CUDA events, milliseconds per launch in *ms.
int fattn_vec_time(int D, const float * q, const char * k, const char * v, const half * mask, float * dst,
                   float * parts, float * meta, float scale, int B, int H, int Hkv, int n_kv, int64_t nb11,
                   int64_t nb12, int64_t nb13, int64_t nb21, int64_t nb22, int64_t nb23, int splits, int repeat,
                   float * ms) {
    float2 * m = (float2 *) meta;
    switch (D) {
        case  64: return timed< 64>(q, k, v, mask, dst, parts, m, scale, B, H, Hkv, n_kv, nb11, nb12, nb13, nb21, nb22, nb23, splits, repeat, ms);
        case 128: return timed<128>(q, k, v, mask, dst, parts, m, scale, B, H, Hkv, n_kv, nb11, nb12, nb13, nb21, nb22, nb23, splits, repeat, ms);
        case 256: return timed<256>(q, k, v, mask, dst, parts, m, scale, B, H, Hkv, n_kv, nb11, nb12, nb13, nb21, nb22, nb23, splits, repeat, ms);
        default:  return -1;
    }
}

// ggml-cuda's set_rows bytes of n_values float32 (rows of whole blocks) in K's (which 0) or V's type.
int fattn_set_rows(int which, const float * x, char * y, int64_t n_values) {
    return which == 0 ? run_set_rows<FA_TYPE_K>(x, y, n_values) : run_set_rows<FA_TYPE_V>(x, y, n_values);
}

}  // extern "C"
