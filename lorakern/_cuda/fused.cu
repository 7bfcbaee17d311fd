// lorakern CUDA kernels: one fused pass over the data per step of LoRA gradient descent.
//
// The launcher (launch.py) prepends the loss's device function
//     template <typename T> void loss_pointwise(T t, T y, double delta, double* value, double* grad)
// (lorakern/losses.py, Loss.cuda_source) to this file, so adding a loss edits no kernel. It
// compiles the result with NVRTC (cupy.RawModule + name_expressions), after fused_common.cuh
// (the helpers, copy wrappers and partials this file shares with fused_mma.cu): no #include.
//
// One step at V_t = (B, A), with t = R + BA (residual losses, R = W0 - Y) or t = W0 + BA (labels):
//
//   fused_pass    one read of the data. Each block owns a super-tile of rpb x cpb tiles of
//                 BM x BN entries and walks it row tile by row tile, column tiles inner:
//                   copies    the next tile's R (or W0, Y), A tile and, at a new row tile, B tile
//                             go to shared memory by cp.async while this tile is worked on
//                             (double buffers); the mask goes to registers, one tile ahead
//                   phase 1   t = R + B[rows,:] A[:,cols]   256 threads, TM1 rows x 4 columns each
//                   pointwise value, G = loss'(t), zero off the mask and outside m x n;
//                             loss and ||G||^2 accumulated in float64 per thread         (eq. 7)
//                   phase 2   grad_B[rows,:] += G A[:,cols]^T   register accumulators that live
//                             for a whole row of column tiles; split over columns
//                   phase 3   grad_A[:,cols]  = B[rows,:]^T G   per tile, split over rows
//                 G goes to shared memory once so that phases 2 and 3 read it with their own
//                 thread layouts (register-blocked: 32 accumulators per thread for float).
//                 One block per multiprocessor (registers uncapped: 140-250, no spills): the
//                 copies, not other blocks, hide the memory latency.
//                 Partials: gB_part[column super-tile][m_ld][RK]  (written once per row tile)
//                           gA_part[row super-tile][RK][n_ld]     (the block's own slice,
//                                                                  read-add-written per tile)
//                           scal_part[block] = (loss, ||G||^2, a share of ||V||^2)
//   tail          every block: eta_t (Lemma 2, eq. 8) from the pass's per-block sums; then
//                 grad_B, grad_A = the partials summed in slice order, B - eta grad_B and
//                 A - eta grad_A (rounded as NumPy does), per block ||grad J||^2 in float64;
//                 block 0 writes the step's row (loss, ||G||^2, ||V||^2, eta_t)
//   finish        one block: the row's ||grad J||^2 (the on-device loop: the next tail does it)
//   update        B - eta grad_B, A - eta grad_A alone, for gradients made elsewhere
//
// Determinism: no atomics. Every sum runs in an order fixed by the shapes and the launch
// configuration: per thread in loop order, across threads through shared memory in split
// order, across blocks in slice / block order. The same inputs give the same bits every run.
//
// The rank is padded to RK (a template bound): columns k >= r of B and rows k >= r of A are
// loaded as zeros, add nothing to t and receive gradients that are never read back.

namespace lorakern {

// ---- the fused pass: configuration --------------------------------------------------------
// Everything is derived from (T, RK, BM, BN); launch.py mirrors SMEM_BYTES in smem_bytes().
template <typename T, int RK, int BM, int BN, bool LABELS, bool GRAD>
struct Fused {
    // phase 1: thread (ty, tx) owns rows ty + i*TY1 (i < TM1) and columns 4tx .. 4tx+3
    static constexpr int TX1 = BN / 4;
    static constexpr int TY1 = NT / TX1;
    static constexpr int TM1 = BM / TY1;
    // register accumulators per thread in phases 2 and 3 (fewer for double: same registers)
    static constexpr int ACC0 = sizeof(T) == 4 ? 32 : 16;
    // phase 2: grad_B tile BM x RK. Thread: RT2 rows (rg + i*NRG2) x KT2 ranks (kg*KT2 + j),
    // summing over CS2 columns of split s; S2 splits cover the BN columns.
    static constexpr int ACC2 = cmax(ACC0, BM * RK / NT);
    static constexpr int KT2 = cmin(RK, 8);
    static constexpr int RT2 = cmin(ACC2 / KT2, BM);
    static constexpr int NKG2 = RK / KT2;
    static constexpr int NRG2 = BM / RT2;
    static constexpr int TPS2 = NKG2 * NRG2;
    static constexpr int S2 = cmin(NT / TPS2, BN / 4);
    static constexpr int CS2 = BN / S2;
    // phase 3: grad_A tile RK x BN. Thread: KT3 ranks (kg*KT3 + kk) x CP3 packs of 4 columns
    // ((cg + p*NCG3) * 4), summing over RS3 rows of split s; S3 splits cover the BM rows.
    static constexpr int ACC3 = cmax(ACC0, RK * BN / NT);
    static constexpr int KT3 = cmin(RK, ACC3 / 4);
    static constexpr int CP3 = ACC3 / KT3 / 4;
    static constexpr int NCG3 = BN / 4 / CP3;
    static constexpr int NKG3 = RK / KT3;
    static constexpr int TPS3 = NKG3 * NCG3;
    static constexpr int S3 = cmin(NT / TPS3, BM);
    static constexpr int RS3 = BM / S3;
    // packs of 4 outputs of the grad_A tile per thread when the splits are summed; at small
    // ranks the block's previous partial is fetched at the start of the tile (an L2 round trip
    // hidden behind phases 1-3), at large ranks the tile's work hides less of it anyway
    static constexpr int OP3 = (RK * BN / 4 + NT - 1) / NT;
    static constexpr bool PREFETCH_GA = OP3 <= 2;
    // shared memory, every tile double-buffered so that the next tile's copies (cp.async)
    // overlap this tile's work: A tiles [2][RK][LDA], B tiles [2][BM][LDB], data tiles
    // X (R or W0) and, for labels, Y [2][BM][LDX]; and a work area W: the G tile [BM][LDG],
    // aliased with the split-reduction scratch and the final block reduction.
    // Rows padded by 4 elements keep the 16-byte accesses of phases 1-3 free of bank conflicts.
    // B is double-buffered where it is small; at large ranks its one buffer is reloaded at the
    // start of each row tile (latency exposed once per row tile: cpb tiles).
    static constexpr int LDA = BN + 4, LDB = RK + 4, LDX = BN + 4, LDG = BN + 4;
    static constexpr int B_BUF = sizeof(T) * RK <= 256 ? 2 : 1;
    static constexpr long long A_BYTES = round128(2LL * RK * LDA * sizeof(T));
    static constexpr long long B_BYTES = round128((long long)B_BUF * BM * LDB * sizeof(T));
    static constexpr long long X_BYTES = round128(2LL * BM * LDX * sizeof(T));
    static constexpr long long Y_BYTES = LABELS ? X_BYTES : 0;
    static constexpr long long SCRATCH = (long long)cmax(S2 * BM * RK, S3 * RK * BN) * sizeof(T);
    static constexpr long long G_BYTES = (long long)BM * LDG * sizeof(T);
    static constexpr long long RED_BYTES = 2LL * NT * sizeof(double);
    static constexpr long long W_BYTES =
        round128(GRAD ? (G_BYTES > SCRATCH ? (G_BYTES > RED_BYTES ? G_BYTES : RED_BYTES)
                                           : (SCRATCH > RED_BYTES ? SCRATCH : RED_BYTES))
                      : RED_BYTES);
    static constexpr long long SMEM_BYTES = A_BYTES + B_BYTES + X_BYTES + Y_BYTES + W_BYTES;

    static_assert(RK % 4 == 0 && BM % 4 == 0 && BN % 4 == 0, "RK, BM, BN must be multiples of 4");
    static_assert(NT % TX1 == 0 && TY1 * TM1 == BM && TM1 >= 1, "phase-1 layout");
    static_assert(RK % KT2 == 0 && BM % RT2 == 0 && TPS2 <= NT && S2 >= 1 && BN % S2 == 0 && CS2 % 4 == 0,
                  "phase-2 layout");
    static_assert(KT3 % 4 == 0 && RK % KT3 == 0 && ACC3 % (4 * KT3) == 0 && (BN / 4) % CP3 == 0 &&
                      TPS3 <= NT && S3 >= 1 && BM % S3 == 0,
                  "phase-3 layout");
};

// ---- the fused pass -----------------------------------------------------------------------
// X: R (m x n) or, with LABELS, W0 and Y (labels). M: the mask (uint8, m x n) if MASKED.
// B (m x r), A (r x n): the iterate, row-major. rpb x cpb tiles per block (super-tile).
// GRAD == false is the loss-only pass for line searches: phase 1 and the loss, nothing else.
template <typename T, int RK, int BM, int BN, bool LABELS, bool MASKED, bool GRAD>
__global__ void __launch_bounds__(NT, 1) fused_pass(
    const T* __restrict__ X, const T* __restrict__ Y, const unsigned char* __restrict__ M,
    const T* __restrict__ B, const T* __restrict__ A, int m, int n, int r, double delta, int rpb, int cpb,
    T* __restrict__ gB_part, T* __restrict__ gA_part, long long m_ld, long long n_ld,
    double* __restrict__ scal_part)
{
    using C = Fused<T, RK, BM, BN, LABELS, GRAD>;
    const PassSmem<T> sm = pass_smem<C, T>();
    T *A_s = sm.A, *B_s = sm.B, *X_s = sm.X, *Y_s = sm.Y;
    T* G_s = reinterpret_cast<T*>(sm.W);
    T* scratch = reinterpret_cast<T*>(sm.W);
    double* red = reinterpret_cast<double*>(sm.W);

    const int tid = threadIdx.x;
    const SuperTile st = super_tile<BM, BN>(m, n, rpb, cpb);
    const int rs = st.rs, cs = st.cs, rt0 = st.rt0, ct0 = st.ct0, nct = st.nct, ntiles = st.ntiles;

    constexpr int V = 16 / sizeof(T);  // elements per 16-byte copy
    const bool vec_x = n % V == 0 && aligned(X, 16) && (!LABELS || aligned(Y, 16));
    const bool vec_m = MASKED && n % 4 == 0 && aligned(M, 4);
    const bool vec_a = n % V == 0 && aligned(A, 16);
    const bool vec_b = r % V == 0 && aligned(B, 16);

    const int tx = tid % C::TX1, ty = tid / C::TX1;

    double loss_acc = 0.0, gsq_acc = 0.0;
    T accB[C::RT2][C::KT2];  // phase 2, per row tile
#pragma unroll
    for (int i = 0; i < C::RT2; ++i)
#pragma unroll
        for (int j = 0; j < C::KT2; ++j) accB[i][j] = T(0);

    // tile `it` of this block: its copies into buffer (it & 1); B when it starts a row tile.
    // The mask goes to registers instead (4 bytes per thread and row: cp.async moves >= 4 bytes
    // and mask rows need not be 4-byte aligned), also one tile ahead.
    unsigned mk_next[C::TM1];
    auto issue_b = [&](int q) {
        tile_async<T, BM, RK>(B_s + (q % C::B_BUF) * BM * C::LDB, C::LDB, B, r, (rt0 + q) * BM, 0, m, r, vec_b);
    };
    auto issue = [&](int it) {
        const int q = it / nct, row0 = (rt0 + q) * BM, col0 = (ct0 + it % nct) * BN, buf = it & 1;
        if (it % nct == 0 && (C::B_BUF == 2 || it == 0)) issue_b(q);
        tile_async<T, RK, BN>(A_s + buf * RK * C::LDA, C::LDA, A, n, 0, col0, r, n, vec_a);
        tile_async<T, BM, BN>(X_s + buf * BM * C::LDX, C::LDX, X, n, row0, col0, m, n, vec_x);
        if (LABELS) tile_async<T, BM, BN>(Y_s + buf * BM * C::LDX, C::LDX, Y, n, row0, col0, m, n, vec_x);
        copy_async_commit();
        if (MASKED) {
#pragma unroll
            for (int i = 0; i < C::TM1; ++i) {
                const int row = row0 + ty + i * C::TY1, col = col0 + 4 * tx;
                const int valid = row < m ? cmax(0, cmin(4, n - col)) : 0;
                mk_next[i] = load_mask4(M + (valid > 0 ? (long long)row * n + col : 0), valid, vec_m);
            }
        }
    };
    issue(0);

    for (int it = 0; it < ntiles; ++it) {
        const int q = it / nct, rt = rt0 + q, ct = ct0 + it % nct;
        const bool row_end = it % nct == nct - 1;
        const int row0 = rt * BM, col0 = ct * BN;
        unsigned mk[C::TM1];
        int valid[C::TM1];
#pragma unroll
        for (int i = 0; i < C::TM1; ++i) {
            mk[i] = MASKED ? mk_next[i] : 0u;
            const int row = row0 + ty + i * C::TY1, col = col0 + 4 * tx;
            valid[i] = row < m ? cmax(0, cmin(4, n - col)) : 0;
        }

        copy_async_wait_all();
        __syncthreads();  // this tile's copies visible; every thread is done with the previous tile
        if (C::B_BUF == 1 && it % nct == 0 && it > 0) {  // the one B buffer is free only now
            issue_b(q);
            copy_async_commit();
            copy_async_wait_all();
            __syncthreads();
        }
        if (it + 1 < ntiles) issue(it + 1);  // into the buffers the previous tile used
        Pack4<T> gA_prev[C::PREFETCH_GA ? C::OP3 : 1];
        if (GRAD && C::PREFETCH_GA && rt != rt0) prefetch_gA<C, RK, BN>(gA_prev, gA_part, rs, n_ld, col0);
        const T* As = A_s + (it & 1) * RK * C::LDA;
        const T* Bs = B_s + (q % C::B_BUF) * BM * C::LDB;
        const T* Xs = X_s + (it & 1) * BM * C::LDX;
        const T* Ys = Y_s + (it & 1) * BM * C::LDX;

        T t[C::TM1][4];
#pragma unroll
        for (int i = 0; i < C::TM1; ++i) {
            const Pack4<T> x = ld4(Xs + (ty + i * C::TY1) * C::LDX + 4 * tx);
#pragma unroll
            for (int j = 0; j < 4; ++j) t[i][j] = x.v[j];
        }

        // ---- phase 1: t += B[rows, :] A[:, cols], 4 ranks at a time
#pragma unroll 1
        for (int k = 0; k < RK; k += 4) {
            Pack4<T> a[4];
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) a[kk] = ld4(As + (k + kk) * C::LDA + 4 * tx);
#pragma unroll
            for (int i = 0; i < C::TM1; ++i) {
                const Pack4<T> b = ld4(Bs + (ty + i * C::TY1) * C::LDB + k);
#pragma unroll
                for (int kk = 0; kk < 4; ++kk)
#pragma unroll
                    for (int j = 0; j < 4; ++j) t[i][j] = fma_rn(b.v[kk], a[kk].v[j], t[i][j]);
            }
        }

        // ---- pointwise: value and G = dL/dt; nothing off the mask or outside m x n
#pragma unroll
        for (int i = 0; i < C::TM1; ++i) {
            const Pack4<T> y = LABELS ? ld4(Ys + (ty + i * C::TY1) * C::LDX + 4 * tx) : Pack4<T>{};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const auto keep = [&] { return j < valid[i] && (!MASKED || ((mk[i] >> (8 * j)) & 0xffu) != 0); };
                t[i][j] = pointwise<T>(t[i][j], LABELS ? y.v[j] : t[i][j], delta, keep, loss_acc, gsq_acc);
            }
        }
        if constexpr (GRAD) {
#pragma unroll
            for (int i = 0; i < C::TM1; ++i) {
                Pack4<T> g;
#pragma unroll
                for (int j = 0; j < 4; ++j) g.v[j] = t[i][j];
                st4(G_s + (ty + i * C::TY1) * C::LDG + 4 * tx, g);
            }
            __syncthreads();

            // ---- phase 2: accB[rows, ranks] += sum over this split's columns of G A^T
            if (tid < C::S2 * C::TPS2) {
                const int s = tid / C::TPS2, w = tid % C::TPS2;
                const int kg = w % C::NKG2, rg = w / C::NKG2;
#pragma unroll 1
                for (int c = s * C::CS2; c < (s + 1) * C::CS2; c += 4) {
                    Pack4<T> g[C::RT2];
#pragma unroll
                    for (int i = 0; i < C::RT2; ++i) g[i] = ld4(G_s + (rg + i * C::NRG2) * C::LDG + c);
#pragma unroll
                    for (int j = 0; j < C::KT2; ++j) {
                        const Pack4<T> a = ld4(As + (kg * C::KT2 + j) * C::LDA + c);
#pragma unroll
                        for (int i = 0; i < C::RT2; ++i)
#pragma unroll
                            for (int q = 0; q < 4; ++q) accB[i][j] = fma_rn(g[i].v[q], a.v[q], accB[i][j]);
                    }
                }
            }

            // ---- phase 3: grad_A[ranks, cols] over this split's rows: B^T G
            T acc3[C::KT3][4 * C::CP3];
#pragma unroll
            for (int kk = 0; kk < C::KT3; ++kk)
#pragma unroll
                for (int c = 0; c < 4 * C::CP3; ++c) acc3[kk][c] = T(0);
            const int s3 = tid / C::TPS3, w3 = tid % C::TPS3;
            const int cg3 = w3 % C::NCG3, kg3 = w3 / C::NCG3;
            if (tid < C::S3 * C::TPS3) {
#pragma unroll 1
                for (int row = s3 * C::RS3; row < (s3 + 1) * C::RS3; ++row) {
                    Pack4<T> g[C::CP3];
#pragma unroll
                    for (int p = 0; p < C::CP3; ++p) g[p] = ld4(G_s + row * C::LDG + (cg3 + p * C::NCG3) * 4);
#pragma unroll
                    for (int h = 0; h < C::KT3 / 4; ++h) {
                        const Pack4<T> b = ld4(Bs + row * C::LDB + kg3 * C::KT3 + 4 * h);
#pragma unroll
                        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
                            for (int p = 0; p < C::CP3; ++p)
#pragma unroll
                                for (int j = 0; j < 4; ++j)
                                    acc3[4 * h + kk][4 * p + j] = fma_rn(b.v[kk], g[p].v[j], acc3[4 * h + kk][4 * p + j]);
                    }
                }
            }
            __syncthreads();  // G tile no longer read: the work area becomes the split scratch

            // phase-3 splits -> scratch[s][k][c], then summed in split order into the block's slice
            if (tid < C::S3 * C::TPS3) {
#pragma unroll
                for (int kk = 0; kk < C::KT3; ++kk)
#pragma unroll
                    for (int p = 0; p < C::CP3; ++p) {
                        Pack4<T> v;
#pragma unroll
                        for (int j = 0; j < 4; ++j) v.v[j] = acc3[kk][4 * p + j];
                        st4(scratch + ((long long)s3 * RK + kg3 * C::KT3 + kk) * BN + (cg3 + p * C::NCG3) * 4, v);
                    }
            }
            __syncthreads();
            flush_gA<C, RK, BN>(scratch, gA_part, rs, n_ld, col0, rt != rt0, gA_prev);

            if (row_end) {  // this row tile is done: phase-2 splits summed into gB_part[cs]
                __syncthreads();
                if (tid < C::S2 * C::TPS2) {
                    const int s = tid / C::TPS2, w = tid % C::TPS2;
                    const int kg = w % C::NKG2, rg = w / C::NKG2;
#pragma unroll
                    for (int i = 0; i < C::RT2; ++i)
#pragma unroll
                        for (int j = 0; j < C::KT2; j += 4) {
                            Pack4<T> v;
#pragma unroll
                            for (int q = 0; q < 4; ++q) v.v[q] = accB[i][j + q];
                            st4(scratch + ((long long)s * BM + rg + i * C::NRG2) * RK + kg * C::KT2 + j, v);
                        }
                }
                __syncthreads();
                for (int e = tid; e < BM * RK / 4; e += NT) {
                    const int row = e / (RK / 4), k = (e % (RK / 4)) * 4;
                    Pack4<T> sum = ld4(scratch + row * RK + k);
                    for (int s = 1; s < C::S2; ++s) {
                        const Pack4<T> v = ld4(scratch + ((long long)s * BM + row) * RK + k);
#pragma unroll
                        for (int j = 0; j < 4; ++j) sum.v[j] += v.v[j];
                    }
                    st4(gB_part + ((long long)cs * m_ld + row0 + row) * RK + k, sum);
                }
#pragma unroll
                for (int i = 0; i < C::RT2; ++i)
#pragma unroll
                    for (int j = 0; j < C::KT2; ++j) accB[i][j] = T(0);
            }
        }
    }

    __syncthreads();  // the work area is free
    store_scal_part(red, loss_acc, gsq_acc, B, A, (long long)m * r, (long long)r * n, scal_part);
}

// ---- the tail: partials -> gradients, eta_t and the update, in one kernel --------------------
// Every block first sums the pass's per-block numbers in the same fixed order (step_sums), so
// that every block holds the same bits of J(V_t), ||G_t||^2, ||V_t||^2 and hence of eta_t
//   eta_t = eta_fixed                                        if eta_fixed > 0 (a constant step)
//         = 1 / max(eta_scale (||V_t||^2 + ||G_t||), 1)      else; eta_scale = 5 sqrt(2) max(L, 1)
// which is min{1 / (5 sqrt(2) L (||V||^2 + ||G||)), 1} of Lemma 2 (eq. 8), with no 1/0 at
// V = G = 0. No block waits for another: the step is two kernels (the pass, this tail).
// Then, over a grid-stride share of the m r + r n entries:
//   grad_B[i, k] = sum_c gB_part[c, i, k] (c = 0 .. ncs-1 in order), grad_A likewise over the
//   nrs row slices; stored where grad_B / grad_A are given;
//   B_out = B - eta grad_B, A_out = A - eta grad_A where B_out is given (update's rounding);
//   with ok_in given, not once J(V_t) or an earlier J (*ok_in == 0) was not finite;
//   norm_part[block] = this block's share of ||grad J(V_t)||^2 in float64.
// ||grad J||^2 is the one number no block can finish: its row of `out` gets it from `finish`,
// or (the on-device loop) from block 0 of the next step's tail, which sums norm_prev, the
// previous step's norm_part. Block 0 writes the row (counter: row *counter, then ++*counter)
// and ok_out = (ok_in and J finite); ok_in and ok_out are two words (the loop alternates
// them), so no block reads what another writes in the same launch.
// gB_part == nullptr: the loss-only pass (no gradients; launch one block).
__device__ __forceinline__ void step_sums(double* red, const double* __restrict__ scal_part, int nmain,
                                          double& loss, double& gsq, double& vsq)
{
    double unused = 0.0;
    loss = gsq = vsq = 0.0;
    for (int b = threadIdx.x; b < nmain; b += NT) {
        loss += scal_part[3 * b];
        gsq += scal_part[3 * b + 1];
        vsq += scal_part[3 * b + 2];
    }
    block_sum2(red, loss, gsq);
    __syncthreads();
    block_sum2(red, vsq, unused);
    __syncthreads();  // red is free again
}

// sum of parts[0 .. count) in a fixed order (thread-strided, then block_sum2): ||grad J||^2
__device__ __forceinline__ double parts_sum(double* red, const double* __restrict__ parts, int count)
{
    double s = 0.0, unused = 0.0;
    for (int b = threadIdx.x; b < count; b += NT) s += parts[b];
    block_sum2(red, s, unused);
    __syncthreads();
    return s;
}

template <typename T>
__global__ void __launch_bounds__(NT) tail(
    const T* __restrict__ gB_part, const T* __restrict__ gA_part, int ncs, int nrs, int rk, long long m_ld,
    long long n_ld, int m, int n, int r, const T* __restrict__ B, const T* __restrict__ A,
    const double* __restrict__ scal_part, int nmain, double eta_scale, double eta_fixed,
    T* __restrict__ grad_B, T* __restrict__ grad_A, T* __restrict__ B_out, T* __restrict__ A_out,
    const int* __restrict__ ok_in, int* __restrict__ ok_out, double* __restrict__ norm_part,
    const double* __restrict__ norm_prev, int nred, double* __restrict__ out, int* __restrict__ counter)
{
    __shared__ double red[2 * NT];
    double loss, gsq, vsq;
    step_sums(red, scal_part, nmain, loss, gsq, vsq);
    double eta = eta_fixed;
    if (!(eta_fixed > 0.0)) {
        const double scale = eta_scale * (vsq + sqrt(gsq));
        eta = 1.0 / (scale > 1.0 ? scale : 1.0);
    }
    // without ok_in the update is always written (fused_step); with it, not once J is not finite
    const bool ok = ok_in == nullptr || (*ok_in != 0 && is_finite(loss));

    if (gB_part != nullptr) {
        const bool write = B_out != nullptr && ok;
        const T eta_t = (T)eta;
        const long long mr = (long long)m * r, total = mr + (long long)r * n;
        double grad_sq = 0.0, unused = 0.0;
        for (long long e = (long long)blockIdx.x * NT + threadIdx.x; e < total; e += (long long)gridDim.x * NT) {
            T s;
            if (e < mr) {
                const long long i = e / r;
                const int k = (int)(e - i * r);
                const T* p = gB_part + i * rk + k;
                s = p[0];
                for (int c = 1; c < ncs; ++c) s += p[c * m_ld * rk];
                if (grad_B != nullptr) grad_B[e] = s;
                if (write) B_out[e] = sub_rn(B[e], mul_rn(eta_t, s));
            } else {
                const long long e2 = e - mr;
                const int k = (int)(e2 / n);
                const long long j = e2 - (long long)k * n;
                const T* p = gA_part + k * n_ld + j;
                s = p[0];
                for (int c = 1; c < nrs; ++c) s += p[c * rk * n_ld];
                if (grad_A != nullptr) grad_A[e2] = s;
                if (write) A_out[e2] = sub_rn(A[e2], mul_rn(eta_t, s));
            }
            grad_sq += (double)s * (double)s;
        }
        block_sum2(red, grad_sq, unused);
        __syncthreads();
        if (threadIdx.x == 0) norm_part[blockIdx.x] = grad_sq;
    }

    if (blockIdx.x == 0) {
        const int step = counter != nullptr ? *counter : 0;
        const bool finish_prev = norm_prev != nullptr && step > 0;
        const double prev = finish_prev ? parts_sum(red, norm_prev, nred) : 0.0;
        __syncthreads();  // every thread has read *counter before thread 0 advances it
        if (threadIdx.x == 0) {
            double* o = out + 5LL * step;
            o[0] = loss;
            o[1] = gsq;
            o[2] = 0.0;  // ||grad J(V_t)||^2: from finish, or from the next step's tail
            o[3] = vsq;
            o[4] = eta;
            if (finish_prev) out[5LL * (step - 1) + 2] = prev;
            if (counter != nullptr) *counter = step + 1;
            if (ok_out != nullptr) *ok_out = ok ? 1 : 0;
        }
    }
}

// ---- the last row's ||grad J||^2, one block ---------------------------------------------------
// out[5 row + 2] = the sum of norm_part[0 .. nred) (the tail's shares, in parts_sum's order), for
// row = *counter - 1 (the row the tail just wrote), or row 0 without a counter.
__global__ void __launch_bounds__(NT) finish(const double* __restrict__ norm_part, int nred,
                                             double* __restrict__ out, const int* __restrict__ counter)
{
    __shared__ double red[2 * NT];
    const double s = parts_sum(red, norm_part, nred);
    if (threadIdx.x == 0) out[5LL * (counter != nullptr ? *counter - 1 : 0) + 2] = s;
}

// ---- B - eta grad_B, A - eta grad_A ---------------------------------------------------------
// eta rounded to T first, then one rounded product and one rounded difference: the bits of
// NumPy's `B - T(eta) * grad_B`. eta from *eta_ptr when given (stays on the device), else
// eta_value. With ok given and *ok == 0 nothing is written.
template <typename T>
__global__ void __launch_bounds__(NT) update(
    const T* __restrict__ B, const T* __restrict__ A, const T* __restrict__ grad_B, const T* __restrict__ grad_A,
    long long mr, long long rn, const double* __restrict__ eta_ptr, double eta_value, const int* __restrict__ ok,
    T* __restrict__ B_out, T* __restrict__ A_out)
{
    if (ok != nullptr && *ok == 0) return;
    const T eta = (T)(eta_ptr != nullptr ? *eta_ptr : eta_value);
    for (long long e = (long long)blockIdx.x * NT + threadIdx.x; e < mr + rn; e += (long long)gridDim.x * NT) {
        if (e < mr)
            B_out[e] = sub_rn(B[e], mul_rn(eta, grad_B[e]));
        else
            A_out[e - mr] = sub_rn(A[e - mr], mul_rn(eta, grad_A[e - mr]));
    }
}

// ---- the linear kind's pointwise (lorakern/_cuda/linear.py) ----------------------------------
// One row tile of the layer's outputs, count = rows x m entries: t = Z0 + PB (rounded to T, as
// the array expression Z0 + P B^T), Delta = loss'(t) rounded to T, and per block the float64 sums
// (loss values, Delta^2) in grid-stride then block_sum2 order: part[block] = (loss, ||Delta||^2).
// One read of Z0 and PB (and Y for label losses), one write of Delta: the sweep's elementwise
// work in one pass, where the array expressions make five or six. LABELS: y = Y (logistic);
// else the residual loss reads t itself. Not for cross-entropy (a softmax over each row).
template <typename T, bool LABELS>
__global__ void __launch_bounds__(NT) linear_pointwise(
    const T* __restrict__ Z0, const T* __restrict__ PB, const T* __restrict__ Y, long long count,
    double delta, T* __restrict__ Delta, double* __restrict__ part)
{
    __shared__ double red[2 * NT];
    double loss = 0.0, dsq = 0.0;
    for (long long e = (long long)blockIdx.x * NT + threadIdx.x; e < count; e += (long long)gridDim.x * NT) {
        const T t = Z0[e] + PB[e];
        double value, grad;
        loss_pointwise<T>(t, LABELS ? Y[e] : t, delta, &value, &grad);
        const T g = (T)grad;
        Delta[e] = g;
        loss += value;
        dsq += (double)g * (double)g;
    }
    block_sum2(red, loss, dsq);
    if (threadIdx.x == 0) {
        part[2 * blockIdx.x] = loss;
        part[2 * blockIdx.x + 1] = dsq;
    }
}

}  // namespace lorakern
