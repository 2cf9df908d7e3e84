"""Read slices of safetensors tensors straight from the checkpoint files, counting what is read.

The data stays in the files (the OS page cache on Linux, the SSD on a Mac), outside MLX's working set.
Reads use pread rather than a memory map: a mapped file that shrinks under a running process kills it with
SIGBUS, while pread returns short and becomes one clear error. Every read first checks that the shard still
exists at its path with at least the size its header promised.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..safetensors_header import TensorInfo
from ..tensor_read import NUMPY, pread_exact
REMEDY = "the checkpoint changed while the model was running; restore or download it again, then reload"


class ShardReader:
    """pread() of byte ranges of the checkpoint's shards; `reads[(tensor name, index)]` counts reads of
    row `index` (an expert, an embedding row) and `bytes_read` totals them."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self.reads: Counter = Counter()
        self.bytes_read = 0

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open shard ({e.strerror}); {REMEDY}") from None
        return fd

    def read(self, info: TensorInfo, index: int, count: int = 1) -> np.ndarray:
        """Rows index..index+count of tensor `info` along its first axis, as a numpy array (a copy)."""
        rows = info.shape[0]
        if not 0 <= index < index + count <= rows:
            raise IndexError(f"{info.name}: rows {index}..{index + count} out of 0..{rows}")
        row_bytes = info.nbytes // rows
        start, n = info.start + index * row_bytes, count * row_bytes
        try:
            size = os.stat(info.file).st_size
        except OSError:
            raise CheckpointError(f"{info.file}: shard disappeared (needed for {info.name}); {REMEDY}") from None
        if size < info.end:
            raise CheckpointError(f"{info.file}: shard shrank to {size} bytes but {info.name} ends at byte "
                                  f"{info.end}; {REMEDY}")
        buf = np.empty(n, dtype=np.uint8)
        pread_exact(self._fd(info.file), memoryview(buf), start, info, REMEDY)
        for i in range(index, index + count):
            self.reads[(info.name, i)] += 1
        self.bytes_read += n
        return buf.view(NUMPY[info.dtype]).reshape(count, *info.shape[1:])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

