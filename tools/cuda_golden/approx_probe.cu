// Measures the two hardware-defined instructions ggml-cuda's fast-math quantizers use, so that the
// CPU can emulate them: rcp.approx.ftz.f32 (tabled over every mantissa) and div.approx.ftz.f32
// (checked against a * rcp.approx(b), for the constant divisors ggml writes and for runtime ones).
//
//   approx_probe OUTDIR     writes OUTDIR/rcp_delta.bin: int8[2^23], for x = 1 + m/2^23,
//                           bits(rcp.approx.ftz(x)) - bits(correctly rounded 1/x)
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <cuda_runtime.h>

#define CHECK(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

constexpr int NM = 1 << 23;

__device__ __forceinline__ float rcp_approx(float x) { float r; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r; }
__device__ __forceinline__ float div_approx(float a, float b) { float r; asm("div.approx.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float mul_ftz(float a, float b) { float r; asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }

__global__ void rcp_table(int8_t * delta, unsigned long long * exp_mismatch) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= NM) return;
    const float x = __int_as_float(0x3F800000 | m);
    const float r = rcp_approx(x);
    delta[m] = (int8_t) (__float_as_int(r) - __float_as_int(__frcp_rn(x)));
    // Is the result the same table shifted by the exponent? (checked for normal results only)
    const int exps[] = {-120, -60, -1, 1, 60, 120};
    for (int e : exps) {
        const float xe = ldexpf(x, e);
        const float re = rcp_approx(xe);
        if (__float_as_int(re) != __float_as_int(ldexpf(r, -e))) atomicAdd(exp_mismatch, 1ull);
    }
}

// Divisors as ggml-cuda writes them: literal constants, so ptxas sees them as in the harness.
template <int DIV>
__global__ void div_const(unsigned long long * counts, int exp_a) {
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= NM) return;
    const float a = ldexpf(__int_as_float(0x3F800000 | m), exp_a);
    const float q = div_approx(a, (float) DIV);
    const float b = (float) DIV;
    if (__float_as_int(q) != __float_as_int(mul_ftz(a, rcp_approx(b)))) atomicAdd(counts + 0, 1ull);
    if (__float_as_int(q) != __float_as_int(mul_ftz(a, __frcp_rn(b)))) atomicAdd(counts + 1, 1ull);
    if (__float_as_int(q) != __float_as_int(__fdiv_rn(a, b))) atomicAdd(counts + 2, 1ull);
}

__device__ uint32_t hash32(uint32_t x) { x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16; return x; }

// Runtime divisors (iq4_nl's sumqx/sumq2): random normal a and b over the whole exponent range.
__global__ void div_runtime(unsigned long long * counts, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const uint32_t ua = hash32(2 * i + 1), ub = hash32(2 * i + 2);
    const float a = __int_as_float((ua & 0x807FFFFF) | ((1 + (ua >> 23) % 253) << 23));
    const float b = __int_as_float((ub & 0x807FFFFF) | ((1 + (ub >> 23) % 253) << 23));
    const float q = div_approx(a, b);
    if (__float_as_int(q) != __float_as_int(mul_ftz(a, rcp_approx(b)))) atomicAdd(counts + 0, 1ull);
    if (__float_as_int(q) != __float_as_int(__fdiv_rn(a, b))) atomicAdd(counts + 1, 1ull);
    if (fabsf(b) >= 0x1p126f && __float_as_int(q) != __float_as_int(mul_ftz(a, rcp_approx(b)))) atomicAdd(counts + 2, 1ull);
}

template <int DIV>
static void report_div_const(unsigned long long * d_counts) {
    for (int e : {-20, 0, 7, 40}) {
        CHECK(cudaMemset(d_counts, 0, 3 * sizeof(unsigned long long)));
        div_const<DIV><<<NM / 256, 256>>>(d_counts, e);
        CHECK(cudaGetLastError());
        unsigned long long c[3];
        CHECK(cudaMemcpy(c, d_counts, sizeof c, cudaMemcpyDeviceToHost));
        printf("div.approx(a, %d) a=1.m*2^%d: != a*rcp.approx(b): %llu, != a*RN(1/b): %llu, != RN(a/b): %llu  (of %d)\n",
               DIV, e, c[0], c[1], c[2], NM);
    }
}

int main(int argc, char ** argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s OUTDIR\n", argv[0]); return 2; }
    int8_t * d_delta; unsigned long long * d_counts;
    CHECK(cudaMalloc(&d_delta, NM));
    CHECK(cudaMalloc(&d_counts, 4 * sizeof(unsigned long long)));
    CHECK(cudaMemset(d_counts, 0, 4 * sizeof(unsigned long long)));
    rcp_table<<<NM / 256, 256>>>(d_delta, d_counts);
    CHECK(cudaGetLastError());
    std::vector<int8_t> delta(NM);
    CHECK(cudaMemcpy(delta.data(), d_delta, NM, cudaMemcpyDeviceToHost));
    unsigned long long exp_mismatch;
    CHECK(cudaMemcpy(&exp_mismatch, d_counts, sizeof exp_mismatch, cudaMemcpyDeviceToHost));
    long hist[5] = {0};
    for (int8_t d : delta) hist[d < -2 ? 0 : d > 2 ? 4 : d + 2]++;
    printf("rcp.approx.ftz vs RN(1/x) over 2^23 mantissas: delta<=-2..>=2 ulp: %ld %ld %ld %ld %ld\n",
           hist[0], hist[1], hist[2], hist[3], hist[4]);
    printf("rcp.approx.ftz exponent-shift mismatches (6 exponents x 2^23): %llu\n", exp_mismatch);
    FILE * f = fopen((std::string(argv[1]) + "/rcp_delta.bin").c_str(), "wb");
    fwrite(delta.data(), 1, NM, f);
    fclose(f);

    report_div_const<127>(d_counts);
    report_div_const<15>(d_counts);
    report_div_const<31>(d_counts);
    report_div_const<-8>(d_counts);
    report_div_const<-16>(d_counts);
    report_div_const<-127>(d_counts);
    CHECK(cudaMemset(d_counts, 0, 3 * sizeof(unsigned long long)));
    const int n = 1 << 24;
    div_runtime<<<n / 256, 256>>>(d_counts, n);
    CHECK(cudaGetLastError());
    unsigned long long c[3];
    CHECK(cudaMemcpy(c, d_counts, sizeof c, cudaMemcpyDeviceToHost));
    printf("div.approx(a, b) runtime b, %d random normal pairs: != a*rcp.approx(b): %llu, != RN(a/b): %llu, "
           "(|b|>=2^126 and != a*rcp: %llu)\n", n, c[0], c[1], c[2]);
    return 0;
}
