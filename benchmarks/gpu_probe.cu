// Kernels of benchmarks/gpu_probe.py: the design's assumptions measured on the GPU (TF32
// rounding, mma layouts and accumulation, mma.sync and DMMA rates, streaming bandwidth in tile
// order). A module is lorakern/_cuda/warp.cuh, then this file (launch.warp_source() + it); the
// same kernels run in the host emulation (tests/test_gpu_probe.py), with small sizes.
using namespace lorakern::warp;

// every 32-bit pattern start + i, i < count: cvt.rna.tf32.f32 against warp.cuh's model, per
// thread: mismatches on non-NaN inputs, NaN inputs whose result is not a NaN, the first mismatch
extern "C" __global__ void cvt_exhaustive(unsigned long long start, unsigned long long count,
                                          unsigned long long* mismatches, unsigned long long* nan_bad,
                                          unsigned* first)
{
    const unsigned long long tid = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long bad = 0, nbad = 0;
    unsigned f = 0;
    for (unsigned long long i = tid; i < count; i += stride) {
        const unsigned bits = (unsigned)(start + i);
        const unsigned got = cvt_rna_tf32(__uint_as_float(bits));
        if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) {
            if ((got & 0x7f800000u) != 0x7f800000u || !(got & 0x007fffffu)) ++nbad;
        } else if (got != tf32_rna_model(bits)) {
            if (bad == 0) f = bits;
            ++bad;
        }
    }
    mismatches[tid] = bad;
    nan_bad[tid] = nbad;
    first[tid] = f;
}

// out[i] = cvt.rna.tf32.f32(in[i]) bits (the hand cases, NaN payloads)
extern "C" __global__ void cvt_list(const unsigned* in, unsigned* out, int n)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = cvt_rna_tf32(__uint_as_float(in[i]));
}

// per warp w: D_w = A_w B_w + C_w for one m16n8k8 tile (row-major A 16x8, B 8x8, C and D
// 16x8, tile w at offset w * size); the operands' bits as given (already TF32)
extern "C" __global__ void mma_tf32_tiles(const float* A, const float* B, const float* C, float* D)
{
    typedef FragM16N8K8Tf32 F;
    const unsigned lane = threadIdx.x % 32, w = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    A += w * 128;
    B += w * 64;
    C += w * 128;
    D += w * 128;
    unsigned a[4], b[2];
    float c[4], d[4];
    for (int i = 0; i < 4; ++i) a[i] = __float_as_uint(A[F::a(lane, i).row * 8 + F::a(lane, i).col]);
    for (int i = 0; i < 2; ++i) b[i] = __float_as_uint(B[F::b(lane, i).row * 8 + F::b(lane, i).col]);
    for (int i = 0; i < 4; ++i) c[i] = C[F::c(lane, i).row * 8 + F::c(lane, i).col];
    mma_m16n8k8_tf32(d, a, b, c);
    for (int i = 0; i < 4; ++i) D[F::c(lane, i).row * 8 + F::c(lane, i).col] = d[i];
}

// per warp w: D_w = A_w B_w + C_w for one m8n8k4 f64 tile (row-major A 8x4, B 4x8, C, D 8x8)
extern "C" __global__ void mma_f64_tiles(const double* A, const double* B, const double* C, double* D)
{
    typedef FragM8N8K4F64 F;
    const unsigned lane = threadIdx.x % 32, w = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    A += w * 32;
    B += w * 32;
    C += w * 64;
    D += w * 64;
    double c[2], d[2];
    for (int i = 0; i < 2; ++i) c[i] = C[F::c(lane, i).row * 8 + F::c(lane, i).col];
    mma_m8n8k4_f64(d, A[F::a(lane, 0).row * 4 + F::a(lane, 0).col], B[F::b(lane, 0).row * 8 + F::b(lane, 0).col], c);
    for (int i = 0; i < 2; ++i) D[F::c(lane, i).row * 8 + F::c(lane, i).col] = d[i];
}

// the mma rates: each warp runs `iters` rounds of CHAINS independent mma on register operands
#define CHAINS 8
extern "C" __global__ void mma_tf32_rate(int iters, float* out)
{
    unsigned a[4], b[2];
    for (int i = 0; i < 4; ++i) a[i] = cvt_rna_tf32(1.0f + 0.001f * (threadIdx.x + i));
    for (int i = 0; i < 2; ++i) b[i] = cvt_rna_tf32(0.5f - 0.001f * (threadIdx.x + i));
    float acc[CHAINS][4];
    for (int j = 0; j < CHAINS; ++j)
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int j = 0; j < CHAINS; ++j) mma_m16n8k8_tf32(acc[j], a, b, acc[j]);
    }
    float s = 0.0f;
    for (int j = 0; j < CHAINS; ++j)
        for (int i = 0; i < 4; ++i) s += acc[j][i];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

extern "C" __global__ void mma_f64_rate(int iters, double* out)
{
    const double a = 1.0 + 0.001 * threadIdx.x, b = 0.5 - 0.001 * threadIdx.x;
    double acc[CHAINS][2];
    for (int j = 0; j < CHAINS; ++j) acc[j][0] = acc[j][1] = 0.0;
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int j = 0; j < CHAINS; ++j) mma_m8n8k4_f64(acc[j], a, b, acc[j]);
    }
    double s = 0.0;
    for (int j = 0; j < CHAINS; ++j) s += acc[j][0] + acc[j][1];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// streaming read of a rows x (row_vecs * 16 bytes) array in tiles of tile_rows x tile_vecs
// 16-byte vectors, tiles in row-major order, a grid-stride loop of blocks over tiles (as the
// fused kernel walks R); each thread's xor of what it read goes to out
struct __align__(16) Vec16 {
    unsigned x, y, z, w;
};

extern "C" __global__ void read_tiles(const Vec16* x, int rows, int row_vecs, int tile_rows, int tile_vecs,
                                      unsigned* out)
{
    const int ntc = row_vecs / tile_vecs, ntiles = rows / tile_rows * ntc, per_tile = tile_rows * tile_vecs;
    unsigned acc = 0;
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const long long base = (long long)(tile / ntc) * tile_rows * row_vecs + (long long)(tile % ntc) * tile_vecs;
#pragma unroll 4
        for (int e = threadIdx.x; e < per_tile; e += blockDim.x) {
            const Vec16 v = x[base + (long long)(e / tile_vecs) * row_vecs + e % tile_vecs];
            acc ^= v.x ^ v.y ^ v.z ^ v.w;
        }
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}
