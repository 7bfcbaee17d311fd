// lorakern CUDA kernels, v2: the fused pass on tensor cores (mma.sync), selected by
// launch.KERNEL = "mma" (or LORAKERN_CUDA_KERNEL=mma); "simt" (fused.cu's fused_pass) stays the
// default until a GPU run has timed this one (benchmarks/NOTES.md, "v2 (mma) kernel").
//
// The launcher builds a module as: the loss's device function, warp.cuh, fused_common.cuh (the
// helpers, copy wrappers and partials shared with fused.cu), fused.cu, this file.
// fused_pass_mma computes what fused.cu's fused_pass computes, into the same partials
//     gB_part[column super-tile][m_ld][RK]   gA_part[row super-tile][RK][n_ld]   scal_part[block]
// so that fused.cu's tail and finish, and matrix.py's step and run_steps, work unchanged on top
// of it. Only the arithmetic of the three products changes:
//
//   fp32   mma.sync m16n8k8 .tf32 in 3xTF32: x = big + small (big = cvt.rna.tf32(x), small =
//          cvt.rna.tf32(x - big)), x y ~ small_x big_y + big_x small_y + big_x big_y, the two
//          small products first, small_x small_y dropped (warp.cuh's Tf32Split). Plain TF32
//          (LORAKERN_TF32_PASSES=1, a mutation the tests show failing) is not accurate enough.
//   fp64   mma.sync m8n8k4 .f64 (DMMA): no split.
//
// Every product's accumulator starts at zero in each tile (the "per-tile restart": an RZ
// accumulator chained over a whole row panel would lose ~4e-6, cuda-floor.md) and is added to
// what it contributes to with one rounded FADD in a fixed order.
//
// One block of NT = 256 threads (8 warps) per BM x BN tile at a time, rpb x cpb tiles per block
// (a super-tile, row tiles outer). Copies by cp.async as in fused.cu, but STAGES deep (a
// template parameter, launch.MMA_STAGES: 3 where shared memory allows, else 2 = fused.cu's
// double buffer): the copies of tiles it + 1 .. it + STAGES - 1 are in flight while tile it is
// worked on, one commit group per tile, cp.async.wait_group STAGES - 2; the mask to registers
// one tile ahead. Per tile:
//   phase 1   P = B[rows, :] A[:, cols] by mma (M = rows, N = cols, K = ranks). Warp (wr, wc)
//             owns the panel of M rows x CW columns at (wr M, wc CW): NB1 blocks of M x 8.
//             t = R + P (one FADD), or t = W0 + P for label losses.
//   pointwise value, G = loss'(t) on the C fragments, zero off the mask and outside m x n; loss
//             and ||G||^2 summed in float64 per thread in fragment order (eq. 7).
//   phase 2   grad_B[panel rows, :] += G[panel] A[:, panel cols]^T by mma (M = rows, N = ranks,
//             K = columns) straight from the registers: the C fragment of an M x 8 block is an A
//             fragment once the K slots are mapped to its columns (MmaOp::slot_col), and A's B
//             fragment is loaded in the same column order. Running sums accB (registers) live
//             for a whole row of column tiles; at its end the WC warps of a row group are summed
//             in wc order (shared memory) into gB_part[cs].
//   phase 3   grad_A[:, cols]^T = G^T B[rows, :] by mma (M = cols, N = ranks, K = rows), G^T
//             read from shared memory: NB3 output blocks of M x 8 over the 8 warps (S3 splits of
//             the rows when there are fewer blocks than warps), split sums in split order, then
//             added to the block's own slice of gA_part (read-add-write per tile, as fused.cu).
//
// Determinism: no atomics; every sum in an order fixed by the shapes and the launch
// configuration (per thread in loop order, warps in split order, blocks in slice order). The
// same inputs give the same bits every run (tests/test_cuda_mma.py).
//
// 128 x 64 tiles (fp32, one warp column: WR = 8, WC = 1) compile and pass the tests, but are
// not the default (launch.TILES): gpu_probe.py times them beside 64 x 64 first.
// Not (yet) here from shared/design/cuda-floor.md: a persistent tile scheduler (the super-tiles
// are one wave of blocks, as fused.cu's), conflict-free operand pitches
// everywhere, the grad_A slice kept in shared memory, the one-kernel tail. This is the simple,
// correct layout to time first.

namespace lorakern {

#ifndef LORAKERN_TF32_PASSES
#define LORAKERN_TF32_PASSES 3  // 3: 3xTF32; 1: plain TF32 (only to show that the tests can fail)
#endif
static_assert(LORAKERN_TF32_PASSES == 1 || LORAKERN_TF32_PASSES == 3, "LORAKERN_TF32_PASSES is 1 or 3");

// ---- one mma step per element type: d += a b, operands given as T values in fragment order -----
template <typename T>
struct MmaOp;

template <>
struct MmaOp<float> {
    typedef warp::FragM16N8K8Tf32 F;
    static constexpr int M = 16, K = 8, A_REGS = 4, B_REGS = 2, C_REGS = 4;
    static constexpr int CHUNKS = 8 / K;  // K steps per 8 columns of a C block (phase 2)
    template <int R>
    struct Split {  // 3xTF32 operand: big and small TF32 halves
        warp::u32 big[R], small[R];
    };
    typedef Split<A_REGS> AOp;
    typedef Split<B_REGS> BOp;

    template <int R>
    __device__ __forceinline__ static Split<R> split(const float (&x)[R])
    {
        Split<R> s;
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const warp::Tf32Split p = warp::split_tf32(x[i]);
            s.big[i] = p.big;
            s.small[i] = p.small;
        }
        return s;
    }
    __device__ __forceinline__ static AOp split_a(const float (&x)[A_REGS]) { return split<A_REGS>(x); }
    __device__ __forceinline__ static BOp split_b(const float (&x)[B_REGS]) { return split<B_REGS>(x); }

    // d += a b: small_a big_b, big_a small_b, then big_a big_b (CUTLASS's order)
    __device__ __forceinline__ static void mma(float (&d)[C_REGS], const AOp& a, const BOp& b)
    {
#if LORAKERN_TF32_PASSES == 3
        warp::mma_m16n8k8_tf32(d, a.small, b.big, d);
        warp::mma_m16n8k8_tf32(d, a.big, b.small, d);
#endif
        warp::mma_m16n8k8_tf32(d, a.big, b.big, d);
    }

    // phase 2: the C fragment of a 16 x 8 block, c (g, 2t) (g, 2t+1) (g+8, 2t) (g+8, 2t+1), as the
    // A fragment a (g, s) (g+8, s) (g, s+4) (g+8, s+4) of K slots s = t, t+4 taken as columns
    // 2t, 2t+1 (slot_col): a = c0, c2, c1, c3
    __device__ __forceinline__ static void c_as_a(const float (&c)[C_REGS], int, float (&a)[A_REGS])
    {
        a[0] = c[0];
        a[1] = c[2];
        a[2] = c[1];
        a[3] = c[3];
    }
    // the column (0..7, within the C block) that K slot `slot` stands for in phase 2
    __host__ __device__ static constexpr int slot_col(int slot, int) { return slot < 4 ? 2 * slot : 2 * slot - 7; }
};

template <>
struct MmaOp<double> {
    typedef warp::FragM8N8K4F64 F;
    static constexpr int M = 8, K = 4, A_REGS = 1, B_REGS = 1, C_REGS = 2;
    static constexpr int CHUNKS = 8 / K;
    struct AOp {
        double v;
    };
    typedef AOp BOp;

    __device__ __forceinline__ static AOp split_a(const double (&x)[A_REGS]) { return AOp{x[0]}; }
    __device__ __forceinline__ static BOp split_b(const double (&x)[B_REGS]) { return BOp{x[0]}; }
    __device__ __forceinline__ static void mma(double (&d)[C_REGS], const AOp& a, const BOp& b)
    {
        warp::mma_m8n8k4_f64(d, a.v, b.v, d);
    }
    // c (g, 2t) (g, 2t+1) of an 8 x 8 block; chunk j's A fragment a (g, t) takes column 2t + j
    __device__ __forceinline__ static void c_as_a(const double (&c)[C_REGS], int chunk, double (&a)[A_REGS])
    {
        a[0] = c[chunk];
    }
    __host__ __device__ static constexpr int slot_col(int slot, int chunk) { return 2 * slot + chunk; }
};

// ---- configuration: everything derived from (T, RK, BM, BN); launch.py mirrors SMEM_BYTES --------
template <typename T, int RK, int BM, int BN, int STAGES, bool LABELS, bool GRAD>
struct FusedMma {
    typedef MmaOp<T> Op;
    static constexpr int RANK = RK, TILE_M = BM, TILE_N = BN;
    static constexpr int NWARP = NT / 32;
    // phases 1-2: warp (wr, wc) = (warp % WR, warp / WR) owns rows [wr M, +M) x columns [wc CW, +CW)
    static constexpr int WR = BM / Op::M;
    static constexpr int WC = NWARP / WR;
    static constexpr int CW = BN / WC;
    static constexpr int NB1 = CW / 8;  // M x 8 blocks per warp
    static constexpr int KB = RK / 8;   // blocks of 8 ranks (phase 2's and 3's N)
    // phase 3: grad_A^T (BN x RK) in NB3 blocks of M columns x 8 ranks; PW3 blocks per warp, or,
    // with fewer blocks than warps, S3 splits of the BM rows (RS3 rows each)
    static constexpr int CB3 = BN / Op::M;
    static constexpr int NB3 = CB3 * KB;
    static constexpr int S3 = NB3 >= NWARP ? 1 : NWARP / NB3;
    static constexpr int PW3 = NB3 >= NWARP ? NB3 / NWARP : 1;
    static constexpr int RS3 = BM / S3;
    static constexpr int OP3 = (RK * BN / 4 + NT - 1) / NT;  // packs of 4 per thread, grad_A flush
    // the block's previous grad_A partial is fetched at the start of the tile (its L2 round trip
    // hidden behind phases 1-3) where it takes few registers, as fused.cu does
    static constexpr bool PREFETCH_GA = OP3 <= 2;

    // shared memory. Pitches: A rows BN + 8 (phase 1's B fragment, (k, n) = (t + 4i, g), hits 32
    // banks); B rows RK + 4 (phase 1's A fragment); data rows BN + 4 (16-byte copies); G rows
    // BN + 8 (phase 3's A fragment, (col, row) = (g, t)). The work area W holds the G tile and,
    // where phase 3 splits the rows (S3 > 1, small ranks), its split sums; the block's last
    // reduction aliases it. Once phase 2 is done the tile's own A buffer is free until the copies
    // of tile it + STAGES (issued after the next tile's first barrier): phase 3's sums (S3 == 1,
    // [RK][BN]) and the grad_B flush ([BM][RK]) use it, so that rank 128 fits an A100's 163 KB.
    // STAGES buffers of A, R (W0, Y): the copies of STAGES - 1 tiles in flight while one is
    // worked on. B: one buffer per stage where it is small (a row tile's B is issued up to
    // STAGES - 1 tiles ahead, and rows may be one tile long), else one, reloaded at each row.
    static constexpr int LDA = BN + 8, LDB = RK + 4, LDX = BN + 4, LDG = BN + 8;
    static constexpr int B_BUF = sizeof(T) * RK <= 256 ? STAGES : 1;
    static constexpr long long A_BYTES = round128((long long)STAGES * RK * LDA * sizeof(T));
    static constexpr long long B_BYTES = round128((long long)B_BUF * BM * LDB * sizeof(T));
    static constexpr long long X_BYTES = round128((long long)STAGES * BM * LDX * sizeof(T));
    static constexpr long long Y_BYTES = LABELS ? X_BYTES : 0;
    static constexpr long long G_BYTES = round128((long long)BM * LDG * sizeof(T));
    static constexpr long long S3_BYTES = S3 > 1 ? (long long)S3 * RK * BN * sizeof(T) : 0;  // else in A
    static constexpr long long RED_BYTES = 2LL * NT * sizeof(double);
    static constexpr long long W_BYTES = round128(GRAD && G_BYTES + S3_BYTES > RED_BYTES ? G_BYTES + S3_BYTES : RED_BYTES);
    static constexpr long long SMEM_BYTES = A_BYTES + B_BYTES + X_BYTES + Y_BYTES + W_BYTES;

    static_assert(STAGES >= 2 && STAGES <= 4, "2 to 4 copy stages");
    static_assert(RK % 8 == 0, "the mma kernel's rank bound is a multiple of 8 (launch.rank_bound)");
    static_assert(BM % Op::M == 0 && WR <= NWARP && NWARP % WR == 0, "BM: M-row groups that divide the 8 warps");
    static_assert(BN % (8 * WC) == 0 && NB1 >= 1, "BN: whole blocks of 8 columns per warp");
    static_assert(BN % Op::M == 0, "phase 3: whole blocks of M columns");
    static_assert(NB3 >= NWARP ? NB3 % NWARP == 0 : NWARP % NB3 == 0, "phase 3: blocks and warps");
    static_assert(BM % S3 == 0 && RS3 % Op::K == 0, "phase 3: whole K steps of rows per split");
    static_assert(BN % 4 == 0 && RK % 4 == 0, "16-byte packs in the flushes");
    // grad_B's flush goes through the A buffer where warp columns are summed (WC > 1); with one
    // warp column (128 x 64 fp32 tiles) each warp's sums are final and go out from registers
    static_assert((WC == 1 || BM <= LDA) && (S3 > 1 || BN <= LDA), "the flushes fit in a tile's A buffer");
};

// ---- phases ---------------------------------------------------------------------------------------
// phase 1: p[nb] = B[prow + (0..M), :] A[:, pcol + 8 nb + (0..8)], fresh accumulators
template <typename C, typename T>
__device__ __forceinline__ void mma_phase1(T (&p)[C::NB1][C::Op::C_REGS], const T* As, const T* Bs, int prow,
                                           int pcol, unsigned lane)
{
    typedef typename C::Op Op;
    typedef typename Op::F F;
#pragma unroll
    for (int nb = 0; nb < C::NB1; ++nb)
#pragma unroll
        for (int i = 0; i < Op::C_REGS; ++i) p[nb][i] = T(0);
#pragma unroll 1
    for (int k0 = 0; k0 < C::RANK; k0 += Op::K) {
        T a[Op::A_REGS];
#pragma unroll
        for (int i = 0; i < Op::A_REGS; ++i) {
            const warp::RowCol rc = F::a(lane, i);  // (row, rank)
            a[i] = Bs[(prow + rc.row) * C::LDB + k0 + rc.col];
        }
        const typename Op::AOp as = Op::split_a(a);
#pragma unroll
        for (int nb = 0; nb < C::NB1; ++nb) {
            T b[Op::B_REGS];
#pragma unroll
            for (int i = 0; i < Op::B_REGS; ++i) {
                const warp::RowCol rc = F::b(lane, i);  // (rank, column)
                b[i] = As[(k0 + rc.row) * C::LDA + pcol + 8 * nb + rc.col];
            }
            Op::mma(p[nb], as, Op::split_b(b));
        }
    }
}

// phase 2: accB[kb] += G[panel] A[8 kb + (0..8), panel columns]^T, one fresh accumulator per
// block of 8 ranks, K over the panel's columns in order
template <typename C, typename T>
__device__ __forceinline__ void mma_phase2(T (&accB)[C::KB][C::Op::C_REGS], const T (&g)[C::NB1][C::Op::C_REGS],
                                           const T* As, int pcol, unsigned lane)
{
    typedef typename C::Op Op;
    typedef typename Op::F F;
    typename Op::AOp ga[C::NB1][Op::CHUNKS];
#pragma unroll
    for (int nb = 0; nb < C::NB1; ++nb)
#pragma unroll
        for (int j = 0; j < Op::CHUNKS; ++j) {
            T a[Op::A_REGS];
            Op::c_as_a(g[nb], j, a);
            ga[nb][j] = Op::split_a(a);
        }
#pragma unroll  // accB indexed by constants: registers, not a stack frame
    for (int kb = 0; kb < C::KB; ++kb) {
        T acc[Op::C_REGS];
#pragma unroll
        for (int i = 0; i < Op::C_REGS; ++i) acc[i] = T(0);
#pragma unroll
        for (int nb = 0; nb < C::NB1; ++nb)
#pragma unroll
            for (int j = 0; j < Op::CHUNKS; ++j) {
                T b[Op::B_REGS];
#pragma unroll
                for (int i = 0; i < Op::B_REGS; ++i) {
                    const warp::RowCol rc = F::b(lane, i);  // (K slot -> column, rank)
                    b[i] = As[(8 * kb + rc.col) * C::LDA + pcol + 8 * nb + Op::slot_col(rc.row, j)];
                }
                Op::mma(acc, ga[nb][j], Op::split_b(b));
            }
#pragma unroll
        for (int i = 0; i < Op::C_REGS; ++i) accB[kb][i] += acc[i];
    }
}

// phase 3: this warp's blocks of grad_A^T over its split's rows -> S3s[split][rank][column]
template <typename C, typename T>
__device__ __forceinline__ void mma_phase3(T* S3s, const T* Gs, const T* Bs, int warp_id, unsigned lane)
{
    typedef typename C::Op Op;
    typedef typename Op::F F;
    const int split = C::S3 > 1 ? warp_id / C::NB3 : 0;
#pragma unroll 1
    for (int w = 0; w < C::PW3; ++w) {
        const int block = C::S3 > 1 ? warp_id % C::NB3 : warp_id + w * C::NWARP;
        const int c0 = (block % C::CB3) * Op::M, k0 = (block / C::CB3) * 8;
        T acc[Op::C_REGS];
#pragma unroll
        for (int i = 0; i < Op::C_REGS; ++i) acc[i] = T(0);
#pragma unroll 1
        for (int r0 = split * C::RS3; r0 < (split + 1) * C::RS3; r0 += Op::K) {
            T a[Op::A_REGS], b[Op::B_REGS];
#pragma unroll
            for (int i = 0; i < Op::A_REGS; ++i) {
                const warp::RowCol rc = F::a(lane, i);  // (column, row) of G^T
                a[i] = Gs[(r0 + rc.col) * C::LDG + c0 + rc.row];
            }
#pragma unroll
            for (int i = 0; i < Op::B_REGS; ++i) {
                const warp::RowCol rc = F::b(lane, i);  // (row, rank) of B
                b[i] = Bs[(r0 + rc.row) * C::LDB + k0 + rc.col];
            }
            Op::mma(acc, Op::split_a(a), Op::split_b(b));
        }
#pragma unroll
        for (int i = 0; i < Op::C_REGS; ++i) {
            const warp::RowCol rc = F::c(lane, i);  // (column, rank)
            S3s[((long long)split * C::RANK + k0 + rc.col) * C::TILE_N + c0 + rc.row] = acc[i];
        }
    }
}

// ---- the fused pass on tensor cores ---------------------------------------------------------------
// Arguments as fused_pass's (fused.cu); rpb x cpb tiles per block. GRAD == false: the loss only.
template <typename T, int RK, int BM, int BN, int STAGES, bool LABELS, bool MASKED, bool GRAD>
__global__ void __launch_bounds__(NT, 1) fused_pass_mma(
    const T* __restrict__ X, const T* __restrict__ Y, const unsigned char* __restrict__ M,
    const T* __restrict__ B, const T* __restrict__ A, int m, int n, int r, double delta, int rpb, int cpb,
    T* __restrict__ gB_part, T* __restrict__ gA_part, long long m_ld, long long n_ld,
    double* __restrict__ scal_part)
{
    typedef FusedMma<T, RK, BM, BN, STAGES, LABELS, GRAD> C;
    typedef typename C::Op Op;
    typedef typename Op::F F;
    const PassSmem<T> sm = pass_smem<C, T>();
    T *A_s = sm.A, *B_s = sm.B, *X_s = sm.X, *Y_s = sm.Y;
    unsigned char* W = sm.W;
    T* G_s = reinterpret_cast<T*>(W);
    double* red = reinterpret_cast<double*>(W);

    const int tid = threadIdx.x, warp_id = tid / 32;
    const unsigned lane = tid % 32;
    const int wr = warp_id % C::WR, wc = warp_id / C::WR;
    const int prow = wr * Op::M, pcol = wc * C::CW;  // the warp's panel (phases 1-2)
    const SuperTile st = super_tile<BM, BN>(m, n, rpb, cpb);
    const int rs = st.rs, cs = st.cs, rt0 = st.rt0, ct0 = st.ct0, nct = st.nct, ntiles = st.ntiles;

    constexpr int V = 16 / sizeof(T);  // elements per 16-byte copy
    const bool vec_x = n % V == 0 && aligned(X, 16) && (!LABELS || aligned(Y, 16));
    const bool vec_a = n % V == 0 && aligned(A, 16);
    const bool vec_b = r % V == 0 && aligned(B, 16);

    double loss_acc = 0.0, gsq_acc = 0.0;
    T accB[C::KB][Op::C_REGS];  // phase 2, per row tile
#pragma unroll
    for (int kb = 0; kb < C::KB; ++kb)
#pragma unroll
        for (int i = 0; i < Op::C_REGS; ++i) accB[kb][i] = T(0);

    // tile j's copies into stage buffer j % STAGES (B at a new row tile), one commit group per
    // tile (empty past the last tile, so that wait_group counts alike everywhere); the mask bytes
    // of this lane's C fragments go to registers, one tile ahead
    unsigned char mk_next[C::NB1][Op::C_REGS];
    auto issue_b = [&](int q) {
        tile_async<T, BM, RK>(B_s + (q % C::B_BUF) * BM * C::LDB, C::LDB, B, r, (rt0 + q) * BM, 0, m, r, vec_b);
    };
    auto issue = [&](int j) {
        if (j < ntiles) {
            const int q = j / nct, row0 = (rt0 + q) * BM, col0 = (ct0 + j % nct) * BN, buf = j % STAGES;
            if (j % nct == 0 && (C::B_BUF > 1 || j == 0)) issue_b(q);
            tile_async<T, RK, BN>(A_s + buf * RK * C::LDA, C::LDA, A, n, 0, col0, r, n, vec_a);
            tile_async<T, BM, BN>(X_s + buf * BM * C::LDX, C::LDX, X, n, row0, col0, m, n, vec_x);
            if (LABELS) tile_async<T, BM, BN>(Y_s + buf * BM * C::LDX, C::LDX, Y, n, row0, col0, m, n, vec_x);
        }
        copy_async_commit();
    };
    auto load_mask = [&](int j) {
        const int row0 = (rt0 + j / nct) * BM, col0 = (ct0 + j % nct) * BN;
        if (MASKED) {
#pragma unroll
            for (int nb = 0; nb < C::NB1; ++nb)
#pragma unroll
                for (int i = 0; i < Op::C_REGS; ++i) {
                    const warp::RowCol rc = F::c(lane, i);
                    const int row = row0 + prow + rc.row, col = col0 + pcol + 8 * nb + rc.col;
                    mk_next[nb][i] = row < m && col < n ? M[(long long)row * n + col] : (unsigned char)0;
                }
        }
    };
#pragma unroll
    for (int j = 0; j < STAGES - 1; ++j) issue(j);
    load_mask(0);

    for (int it = 0; it < ntiles; ++it) {
        const int q = it / nct, rt = rt0 + q, ct = ct0 + it % nct;
        const bool row_end = it % nct == nct - 1;
        const int row0 = rt * BM, col0 = ct * BN;
        unsigned char mk[C::NB1][Op::C_REGS];
#pragma unroll
        for (int nb = 0; nb < C::NB1; ++nb)
#pragma unroll
            for (int i = 0; i < Op::C_REGS; ++i) mk[nb][i] = MASKED ? mk_next[nb][i] : (unsigned char)1;

        copy_async_wait_group<STAGES - 2>();  // this tile's group has landed (newer ones may not)
        __syncthreads();  // this tile's copies visible; every thread is done with the previous tile
        if (C::B_BUF == 1 && it % nct == 0 && it > 0) {  // the one B buffer is free only now
            issue_b(q);
            copy_async_wait_all();  // (the tiles in flight land too: once per row tile)
            __syncthreads();
        }
        issue(it + STAGES - 1);  // into the buffers the previous tile used
        if (it + 1 < ntiles) load_mask(it + 1);
        T* const A_free = A_s + (it % STAGES) * RK * C::LDA;  // free once phase 2 is done (FusedMma)
        const T* As = A_free;
        Pack4<T> gA_prev[C::PREFETCH_GA ? C::OP3 : 1];
        if (GRAD && C::PREFETCH_GA && rt != rt0) prefetch_gA<C, RK, BN>(gA_prev, gA_part, rs, n_ld, col0);
        const T* Bs = B_s + (q % C::B_BUF) * BM * C::LDB;
        const T* Xs = X_s + (it % STAGES) * BM * C::LDX;
        const T* Ys = Y_s + (it % STAGES) * BM * C::LDX;

        // ---- phase 1 and the pointwise: g = dL/dt at t = X + B A, in the C fragments
        T g[C::NB1][Op::C_REGS];
        mma_phase1<C>(g, As, Bs, prow, pcol, lane);
#pragma unroll
        for (int nb = 0; nb < C::NB1; ++nb)
#pragma unroll
            for (int i = 0; i < Op::C_REGS; ++i) {
                const warp::RowCol rc = F::c(lane, i);
                const int lr = prow + rc.row, lc = pcol + 8 * nb + rc.col;
                const T t = Xs[lr * C::LDX + lc] + g[nb][i];
                const T y = LABELS ? Ys[lr * C::LDX + lc] : t;
                const auto keep = [&] { return row0 + lr < m && col0 + lc < n && (!MASKED || mk[nb][i] != 0); };
                g[nb][i] = pointwise<T>(t, y, delta, keep, loss_acc, gsq_acc);
            }

        if constexpr (GRAD) {
#pragma unroll
            for (int nb = 0; nb < C::NB1; ++nb)
#pragma unroll
                for (int i = 0; i < Op::C_REGS; ++i) {
                    const warp::RowCol rc = F::c(lane, i);
                    G_s[(prow + rc.row) * C::LDG + pcol + 8 * nb + rc.col] = g[nb][i];
                }
            // ---- phase 2 from registers (A tile only: no barrier needed)
            mma_phase2<C>(accB, g, As, pcol, lane);
            __syncthreads();  // the G tile is complete

            // ---- phase 3: grad_A^T blocks -> split sums [S3][RK][BN] in shared memory
            T* S3_s = C::S3 > 1 ? reinterpret_cast<T*>(W + C::G_BYTES) : A_free;
            mma_phase3<C>(S3_s, G_s, Bs, warp_id, lane);
            __syncthreads();
            // splits summed in split order, added to the block's own slice of gA_part
            flush_gA<C, RK, BN>(S3_s, gA_part, rs, n_ld, col0, rt != rt0, gA_prev);

            if (row_end && C::WC == 1) {  // one warp column: the warp's sums are its rows' grad_B,
                                          // written to gB_part[cs] from the C fragments
#pragma unroll
                for (int kb = 0; kb < C::KB; ++kb)
#pragma unroll
                    for (int i = 0; i < Op::C_REGS; ++i) {
                        const warp::RowCol rc = F::c(lane, i);  // (row, rank)
                        gB_part[((long long)cs * m_ld + row0 + prow + rc.row) * RK + 8 * kb + rc.col] = accB[kb][i];
                        accB[kb][i] = T(0);
                    }
            } else if (row_end) {  // this row tile is done: the WC warps of each row group summed in
                                   // wc order into S2 [BM][RK] (the A buffer), then written to gB_part[cs]
                T* S2_s = A_free;
#pragma unroll 1
                for (int w = 0; w < C::WC; ++w) {
                    __syncthreads();  // w = 0: phase 3's sums read; else: warp column w - 1 added
                    if (wc == w) {
#pragma unroll
                        for (int kb = 0; kb < C::KB; ++kb)
#pragma unroll
                            for (int i = 0; i < Op::C_REGS; ++i) {
                                const warp::RowCol rc = F::c(lane, i);  // (row, rank)
                                T& dst = S2_s[(prow + rc.row) * RK + 8 * kb + rc.col];
                                dst = w == 0 ? accB[kb][i] : dst + accB[kb][i];
                                accB[kb][i] = T(0);
                            }
                    }
                }
                __syncthreads();
                for (int e = tid; e < BM * RK / 4; e += NT) {
                    const int row = e / (RK / 4), k = (e % (RK / 4)) * 4;
                    st4(gB_part + ((long long)cs * m_ld + row0 + row) * RK + k, ld4(S2_s + row * RK + k));
                }
            }
        }
    }

    __syncthreads();  // the work area is free
    store_scal_part(red, loss_acc, gsq_acc, B, A, (long long)m * r, (long long)r * n, scal_part);
}

}  // namespace lorakern
