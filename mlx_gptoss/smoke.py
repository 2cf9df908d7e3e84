"""An end-to-end smoke test on a tiny random gpt-oss built in memory (no files, no download).

`gptoss-mac doctor` runs it to show that this machine's MLX runs the whole model path: YaRN attention
with sinks, sliding-window and full layers, router top-k, MXFP4 expert matmuls (random uint32/uint8
weights, MLX's packing), the KV caches. It checks more than "it runs": decoding token by token through
the caches must give the same logits as one uncached forward pass over the whole sequence, past the
sliding window so the rotating cache wraps around.

check_model(model) does what the smoke test cannot: it loads a real checkpoint (`doctor -m PATH`) and checks
that its weights and its logits are finite, the failure chat sends the user to doctor for (a corrupt or wrongly
converted checkpoint runs, and samples garbage).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .config import GptOssConfig
from .model import Transformer

TINY = {
    "model_type": "gpt_oss", "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64, "head_dim": 16,
    "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 8,
    "rope_theta": 150000, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                           "beta_slow": 1.0, "original_max_position_embeddings": 4096,
                                           "truncate": False},
    "quantization_config": {"quant_method": "mxfp4"},
}
PROMPT_TOKENS = 6
DECODE_TOKENS = 6  # prompt + decoded = 12 > sliding_window: the rotating cache wraps
TOLERANCE = 1e-3  # max |cached - uncached| logit difference, relative to the logits' scale


def tiny_config(**overrides) -> GptOssConfig:
    return GptOssConfig.from_dict({**TINY, **overrides}, source="smoke test config")


def tiny_model(seed: int = 0, dtype: mx.Dtype = mx.float32, **overrides) -> Transformer:
    """A Transformer with random weights: normal floats, random MXFP4 codes with scales 2^-7..2^-4."""
    cfg = tiny_config(**overrides)
    net = Transformer(cfg)
    net.set_dtype(dtype)
    rng = np.random.default_rng(seed)
    weights = []
    for name, p in tree_flatten(net.parameters()):
        shape = tuple(p.shape)
        if p.dtype == mx.uint32:
            a = rng.integers(0, 2**32, shape, dtype=np.uint32)
        elif p.dtype == mx.uint8:
            a = rng.integers(120, 124, shape, dtype=np.uint8)
        elif "norm" in name:
            a = 1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith(("bias", "sinks")):
            a = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            a = rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[-1])
        weights.append((name, mx.array(a).astype(p.dtype)))
    net.load_weights(weights, strict=True)
    mx.eval(net.parameters())
    net.eval()
    return net


@dataclass
class SmokeResult:
    ok: bool
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (what, passed, detail)
    seconds: float = 0.0


def run(seed: int = 0, dtype: mx.Dtype = mx.float32) -> SmokeResult:
    """Build, forward, decode greedily through the caches, compare with uncached logits."""
    t0 = time.perf_counter()
    res = SmokeResult(ok=True)

    def check(what: str, passed: bool, detail: str = "") -> bool:
        res.checks.append((what, bool(passed), detail))
        res.ok &= bool(passed)
        return bool(passed)

    try:
        net = tiny_model(seed, dtype)
        cfg = net.config
        check("build a tiny random model in memory", True,
              f"{cfg.num_hidden_layers} layers, {cfg.num_local_experts} MXFP4 experts, vocab {cfg.vocab_size}")
        prompt = mx.array(np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, PROMPT_TOKENS)), mx.int32)
        logits = net(prompt)
        mx.eval(logits)
        finite = bool(mx.all(mx.isfinite(logits)).item())
        if not check("forward pass: finite logits", finite and logits.shape == (1, PROMPT_TOKENS, cfg.vocab_size),
                     f"shape {tuple(logits.shape)}"):
            return res

        cache = net.make_cache()
        step = net(prompt, cache=cache)[:, -1]
        tokens, cached = prompt[0].tolist(), []
        for _ in range(DECODE_TOKENS):
            cached.append(step)
            tokens.append(int(mx.argmax(step, axis=-1).item()))
            step = net(mx.array([[tokens[-1]]], mx.int32), cache=cache)[:, -1]
        full = net(mx.array([tokens], mx.int32))[0, PROMPT_TOKENS - 1:-1]
        cached = mx.concatenate(cached, axis=0)
        mx.eval(full, cached)
        scale = max(float(mx.abs(full).max().item()), 1e-6)
        diff = float(mx.abs(full - cached).max().item()) / scale
        check(f"{DECODE_TOKENS} tokens decoded through the KV caches match an uncached forward",
              math.isfinite(diff) and diff < TOLERANCE, f"max relative difference {diff:.1e}")
    except Exception as e:  # the doctor reports any failure instead of crashing
        check("smoke test raised", False, f"{type(e).__name__}: {e}")
    finally:
        res.seconds = time.perf_counter() - t0
    return res


MODEL_CHECK_TOKENS = 16  # token ids 0..15 (no tokenizer needed): every layer, attention and routed experts run


def check_model(model, *, memory=None) -> SmokeResult:
    """Load `model` (a folder or a downloaded repo id; never downloads), scan its weights for NaN/infinity
    (float tensors) and NaN scales (MXFP4's E8M0 0xFF), and run one forward pass: every logit must be finite."""
    from mlx.utils import tree_flatten

    from .api import load
    from .errors import GptOssError

    t0 = time.perf_counter()
    res = SmokeResult(ok=True)

    def check(what: str, passed: bool, detail: str = "") -> None:
        res.checks.append((what, bool(passed), detail))
        res.ok &= bool(passed)

    try:
        gpt = load(model, allow_download=False, **({"memory": memory} if memory else {}))
    except GptOssError as e:
        check(f"load {model}", False, str(e))
        res.seconds = time.perf_counter() - t0
        return res
    check(f"load {model}", True, "" if str(gpt.path) == str(model) else str(gpt.path))
    bad = []
    for name, p in tree_flatten(gpt.model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            broken = not bool(mx.isfinite(p).all().item())
        elif p.dtype == mx.uint8 and name.endswith("scales"):  # E8M0: 0xFF is NaN
            broken = bool((p == 255).any().item())
        else:
            continue
        if broken:
            bad.append(name)
    names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    check("weights: no NaN or infinity", not bad,
          f"{len(bad)} tensor{'s' if len(bad) > 1 else ''} with NaN or infinity: {names}; the checkpoint is "
          "corrupt or wrongly converted: download it again" if bad else "every tensor checked")
    ids = mx.array([[i % gpt.config.vocab_size for i in range(MODEL_CHECK_TOKENS)]], mx.int32)
    logits = gpt.model(ids)
    mx.eval(logits)
    finite = bool(mx.isfinite(logits).all().item())
    check("forward pass: finite logits", finite,
          f"{MODEL_CHECK_TOKENS} tokens" if finite else "the logits hold NaN or infinity: chat would sample garbage "
          "(a corrupt checkpoint, or a dtype that overflows: try --dtype float32)")
    res.seconds = time.perf_counter() - t0
    return res
