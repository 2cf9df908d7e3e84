// gpt-oss MoE decode, launch 2 of 2: MXFP4 down matvec + bias + router-weighted sum over the K experts.
//   out[t, n] = sum_j weights[t, j] * (W_e[n] . h[t, j] + b_e[n]),  e = ids[t, j],  j = 0, 1, ..., K-1 in order
// Data: h [T, K, I] of T; w uint32 [E, H, I/8], scales uint8 [E, H, I/32] (mxfp4.h); bias [E, H] of T;
//   ids uint32 [T, K] and router weights [T, K] of T (at T = 1 under 8 elements: MLX passes them in `constant`
//   memory, at T >= 2 `device`; the body reads both the same way); out [T, H] of T. I must be a multiple of 32.
//   An expert id >= E gives NaN outputs, never a bad read.
// Threads: grid (32 * K, ceil(H / ROWS), T), threadgroup (32 * K, 1, 1).
//   threadgroup (y, z) = ROWS consecutive output features of token z; its simdgroup j computes expert slot j:
//   per step lane l takes MXFP4 block l (32 inputs in registers, one 16-byte load and one scale byte per row),
//   a simd_sum per row reduces the lanes, and lane r < ROWS writes weights[t, j] * (dot + bias) to
//   threadgroup memory. After one barrier, simdgroup 0's lane r adds the K partials of row r in the order
//   j = 0..K-1 and stores. No atomics and no scheduling-dependent order: the result is deterministic.
//   A full tile (every tile but the last) issues its ROWS row loads before the math (mxfp4.h).
// Tiles for gpt-oss (H = I = 2880, K = 4): ROWS = 8 -> each h value loaded once feeds 8 rows; 360
//   threadgroups of 4 simdgroups per token, 1,440 simdgroups at T = 1; I = 2880 is 90 blocks, 3 steps of 32
//   lanes.
const int I = h_shape[2];
const int E = bias_shape[0];
const int H = bias_shape[1];
const uint t = threadgroup_position_in_grid.z;
const uint j = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int n0 = int(threadgroup_position_in_grid.y) * ROWS;
const int n_rows = min(ROWS, H - n0);  // >= 1 (the grid has ceil(H / ROWS) rows) and the same for the threadgroup
const uint e = ids[t * uint(K) + j];
const float weight = float(weights[t * uint(K) + j]);
const int words_per_row = I / CODES_PER_WORD;
const int blocks_per_row = I / MXFP4_BLOCK;

threadgroup float partial[K][ROWS];
float acc[ROWS];
#pragma unroll
for (int r = 0; r < ROWS; ++r) {
    acc[r] = 0.0f;
}
if (e < uint(E)) {  // uniform over the simdgroup: every lane reaches the simd_sums below either way
    const size_t row0 = size_t(e) * size_t(H) + size_t(n0);
    const device uint32_t* w_rows = w + row0 * size_t(words_per_row);
    const device uint8_t* s_rows = scales + row0 * size_t(blocks_per_row);
    const device T* h_tj = h + (size_t(t) * size_t(K) + size_t(j)) * size_t(I);
    for (int b = int(lane); b < blocks_per_row; b += SIMD_WIDTH) {
        float xs[MXFP4_BLOCK];
#pragma unroll
        for (int v = 0; v < MXFP4_BLOCK; ++v) {
            xs[v] = float(h_tj[b * MXFP4_BLOCK + v]);
        }
        rows_step<ROWS>(acc, xs, w_rows, s_rows, words_per_row, blocks_per_row, b, n_rows);
    }
}
#pragma unroll
for (int r = 0; r < ROWS; ++r) {
    acc[r] = simd_sum(acc[r]);
}
// Lane r takes row r by a constant-index select (a dynamic index would push acc out of registers).
float row_dot = 0.0f;
#pragma unroll
for (int r = 0; r < ROWS; ++r) {
    if (int(lane) == r) {
        row_dot = acc[r];
    }
}
if (int(lane) < n_rows) {
    partial[j][lane] = e < uint(E) ? weight * (row_dot + float(bias[size_t(e) * size_t(H) + size_t(n0) + lane])) : NAN;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (j == 0u && int(lane) < n_rows) {
    float sum = partial[0][lane];
    for (int s = 1; s < K; ++s) {
        sum += partial[s][lane];
    }
    out[size_t(t) * size_t(H) + size_t(n0) + lane] = T(sum);
}
