// gpt-oss MoE decode, launch 2 of 2: MXFP4 down matvec + bias + router-weighted sum over the K experts.
//   out[t, n] = sum_j weights[t, j] * (W_e[n] . h[t, j] + b_e[n]),  e = ids[t, j],  j = 0, 1, ..., K-1 in order
// Data: h [T, K, I] of T; w uint32 [E, H, I/8], scales uint8 [E, H, I/32] (mxfp4.h); bias [E, H] of T;
//   ids uint32 [T, K] and router weights [T, K] of T (at T = 1 under 8 elements: MLX passes them in `constant`
//   memory, at T >= 2 `device`; the body reads both the same way); out [T, H] of T. I must be a multiple of 32.
//   An expert id >= E gives NaN outputs, never a bad read.
// Threads: grid (32 * K * TOKENS, ceil(H / ROWS), T / TOKENS), threadgroup (32 * K * TOKENS, 1, 1), where
//   TOKENS = T with SHARE (T = 2..4), else 1. Threadgroup (y, z) = ROWS consecutive output features of TOKENS
//   tokens; its simdgroup p computes pair p (token p / K, expert slot p % K): per step lane l takes MXFP4
//   block l, loads that block of all ROWS rows (a full tile issues every load before the math, mxfp4.h) and
//   dots it with its 32 inputs; a simd_sum per row reduces the lanes, and lane r < ROWS writes
//   weights[t, j] * (dot + bias) to threadgroup memory. After one barrier, simdgroup tK's lane r adds token
//   t's K partials of row r in the order j = 0..K-1 and stores. No atomics and no scheduling-dependent order:
//   the result is deterministic.
// SHARE: pairs with the same expert are computed by one simdgroup, up to GROUP of them (mxfp4.h
//   group_members): each weight block is loaded once and dotted with each member's inputs; the others idle
//   until the barrier. Each pair's sums run in the same order either way: SHARE never changes a bit.
// Tiles for gpt-oss (H = I = 2880, K = 4): ROWS = 8 -> each h value loaded feeds 8 rows; 360 threadgroups of
//   4 simdgroups per token at T = 1; I = 2880 is 90 blocks, 3 steps of 32 lanes.
constexpr int MEMBERS = SHARE ? GROUP : 1;
constexpr int MAX_PAIRS = SHARE ? SHARE_TOKENS * K : K;  // pairs per threadgroup, at most
const int I = h_shape[2];
const int E = bias_shape[0];
const int H = bias_shape[1];
const int n_pairs = SHARE ? ids_shape[0] * K : K;  // pairs in this threadgroup
const uint first = threadgroup_position_in_grid.z * uint(n_pairs);  // its first pair
const uint p = simdgroup_index_in_threadgroup;  // this simdgroup's pair, within the threadgroup
const uint lane = thread_index_in_simdgroup;
const int n0 = int(threadgroup_position_in_grid.y) * ROWS;
const int n_rows = min(ROWS, H - n0);  // >= 1 (the grid has ceil(H / ROWS) rows) and the same for the threadgroup
const uint e = ids[first + p];
const int words_per_row = I / CODES_PER_WORD;
const int blocks_per_row = I / MXFP4_BLOCK;

threadgroup float partial[MAX_PAIRS][ROWS];
uint member[MEMBERS];  // pairs within the threadgroup
const int n_members = group_members<MEMBERS>(member, ids + first, p, n_pairs);
float acc[MEMBERS][ROWS];
#pragma unroll
for (int m = 0; m < MEMBERS; ++m) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        acc[m][r] = 0.0f;
    }
}
if (n_members > 0 && e < uint(E)) {  // uniform over the simdgroup
    const size_t row0 = size_t(e) * size_t(H) + size_t(n0);
    const device uint32_t* w_rows = w + row0 * size_t(words_per_row);
    const device uint8_t* s_rows = scales + row0 * size_t(blocks_per_row);
    for (int b = int(lane); b < blocks_per_row; b += SIMD_WIDTH) {
        packed_uint4 q[ROWS];
        uint s[ROWS];
        load_rows<ROWS>(q, s, w_rows, s_rows, words_per_row, blocks_per_row, b, n_rows);
#pragma unroll
        for (int m = 0; m < MEMBERS; ++m) {
            if (m < n_members) {  // uniform over the simdgroup
                const device T* h_m = h + size_t(first + member[m]) * size_t(I) + size_t(b * MXFP4_BLOCK);
                float xs[MXFP4_BLOCK];
#pragma unroll
                for (int v = 0; v < MXFP4_BLOCK; ++v) {
                    xs[v] = float(h_m[v]);
                }
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    acc[m][r] += scaled_dot(xs, q[r], s[r]);
                }
            }
        }
    }
}
#pragma unroll
for (int m = 0; m < MEMBERS; ++m) {
    if (m < n_members) {  // uniform over the simdgroup: every lane reaches the simd_sums
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            acc[m][r] = simd_sum(acc[m][r]);
        }
        // Lane r takes row r by a constant-index select (a dynamic index would push acc out of registers).
        float row_dot = 0.0f;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (int(lane) == r) {
                row_dot = acc[m][r];
            }
        }
        if (int(lane) < n_rows) {
            const float weight = float(weights[first + member[m]]);
            partial[member[m]][lane] = e < uint(E)
                ? weight * (row_dot + float(bias[size_t(e) * size_t(H) + size_t(n0) + lane])) : NAN;
        }
    }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (p % uint(K) == 0u && int(lane) < n_rows) {
    float sum = partial[p][lane];
    for (int j = 1; j < K; ++j) {
        sum += partial[p + uint(j)][lane];
    }
    out[size_t((first + p) / uint(K)) * size_t(H) + size_t(n0) + lane] = T(sum);
}
