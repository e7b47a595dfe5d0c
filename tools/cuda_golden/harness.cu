// Runs ggml-cuda's own set_rows block writers over every 32-value block of a float32 file.
//
//   harness IN.bin OUTDIR      IN.bin: raw little-endian float32, a multiple of 32 values
//
// Writes OUTDIR/<type>.bin for the nine KV-cache types: exactly the bytes ggml-cuda's set_rows
// stores (cpy-utils.cuh's quantize_f32_*_block, and cpy_1_scalar = ggml_cuda_cast for
// f32/f16/bf16). Build it with ggml-cuda's flags so nvcc picks the same instructions:
//   nvcc -use_fast_math -extended-lambda -arch=sm_90 -I ggml/include -I ggml/src -I ggml/src/ggml-cuda
// Nothing here re-implements a quantizer: the functions are ggml's, included as they ship.
#include "common.cuh"
#include "cpy-utils.cuh"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CHECK(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); exit(1); } } while (0)

constexpr int QK = 32;  // every quantized KV type here has 32 values per block

// One thread per block, as k_set_rows_quant does (one thread quantizes one whole block).
template <typename block_t, void (*quantize)(const float *, block_t *)>
__global__ void quantize_blocks(const float * __restrict__ x, block_t * __restrict__ y, int64_t n_blocks) {
    const int64_t i = int64_t(blockDim.x) * blockIdx.x + threadIdx.x;
    if (i < n_blocks) {
        quantize(x + i * QK, y + i);
    }
}

// One thread per value, as k_set_rows does for f32/f16/bf16 (cpy_1_scalar is ggml_cuda_cast).
template <typename dst_t>
__global__ void convert_values(const float * __restrict__ x, dst_t * __restrict__ y, int64_t n) {
    const int64_t i = int64_t(blockDim.x) * blockIdx.x + threadIdx.x;
    if (i < n) {
        cpy_1_scalar<float, dst_t>((const char *) (x + i), (char *) (y + i));
    }
}

static void save(const std::string & path, const void * dev, size_t bytes) {
    std::vector<char> host(bytes);
    CHECK(cudaMemcpy(host.data(), dev, bytes, cudaMemcpyDeviceToHost));
    FILE * f = fopen(path.c_str(), "wb");
    if (!f || fwrite(host.data(), 1, bytes, f) != bytes) { fprintf(stderr, "cannot write %s\n", path.c_str()); exit(1); }
    fclose(f);
}

template <typename block_t, void (*quantize)(const float *, block_t *)>
static void run_quant(const char * name, const float * x_dev, int64_t n_blocks, const std::string & outdir) {
    block_t * y_dev;
    const size_t bytes = sizeof(block_t) * n_blocks;
    CHECK(cudaMalloc(&y_dev, bytes));
    CHECK(cudaMemset(y_dev, 0xA5, bytes));  // poison: an unwritten byte would show
    quantize_blocks<block_t, quantize><<<(n_blocks + 255) / 256, 256>>>(x_dev, y_dev, n_blocks);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    save(outdir + "/" + name + ".bin", y_dev, bytes);
    CHECK(cudaFree(y_dev));
}

template <typename dst_t>
static void run_convert(const char * name, const float * x_dev, int64_t n, const std::string & outdir) {
    dst_t * y_dev;
    const size_t bytes = sizeof(dst_t) * n;
    CHECK(cudaMalloc(&y_dev, bytes));
    CHECK(cudaMemset(y_dev, 0xA5, bytes));
    convert_values<dst_t><<<(n + 255) / 256, 256>>>(x_dev, y_dev, n);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    save(outdir + "/" + name + ".bin", y_dev, bytes);
    CHECK(cudaFree(y_dev));
}

int main(int argc, char ** argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s IN.bin OUTDIR\n", argv[0]); return 2; }
    FILE * f = fopen(argv[1], "rb");
    if (!f) { fprintf(stderr, "cannot read %s\n", argv[1]); return 1; }
    fseek(f, 0, SEEK_END);
    const long in_bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (in_bytes <= 0 || in_bytes % (QK * sizeof(float)) != 0) { fprintf(stderr, "input is not whole 32-float blocks\n"); return 1; }
    const int64_t n = in_bytes / sizeof(float);
    std::vector<float> x(n);
    if (fread(x.data(), sizeof(float), n, f) != (size_t) n) { fprintf(stderr, "short read\n"); return 1; }
    fclose(f);

    float * x_dev;
    CHECK(cudaMalloc(&x_dev, n * sizeof(float)));
    CHECK(cudaMemcpy(x_dev, x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    const std::string out = argv[2];
    const int64_t nb = n / QK;

    static_assert(sizeof(block_q8_0) == 34 && sizeof(block_q4_0) == 18 && sizeof(block_q4_1) == 20 &&
                  sizeof(block_iq4_nl) == 18 && sizeof(block_q5_0) == 22 && sizeof(block_q5_1) == 24, "block sizes");
    run_convert<float>("f32", x_dev, n, out);
    run_convert<half>("f16", x_dev, n, out);
    run_convert<nv_bfloat16>("bf16", x_dev, n, out);
    run_quant<block_q8_0, quantize_f32_q8_0_block>("q8_0", x_dev, nb, out);
    run_quant<block_q4_0, quantize_f32_q4_0_block>("q4_0", x_dev, nb, out);
    run_quant<block_q4_1, quantize_f32_q4_1_block>("q4_1", x_dev, nb, out);
    run_quant<block_iq4_nl, quantize_f32_iq4_nl_block>("iq4_nl", x_dev, nb, out);
    run_quant<block_q5_0, quantize_f32_q5_0_block>("q5_0", x_dev, nb, out);
    run_quant<block_q5_1, quantize_f32_q5_1_block>("q5_1", x_dev, nb, out);
    CHECK(cudaFree(x_dev));
    printf("harness: %lld values, %lld blocks -> %s\n", (long long) n, (long long) nb, out.c_str());
    return 0;
}
