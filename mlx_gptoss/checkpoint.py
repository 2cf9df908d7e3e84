"""Checkpoint files -> the model's weights, checked tensor by tensor before anything is computed.

Hub layout (root folder of openai/gpt-oss-*): sharded safetensors + model.safetensors.index.json.
MXFP4 experts (`*_blocks` uint8 [E, R, C/32, 16], `*_scales` uint8 [E, R, C/32]) become MLX mxfp4
weights by a byte view: the bytes are already MLX's packing (low nibble = even element), so nothing is
dequantized. Unquantized (bf16) checkpoints store experts as [E, in, out] matrices (transformers'
layout); those are quantized to mxfp4 one expert at a time, since mx.quantize peaks at ~20x its input.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from .config import GptOssConfig
from .errors import CheckpointError
from .safetensors_header import TensorInfo, read_header

INDEX_FILE = "model.safetensors.index.json"
MXFP4_BLOCK = 32  # values per scale byte
EXPERT_PARTS = ("gate_up_proj", "down_proj")


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: those its index names, else every root *.safetensors."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: corrupt index (no weight_map); download the model again") from None
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: missing shard named in {INDEX_FILE}; download the model again")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weight files in this folder")
    return files


def read_tensor_index(folder: Path, *, check_size: bool = True) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, from the headers alone; checks that no name appears twice.
    check_size=False accepts files whose data is absent (planning before or during a download)."""
    tensors: dict[str, TensorInfo] = {}
    for f in safetensors_files(folder):
        for name, info in read_header(f, check_size=check_size).items():
            if name in tensors:
                raise CheckpointError(f"{f}: tensor {name} also appears in {tensors[name].file.name}")
            tensors[name] = info
    return tensors


def expected_tensors(cfg: GptOssConfig, mxfp4: bool) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Hub tensor name -> (shape, accepted dtypes)."""
    H, I, E, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    floats = ("BF16", "F16", "F32")
    spec = {
        "model.embed_tokens.weight": ((cfg.vocab_size, H), floats),
        "model.norm.weight": ((H,), floats),
        "lm_head.weight": ((cfg.vocab_size, H), floats),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        spec[p + "input_layernorm.weight"] = ((H,), floats)
        spec[p + "post_attention_layernorm.weight"] = ((H,), floats)
        for name, rows in (("q_proj", nq * D), ("k_proj", nkv * D), ("v_proj", nkv * D)):
            spec[p + f"self_attn.{name}.weight"] = ((rows, H), floats)
            spec[p + f"self_attn.{name}.bias"] = ((rows,), floats)
        spec[p + "self_attn.o_proj.weight"] = ((H, nq * D), floats)
        spec[p + "self_attn.o_proj.bias"] = ((H,), floats)
        spec[p + "self_attn.sinks"] = ((nq,), floats)
        spec[p + "mlp.router.weight"] = ((E, H), floats)
        spec[p + "mlp.router.bias"] = ((E,), floats)
        for part, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            q = p + f"mlp.experts.{part}"
            spec[q + "_bias"] = ((E, rows), floats)
            if mxfp4:
                spec[q + "_blocks"] = ((E, rows, cols // MXFP4_BLOCK, 16), ("U8",))
                spec[q + "_scales"] = ((E, rows, cols // MXFP4_BLOCK), ("U8",))
            else:
                spec[q] = ((E, cols, rows), floats)
    return spec


def check_tensors(cfg: GptOssConfig, tensors: dict[str, TensorInfo]) -> bool:
    """Raise on any missing, unexpected, mis-shaped or mis-typed tensor. Returns True for MXFP4 experts."""
    for dim, name in ((cfg.hidden_size, "hidden_size"), (cfg.intermediate_size, "intermediate_size")):
        if dim % MXFP4_BLOCK:
            raise CheckpointError(f"config: {name} {dim} is not a multiple of {MXFP4_BLOCK} (MXFP4 block size)")
    mxfp4 = any(n.endswith("_blocks") for n in tensors)
    spec = expected_tensors(cfg, mxfp4)
    for name, (shape, dtypes) in spec.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"missing tensor {name} (no safetensors file of this checkpoint has it)")
        if info.shape != shape:
            hint = ""
            if name.endswith(("_blocks", "_scales")):
                hint = "; its MXFP4 blocks and scales disagree with config.json"
            raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}{hint}")
        if info.dtype not in dtypes:
            raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, expected {' or '.join(dtypes)}")
    for name, info in tensors.items():
        if name not in spec:
            raise CheckpointError(f"{info.file}: unexpected tensor {name}; not a gpt-oss checkpoint of this config")
    return mxfp4


def load_weights(tensors: dict[str, TensorInfo], dtype: mx.Dtype) -> list[tuple[str, mx.array]]:
    """(model parameter name, array) pairs for a checked tensor index (read_tensor_index + check_tensors),
    lazily read: MLX maps each tensor when it is first evaluated."""
    raw: dict[str, mx.array] = {}
    for f in sorted({t.file for t in tensors.values()}):
        try:
            raw.update(mx.load(str(f), format="safetensors"))
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{f}: MLX cannot read this safetensors file ({e})") from None
    out = []
    for name, a in raw.items():
        part = next((p for p in EXPERT_PARTS if f"experts.{p}" in name), None)
        if part is None or name.endswith("_bias"):
            out.append((name, a.astype(dtype)))
        elif name.endswith("_blocks"):
            E, R, G, B = a.shape
            out.append((name[: -len("_blocks")], mx.view(a.reshape(E, R, G * B), mx.uint32)))
        elif name.endswith("_scales"):
            out.append((name, a))
        else:  # bf16 experts, [E, in, out]
            w, s = quantize_experts(a)
            out += [(name, w), (name + "_scales", s)]
    return out


def quantize_experts(w_in_out: mx.array) -> tuple[mx.array, mx.array]:
    """[E, in, out] float -> mxfp4 (uint32 [E, out, in/8], uint8 [E, out, in/32]), one expert at a time."""
    ws, ss = [], []
    for e in range(w_in_out.shape[0]):
        q, s = mx.quantize(w_in_out[e].T.astype(mx.float32), group_size=MXFP4_BLOCK, bits=4, mode="mxfp4")
        mx.eval(q, s)
        ws.append(q)
        ss.append(s)
    return mx.stack(ws), mx.stack(ss)
