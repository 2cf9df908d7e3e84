// MXFP4 decoding shared by the MoE kernels; kernels.py passes this file as mx.fast.metal_kernel's `header`
// (MLX has already put `using namespace metal;` and its bfloat16_t / float16_t typedefs in front of it).
//
// Weight layout (MLX mode="mxfp4", byte-identical to the gpt-oss checkpoint's *_blocks / *_scales):
//   w      uint32 [E, rows, cols / 8]   eight 4-bit E2M1 codes per word, the lowest nibble is the first value
//   scales uint8  [E, rows, cols / 32]  one E8M0 exponent per block of 32 values: scale = 2^(s - 127)
// Each kernel lane reads half a block per step: one 8-byte uint2 load = 16 codes, one scale byte.

constant constexpr int SIMD_WIDTH = 32;
constant constexpr int MXFP4_BLOCK = 32;                            // values per E8M0 scale
constant constexpr int BITS_PER_CODE = 4;
constant constexpr int CODES_PER_WORD = 32 / BITS_PER_CODE;         // 8 per uint32
constant constexpr int VALUES_PER_LANE = 16;                        // one uint2 per lane per step
constant constexpr int WORDS_PER_LANE = VALUES_PER_LANE / CODES_PER_WORD;
constant constexpr int K_PER_STEP = SIMD_WIDTH * VALUES_PER_LANE;   // inputs a simdgroup consumes per step
constant constexpr uint CODE_MASK = (1u << BITS_PER_CODE) - 1u;
constant constexpr uint E2M1_SIGN = 8u;
constant constexpr uint E2M1_MAGNITUDE = 7u;
constant constexpr uint FLOAT_MANTISSA_BITS = 23u;
constant constexpr uint FLOAT_EXPONENT_BIAS = 127u;
constant constexpr uint E2M1_EXPONENT_BIAS = 1u;

// E2M1 code -> float without a table (a divergent table index would serialize): magnitudes
// 0, 0.5 (subnormals: m * 0.5) and 1, 1.5, 2, 3, 4, 6 (exponent m >> 1, mantissa bit m & 1).
inline float e2m1_to_float(uint code) {
    uint m = code & E2M1_MAGNITUDE;
    float magnitude = m < 2u ? 0.5f * float(m)
        : as_type<float>(((m >> 1) + FLOAT_EXPONENT_BIAS - E2M1_EXPONENT_BIAS) << FLOAT_MANTISSA_BITS
                         | (m & 1u) << (FLOAT_MANTISSA_BITS - 1u));
    return (code & E2M1_SIGN) ? -magnitude : magnitude;
}

// E8M0 exponent byte -> 2^(s - 127) by placing it in a float's exponent field (s = 0, 2^-127, becomes 0:
// a subnormal that Metal flushes anyway).
inline float e8m0_to_float(uint s) {
    return as_type<float>(s << FLOAT_MANTISSA_BITS);
}

// Sum of xs[v] * code v of the VALUES_PER_LANE codes packed in q (word 0 first, low nibble first).
inline float dot_codes(thread const float* xs, uint2 q) {
    float acc = 0.0f;
    for (int v = 0; v < CODES_PER_WORD; ++v) {
        acc += xs[v] * e2m1_to_float((q.x >> (BITS_PER_CODE * v)) & CODE_MASK);
        acc += xs[CODES_PER_WORD + v] * e2m1_to_float((q.y >> (BITS_PER_CODE * v)) & CODE_MASK);
    }
    return acc;
}
