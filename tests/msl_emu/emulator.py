"""Run mx.fast.metal_kernel kernels on the CPU: the exact Metal source MLX would generate, compiled as C++.

`metal_kernel(...)` has mx.fast.metal_kernel's signature and returns a callable with the same keywords, so a
test can monkeypatch `mx.fast.metal_kernel` with it. Each call:
1. generates the kernel text as MLX does (mlx/backend/common/metal_kernel.cpp, `write_signature`): the header,
   a `template <...>` line if template arguments are given, `[[kernel]] void custom_kernel_<name>...(` with
   inputs as `const device T*` (`const constant T*` under 8 elements, `const constant T&` when 0-d), each
   followed by `x_shape`/`x_strides`/`x_ndim` only if the body names them, outputs `device T*`, then the thread
   attributes whose names occur in the body, the body, and the explicit instantiation line;
2. when clang is installed, type-checks that text as Metal would (msl_check.h: C++14, MSL's dialect, with
   device / constant / threadgroup / thread kept as clang address spaces, so mixing them up does not
   compile; no double; no C++17);
3. compiles it as C++14 with msl_shim.h in front and runtime.h behind (address spaces erased, an alignment
   sanitizer that traps on misaligned vector loads). The one textual change: the attribute lists on the
   explicit instantiation line are dropped (C++ forbids attributes there); every other attribute is an
   unknown attribute the compiler ignores;
4. runs the grid with runtime.h's scheduler in the chosen thread order (thread_order) and buffer placement
   (alignment) and returns the outputs.
Compiled libraries and passed type checks are cached per source text and compiler (in-process and as files
in a temp dir, $MSL_EMU_CACHE).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX: inputs with fewer elements go to the constant address space
ORDERS = {"forward": 0, "reverse": 1, "random": 2}

# MLX's list, in its order: a parameter is added when its name occurs anywhere in the body (substring match).
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"), ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"), ("grid_origin", "uint3"), ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"), ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"), ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"), ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"), ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"), ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"), ("threadgroups_per_grid", "uint3"), ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"), ("threads_per_threadgroup", "uint3"),
]

TYPE_NAMES = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.float64: "double",
    mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t",
    mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
}

_settings = threading.local()


class EmulatorError(RuntimeError):
    """A kernel bug the emulator caught (or a compile error): the message says what and where."""


@contextlib.contextmanager
def thread_order(order: str, seed: int = 0):
    """Run every emulated launch inside the block with lanes in `order`: forward, reverse or random(seed)."""
    old = getattr(_settings, "order", ("forward", 0))
    _settings.order = (order, seed)
    try:
        yield
    finally:
        _settings.order = old


@contextlib.contextmanager
def compiler(cxx: str):
    """Compile every emulated kernel inside the block with `cxx` (g++ or clang++)."""
    old = getattr(_settings, "cxx", None)
    _settings.cxx = cxx
    try:
        yield
    finally:
        _settings.cxx = old


@contextlib.contextmanager
def alignment(mode: str):
    """Buffer placement inside the block: "end" (the default: each buffer ends exactly at a guard page, so a
    read one element past the end faults) or "element" (each buffer starts only as aligned as its element
    type, at an address = element size mod 16, as a sliced MLX array may: a uint2 / uint4 load that assumes
    more traps; the end guard is then up to 15 bytes away)."""
    if mode not in ("end", "element"):
        raise ValueError(f"alignment mode {mode!r}")
    old = getattr(_settings, "alignment", "end")
    _settings.alignment = mode
    try:
        yield
    finally:
        _settings.alignment = old


def available_compilers() -> list[str]:
    return [c for c in ("g++", "clang++") if shutil.which(c)]


def _default_cxx() -> str:
    chosen = getattr(_settings, "cxx", None)
    if chosen:
        return chosen
    found = available_compilers()
    if not found:
        raise EmulatorError("the MSL emulator needs g++ or clang++ (apt-get install g++ clang)")
    return found[0]


# ---- the text MLX generates ---------------------------------------------------------------------------------

def _template_value(v) -> str:
    if isinstance(v, mx.Dtype):
        return TYPE_NAMES[v]
    if isinstance(v, bool):
        return str(int(v))
    return str(int(v))


def _template_kind(v) -> str:
    return "typename" if isinstance(v, mx.Dtype) else "bool" if isinstance(v, bool) else "int"


def generate(name, input_names, output_names, source, header, inputs, output_dtypes, template=None):
    """(kernel_name, source text) exactly as MLX builds them for these inputs ([(dtype, shape)]) and template."""
    template = list(template or [])
    kname = "custom_kernel_" + name
    tdef = ""
    if template:
        tdef = "<" + ", ".join(_template_value(v) for _, v in template) + ">"
        thash = tdef.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
        kname += "_" + thash
    for dtype, shape in inputs:
        size = int(np.prod(shape)) if shape else 1
        kname += "_" + TYPE_NAMES[dtype] + ("s" if len(shape) == 0 else "c" if size < MAX_CONSTANT_ARRAY_SIZE else "")
    for dtype in output_dtypes:
        kname += "_" + TYPE_NAMES[dtype]
    attributes = [f"  {t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES if a in source]

    text = header
    if template:
        text += "template <" + ", ".join(f"{_template_kind(v)} {n}" for n, v in template) + ">\n"
    text += f"[[kernel]] void {kname}(\n"
    index = 0
    for n, (dtype, shape) in zip(input_names, inputs):
        size = int(np.prod(shape)) if shape else 1
        location = "constant" if size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if len(shape) == 0 else "*"
        text += f"  const {location} {TYPE_NAMES[dtype]}{ref} {n} [[buffer({index})]],\n"
        index += 1
        if len(shape) > 0:
            for suffix, decl in (("_shape", "const constant int*"), ("_strides", "const constant int64_t*"),
                                 ("_ndim", "const constant int&")):
                if n + suffix in source:
                    text += f"  {decl} {n}{suffix} [[buffer({index})]],\n"
                    index += 1
    for i, (n, dtype) in enumerate(zip(output_names, output_dtypes)):
        text += f"  device {TYPE_NAMES[dtype]}* {n} [[buffer({index})]]"
        last = index >= len(inputs) + len(output_names) - 1 and not attributes
        text += ") {\n" if last else ",\n"
        index += 1
    for i, attr in enumerate(attributes):
        text += attr + (",\n" if i < len(attributes) - 1 else ") {\n")
    text += source + "\n}\n"
    if template:
        full = kname + tdef
        text += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({full}) {full};\n'
    return kname, text


def _invoke(kname, template, input_names, inputs, output_names, output_dtypes, source) -> str:
    """The C++ call of the kernel from the buffer array, mirroring MLX's buffer indices."""
    args, index = [], 0
    for n, (dtype, shape) in zip(input_names, inputs):
        t = TYPE_NAMES[dtype]
        args.append(f"*(const {t}*)b[{index}]" if len(shape) == 0 else f"(const {t}*)b[{index}]")
        index += 1
        if len(shape) > 0:
            for suffix, expr in (("_shape", "(const int*)b[{}]"), ("_strides", "(const int64_t*)b[{}]"),
                                 ("_ndim", "*(const int*)b[{}]")):
                if n + suffix in source:
                    args.append(expr.format(index))
                    index += 1
    for n, dtype in zip(output_names, output_dtypes):
        args.append(f"({TYPE_NAMES[dtype]}*)b[{index}]")
        index += 1
    args += [f"a.{a}" for a, _ in METAL_ATTRIBUTES if a in source]
    targs = "<" + ", ".join(_template_value(v) for _, v in template) + ">" if template else ""
    call = ",\n    ".join(args)
    return f"static void emu_invoke(void** b, const emu::Attrs& a) {{\n  {kname}{targs}(\n    {call});\n}}\n"


# ---- compile and run ------------------------------------------------------------------------------------------

_libs: dict[str, tuple] = {}
_lock = threading.Lock()


def _cache_dir() -> Path:
    d = Path(os.environ.get("MSL_EMU_CACHE", Path(tempfile.gettempdir()) / f"msl_emu_{os.getuid()}"))
    d.mkdir(parents=True, exist_ok=True)
    return d


LANGUAGE = "-std=c++14"


def _flags(cxx: str) -> list[str]:
    # C++14: the dialect MSL is based on. The alignment sanitizer traps (SIGILL, reported by runtime.h) on a
    # vector load or store at an address its MSL type's alignment does not divide (uint2 8, uint4 16 bytes).
    flags = [LANGUAGE, "-O1", "-g0", "-fPIC", "-shared", "-U_FORTIFY_SOURCE", "-fvisibility=hidden",
             "-fno-strict-aliasing", "-fsanitize=alignment", f"-I{HERE}"]
    if "clang" in cxx:
        flags += ["-Wno-unknown-attributes", "-Wno-ignored-attributes", "-fsanitize-trap=alignment"]
        version = subprocess.run([cxx, "-dumpversion"], capture_output=True, text=True).stdout
        if int(version.split(".")[0] or 0) >= 16:
            flags += ["-Xclang", "-ffloat16-excess-precision=none"]
    else:
        flags += ["-Wno-attributes", "-fno-gnu-unique", "-fsanitize-undefined-trap-on-error"]
    return flags


_checked: set[str] = set()


def check_types(kname: str, text: str) -> bool:
    """clang's MSL type check of a generated kernel (msl_check.h: C++14, address spaces kept). Raises
    EmulatorError on a type error; returns False when clang is not installed (g++ cannot check address spaces)."""
    clang = shutil.which("clang++")
    if not clang:
        return False
    src = f'#line 1 "{kname}.metal"\n' + _strip_host_name(kname, text)
    header = HERE / "msl_check.h"
    key = hashlib.sha256((clang + "\0" + src + header.read_text()).encode()).hexdigest()[:24]
    marker = _cache_dir() / f"check_{key}.ok"
    if key in _checked or marker.exists():
        _checked.add(key)
        return True
    r = subprocess.run([clang, LANGUAGE, "-Werror=c++17-extensions", "-fsyntax-only", "-fno-exceptions", "-fno-rtti",
                        "-Wno-unknown-attributes",
                        "-Wno-ignored-attributes", "-include", str(header), "-x", "c++", "-"],
                       input=src, capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise EmulatorError(f"clang's MSL type check rejects {kname} (as the Metal compiler would):\n{r.stderr[-6000:]}")
    marker.touch()
    _checked.add(key)
    return True


def _strip_host_name(kname: str, text: str) -> str:
    """C++ allows no attributes on an explicit instantiation: the one textual change to MLX's source."""
    return text.replace(f'template [[host_name("{kname}")]] [[kernel]] decltype(', "template decltype(")


def compile_kernel(kname: str, text: str, invoke: str, cxx: str):
    """-> (ctypes function emu_run, [(offset, size)] of the kernel's threadgroup statics). Cached.
    Runs clang's type check first when clang is installed (see check_types)."""
    check_types(kname, text)
    tu = ('#include "msl_shim.h"\n' + f'#line 1 "{kname}.metal"\n' + text +
          '#include "runtime.h"\n' + invoke)
    tu = _strip_host_name(kname, tu)
    key = hashlib.sha256((cxx + "\0" + " ".join(_flags(cxx)) + "\0" + tu + (HERE / "msl_shim.h").read_text()
                          + (HERE / "runtime.h").read_text()).encode()).hexdigest()[:24]
    with _lock:
        if key in _libs:
            return _libs[key]
        so = _cache_dir() / f"{kname[:80]}_{key}.so"
        if not so.exists():
            src = so.with_suffix(".cpp")
            src.write_text(tu)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            r = subprocess.run([cxx, *_flags(cxx), "-o", str(tmp), str(src)], capture_output=True, text=True)
            if r.returncode:
                raise EmulatorError(f"{cxx} could not compile {kname}:\n{r.stderr[-6000:]}")
            os.replace(tmp, so)
        syms = {}
        for line in subprocess.run(["nm", "-S", "--defined-only", str(so)], capture_output=True,
                                   text=True, check=True).stdout.splitlines():
            parts = line.split()
            if len(parts) == 4:
                syms[parts[3]] = (int(parts[0], 16), int(parts[1], 16), parts[2])
        base = syms["emu_run"][0]
        prefix = f"_ZZ{len(kname)}{kname}"  # function-local statics of the kernel = its threadgroup memory
        statics = [(addr - base, size) for n, (addr, size, t) in syms.items()
                   if n.startswith(prefix) and t in "bBdDuVv"]
        lib = ctypes.CDLL(str(so))
        fn = lib.emu_run
        fn.restype = ctypes.c_int
        _libs[key] = (fn, statics, lib)
        return _libs[key]


def _to_host(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(mx.view(a, mx.uint16))
    return np.array(a)


def _from_host(buf: np.ndarray, dtype, shape) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.view(mx.array(buf.view(np.uint16)), mx.bfloat16).reshape(shape)
    return mx.array(buf.view(np.dtype(_NP[dtype]))).reshape(shape)


_NP = {mx.float32: "float32", mx.float16: "float16", mx.float64: "float64", mx.bool_: "bool", mx.int8: "int8",
       mx.int16: "int16", mx.int32: "int32", mx.int64: "int64", mx.uint8: "uint8", mx.uint16: "uint16",
       mx.uint32: "uint32", mx.uint64: "uint64"}


TIME_LIMIT = 120.0  # seconds per launch before the emulator calls it an endless loop


def launch(kname, text, invoke, arrays, output_shapes, output_dtypes, grid, threadgroup, init_value=None,
           order=None, seed=0, cxx=None, time_limit=None):
    """Run a generated kernel; returns the outputs as mx arrays. Raises EmulatorError on any caught bug."""
    if order is None:
        order, seed = getattr(_settings, "order", ("forward", 0))
    fn, statics, _ = compile_kernel(kname, text, invoke, cxx or _default_cxx())
    host, esize = [], []
    for a, (shape_needed, strides_needed, ndim_needed) in arrays:
        host.append(np.ascontiguousarray(_to_host(a)).reshape(-1).view(np.uint8))
        esize.append(a.dtype.size)
        if a.ndim > 0:
            if shape_needed:
                host.append(np.array(a.shape, dtype=np.int32).view(np.uint8))
                esize.append(4)
            if strides_needed:
                strides = np.cumprod((list(a.shape[1:]) + [1])[::-1])[::-1]
                host.append(np.array(strides, dtype=np.int64).view(np.uint8))
                esize.append(8)
            if ndim_needed:
                host.append(np.array([a.ndim], dtype=np.int32).view(np.uint8))
                esize.append(4)
    n_in = len(host)
    outs = []
    for shape, dtype in zip(output_shapes, output_dtypes):
        size = int(np.prod(shape)) if len(shape) else 1
        if init_value is None:
            buf = np.full(size * dtype.size, 0xFF, dtype=np.uint8)  # poison: NaN for floats
        else:
            buf = _to_host(mx.full((size,), init_value, dtype=dtype)).view(np.uint8).copy()
        outs.append(buf)
        esize.append(dtype.size)
    host += outs
    element = getattr(_settings, "alignment", "end") == "element"
    base_mod = (ctypes.c_int * len(host))(*[(e % 16 if element else -1) for e in esize])
    n = len(host)
    ptrs = (ctypes.c_void_p * n)(*[h.ctypes.data for h in host])
    nbytes = (ctypes.c_uint64 * n)(*[h.nbytes for h in host])
    writable = (ctypes.c_int * n)(*([0] * n_in + [1] * len(outs)))
    g = (ctypes.c_int64 * 3)(*grid)
    t = (ctypes.c_int64 * 3)(*threadgroup)
    offs = (ctypes.c_int64 * max(1, len(statics)))(*[o for o, _ in statics])
    sizes = (ctypes.c_int64 * max(1, len(statics)))(*[s for _, s in statics])
    err = ctypes.create_string_buffer(4096)
    rc = fn(n, ptrs, nbytes, writable, base_mod, g, t, ORDERS[order], ctypes.c_uint64(seed), len(statics), offs, sizes,
            ctypes.c_double(time_limit or TIME_LIMIT), err, len(err))
    if rc:
        raise EmulatorError(f"{kname}: {err.value.decode(errors='replace')}")
    return [_from_host(b, d, s) for b, d, s in zip(outs, output_dtypes, output_shapes)]


def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, compile_options=None):
    """Stand-in for mx.fast.metal_kernel that runs the kernel in the emulator."""
    if not output_names:
        raise ValueError("[metal_kernel] Must specify at least one output.")
    if atomic_outputs:
        raise NotImplementedError("the emulator does not model atomic outputs")
    input_names, output_names = list(input_names), list(output_names)

    def call(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None,
             verbose=False, stream=None):
        arrays = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        specs = [(a.dtype, tuple(a.shape)) for a in arrays]
        kname, text = generate(name, input_names, output_names, source, header, specs, output_dtypes, template)
        if verbose:
            print(f"Generated source code for `{name}`:\n```\n{text}\n```")
        invoke = _invoke(kname, template, input_names, specs, output_names, output_dtypes, source)
        needs = [(n + "_shape" in source, n + "_strides" in source, n + "_ndim" in source) for n in input_names]
        return launch(kname, text, invoke, list(zip(arrays, needs)), [tuple(s) for s in output_shapes],
                      list(output_dtypes), tuple(grid), tuple(threadgroup), init_value)

    return call

