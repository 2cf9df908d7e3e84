"""Read and check a safetensors header without touching tensor data.

The loader uses it to validate every file before MLX maps it (a truncated or corrupt file must be one
clear error, not a crash), and the memory planner uses it to size a model without reading its weights.
Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors spec's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: "BF16", "U8", ...
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | Path, *, check_size: bool = True) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo for one file. check_size=False accepts a file whose data is absent
    or shorter than the header says (a header-only download, for planning)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, "
                    f"file has {size}); delete it and download again"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); delete it and download again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    header.pop("__metadata__", None)

    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        try:
            dtype, shape, (lo, hi) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {name}: malformed header entry") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name}: unknown dtype {dtype!r}")
        want = math.prod(shape) * DTYPE_BYTES[dtype]
        if not (isinstance(lo, int) and isinstance(hi, int)) or lo < 0 or hi - lo != want:
            raise CheckpointError(
                f"{path}: tensor {name}: header offsets {lo}..{hi} do not fit {dtype} {list(shape)}"
            )
        if check_size and base + hi > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} ends at byte {base + hi} but the file has {size}; "
                "delete it and download again"
            )
        out[name] = TensorInfo(name, dtype, shape, path, base + lo, base + hi)
    return out

