// MSL type check for clang (-fsyntax-only): the kernel text MLX generates, compiled as C++14 (the C++ dialect
// MSL is based on) with Metal's address spaces kept as clang address spaces, so that mixing them up does not
// compile, as on a Mac: a `device` pointer passed where a `thread` one is expected, a `threadgroup` array
// assigned to a `device` pointer, a `constant` input written, and so on. Only types are checked here; the
// code that runs is built from msl_shim.h, where address spaces are erased. Differences from the run build:
// half and bfloat are float (their arithmetic does not matter for a type check), vectors are clang
// ext_vector_types (a struct could not be read through an address-space pointer), builtins are declarations.
// g++ has no address spaces in C++, so this check needs clang; emulator.py runs it when clang is installed.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef float half;     // type check only
typedef float bfloat;   // type check only
typedef bfloat bfloat16_t;
typedef half float16_t;
typedef uint64_t ulong;

template <class V, class... A> V emu_vec_make(A...);  // MSL's float4(a, b, c, d) and friends

#define EMU_CHECK_VEC(T, name)                                                                               \
    typedef T name##2 __attribute__((ext_vector_type(2)));                                                  \
    typedef T name##3 __attribute__((ext_vector_type(3)));                                                  \
    typedef T name##4 __attribute__((ext_vector_type(4)));                                                  \
    typedef T packed_##name##2 __attribute__((ext_vector_type(2), aligned(sizeof(T))));                     \
    typedef T packed_##name##3 __attribute__((ext_vector_type(3), aligned(sizeof(T))));                     \
    typedef T packed_##name##4 __attribute__((ext_vector_type(4), aligned(sizeof(T))));
EMU_CHECK_VEC(float, float) EMU_CHECK_VEC(half, half) EMU_CHECK_VEC(bfloat, bfloat) EMU_CHECK_VEC(int, int)
EMU_CHECK_VEC(uint, uint) EMU_CHECK_VEC(short, short) EMU_CHECK_VEC(ushort, ushort) EMU_CHECK_VEC(char, char)
EMU_CHECK_VEC(uchar, uchar) EMU_CHECK_VEC(ulong, ulong)
#undef EMU_CHECK_VEC
template <int N> struct emu_bool_vec { bool v[N]; bool& operator[](int i); };
typedef emu_bool_vec<2> bool2;
typedef emu_bool_vec<3> bool3;
typedef emu_bool_vec<4> bool4;

namespace metal {
template <class T> T exp(T); template <class T> T exp2(T); template <class T> T log(T); template <class T> T log2(T);
template <class T> T sqrt(T); template <class T> T rsqrt(T); template <class T> T tanh(T); template <class T> T floor(T);
template <class T> T ceil(T); template <class T> T round(T); template <class T> T sin(T); template <class T> T cos(T);
template <class T> T fabs(T); template <class T> T abs(T);
namespace fast { using metal::exp; using metal::exp2; using metal::log; using metal::sqrt; using metal::rsqrt;
                 using metal::tanh; }
namespace precise { using metal::exp; using metal::exp2; using metal::log; using metal::sqrt; using metal::rsqrt;
                    using metal::tanh; }
template <class T> T min(T, T); template <class T> T max(T, T); template <class T> T clamp(T, T, T);
template <class T> T fma(T, T, T); template <class T> T select(T, T, bool); template <class T> T pow(T, T);
template <class T> bool isnan(T); template <class T> bool isinf(T);
template <class V> auto dot(V, V) -> decltype(V()[0]);
template <class To, class From> To as_type(From);
template <class T> struct numeric_limits { static T max(); static T min(); static T lowest(); static T infinity(); };

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);
template <class T> T simd_sum(T); template <class T> T simd_max(T); template <class T> T simd_min(T);
template <class T> T simd_prefix_exclusive_sum(T); template <class T> T simd_prefix_inclusive_sum(T);
template <class T> T simd_shuffle(T, ushort); template <class T> T simd_broadcast(T, ushort);
template <class T> T simd_shuffle_down(T, ushort); template <class T> T simd_shuffle_up(T, ushort);
template <class T> T simd_shuffle_xor(T, ushort);
struct simd_vote { typedef uint64_t vote_t; explicit operator vote_t() const; bool any() const; };
simd_vote simd_ballot(bool); bool simd_any(bool); bool simd_all(bool);
template <class T, int C, int R> struct simdgroup_matrix {
    simdgroup_matrix(); explicit simdgroup_matrix(T diagonal); ulong2 thread_elements(); };
template <class T, int C, int R> simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T);
template <class M, class P> void simdgroup_load(M&, P src, size_t = 8, ulong2 = ulong2{0, 0}, bool = false);
template <class M, class P> void simdgroup_store(const M&, P dst, size_t = 8, ulong2 = ulong2{0, 0}, bool = false);
template <class D, class A, class B, class C> void simdgroup_multiply_accumulate(D&, const A&, const B&, const C&);
template <class D, class A, class B> void simdgroup_multiply(D&, const A&, const B&);
}  // namespace metal

typedef metal::simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef metal::simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef metal::simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;
using namespace metal;  // as MLX's utils.h does

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup static __attribute__((address_space(3)))
#define thread
#define double msl_has_no_double_use_float
#define float2(...) (emu_vec_make<float2>(__VA_ARGS__))
#define float3(...) (emu_vec_make<float3>(__VA_ARGS__))
#define float4(...) (emu_vec_make<float4>(__VA_ARGS__))
#define half2(...) (emu_vec_make<half2>(__VA_ARGS__))
#define half4(...) (emu_vec_make<half4>(__VA_ARGS__))
#define uint2(...) (emu_vec_make<uint2>(__VA_ARGS__))
#define uint3(...) (emu_vec_make<uint3>(__VA_ARGS__))
#define uint4(...) (emu_vec_make<uint4>(__VA_ARGS__))
#define int2(...) (emu_vec_make<int2>(__VA_ARGS__))
#define int4(...) (emu_vec_make<int4>(__VA_ARGS__))
#define ulong2(...) (emu_vec_make<ulong2>(__VA_ARGS__))
