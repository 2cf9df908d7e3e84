// MXFP4 decoding shared by the MoE kernels; kernels.py passes this file as mx.fast.metal_kernel's `header`
// (MLX has already put `using namespace metal;` and its bfloat16_t / float16_t typedefs in front of it).
//
// Weight layout (MLX mode="mxfp4", byte-identical to the gpt-oss checkpoint's *_blocks / *_scales):
//   w      uint32 [E, rows, cols / 8]   eight 4-bit E2M1 codes per word, the lowest nibble is the first value
//   scales uint8  [E, rows, cols / 32]  one E8M0 exponent per block of 32 values: scale = 2^(s - 127)
// Each kernel lane reads one whole block per step: one 16-byte load of 32 codes and one scale byte. The load
// is a packed_uint4, which needs only the 4-byte alignment every uint32 array has (a uint4 would need 16).

constant constexpr int SIMD_WIDTH = 32;
constant constexpr int MXFP4_BLOCK = 32;                          // values per E8M0 scale = values per lane-step
constant constexpr int CODES_PER_WORD = 8;                        // 4-bit codes per uint32
constant constexpr int WORDS_PER_BLOCK = MXFP4_BLOCK / CODES_PER_WORD;
constant constexpr int K_PER_STEP = SIMD_WIDTH * MXFP4_BLOCK;     // inputs a simdgroup consumes per step
// An E2M1 code placed in a half's bits (sign -> bit 15, exponent and mantissa -> bits 11..9) is the code's
// value times 2^-14 exactly (exponent bias 15 vs 1; code 1 lands on the subnormal 2^-15 = 0.5 * 2^-14).
constant constexpr float E2M1_IN_HALF_SCALE = 16384.0f;           // 2^14: undoes that, once per block
constant constexpr uint FLOAT_MANTISSA_BITS = 23u;
constant constexpr uint FLOAT_2_POW_MINUS_127 = 0x00400000u;      // the subnormal MLX gives scale byte 0

// Codes 2p and 2p+4... of one word as half2s, bit-parallel: (word >> 4p) holds code p in bits 0..3 and code
// p + 4 in bits 16..19, so one mask-and-shift moves both into half positions. Four of these decode a word.
inline half2 e2m1x2_low(uint w) {   // codes 0 and 4
    return as_type<half2>(((w & 0x00070007u) << 9) | ((w & 0x00080008u) << 12));
}
inline half2 e2m1x2_1(uint w) {     // codes 1 and 5
    return as_type<half2>(((w & 0x00700070u) << 5) | ((w & 0x00800080u) << 8));
}
inline half2 e2m1x2_2(uint w) {     // codes 2 and 6
    return as_type<half2>(((w & 0x07000700u) << 1) | ((w & 0x08000800u) << 4));
}
inline half2 e2m1x2_high(uint w) {  // codes 3 and 7: the sign bits already sit at 15 and 31
    return as_type<half2>(((w & 0x70007000u) >> 3) | (w & 0x80008000u));
}

// E8M0 byte -> 2^(s - 127) as MLX decodes it: the byte in a float's exponent field (255 -> inf), except
// that 0 is 2^-127 (a subnormal), not 0.
inline float e8m0_to_float(uint s) {
    return s == 0u ? as_type<float>(FLOAT_2_POW_MINUS_127) : as_type<float>(s << FLOAT_MANTISSA_BITS);
}

// x[0..31] . (the 32 codes of q) * 2^-14, accumulated in float32 (x in registers, code c of word w at x[8w+c]).
inline float dot_block(thread const float* x, packed_uint4 q) {
    float acc = 0.0f;
#pragma unroll
    for (int w = 0; w < WORDS_PER_BLOCK; ++w) {
        const uint word = q[w];
        thread const float* xw = x + w * CODES_PER_WORD;
        const float2 c04 = float2(e2m1x2_low(word));
        const float2 c15 = float2(e2m1x2_1(word));
        const float2 c26 = float2(e2m1x2_2(word));
        const float2 c37 = float2(e2m1x2_high(word));
        acc = fma(xw[0], c04.x, acc);
        acc = fma(xw[4], c04.y, acc);
        acc = fma(xw[1], c15.x, acc);
        acc = fma(xw[5], c15.y, acc);
        acc = fma(xw[2], c26.x, acc);
        acc = fma(xw[6], c26.y, acc);
        acc = fma(xw[3], c37.x, acc);
        acc = fma(xw[7], c37.y, acc);
    }
    return acc;
}

// One block's 32 codes: one 16-byte load (packed: 4-byte alignment suffices).
inline packed_uint4 load_block(const device uint32_t* words) {
    return *((const device packed_uint4*)words);
}

// One block's contribution x . (codes * scale): the block sum times 2^14, then times the E8M0 scale (two
// products, not one folded 2^(s - 113): that overflows for s >= 241, where MLX's values are finite).
inline float scaled_dot(thread const float* x, packed_uint4 q, uint scale) {
    return dot_block(x, q) * E2M1_IN_HALF_SCALE * e8m0_to_float(scale);
}

// A lane's block b of ROWS weight rows (row r at w_rows + r * words_per_row, its scale s_rows[r * blocks_per_row]),
// into registers before any math, so that every load is in flight at once. A full tile (all but a matrix's
// last) loads unguarded; a partial one loads its n_rows rows and zeros for the others (never read past the end).
template <int ROWS>
inline void load_rows(thread packed_uint4* q, thread uint* s, const device uint32_t* w_rows,
                      const device uint8_t* s_rows, int words_per_row, int blocks_per_row, int b, int n_rows) {
    if (n_rows == ROWS) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            q[r] = load_block(w_rows + r * words_per_row + b * WORDS_PER_BLOCK);
            s[r] = s_rows[r * blocks_per_row + b];
        }
    } else {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            q[r] = r < n_rows ? load_block(w_rows + r * words_per_row + b * WORDS_PER_BLOCK) : packed_uint4(uint4(0u));
            s[r] = r < n_rows ? uint(s_rows[r * blocks_per_row + b]) : 0u;
        }
    }
}

// Which pairs (token, expert slot) one simdgroup computes, so that pairs sharing an expert read its weights
// once. Pair p's expert e = ids[p]; the pairs with expert e, in order, form groups of up to GROUP. The first
// of each group (the leader) returns the group's pairs in member[] and their count; every other pair returns
// 0 (its leader computes it). With GROUP == 1 each pair is its own leader. ids holds n_pairs pairs; the scan
// is short because the wrapper shares only for decode's few tokens.
template <int GROUP, typename IdPtr>
inline int group_members(thread uint* member, IdPtr ids, uint p, int n_pairs) {
    member[0] = p;
    if (GROUP == 1) {
        return 1;
    }
    const uint e = ids[p];
    int before = 0;
    for (int q = 0; q < int(p); ++q) {
        before += ids[q] == e ? 1 : 0;
    }
    if (before % GROUP != 0) {
        return 0;
    }
    int n = 1;
    for (int q = int(p) + 1; q < n_pairs && n < GROUP; ++q) {
        if (ids[q] == e) {
            member[n++] = uint(q);
        }
    }
    return n;
}
