"""Bytes of safetensors tensors read straight from the files by offset (pread), for the modules that must not
load whole tensors: offloading (one expert or embedding row at a time) and distribution (one rank's slice).
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from .errors import CheckpointError
from .safetensors_header import TensorInfo

# numpy holders of each safetensors dtype; bf16 travels as its uint16 bit patterns (see to_mx)
NUMPY = {"U8": np.uint8, "I8": np.int8, "F16": np.float16, "BF16": np.uint16, "F32": np.float32,
         "U32": np.uint32, "I32": np.int32, "I64": np.int64}


def pread_exact(fd: int, dest: memoryview, offset: int, info: TensorInfo, remedy: str) -> None:
    """Fill dest with the file's bytes from offset (pread may return less than asked: loop); a file that ends
    first is one CheckpointError naming it, the tensor and the remedy."""
    got = 0
    while got < len(dest):
        n = os.preadv(fd, [dest[got:]], offset + got)
        if n <= 0:
            raise CheckpointError(f"{info.file}: short read of {info.name} ({got} of {len(dest)} bytes at "
                                  f"{offset}); {remedy}")
        got += n


def to_mx(a: np.ndarray, dtype: str, cast: mx.Dtype | None = None) -> mx.array:
    """A numpy array read from a file -> MLX (bf16 bit patterns become bf16), cast if asked."""
    x = mx.array(a)
    if dtype == "BF16":
        x = mx.view(x, mx.bfloat16)
    return x.astype(cast) if cast is not None and x.dtype != cast else x
