"""Logit parity with two references nobody here wrote: transformers' GptOssForCausalLM and OpenAI's
gpt_oss.torch reference model, float32 on the CPU, on checkpoints written in the hub / original layouts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlx_gptoss
from tiny_checkpoint import hub_config, random_weights, write_hub_checkpoint, write_original_checkpoint

PROMPT_LEN = 24  # three times the tiny sliding window (8)
TOL = 1e-3  # of max |logit|


def prompt(vocab: int, n: int = PROMPT_LEN, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int32)


def ours_full(path, ids: np.ndarray) -> np.ndarray:
    gpt = mlx_gptoss.load(path, dtype=mx.float32)
    return np.array(gpt.model(mx.array(ids)[None])[0])


def ours_cached(path, ids: np.ndarray, prefill: int, chunk: int | None = None) -> np.ndarray:
    """Prefill `prefill` tokens (in chunks if given), then decode the rest one token at a time."""
    gpt = mlx_gptoss.load(path, dtype=mx.float32)
    cache = gpt.model.make_cache()
    steps = [ids[i:i + chunk] for i in range(0, prefill, chunk)] if chunk else [ids[:prefill]]
    steps += [ids[i:i + 1] for i in range(prefill, len(ids))]
    out = [np.array(gpt.model(mx.array(s)[None], cache=cache)[0]) for s in steps]
    return np.concatenate(out)


def transformers_logits(path, ids: np.ndarray, cached_from: int | None = None) -> np.ndarray:
    from transformers import GptOssForCausalLM

    hf = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t = torch.tensor(ids[None], dtype=torch.long)
    with torch.no_grad():
        if cached_from is None:
            return hf(t).logits[0].numpy()
        out = hf(t[:, :cached_from], use_cache=True)
        logits, past = [out.logits[0]], out.past_key_values
        for i in range(cached_from, len(ids)):
            out = hf(t[:, i:i + 1], past_key_values=past, use_cache=True)
            logits.append(out.logits[0])
            past = out.past_key_values
        return torch.cat(logits).numpy()


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    scale = np.abs(ref).max()
    diff = np.abs(ours - ref).max()
    print(f"max abs diff {diff:.3g}, max |logit| {scale:.3g}")
    assert diff <= TOL * scale, f"max abs diff {diff:.3g} > {TOL} x max |logit| {scale:.3g}"


CASES = {
    "mxfp4-notruncate": dict(experts="mxfp4", truncate=False),
    "mxfp4-truncate": dict(experts="mxfp4", truncate=True),
    "bf16-notruncate": dict(experts="bf16", truncate=False),
    "bf16-truncate": dict(experts="bf16", truncate=True),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    c = CASES[request.param]
    cfg = hub_config()
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], truncate=c["truncate"])
    # bf16 experts hold dequantized MXFP4 values whose blocks each contain a +-6: they requantize exactly.
    w = random_weights(cfg, seed=3, full_scale_blocks=c["experts"] == "bf16")
    path = write_hub_checkpoint(tmp_path_factory.mktemp(request.param), cfg, w, experts=c["experts"])
    return path, cfg


def test_all_positions_match_transformers(case):
    path, cfg = case
    ids = prompt(cfg["vocab_size"])
    assert_close(ours_full(path, ids), transformers_logits(path, ids))


def test_cached_decode_matches_transformers(case):
    path, cfg = case
    ids = prompt(cfg["vocab_size"], seed=2)
    assert_close(ours_cached(path, ids, prefill=10), transformers_logits(path, ids, cached_from=10))


def test_chunked_prefill_equals_one_shot(tiny_ckpt, tiny_cfg):
    """Chunks that straddle the sliding window through the rotating cache give the one-shot logits."""
    ids = prompt(tiny_cfg["vocab_size"], n=40, seed=4)
    full = ours_full(tiny_ckpt, ids)
    np.testing.assert_allclose(ours_cached(tiny_ckpt, ids, prefill=33, chunk=11), full, rtol=1e-4, atol=1e-4)


def test_truncate_flag_matters(tmp_path):
    """The parity tests can fail: ignoring `truncate: false` (as mlx-lm does) moves the logits visibly."""
    cfg = hub_config()
    w = random_weights(cfg, seed=3)
    exact = write_hub_checkpoint(tmp_path / "exact", cfg, w)
    cfg_t = dict(cfg, rope_scaling=dict(cfg["rope_scaling"], truncate=True))
    truncated = write_hub_checkpoint(tmp_path / "truncated", cfg_t, w)
    ids = prompt(cfg["vocab_size"], n=64)
    a, b = ours_full(exact, ids), ours_full(truncated, ids)
    assert np.abs(a - b).max() > TOL * np.abs(a).max()


def test_rope_parameters_spelling_matches(tmp_path, tiny_cfg, tiny_weights):
    """transformers 5.x writes rope_parameters (theta inside) instead of rope_scaling + rope_theta."""
    cfg = {k: v for k, v in tiny_cfg.items() if k not in ("rope_scaling", "rope_theta")}
    cfg["rope_parameters"] = dict(tiny_cfg["rope_scaling"], rope_theta=tiny_cfg["rope_theta"])
    path = write_hub_checkpoint(tmp_path / "rp", cfg, tiny_weights)
    ids = prompt(cfg["vocab_size"])
    assert_close(ours_full(path, ids), transformers_logits(path, ids))


def _openai_reference_available() -> bool:
    return importlib.util.find_spec("gpt_oss") is not None


@pytest.fixture(scope="session")
def openai_reference():
    """OpenAI's reference (PyPI gpt-oss) declares Python >= 3.12 and heavy deps it does not need for
    gpt_oss/torch/model.py: install it without them, as DESIGN.md describes."""
    if not _openai_reference_available():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--ignore-requires-python", "gpt-oss==0.0.9"], check=True)
    from gpt_oss.torch.model import Transformer

    return Transformer


def test_matches_openai_reference(openai_reference, tmp_path, tiny_cfg, tiny_weights, tiny_ckpt):
    ref_dir = write_original_checkpoint(tmp_path / "original", tiny_cfg, tiny_weights)
    model = openai_reference.from_checkpoint(str(ref_dir), device="cpu").float()
    ids = prompt(tiny_cfg["vocab_size"])
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.int32)).numpy()
    assert_close(ours_full(tiny_ckpt, ids), ref)


def test_half_precision_activations_track_float32(tiny_ckpt, tiny_cfg):
    """The Metal dtype policy (bf16 activations) runs the same model. float16 has the mantissa to show it
    tightly; in bf16 a near-tie in a random router may flip an expert at a position, so there the typical
    position is checked, and the greedy tokens."""
    ids = prompt(tiny_cfg["vocab_size"])
    ref = ours_full(tiny_ckpt, ids)
    scale = np.abs(ref).max()
    for dtype, typical in ((mx.float16, 3e-3), (mx.bfloat16, 2e-2)):
        gpt = mlx_gptoss.load(tiny_ckpt, dtype=dtype)
        got = np.array(gpt.model(mx.array(ids)[None])[0].astype(mx.float32))
        per_position = np.abs(got - ref).max(axis=-1)
        assert np.median(per_position) <= typical * scale, (dtype, per_position)
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9, dtype
