// gpt-oss MoE decode, launch 2 of 2: MXFP4 down matvec + bias + router-weighted sum over the k experts.
//   out[t, n] = sum_j weights[t, j] * (W_e[n] . h[t, j] + b_e[n]),  e = ids[t, j]
// Data: h [T, k, I] of T; w uint32 [E, H, I/8], scales uint8 [E, H, I/32] (mxfp4.h); bias [E, H] of T;
//   ids uint32 [T, k]; weights float [T, k]; out [T, H] of T. I must be a multiple of 32.
// Threads: grid (32 * SIMDS, ceil(H / (SIMDS * ROWS)), T), threadgroup (32 * SIMDS, 1, 1).
//   threadgroup z = one token; simdgroup s of threadgroup y owns ROWS consecutive output features. Each lane
//   accumulates weights[t, j] * (its partial dot) over j = 0..k-1 in that fixed order, then one simd_sum per
//   row reduces the lanes and lane r adds sum_j weights[t, j] * b_e[n] (again in j order) and stores.
//   No atomics and no order that depends on scheduling: the result is deterministic.
const int I = h_shape[2];
const int H = bias_shape[1];
const int k = ids_shape[1];
const uint t = threadgroup_position_in_grid.z;
const uint lane = thread_index_in_simdgroup;
const int n0 = (int(threadgroup_position_in_grid.y) * SIMDS + int(simdgroup_index_in_threadgroup)) * ROWS;
const int n_rows = min(ROWS, H - n0);  // the same for every lane of the simdgroup
if (n_rows <= 0) {
    return;  // the whole simdgroup is past the last feature: no collective is skipped by part of it
}
const int words_per_row = I / CODES_PER_WORD;
const int blocks_per_row = I / MXFP4_BLOCK;

float acc[ROWS];
for (int r = 0; r < ROWS; ++r) {
    acc[r] = 0.0f;
}
for (int j = 0; j < k; ++j) {
    const uint e = ids[t * uint(k) + uint(j)];
    const float weight = weights[t * uint(k) + uint(j)];
    const size_t row0 = size_t(e) * size_t(H) + size_t(n0);
    const device uint32_t* w_rows = w + row0 * size_t(words_per_row);
    const device uint8_t* s_rows = scales + row0 * size_t(blocks_per_row);
    const device T* h_tj = h + (size_t(t) * size_t(k) + size_t(j)) * size_t(I);
    for (int k0 = 0; k0 < I; k0 += K_PER_STEP) {
        const int kk = k0 + int(lane) * VALUES_PER_LANE;
        if (kk < I) {
            float xs[VALUES_PER_LANE];
            for (int v = 0; v < VALUES_PER_LANE; ++v) {
                xs[v] = float(h_tj[kk + v]);
            }
            for (int r = 0; r < ROWS; ++r) {  // constant trip count: acc stays in registers
                if (r < n_rows) {
                    const uint2 q = *((const device uint2*)(w_rows + r * words_per_row + kk / CODES_PER_WORD));
                    acc[r] += weight * e8m0_to_float(s_rows[r * blocks_per_row + kk / MXFP4_BLOCK])
                        * dot_codes(xs, q);
                }
            }
        }
    }
}
for (int r = 0; r < ROWS; ++r) {
    acc[r] = simd_sum(acc[r]);
}
// Lane r takes row r by a constant-index select (a dynamic index would push acc out of registers).
float sum = 0.0f;
for (int r = 0; r < ROWS; ++r) {
    if (int(lane) == r) {
        sum = acc[r];
    }
}
if (int(lane) < n_rows) {
    float b = 0.0f;
    for (int j = 0; j < k; ++j) {
        const uint e = ids[t * uint(k) + uint(j)];
        b += weights[t * uint(k) + uint(j)] * float(bias[size_t(e) * size_t(H) + size_t(n0) + lane]);
    }
    out[size_t(t) * size_t(H) + size_t(n0) + lane] = T(sum + b);
}
