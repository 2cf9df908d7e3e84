"""Read one rank's slice of a safetensors tensor by file offset: never the whole tensor, never the whole file.

A slice along axis a of a C-ordered tensor is `outer` runs of contiguous bytes, one per index of the axes
before a, `stride` bytes apart. Long runs are read one pread each; short runs (the down projection's blocks:
720 bytes of every 1440 for gpt-oss-120b on 2 ranks) are read a bounded span of whole rows at a time and
cut in memory, since the disk reads those whole pages anyway; the process never holds more than SPAN_BYTES of
bytes it does not keep.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from ..safetensors_header import DTYPE_BYTES, TensorInfo
from ..tensor_read import NUMPY, pread_exact, to_mx
from .layout import Slice

SPAN_BYTES = 8 << 20  # the most bytes of other ranks' slices held at once
LONG_RUN = 4096  # runs of a page or more are read one by one; shorter ones share their pages with other ranks
REMEDY = "download it again"


class ReadStats:
    """Bytes a rank kept and bytes it read from files (kept + other ranks' interleaved bytes)."""

    def __init__(self):
        self.kept = 0
        self.read = 0


def read_slice(info: TensorInfo, s: Slice | None, stats: ReadStats | None = None) -> mx.array:
    """Tensor `info`'s slice s (None: whole) as an mx.array of the file's dtype (bf16 stays bf16)."""
    if info.dtype not in NUMPY:
        raise CheckpointError(f"{info.file}: tensor {info.name}: dtype {info.dtype} is not supported")
    shape = list(info.shape)
    if s is None:
        s = Slice(0, 0, shape[0] if shape else 1)
        shape = shape or [1]
    item = DTYPE_BYTES[info.dtype]
    inner = math.prod(shape[s.axis + 1:]) * item
    outer = math.prod(shape[:s.axis])
    stride, offset, run = shape[s.axis] * inner, s.lo * inner, (s.hi - s.lo) * inner
    out = np.empty(outer * run, dtype=np.uint8)
    stats = stats or ReadStats()
    try:
        fd = os.open(info.file, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read ({e.strerror or e})") from None
    try:
        if run == stride or run >= LONG_RUN:
            for o in range(outer):
                pread_exact(fd, memoryview(out)[o * run:(o + 1) * run], info.start + o * stride + offset, info, REMEDY)
            stats.read += outer * run
        else:
            rows = max(1, SPAN_BYTES // stride)
            buf = np.empty(rows * stride, dtype=np.uint8)
            for o in range(0, outer, rows):
                k = min(rows, outer - o)
                pread_exact(fd, memoryview(buf)[:k * stride], info.start + o * stride, info, REMEDY)
                out[o * run:(o + k) * run] = buf[:k * stride].reshape(k, stride)[:, offset:offset + run].reshape(-1)
                stats.read += k * stride
    finally:
        os.close(fd)
    stats.kept += out.size
    shape[s.axis] = s.hi - s.lo
    return to_mx(out.view(NUMPY[info.dtype]).reshape(info.shape and shape or ()), info.dtype)

