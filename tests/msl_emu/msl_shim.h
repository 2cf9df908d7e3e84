// MSL-on-CPU shim: just enough of the Metal Shading Language (and of MLX's utils.h, which MLX prepends
// to every custom kernel: `using namespace metal`, bfloat16_t, float16_t) for a kernel body to compile
// as C++14 (MSL's dialect) with g++ or clang. The scheduler lives in runtime.h; this file holds the types and builtins.
//
// Deliberate differences from Metal, all of them in the direction of catching more bugs:
// - simd collectives and threadgroup_barrier require EVERY launched thread of the simdgroup / threadgroup
//   to arrive at the same call site (Metal would silently reduce over the active lanes only).
// - threadgroup memory and outputs start as 0xFF bytes (NaN for floats), so reading unwritten data shows.
// - `half` is _Float16 where the compiler has it (g++ >= 12 on x86-64), else a struct rounding every value
//   to binary16 (clang < 15); `bfloat` is a struct; both compute in float and round on store.
#pragma once

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <sys/time.h>
#include <ucontext.h>
#include <unistd.h>

namespace emu {
// Sync points implemented in runtime.h. `site` names the call (its source line, EMU_SITE): all lanes must agree on it.
const unsigned char* simd_exchange(const void* value, int size, const void* site, unsigned* mask, int* lane);
void barrier(const void* site);
constexpr int kSimdWidth = 32;
constexpr int kSlotBytes = 64;  // largest value a simd collective can carry (a float4x4 would not fit)

// binary16 / bfloat16 stored as 16 bits, converted through float with round-to-nearest-even.
inline uint16_t float_to_bf16(float f) {
    uint32_t b; std::memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40);  // quiet NaN
    return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
inline float bf16_to_float(uint16_t h) { uint32_t b = uint32_t(h) << 16; float f; std::memcpy(&f, &b, 4); return f; }
inline uint16_t float_to_f16(float f) {
    uint32_t b; std::memcpy(&b, &f, 4);
    uint32_t sign = (b >> 16) & 0x8000u, mag = b & 0x7fffffffu;
    if (mag > 0x7f800000u) return uint16_t(sign | 0x7e00u);
    if (mag >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65536: inf
    if (mag < 0x38800000u) {  // subnormal half: add 0.5 so the FPU rounds to a multiple of 2^-24
        float a; std::memcpy(&a, &mag, 4);
        return uint16_t(sign | uint32_t(std::nearbyint(a * 16777216.0f)));
    }
    uint32_t r = mag + 0xfffu + ((mag >> 13) & 1u);
    return uint16_t(sign | ((r - 0x38000000u) >> 13));
}
inline float f16_to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, b;
    if (e == 0) { float f = std::ldexp(float(m), -24); return sign ? -f : f; }
    b = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    float f; std::memcpy(&f, &b, 4); return f;
}
template <uint16_t (*TO)(float), float (*FROM)(uint16_t)>
struct soft16 {
    uint16_t bits;
    soft16() = default;
    template <class U, class = std::enable_if_t<std::is_arithmetic<U>::value>>
    soft16(U v) : bits(TO(float(v))) {}
    operator float() const { return FROM(bits); }
    soft16& operator+=(float v) { return *this = float(*this) + v; }
    soft16& operator-=(float v) { return *this = float(*this) - v; }
    soft16& operator*=(float v) { return *this = float(*this) * v; }
    soft16& operator/=(float v) { return *this = float(*this) / v; }
    soft16 operator-() const { return soft16(-float(*this)); }
};
}  // namespace emu

typedef emu::soft16<emu::float_to_bf16, emu::bf16_to_float> bfloat;
#if defined(__FLT16_MANT_DIG__)
typedef _Float16 half;
#else
typedef emu::soft16<emu::float_to_f16, emu::f16_to_float> half;
#endif
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef bfloat bfloat16_t;  // MLX utils.h
typedef half float16_t;

// ---- vector types: vec<T, N> with .x .y .z .w / .r .g .b .a, [], and the common swizzles ----------------
namespace metal {
template <class T, int N> struct vec;
namespace detail {
template <class T, int N, int... I> struct swizzle {  // aliases the vector's storage inside its union
    T v[N];
    operator vec<T, int(sizeof...(I))>() const { return vec<T, int(sizeof...(I))>(v[I]...); }
    swizzle& operator=(const vec<T, int(sizeof...(I))>& o) {
        int k = 0; int unused[] = {(v[I] = o[k++], 0)...}; (void)unused; return *this; }
};
}  // namespace detail
#define EMU_SW2(T, N) detail::swizzle<T, N, 0, 1> xy; detail::swizzle<T, N, 1, 0> yx; detail::swizzle<T, N, 0, 0> xx; \
    detail::swizzle<T, N, 1, 1> yy;
template <class T> struct alignas(sizeof(T) * 2) vec<T, 2> {
    union { T v[2]; struct { T x, y; }; struct { T r, g; }; EMU_SW2(T, 2) };
    vec() = default;
    vec(T s) : v{s, s} {}
    // User-provided, so that copying from a pointer binds a reference the alignment sanitizer checks.
    vec(const vec& o) : v{o.v[0], o.v[1]} {}
    vec& operator=(const vec& o) { for (int i = 0; i < 2; ++i) v[i] = o.v[i]; return *this; }
    vec(T a, T b) : v{a, b} {}
    template <class U> explicit vec(const vec<U, 2>& o) : v{T(o[0]), T(o[1])} {}
    T& operator[](int i) { return v[i]; }
    const T& operator[](int i) const { return v[i]; }
};
template <class T> struct alignas(sizeof(T) * 4) vec<T, 3> {
    union { T v[3]; struct { T x, y, z; }; struct { T r, g, b; }; EMU_SW2(T, 3)
            detail::swizzle<T, 3, 1, 2> yz; detail::swizzle<T, 3, 0, 1, 2> xyz; detail::swizzle<T, 3, 2, 1, 0> zyx; };
    vec() = default;
    vec(T s) : v{s, s, s} {}
    // User-provided, so that copying from a pointer binds a reference the alignment sanitizer checks.
    vec(const vec& o) : v{o.v[0], o.v[1], o.v[2]} {}
    vec& operator=(const vec& o) { for (int i = 0; i < 3; ++i) v[i] = o.v[i]; return *this; }
    vec(T a, T b, T c) : v{a, b, c} {}
    vec(vec<T, 2> a, T c) : v{a[0], a[1], c} {}
    template <class U> explicit vec(const vec<U, 3>& o) : v{T(o[0]), T(o[1]), T(o[2])} {}
    T& operator[](int i) { return v[i]; }
    const T& operator[](int i) const { return v[i]; }
};
template <class T> struct alignas(sizeof(T) * 4) vec<T, 4> {
    union { T v[4]; struct { T x, y, z, w; }; struct { T r, g, b, a; }; EMU_SW2(T, 4)
            detail::swizzle<T, 4, 2, 3> zw; detail::swizzle<T, 4, 1, 2> yz; detail::swizzle<T, 4, 0, 1, 2> xyz;
            detail::swizzle<T, 4, 3, 2, 1, 0> wzyx; detail::swizzle<T, 4, 0, 1, 2, 3> xyzw; };
    vec() = default;
    vec(T s) : v{s, s, s, s} {}
    // User-provided, so that copying from a pointer binds a reference the alignment sanitizer checks.
    vec(const vec& o) : v{o.v[0], o.v[1], o.v[2], o.v[3]} {}
    vec& operator=(const vec& o) { for (int i = 0; i < 4; ++i) v[i] = o.v[i]; return *this; }
    vec(T a, T b, T c, T d) : v{a, b, c, d} {}
    vec(vec<T, 2> a, vec<T, 2> b) : v{a[0], a[1], b[0], b[1]} {}
    vec(vec<T, 3> a, T d) : v{a[0], a[1], a[2], d} {}
    template <class U> explicit vec(const vec<U, 4>& o) : v{T(o[0]), T(o[1]), T(o[2]), T(o[3])} {}
    T& operator[](int i) { return v[i]; }
    const T& operator[](int i) const { return v[i]; }
};
#undef EMU_SW2

#define EMU_VEC_OP(op)                                                                                       \
    template <class T, int N> vec<T, N> operator op(vec<T, N> a, const vec<T, N>& b) {                         \
        for (int i = 0; i < N; ++i) a[i] = a[i] op b[i]; return a; }                                           \
    template <class T, int N, class S, class = std::enable_if_t<std::is_arithmetic<S>::value>>                 \
    vec<T, N> operator op(vec<T, N> a, S s) { for (int i = 0; i < N; ++i) a[i] = a[i] op T(s); return a; }      \
    template <class T, int N, class S, class = std::enable_if_t<std::is_arithmetic<S>::value>>                 \
    vec<T, N> operator op(S s, vec<T, N> a) { for (int i = 0; i < N; ++i) a[i] = T(s) op a[i]; return a; }      \
    template <class T, int N, class B> vec<T, N>& operator op##=(vec<T, N>& a, const B& b) { return a = a op b; }
EMU_VEC_OP(+) EMU_VEC_OP(-) EMU_VEC_OP(*) EMU_VEC_OP(/) EMU_VEC_OP(&) EMU_VEC_OP(|) EMU_VEC_OP(^)
EMU_VEC_OP(<<) EMU_VEC_OP(>>) EMU_VEC_OP(%)
#undef EMU_VEC_OP

// packed_T2..4: MSL's vectors with only their element's alignment (a packed_uint4 may sit at any multiple of 4);
// the plain vectors above have MSL's: 2, 4, 4 elements' worth (uint2 8 bytes, uint3 and uint4 16 bytes).
template <class T, int N> struct packed_vec {
    T v[N];
    packed_vec() = default;
    packed_vec(const vec<T, N>& o) { for (int i = 0; i < N; ++i) v[i] = o[i]; }
    operator vec<T, N>() const { vec<T, N> o; for (int i = 0; i < N; ++i) o[i] = v[i]; return o; }
    T& operator[](int i) { return v[i]; }
    const T& operator[](int i) const { return v[i]; }
};
template <class T, int N> vec<T, N> operator-(vec<T, N> a) { for (int i = 0; i < N; ++i) a[i] = -a[i]; return a; }
}  // namespace metal

#define EMU_VEC_NAMES(T, name) typedef metal::vec<T, 2> name##2; typedef metal::vec<T, 3> name##3; \
    typedef metal::vec<T, 4> name##4;
EMU_VEC_NAMES(float, float) EMU_VEC_NAMES(half, half) EMU_VEC_NAMES(bfloat, bfloat) EMU_VEC_NAMES(int, int)
EMU_VEC_NAMES(uint, uint) EMU_VEC_NAMES(short, short) EMU_VEC_NAMES(ushort, ushort) EMU_VEC_NAMES(char, char)
EMU_VEC_NAMES(uchar, uchar) EMU_VEC_NAMES(bool, bool)
#undef EMU_VEC_NAMES
#define EMU_PACKED_NAMES(T, name) typedef metal::packed_vec<T, 2> packed_##name##2; \
    typedef metal::packed_vec<T, 3> packed_##name##3; typedef metal::packed_vec<T, 4> packed_##name##4;
EMU_PACKED_NAMES(float, float) EMU_PACKED_NAMES(half, half) EMU_PACKED_NAMES(bfloat, bfloat) EMU_PACKED_NAMES(int, int)
EMU_PACKED_NAMES(uint, uint) EMU_PACKED_NAMES(short, short) EMU_PACKED_NAMES(ushort, ushort) EMU_PACKED_NAMES(char, char)
EMU_PACKED_NAMES(uchar, uchar)
#undef EMU_PACKED_NAMES

// ---- metal:: math, conversions and simd collectives -----------------------------------------------------
namespace metal {
template <class T> struct is_vec : std::false_type {};
template <class T, int N> struct is_vec<vec<T, N>> : std::true_type {};

#define EMU_UNARY(name, expr)                                                                                  \
    inline float name(float x) { return expr; }                                                              \
    template <class T, class = std::enable_if_t<!std::is_same<T, float>::value && !is_vec<T>::value>>       \
    T name(T x) { return T(name(float(x))); }                                                                 \
    template <class T, int N> vec<T, N> name(vec<T, N> a) { for (int i = 0; i < N; ++i) a[i] = name(a[i]); return a; }
EMU_UNARY(exp, std::exp(x)) EMU_UNARY(exp2, std::exp2(x)) EMU_UNARY(log, std::log(x)) EMU_UNARY(log2, std::log2(x))
EMU_UNARY(sqrt, std::sqrt(x)) EMU_UNARY(rsqrt, 1.0f / std::sqrt(x)) EMU_UNARY(tanh, std::tanh(x))
EMU_UNARY(floor, std::floor(x)) EMU_UNARY(ceil, std::ceil(x)) EMU_UNARY(round, std::round(x))
EMU_UNARY(sin, std::sin(x)) EMU_UNARY(cos, std::cos(x)) EMU_UNARY(fabs, std::fabs(x))
#undef EMU_UNARY
namespace fast { using metal::exp; using metal::exp2; using metal::log; using metal::sqrt; using metal::rsqrt;
                 using metal::tanh; }
namespace precise { using metal::exp; using metal::exp2; using metal::log; using metal::sqrt; using metal::rsqrt;
                    using metal::tanh; }

template <class T> T abs(T x) { return x < T(0) ? T(-x) : x; }
template <class T> T min(T a, T b) { return b < a ? b : a; }
template <class T> T max(T a, T b) { return a < b ? b : a; }
template <class T> T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T> T fma(T a, T b, T c) { return T(std::fma(float(a), float(b), float(c))); }
template <class T> T select(T a, T b, bool c) { return c ? b : a; }
template <class T> T pow(T a, T b) { return T(std::pow(float(a), float(b))); }
inline bool isnan(float x) { return std::isnan(x); }
inline bool isinf(float x) { return std::isinf(x); }
template <class T, int N> T dot(const vec<T, N>& a, const vec<T, N>& b) {
    T s = a[0] * b[0]; for (int i = 1; i < N; ++i) s += a[i] * b[i]; return s; }
template <class T, int N> vec<T, N> min(vec<T, N> a, const vec<T, N>& b) { for (int i = 0; i < N; ++i) a[i] = min(a[i], b[i]); return a; }
template <class T, int N> vec<T, N> max(vec<T, N> a, const vec<T, N>& b) { for (int i = 0; i < N; ++i) a[i] = max(a[i], b[i]); return a; }

template <class To, class From> To as_type(const From& f) {
    static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
    To t; std::memcpy(&t, &f, sizeof(To)); return t;
}
template <class T> struct numeric_limits {
    static T max() { return T(INFINITY); } static T lowest() { return T(-INFINITY); } static T infinity() { return T(INFINITY); } };
template <> struct numeric_limits<float> {
    static float max() { return 3.402823466e38f; } static float lowest() { return -3.402823466e38f; }
    static float min() { return 1.175494351e-38f; } static float infinity() { return INFINITY; } };

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
__attribute__((noinline)) inline void threadgroup_barrier_at(const void* site, mem_flags) { emu::barrier(site); }
__attribute__((noinline)) inline void simdgroup_barrier_at(const void* site, mem_flags) {
    unsigned m; int l; char z = 0; emu::simd_exchange(&z, 1, site, &m, &l); }

// Every collective posts its value, waits for all 32 lanes at the same call site, then reads every
// lane's value from the snapshot; lanes combine in lane order, so all lanes get bit-identical results.
#define EMU_COLLECTIVE_BEGIN(T, v)                                                                              \
    static_assert(sizeof(T) <= emu::kSlotBytes, "value too large for a simd collective");                    \
    unsigned mask; int lane;                                                                                   \
    const unsigned char* all = emu::simd_exchange(&v, sizeof(T), site, &mask, &lane);  \
    auto at = [&](int l) { T t; std::memcpy(&t, all + l * emu::kSlotBytes, sizeof(T)); return t; };          \
    (void)lane; (void)mask;
template <class T> __attribute__((noinline)) T simd_sum_at(const void* site, T v) {
    EMU_COLLECTIVE_BEGIN(T, v)
    T s = at(0); for (int l = 1; l < emu::kSimdWidth; ++l) if (mask >> l & 1u) s = s + at(l); return s; }
template <class T> __attribute__((noinline)) T simd_max_at(const void* site, T v) {
    EMU_COLLECTIVE_BEGIN(T, v)
    T s = at(0); for (int l = 1; l < emu::kSimdWidth; ++l) if (mask >> l & 1u) s = max(s, at(l)); return s; }
template <class T> __attribute__((noinline)) T simd_min_at(const void* site, T v) {
    EMU_COLLECTIVE_BEGIN(T, v)
    T s = at(0); for (int l = 1; l < emu::kSimdWidth; ++l) if (mask >> l & 1u) s = min(s, at(l)); return s; }
template <class T> __attribute__((noinline)) T simd_prefix_exclusive_sum_at(const void* site, T v) {
    EMU_COLLECTIVE_BEGIN(T, v)
    T s = T(0); for (int l = 0; l < lane; ++l) s = s + at(l); return s; }
template <class T> __attribute__((noinline)) T simd_prefix_inclusive_sum_at(const void* site, T v) {
    EMU_COLLECTIVE_BEGIN(T, v)
    T s = at(0); for (int l = 1; l <= lane; ++l) s = s + at(l); return s; }
template <class T> __attribute__((noinline)) T simd_shuffle_at(const void* site, T v, ushort src) {
    EMU_COLLECTIVE_BEGIN(T, v) return at(src % emu::kSimdWidth); }
template <class T> __attribute__((noinline)) T simd_broadcast_at(const void* site, T v, ushort src) {
    EMU_COLLECTIVE_BEGIN(T, v) return at(src % emu::kSimdWidth); }
template <class T> __attribute__((noinline)) T simd_shuffle_down_at(const void* site, T v, ushort d) {
    EMU_COLLECTIVE_BEGIN(T, v) return lane + d < emu::kSimdWidth ? at(lane + d) : v; }
template <class T> __attribute__((noinline)) T simd_shuffle_up_at(const void* site, T v, ushort d) {
    EMU_COLLECTIVE_BEGIN(T, v) return lane >= int(d) ? at(lane - d) : v; }
template <class T> __attribute__((noinline)) T simd_shuffle_xor_at(const void* site, T v, ushort m) {
    EMU_COLLECTIVE_BEGIN(T, v) return at((lane ^ m) % emu::kSimdWidth); }
struct simd_vote {
    typedef uint64_t vote_t;
    vote_t bits;
    explicit operator vote_t() const { return bits; }
    bool any() const { return bits != 0; }
};
__attribute__((noinline)) inline simd_vote simd_ballot_at(const void* site, bool b) {
    EMU_COLLECTIVE_BEGIN(bool, b)
    simd_vote r{0}; for (int l = 0; l < emu::kSimdWidth; ++l) if ((mask >> l & 1u) && at(l)) r.bits |= uint64_t(1) << l;
    return r; }
__attribute__((noinline)) inline bool simd_any_at(const void* site, bool b) {
    EMU_COLLECTIVE_BEGIN(bool, b) for (int l = 0; l < emu::kSimdWidth; ++l) if ((mask >> l & 1u) && at(l)) return true;
    return false; }
__attribute__((noinline)) inline bool simd_all_at(const void* site, bool b) {
    EMU_COLLECTIVE_BEGIN(bool, b) for (int l = 0; l < emu::kSimdWidth; ++l) if ((mask >> l & 1u) && !at(l)) return false;
    return true; }
#undef EMU_COLLECTIVE_BEGIN

// ---- simdgroup_matrix 8x8: each lane holds only its own 2-element fragment ------------------------------
// Lane l holds row fm, columns fn and fn + 1 (the layout MLX's steel MMA code assumes):
//   fm = (l / 4 & 4) + (l / 2 % 4),  fn = (l / 4 & 2) * 2 + (l % 2) * 2.
// load / store / multiply are simd collectives (all 32 lanes at the same call site); multiply gathers every
// lane's fragments, multiplies in float and hands each lane its part of the result.
constexpr int kFrag = 8;
inline int frag_row(int l) { return (l / 4 & 4) + (l / 2 % 4); }
inline int frag_col(int l) { return (l / 4 & 2) * 2 + (l % 2) * 2; }
template <class T, int C, int R> struct simdgroup_matrix {
    static_assert(C == kFrag && R == kFrag, "the emulator models 8x8 simdgroup matrices only");
    vec<T, 2> frag;
    simdgroup_matrix() = default;
    __attribute__((noinline)) explicit simdgroup_matrix(T diagonal) {  // MSL: a diagonal matrix
        unsigned m; int l; char z = 0; emu::simd_exchange(&z, 1, __builtin_return_address(0), &m, &l);
        int r = frag_row(l), c = frag_col(l);
        frag = vec<T, 2>(T(r == c ? float(diagonal) : 0.0f), T(r == c + 1 ? float(diagonal) : 0.0f));
    }
    vec<T, 2>& thread_elements() { return frag; }
};
template <class T, int C, int R> __attribute__((noinline)) simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T v) {
    unsigned m; int l; char z = 0; emu::simd_exchange(&z, 1, __builtin_return_address(0), &m, &l);
    simdgroup_matrix<T, C, R> out; out.frag = vec<T, 2>(v, v); return out;
}
template <class T, class U> __attribute__((noinline)) void simdgroup_load(
    simdgroup_matrix<T, 8, 8>& d, const U* src, size_t elements_per_row = 8, vec<uint64_t, 2> origin = vec<uint64_t, 2>(0),
    bool transpose = false) {
    unsigned m; int l; char z = 0; emu::simd_exchange(&z, 1, __builtin_return_address(0), &m, &l);
    for (int i = 0; i < 2; ++i) {
        size_t r = size_t(frag_row(l)), c = size_t(frag_col(l) + i);
        d.frag[i] = T(transpose ? src[(origin.y + c) * elements_per_row + origin.x + r]
                                : src[(origin.y + r) * elements_per_row + origin.x + c]);
    }
}
template <class T, class U> __attribute__((noinline)) void simdgroup_store(
    const simdgroup_matrix<T, 8, 8>& a, U* dst, size_t elements_per_row = 8, vec<uint64_t, 2> origin = vec<uint64_t, 2>(0),
    bool transpose = false) {
    unsigned m; int l; char z = 0; emu::simd_exchange(&z, 1, __builtin_return_address(0), &m, &l);
    for (int i = 0; i < 2; ++i) {
        size_t r = size_t(frag_row(l)), c = size_t(frag_col(l) + i);
        (transpose ? dst[(origin.y + c) * elements_per_row + origin.x + r]
                   : dst[(origin.y + r) * elements_per_row + origin.x + c]) = U(a.frag[i]);
    }
}
template <class TD, class TA, class TB, class TC> __attribute__((noinline)) void simdgroup_multiply_accumulate(
    simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a, const simdgroup_matrix<TB, 8, 8>& b,
    const simdgroup_matrix<TC, 8, 8>& c) {
    float mine[6] = {float(a.frag[0]), float(a.frag[1]), float(b.frag[0]), float(b.frag[1]), float(c.frag[0]),
                     float(c.frag[1])};
    unsigned m; int l;
    const unsigned char* all = emu::simd_exchange(mine, sizeof mine, __builtin_return_address(0), &m, &l);
    float A[8][8], B[8][8], C[8][8];
    for (int s = 0; s < emu::kSimdWidth; ++s) {
        float f[6]; std::memcpy(f, all + s * emu::kSlotBytes, sizeof f);
        int r = frag_row(s), col = frag_col(s);
        A[r][col] = f[0]; A[r][col + 1] = f[1]; B[r][col] = f[2]; B[r][col + 1] = f[3];
        C[r][col] = f[4]; C[r][col + 1] = f[5];
    }
    int r = frag_row(l), col = frag_col(l);
    for (int i = 0; i < 2; ++i) {
        float acc = C[r][col + i];
        for (int k = 0; k < 8; ++k) acc += A[r][k] * B[k][col + i];
        d.frag[i] = TD(acc);
    }
}
template <class TD, class TA, class TB> __attribute__((always_inline)) inline void simdgroup_multiply(
    simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a, const simdgroup_matrix<TB, 8, 8>& b) {
    simdgroup_matrix<TD, 8, 8> zero; zero.frag = vec<TD, 2>(TD(0.0f));
    simdgroup_multiply_accumulate(d, a, b, zero);
}
}  // namespace metal

typedef metal::simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef metal::simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef metal::simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;
typedef metal::vec<uint64_t, 2> ulong2;
typedef uint64_t ulong;

using namespace metal;  // as MLX's utils.h does

// A sync point is identified by its source line (the kernel text is one file, numbered from 1), not by the
// call's return address: a compiler may duplicate one call into several branches (g++ does, for a barrier
// after an if), and lanes reaching the same source call through different copies are not divergent.
#define EMU_SITE ((const void*)(uintptr_t)__LINE__)
#define threadgroup_barrier(...) threadgroup_barrier_at(EMU_SITE, __VA_ARGS__)
#define simdgroup_barrier(...) simdgroup_barrier_at(EMU_SITE, __VA_ARGS__)
#define simd_sum(...) simd_sum_at(EMU_SITE, __VA_ARGS__)
#define simd_max(...) simd_max_at(EMU_SITE, __VA_ARGS__)
#define simd_min(...) simd_min_at(EMU_SITE, __VA_ARGS__)
#define simd_prefix_exclusive_sum(...) simd_prefix_exclusive_sum_at(EMU_SITE, __VA_ARGS__)
#define simd_prefix_inclusive_sum(...) simd_prefix_inclusive_sum_at(EMU_SITE, __VA_ARGS__)
#define simd_shuffle(...) simd_shuffle_at(EMU_SITE, __VA_ARGS__)
#define simd_broadcast(...) simd_broadcast_at(EMU_SITE, __VA_ARGS__)
#define simd_shuffle_down(...) simd_shuffle_down_at(EMU_SITE, __VA_ARGS__)
#define simd_shuffle_up(...) simd_shuffle_up_at(EMU_SITE, __VA_ARGS__)
#define simd_shuffle_xor(...) simd_shuffle_xor_at(EMU_SITE, __VA_ARGS__)
#define simd_ballot(...) simd_ballot_at(EMU_SITE, __VA_ARGS__)
#define simd_any(...) simd_any_at(EMU_SITE, __VA_ARGS__)
#define simd_all(...) simd_all_at(EMU_SITE, __VA_ARGS__)

// Address-space qualifiers disappear here (msl_check.h, clang's type check, keeps and checks them);
// threadgroup variables become function statics, shared by all the
// fibers of the one threadgroup that runs at a time (runtime.h finds them in the symbol table, poisons
// them before each threadgroup and checks their total size).
#define device
#define constant
#define thread
#define threadgroup static
