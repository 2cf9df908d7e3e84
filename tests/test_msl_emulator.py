"""The MSL emulator proves itself: MLX's exact generated text, correct kernels pass in every thread order,
and each classic GPU bug (missing barrier, out-of-bounds access, divergent simd_sum, too much threadgroup
memory, early return before a barrier, unwritten output) is caught. Also static checks on metal/ sources."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from msl_emu import emulator as emu

COMPILERS = emu.available_compilers()
ORDERS = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]
METAL_DIR = Path(__file__).resolve().parent.parent / "metal"


def run(source, inputs, out_shape, grid, group, *, header="", template=None, order=("forward", 0), cxx="g++",
        out_dtype=mx.float32, input_names=None):
    names = input_names or [f"in{i}" for i in range(len(inputs))]
    kernel = emu.metal_kernel("t", names, ["out"], source, header=header)
    with emu.compiler(cxx), emu.thread_order(*order):
        (out,) = kernel(inputs=inputs, output_shapes=[out_shape], output_dtypes=[out_dtype], grid=grid,
                        threadgroup=group, template=template)
    return np.array(out.astype(mx.float32))


# ---- the generated text -----------------------------------------------------------------------------------

def test_generated_signature_follows_mlx_rules():
    body = ("out[thread_position_in_grid.x] = a[0] + b[0] * alpha + float(big_shape[0])"
            " + simdgroup_index_in_threadgroup;")
    header = "// thread_index_in_simdgroup named only in the header: no parameter for it\n"
    specs = [(mx.float32, (10,)), (mx.float32, (3,)), (mx.float32, ()), (mx.int32, (4, 4))]
    name, text = emu.generate("demo", ["a", "b", "alpha", "big"], ["out"], body, header, specs, [mx.bfloat16],
                              template=[("T", mx.float16), ("N", 3), ("FLAG", True)])
    # Written from MLX's rules (DESIGN.md, mlx/backend/common/metal_kernel.cpp), not produced by this code.
    assert name == "custom_kernel_demo__float16_t_3_1_float_floatc_floats_int32_t_bfloat16_t"  # "_" + "_float16_t_3_1"
    assert text == (
        header
        + "template <typename T, int N, bool FLAG>\n"
        + f"[[kernel]] void {name}(\n"
        + "  const device float* a [[buffer(0)]],\n"
        + "  const constant float* b [[buffer(1)]],\n"
        + "  const constant float& alpha [[buffer(2)]],\n"
        + "  const device int32_t* big [[buffer(3)]],\n"
        + "  const constant int* big_shape [[buffer(4)]],\n"
        + "  device bfloat16_t* out [[buffer(5)]],\n"
        + "  uint simdgroup_index_in_threadgroup [[simdgroup_index_in_threadgroup]],\n"
        + "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n"
        + body + "\n}\n"
        + f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({name}<float16_t, 3, 1>) {name}<float16_t, 3, 1>;\n')


def test_generated_signature_without_template_or_attributes():
    name, text = emu.generate("plain", ["x"], ["y"], "y[0] = x[0];", "", [(mx.uint8, (8,))], [mx.float32])
    assert name == "custom_kernel_plain_uint8_t_float"
    assert text == (f"[[kernel]] void {name}(\n  const device uint8_t* x [[buffer(0)]],\n"
                    "  device float* y [[buffer(1)]]) {\ny[0] = x[0];\n}\n")


# ---- a correct kernel: barriers, threadgroup memory and simd collectives, every order, both compilers -------

GOOD = """
    const uint tid = thread_position_in_threadgroup.x;
    const uint gid = thread_position_in_grid.x;
    const uint lane = thread_index_in_simdgroup;
    threadgroup float shared[N];
    shared[tid] = float(in0[gid]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float neighbour = shared[(tid + 1) % N];
    float total = simd_sum(neighbour);
    float first = simd_broadcast(neighbour, 0);
    float prefix = simd_prefix_exclusive_sum(1.0f);
    float down = simd_shuffle_down(neighbour, 1);
    uint odd = uint(static_cast<uint64_t>(simd_ballot((lane & 1u) != 0u)) == 0xAAAAAAAAull);
    float2 v = float2(total, first);
    out[4 * gid] = T(v.x);
    out[4 * gid + 1] = T(v.y);
    out[4 * gid + 2] = T(prefix + 100.0f * float(odd));
    out[4 * gid + 3] = T(down);
"""


def good_reference(n, group):
    x = np.arange(n, dtype=np.float64)
    out = np.zeros((n, 4))
    for g in range(n // group):
        shared = x[g * group:(g + 1) * group]
        neighbour = np.roll(shared, -1)
        for s in range(group // 32):
            lanes = neighbour[s * 32:(s + 1) * 32]
            for lane in range(32):
                down = lanes[lane + 1] if lane < 31 else lanes[lane]
                out[g * group + s * 32 + lane] = (lanes.sum(), lanes[0], lane + 100, down)
    return out.reshape(-1).astype(np.float32)


@pytest.mark.parametrize("cxx", COMPILERS)
def test_correct_kernel_in_every_order(cxx):
    n, group = 256, 64
    x = mx.arange(n, dtype=mx.float32)
    want = good_reference(n, group)
    for order in ORDERS:
        got = run(GOOD, [x], (4 * n,), (n, 1, 1), (group, 1, 1), template=[("T", mx.float32), ("N", group)],
                  order=order, cxx=cxx)
        np.testing.assert_array_equal(got, want, err_msg=f"order {order}")


@pytest.mark.parametrize("cxx", COMPILERS)
def test_half_and_bfloat_round_like_metal(cxx):
    src = "out[thread_position_in_grid.x] = T(float(in0[thread_position_in_grid.x]) * 3.0f);"
    x = mx.array(np.linspace(-70000, 70000, 64, dtype=np.float32))
    for dtype in (mx.float16, mx.bfloat16):
        got = run(src, [x.astype(dtype)], (64,), (64, 1, 1), (32, 1, 1), template=[("T", dtype)], cxx=cxx,
                  out_dtype=dtype)
        want = np.array((x.astype(dtype).astype(mx.float32) * 3).astype(dtype).astype(mx.float32))
        np.testing.assert_array_equal(got, want)


def test_vector_swizzles_and_math():
    src = """
    float4 v = float4(1.0f, 2.0f, 3.0f, 4.0f);
    float2 zw = v.zw;
    v.xy = zw;
    uint2 bits = uint2(0xF0u, 0x0Fu) >> 4u;
    out[0] = v.x * 1000.0f + v.y * 100.0f + v.z * 10.0f + v.w;
    out[1] = dot(float3(1.0f, 2.0f, 3.0f), float3(v.xyz));
    out[2] = float(bits.x + bits.y) + metal::exp(0.0f) + clamp(9.0f, -1.0f, 2.0f) + as_type<float>(0x3f800000u);
    """
    got = run(src, [mx.ones((8,))], (3,), (1, 1, 1), (1, 1, 1))
    np.testing.assert_array_equal(got, [3434.0, 3 + 8 + 9, 15 + 0 + 1 + 2 + 1])


def test_scalar_small_and_shape_arguments_reach_the_kernel():
    src = """
    const uint i = thread_position_in_grid.x;
    out[i] = in0[i] * alpha + small[1] + float(in0_shape[1]) * 100.0f + float(in0_strides[0]) * 1000.0f
             + float(in0_ndim) * 10000.0f;
    """
    x = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    got = run(src, [x, 0.5, mx.array([1.0, 2.0, 3.0])], (12,), (12, 1, 1), (4, 1, 1),
              input_names=["in0", "alpha", "small"])
    np.testing.assert_array_equal(got, np.arange(12) * 0.5 + 2 + 400 + 4000 + 20000)


def test_threadgroup_memory_is_poisoned_for_every_threadgroup():
    src = """
    threadgroup float scratch[64];
    const uint tid = thread_position_in_threadgroup.x;
    const float before = scratch[tid];  // never written by this threadgroup: must read as NaN
    threadgroup_barrier(mem_flags::mem_threadgroup);
    scratch[tid] = 1.0f;
    out[thread_position_in_grid.x] = before;
    """
    for order in ORDERS:
        got = run(src, [mx.ones((8,))], (256,), (256, 1, 1), (64, 1, 1), order=order)
        assert np.isnan(got).all(), order


SIMDGROUP_MATMUL = """
    simdgroup_float8x8 a;
    simdgroup_float8x8 b;
    simdgroup_float8x8 acc;
    for (int i = 0; i < M / 8; ++i) {
        acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        for (int k = 0; k < K / 8; ++k) {
            simdgroup_load(a, in0, K, ulong2(k * 8, i * 8));
            simdgroup_load(b, in1, K, ulong2(k * 8, 0), true);  // in1 is [8, K]: load its transpose
            simdgroup_multiply_accumulate(acc, a, b, acc);
        }
        simdgroup_store(acc, out, 8, ulong2(0, i * 8));
    }
    simdgroup_float8x8 identity(2.0f);
    simdgroup_store(identity, out + M * 8, 8);
    if (thread_index_in_simdgroup > 99) { out[0] = 0.0f; }
"""


@pytest.mark.parametrize("cxx", COMPILERS)
def test_simdgroup_matrix_matmul(cxx):
    rng = np.random.default_rng(0)
    A = rng.integers(-4, 5, (16, 24)).astype(np.float32)
    Bt = rng.integers(-4, 5, (8, 24)).astype(np.float32)
    for order in ORDERS:
        got = run(SIMDGROUP_MATMUL, [mx.array(A), mx.array(Bt)], (16 * 8 + 64,), (32, 1, 1), (32, 1, 1),
                  template=[("M", 16), ("K", 24)], order=order, cxx=cxx)
        np.testing.assert_array_equal(got[:128].reshape(16, 8), A @ Bt.T)
        np.testing.assert_array_equal(got[128:].reshape(8, 8), 2 * np.eye(8))


# ---- deliberately broken kernels must be caught --------------------------------------------------------------

MISSING_BARRIER = GOOD.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "")


@pytest.mark.parametrize("cxx", COMPILERS)
def test_missing_barrier_is_caught(cxx):
    n, group = 128, 64
    x = mx.arange(n, dtype=mx.float32)
    want = good_reference(n, group)
    wrong = 0
    for order in ORDERS:
        got = run(MISSING_BARRIER, [x], (4 * n,), (n, 1, 1), (group, 1, 1),
                  template=[("T", mx.float32), ("N", group)], order=order, cxx=cxx)
        wrong += not np.array_equal(got, want)
    assert wrong >= 2, "a read of another thread's threadgroup slot without a barrier went unnoticed"


BROKEN = {
    "out-of-bounds read": (
        "out[thread_position_in_grid.x] = in0[thread_position_in_grid.x + 1];", "out of bounds of buffer 0"),
    "out-of-bounds write": (
        "out[thread_position_in_grid.x + 1] = in0[thread_position_in_grid.x];", "out of bounds of buffer 1"),
    "simd_sum in a divergent branch": (
        """float v = in0[thread_position_in_grid.x];
        if (thread_index_in_simdgroup < 16) { v = simd_sum(v); }
        out[thread_position_in_grid.x] = v;""", "simd collective in divergent control flow"),
    "too much threadgroup memory": (
        """threadgroup float big[9000];
        big[thread_position_in_threadgroup.x] = in0[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = big[0];""", "too much threadgroup memory: 36000 bytes"),
    "simdgroup_multiply in a divergent branch": (
        """simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
        if (thread_index_in_simdgroup != 3) { simdgroup_multiply(m, m, m); }
        simdgroup_store(m, out, 8);""", "simd collective in divergent control flow"),
    "early return before a barrier": (
        """threadgroup float t[64];
        if (thread_position_in_threadgroup.x == 5) { return; }
        t[thread_position_in_threadgroup.x] = in0[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = t[0];""", "early return before a barrier"),
    "barrier in a loop with a divergent trip count": (
        """for (uint i = 0; i < (thread_position_in_threadgroup.x < 32 ? 2u : 1u); ++i) {
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        out[thread_position_in_grid.x] = in0[thread_position_in_grid.x];""", "early return before a barrier"),
}


@pytest.mark.parametrize("cxx", COMPILERS)
@pytest.mark.parametrize("bug", list(BROKEN))
def test_broken_kernel_is_caught(bug, cxx):
    source, message = BROKEN[bug]
    with pytest.raises(emu.EmulatorError, match=re.escape(message)):
        run(source, [mx.arange(128, dtype=mx.float32)], (128,), (128, 1, 1), (64, 1, 1), cxx=cxx)


# ---- what the Metal compiler would reject: address spaces, the C++14 dialect; misaligned vector loads ------

HAS_CLANG = shutil.which("clang++") is not None
TYPE_BUGS = {
    "device pointer passed as a thread pointer": (
        "inline float first(thread const float* p) { return p[0]; }\n",
        "out[thread_position_in_grid.x] = first(in0);"),
    "constant input passed as a device pointer": (
        "inline float first(const device float* p) { return p[0]; }\n",
        "out[thread_position_in_grid.x] = first(small);"),
    "threadgroup array taken as a device pointer": (
        "", """threadgroup float t[64];
        device float* p = t;
        p[thread_position_in_threadgroup.x] = in0[thread_position_in_grid.x];
        out[thread_position_in_grid.x] = t[0];"""),
    "thread array taken as a device pointer": (
        "", """float local[4] = {1.0f, 2.0f, 3.0f, 4.0f};
        const device float* p = local;
        out[thread_position_in_grid.x] = p[1];"""),
    "C++17: if constexpr": (
        "", "if constexpr (sizeof(float) == 4) { out[thread_position_in_grid.x] = in0[0]; }"),
    "double (Metal has none)": (
        "", "double d = in0[thread_position_in_grid.x]; out[thread_position_in_grid.x] = float(d);"),
}


def typed(header, body):
    specs = [(mx.float32, (64,)), (mx.float32, (3,))]
    return emu.generate("t", ["in0", "small"], ["out"], body, header, specs, [mx.float32])


@pytest.mark.skipif(not HAS_CLANG, reason="the address-space check needs clang (g++ has no address spaces in C++)")
@pytest.mark.parametrize("bug", list(TYPE_BUGS))
def test_type_errors_metal_would_reject_do_not_compile(bug):
    header, body = TYPE_BUGS[bug]
    with pytest.raises(emu.EmulatorError, match="type check rejects"):
        emu.check_types(*typed(header, body))


@pytest.mark.skipif(not HAS_CLANG, reason="the address-space check needs clang")
def test_type_check_accepts_correct_address_spaces():
    header = "inline float first(const device float* p) { return p[0]; }\ninline float two(thread const float* p) { return p[1]; }\n"
    body = """threadgroup float t[64];
    threadgroup float* tp = t;
    float local[2] = {in0[0], small[1]};
    tp[thread_position_in_threadgroup.x] = first(in0) + two(local);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = t[0];"""
    assert emu.check_types(*typed(header, body)) is True


MISALIGNED = {
    "uint2 load from a 4-byte aligned address": "const uint2 q = *((const device uint2*)in0);",
    "uint4 load from a 4-byte aligned address": "const uint4 q = *((const device uint4*)in0);",
}


@pytest.mark.parametrize("cxx", COMPILERS)
@pytest.mark.parametrize("bug", list(MISALIGNED))
def test_misaligned_vector_load_is_caught(bug, cxx):
    body = MISALIGNED[bug] + "\nout[thread_position_in_grid.x] = float(q.x + q.y);"
    words = mx.arange(64, dtype=mx.uint32)
    with emu.alignment("element"), pytest.raises(emu.EmulatorError, match="misaligned access"):
        run(body, [words], (32,), (32, 1, 1), (32, 1, 1), cxx=cxx)
    # The same data through a packed vector (element alignment only) is fine, and so is an aligned uint2.
    packed = "const packed_uint4 q = *((const device packed_uint4*)in0);\nout[thread_position_in_grid.x] = float(q[0] + q[1]);"
    with emu.alignment("element"):
        assert run(packed, [words], (32,), (32, 1, 1), (32, 1, 1), cxx=cxx)[0] == 1.0
    with emu.alignment("end"):  # 256 bytes ending at a page: the start is 16-byte aligned
        assert run(body, [words], (32,), (32, 1, 1), (32, 1, 1), cxx=cxx)[0] == 1.0


def test_endless_loop_is_stopped(monkeypatch):
    monkeypatch.setattr(emu, "TIME_LIMIT", 0.5)
    with pytest.raises(emu.EmulatorError, match="did not finish in time"):
        run("uint i = 0; while (in0[0] > 0.0f) { i++; } out[0] = float(i);", [mx.ones((8,))], (1,), (1, 1, 1),
            (1, 1, 1))


def test_unwritten_output_reads_as_nan():
    got = run("if (thread_position_in_grid.x != 7) { out[thread_position_in_grid.x] = in0[0]; }",
              [mx.ones((64,))], (64,), (64, 1, 1), (32, 1, 1))
    assert np.isnan(got[7]) and not np.isnan(np.delete(got, 7)).any()


def test_compile_error_names_the_kernel():
    with pytest.raises(emu.EmulatorError, match=r"(could not compile|type check rejects) custom_kernel_t"):
        run("out[0] = undeclared_thing;", [mx.ones((8,))], (8,), (8, 1, 1), (8, 1, 1))


# ---- static checks on the shipped kernel sources -----------------------------------------------------------

ATTRIBUTE_NAMES = [a for a, _ in emu.METAL_ATTRIBUTES]


def static_problems(header: str, bodies: dict[str, str]) -> list[str]:
    """Constructs MSL forbids or MLX's generator would mishandle; [] when the sources are clean."""
    problems = []
    for name, text in {"header": header, **bodies}.items():
        code = re.sub(r"//[^\n]*", "", text)
        if re.search(r"\[[&=]?\]\s*\(|\[[&=]\w*\]\s*\(", code):
            problems.append(f"{name}: lambda")
        if "std::" in code:
            problems.append(f"{name}: std::")
        if re.search(r"\bnew\b|\bdelete\b", code):
            problems.append(f"{name}: new/delete")
        if re.search(r"(?<![\w.])\d+\.\d*(?:e[+-]?\d+)?(?![\w.])", code):
            problems.append(f"{name}: double literal (Metal has no double; write 1.0f)")
        if re.search(r"\bthreadgroup\s+[\w:<>]+\s+\w+(\[[^\]]*\])*\s*=", code):
            problems.append(f"{name}: initialized threadgroup variable")
        for fn in re.finditer(r"\b\w+\s+(\w+)\s*\([^;{]*\)\s*\{", code):  # function definitions: recursion
            body, depth, i = "", 0, fn.end() - 1
            for i in range(fn.end() - 1, len(code)):
                depth += {"{": 1, "}": -1}.get(code[i], 0)
                if depth == 0:
                    break
            body = code[fn.end():i]
            if re.search(rf"\b{fn.group(1)}\s*\(", body):
                problems.append(f"{name}: recursion in {fn.group(1)}")
    for attr in ATTRIBUTE_NAMES:  # MLX adds a thread attribute only when the BODY names it
        if re.search(rf"\b{attr}\b", re.sub(r"//[^\n]*", "", header)):
            problems.append(f"header: uses {attr}, which only a kernel body can name")
    return problems


def shipped_sources():
    header = (METAL_DIR / "mxfp4.h").read_text()
    bodies = {p.name: p.read_text() for p in sorted(METAL_DIR.glob("*.metal"))}
    return header, bodies


def test_shipped_sources_pass_static_checks():
    header, bodies = shipped_sources()
    assert set(bodies) == {"moe_gate_up_swiglu.metal", "moe_down.metal"}
    assert static_problems(header, bodies) == []
    for name, text in bodies.items():
        assert text.startswith("//"), f"{name} must open with its layout / thread-mapping comment"
        used = {a for a in ATTRIBUTE_NAMES if re.search(rf"\b{a}\b", text)}
        assert used, f"{name} names no thread attribute"
        # every identifier that looks like a thread attribute is one MLX knows
        for word in set(re.findall(r"\b\w*(?:_in_grid|_in_threadgroup|_in_simdgroup|_per_\w+)\b", text)):
            assert word in ATTRIBUTE_NAMES or not word.startswith(("thread", "simdgroup", "quadgroup")), word


def test_static_checks_catch_violations():
    header = "inline float f(float x) { return x > 0 ? f(x - 1) : 0; }\n"
    bodies = {"bad.metal": "auto g = [&](int i) { return i; };\nstd::vector<int> v; int* p = new int;\nfloat h = 0.5;\n"
                           "threadgroup float t[4] = {0};\nuint k = thread_index_in_simdgroup;\n"}
    problems = static_problems(header + "uint z = thread_position_in_grid.x;", bodies)
    for expected in ("lambda", "std::", "new/delete", "double literal", "initialized threadgroup variable", "recursion in f",
                     "uses thread_position_in_grid"):
        assert any(expected in p for p in problems), (expected, problems)


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs MLX's Metal backend (a Mac) to print its own source")
def test_generated_text_equals_mlx_verbose_output(capfd):
    """On a Mac: MLX's own generated source (verbose=True) is exactly what the emulator compiles."""
    body = "out[thread_position_in_grid.x] = T(a[thread_position_in_grid.x] * b[0] + float(a_shape[0]));"
    inputs = [mx.ones((16,)), mx.array([2.0])]
    template = [("T", mx.float32), ("N", 4)]
    kernel = mx.fast.metal_kernel(name="emucheck", input_names=["a", "b"], output_names=["out"], source=body)
    mx.eval(kernel(inputs=inputs, output_shapes=[(16,)], output_dtypes=[mx.float32], grid=(16, 1, 1),
                   threadgroup=(16, 1, 1), template=template, verbose=True))
    printed = capfd.readouterr().out
    specs = [(a.dtype, a.shape) for a in inputs]
    _, text = emu.generate("emucheck", ["a", "b"], ["out"], body, "", specs, [mx.float32], template)
    assert text in printed
