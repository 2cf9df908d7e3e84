"""Which part of every tensor each rank holds (tensor parallelism, as Megatron-LM and mlx-lm split gpt-oss).

- Attention: the 64 query heads and 8 KV heads split into N equal ranges (N must divide both, so N is
  1, 2, 4 or 8 on the hub models); q/k/v rows, the sinks, and the o_proj input columns follow the heads.
- Experts: the intermediate dimension I splits into N ranges of whole MXFP4 blocks (32 values), larger
  shares first when the blocks do not divide evenly. gate_up rows are interleaved (gate, up, gate, ...), so
  intermediate units [a, b) are rows [2a, 2b): gate/up pairs stay together; the down projection keeps its
  input columns [a, b), i.e. its blocks [a/32, b/32).
- The two outputs that are summed over ranks (o_proj, the experts' down projection) add their bias on rank 0
  only; the other ranks hold zeros there, so the all_sum adds it exactly once.
- Everything else (embedding, unembedding, norms, router) is replicated: the embedding lookup costs nothing,
  and a vocabulary-split unembedding would need the logits gathered (0.8 MB per token in float32, 400 MB per
  512-token prefill chunk) or a distributed sampler, while it is only ~3.5% of gpt-oss-120b's bytes.

Nothing here reads data: `rank_view()` gives the planner a rank's checkpoint as if its slices were files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..checkpoint import MXFP4_BLOCK
from ..config import GptOssConfig
from ..errors import GptOssError
from ..safetensors_header import DTYPE_BYTES, TensorInfo


@dataclass(frozen=True)
class Slice:
    """Rows [lo, hi) of `axis`; zero=True: this rank holds zeros of the full shape (a bias added on rank 0)."""

    axis: int = 0
    lo: int = 0
    hi: int = 0
    zero: bool = False


def split(units: int, n: int) -> list[tuple[int, int]]:
    """[0, units) in n contiguous ranges, the first `units % n` one longer."""
    base, extra = divmod(units, n)
    out, lo = [], 0
    for r in range(n):
        hi = lo + base + (r < extra)
        out.append((lo, hi))
        lo = hi
    return out


def check_ranks(cfg: GptOssConfig, n: int) -> None:
    """Refuse a rank count this model cannot be split into, naming the counts that work."""
    nq, nkv, blocks = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size // MXFP4_BLOCK
    if n < 1 or nkv % n or nq % n or blocks < n:
        ok = [k for k in range(1, nkv + 1) if nkv % k == 0 and nq % k == 0 and blocks >= k]
        raise GptOssError(f"cannot split this model over {n} ranks: its {nq} query and {nkv} key/value heads must "
                          f"divide evenly (and its {blocks} MXFP4 blocks of intermediate size go one or more per "
                          f"rank); use {', '.join(map(str, ok))} ranks")


def heads(cfg: GptOssConfig, rank: int, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(query head range, KV head range) of this rank."""
    q, kv = cfg.num_attention_heads // n, cfg.num_key_value_heads // n
    return (rank * q, (rank + 1) * q), (rank * kv, (rank + 1) * kv)


def intermediate(cfg: GptOssConfig, rank: int, n: int) -> tuple[int, int]:
    """This rank's intermediate units [a, b), a and b multiples of 32."""
    lo, hi = split(cfg.intermediate_size // MXFP4_BLOCK, n)[rank]
    return lo * MXFP4_BLOCK, hi * MXFP4_BLOCK


def rank_config(cfg: GptOssConfig, rank: int, n: int) -> GptOssConfig:
    """The config of the model one rank runs: its heads and intermediate share (the model's shapes follow)."""
    check_ranks(cfg, n)
    a, b = intermediate(cfg, rank, n)
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // n,
                               num_key_value_heads=cfg.num_key_value_heads // n, intermediate_size=b - a)


def slice_of(name: str, shape: tuple[int, ...], cfg: GptOssConfig, rank: int, n: int) -> Slice | None:
    """What rank holds of checkpoint tensor `name` (hub naming): a Slice, or None for the whole tensor."""
    if n == 1 or ".layers." not in name:
        return None
    D = cfg.head_dim
    (q0, q1), (k0, k1) = heads(cfg, rank, n)
    a, b = intermediate(cfg, rank, n)
    leaf = name.split(".self_attn.")[-1] if ".self_attn." in name else name.split(".mlp.experts.")[-1]
    if ".self_attn." in name:
        if leaf.startswith("q_proj."):
            return Slice(0, q0 * D, q1 * D)
        if leaf.startswith(("k_proj.", "v_proj.")):
            return Slice(0, k0 * D, k1 * D)
        if leaf == "o_proj.weight":
            return Slice(1, q0 * D, q1 * D)
        if leaf == "sinks":
            return Slice(0, q0, q1)
        if leaf == "o_proj.bias":
            return None if rank == 0 else Slice(zero=True)
        return None
    if ".mlp.experts." not in name:
        return None
    if leaf in ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias"):
        return Slice(1, 2 * a, 2 * b)  # interleaved gate/up rows: the pairs of units [a, b)
    if leaf in ("down_proj_blocks", "down_proj_scales"):
        return Slice(2, a // MXFP4_BLOCK, b // MXFP4_BLOCK)  # whole 32-value blocks of the input dimension
    if leaf == "down_proj_bias":
        return None if rank == 0 else Slice(zero=True)
    if leaf == "gate_up_proj":  # bf16 experts, [E, in=H, out=2I]
        return Slice(2, 2 * a, 2 * b)
    if leaf == "down_proj":  # [E, in=I, out=H]
        return Slice(1, a, b)
    return None


def sliced_shape(shape: tuple[int, ...], s: Slice | None) -> tuple[int, ...]:
    if s is None or s.zero:
        return tuple(shape)
    return tuple(s.hi - s.lo if i == s.axis else d for i, d in enumerate(shape))


def rank_view(ckpt, rank: int, n: int):
    """ckpt (mlx_gptoss.memory.Checkpoint) as rank `rank` of n holds it: its config and tensor shapes."""
    cfg = ckpt.config
    tensors = {}
    for name, t in ckpt.tensors.items():
        shape = sliced_shape(t.shape, slice_of(name, t.shape, cfg, rank, n))
        nbytes = math.prod(shape) * DTYPE_BYTES[t.dtype]
        tensors[name] = TensorInfo(t.name, t.dtype, shape, t.file, t.start, t.start + nbytes)
    return dataclasses.replace(ckpt, config=rank_config(cfg, rank, n), tensors=tensors)


def fewest_ranks(ckpt, fits, counts=(2, 4, 8)) -> int | None:
    """The smallest rank count in `counts` this model splits into whose rank-0 share (the largest)
    satisfies fits(rank_view), or None."""
    for n in counts:
        try:
            check_ranks(ckpt.config, n)
        except GptOssError:
            continue
        if fits(rank_view(ckpt, 0, n)):
            return n
    return None
