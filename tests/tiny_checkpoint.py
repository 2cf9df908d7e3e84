"""Tiny gpt-oss checkpoints written by the tests, in the exact hub layout (and OpenAI's original layout).

Weights are random but real: bf16 tensors and MXFP4 expert bytes (random E2M1 codes + E8M0 scales), with
the hub's tensor names, shapes, dtypes, sharding and index file. Nothing here uses mlx_gptoss, so the
files are an independent input for both our loader and the reference implementations.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def hub_config(**overrides) -> dict:
    cfg = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "num_hidden_layers": 4,
        "num_local_experts": 8,
        "num_experts_per_tok": 4,
        "experts_per_token": 4,
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 64,
        "head_dim": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 8,
        "initial_context_length": 4096,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "swiglu_limit": 7.0,
        "rope_theta": 150000,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": 4096, "truncate": False},
        "attention_bias": True,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    }
    cfg.update(overrides)
    if cfg["vocab_size"] > 200012:  # the harmony special tokens exist only in the real vocabulary
        cfg.setdefault("eos_token_id", 200002)
        cfg.setdefault("pad_token_id", 199999)
    n = cfg["num_hidden_layers"]
    cfg.setdefault("layer_types", ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)])
    return cfg


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(u: np.ndarray) -> np.ndarray:
    return (u.astype(np.uint32) << 16).view(np.float32)


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[..., G, 16] uint8 codes + [..., G] uint8 exponents -> float32 [..., G*32] (low nibble first)."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    vals = E2M1[codes] * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return vals.reshape(*blocks.shape[:-2], -1)


def random_weights(cfg: dict, seed: int = 0, full_scale_blocks: bool = False) -> dict[str, np.ndarray]:
    """Hub-named tensors: floats as bf16 bits (uint16), experts as MXFP4 blocks/scales (uint8).
    full_scale_blocks puts a +-6 code in every block, so the block's scale is the one any MXFP4
    quantizer picks: the dequantized values then survive a requantization exactly."""
    rng = np.random.default_rng(seed)
    H, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    D, nq, nkv, V = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]

    def f(*shape, std=1.0, mean=0.0):
        return to_bf16(rng.normal(mean, std, shape).astype(np.float32))

    def mxfp4(rows, cols):
        blocks = rng.integers(0, 256, (E, rows, cols // 32, 16), dtype=np.uint8)
        if full_scale_blocks:
            blocks[..., 0] = (blocks[..., 0] & 0xF0) | rng.choice([0x7, 0xF], blocks.shape[:-1]).astype(np.uint8)
        # 2^-7 .. 2^-4 per block: expert outputs of order one for inputs of order one
        scales = rng.integers(120, 124, (E, rows, cols // 32), dtype=np.uint8)
        return blocks, scales

    w = {
        "model.embed_tokens.weight": f(V, H),
        "model.norm.weight": f(H, std=0.1, mean=1.0),
        "lm_head.weight": f(V, H, std=1 / math.sqrt(H)),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = f(H, std=0.1, mean=1.0)
        w[p + "post_attention_layernorm.weight"] = f(H, std=0.1, mean=1.0)
        for name, rows in (("q_proj", nq * D), ("k_proj", nkv * D), ("v_proj", nkv * D)):
            w[p + f"self_attn.{name}.weight"] = f(rows, H, std=1 / math.sqrt(H))
            w[p + f"self_attn.{name}.bias"] = f(rows, std=0.1)
        w[p + "self_attn.o_proj.weight"] = f(H, nq * D, std=1 / math.sqrt(nq * D))
        w[p + "self_attn.o_proj.bias"] = f(H, std=0.1)
        w[p + "self_attn.sinks"] = f(nq)
        w[p + "mlp.router.weight"] = f(E, H, std=1 / math.sqrt(H))
        w[p + "mlp.router.bias"] = f(E, std=0.1)
        for part, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            q = p + f"mlp.experts.{part}"
            w[q + "_blocks"], w[q + "_scales"] = mxfp4(rows, cols)
            w[q + "_bias"] = f(E, rows, std=0.1)
    return w


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtypes: dict[str, str] | None = None) -> None:
    """Minimal safetensors writer; uint16 arrays are written as BF16 unless dtypes says otherwise."""
    names = {np.dtype(np.uint8): "U8", np.dtype(np.uint16): "BF16", np.dtype(np.float32): "F32",
             np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32"}
    header, offset, chunks = {}, 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        dtype = (dtypes or {}).get(name, names[a.dtype])
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        chunks.append(a.tobytes())
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for c in chunks:
            fh.write(c)


def write_hub_checkpoint(folder: Path, cfg: dict, weights: dict[str, np.ndarray], *, shards: int = 2,
                         experts: str = "mxfp4") -> Path:
    """config.json + model-0000i-of-0000n.safetensors + model.safetensors.index.json.
    experts="bf16" writes unquantized experts in transformers' layout ([E, in, out]) and no
    quantization_config, like the community bf16 conversions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg)
    weights = dict(weights)
    if experts == "bf16":
        cfg.pop("quantization_config", None)
        for name in [n for n in weights if n.endswith("_blocks")]:
            base = name[: -len("_blocks")]
            dense = decode_mxfp4(weights.pop(name), weights.pop(base + "_scales"))  # [E, out, in]
            weights[base] = to_bf16(dense.transpose(0, 2, 1))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(weights)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s:05d}-of-{shards - 1:05d}.safetensors"
        part = {n: weights[n] for n in names[s * per:(s + 1) * per]}
        write_safetensors(folder / fname, part)
        weight_map.update({n: fname for n in part})
    total = sum(a.nbytes for a in weights.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def write_original_checkpoint(folder: Path, cfg: dict, weights: dict[str, np.ndarray]) -> Path:
    """The same weights in OpenAI's own layout (the hub's original/ folder), read by gpt_oss.torch."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sc = cfg["rope_scaling"]
    (folder / "config.json").write_text(json.dumps({
        "num_hidden_layers": cfg["num_hidden_layers"], "num_experts": cfg["num_local_experts"],
        "experts_per_token": cfg["num_experts_per_tok"], "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
        "swiglu_limit": cfg["swiglu_limit"], "head_dim": cfg["head_dim"],
        "num_attention_heads": cfg["num_attention_heads"], "num_key_value_heads": cfg["num_key_value_heads"],
        "sliding_window": cfg["sliding_window"], "initial_context_length": sc["original_max_position_embeddings"],
        "rope_theta": cfg["rope_theta"], "rope_scaling_factor": sc["factor"],
        "rope_ntk_alpha": sc["beta_slow"], "rope_ntk_beta": sc["beta_fast"],
    }))
    w = weights
    out = {
        "embedding.weight": w["model.embed_tokens.weight"],
        "norm.scale": w["model.norm.weight"],
        "unembedding.weight": w["lm_head.weight"],
    }
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"block.{i}."
        a = p + "self_attn."
        out[b + "attn.norm.scale"] = w[p + "input_layernorm.weight"]
        out[b + "attn.qkv.weight"] = np.concatenate([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]])
        out[b + "attn.qkv.bias"] = np.concatenate([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]])
        out[b + "attn.sinks"] = w[a + "sinks"]
        out[b + "attn.out.weight"] = w[a + "o_proj.weight"]
        out[b + "attn.out.bias"] = w[a + "o_proj.bias"]
        out[b + "mlp.norm.scale"] = w[p + "post_attention_layernorm.weight"]
        out[b + "mlp.gate.weight"] = w[p + "mlp.router.weight"]
        out[b + "mlp.gate.bias"] = w[p + "mlp.router.bias"]
        for ours, theirs in (("gate_up_proj", "mlp1"), ("down_proj", "mlp2")):
            e = p + f"mlp.experts.{ours}"
            out[b + f"mlp.{theirs}_weight.blocks"] = w[e + "_blocks"]
            out[b + f"mlp.{theirs}_weight.scales"] = w[e + "_scales"]
            out[b + f"mlp.{theirs}_bias"] = w[e + "_bias"]
    # The reference keeps its RMSNorm scales in float32.
    out = {k: (from_bf16(v) if k.endswith("norm.scale") else v) for k, v in out.items()}
    write_safetensors(folder / "model.safetensors", out)
    return folder
