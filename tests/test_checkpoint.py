"""Loading: MXFP4 bytes become MLX weights unchanged, and every kind of broken input is one clear error."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss import CheckpointError, ConfigError, GptOssError
from mlx_gptoss.config import GptOssConfig
from tiny_checkpoint import decode_mxfp4, hub_config, write_hub_checkpoint, write_safetensors

EXPERT = "model.layers.1.mlp.experts.gate_up_proj"


def test_mxfp4_view_decodes_like_numpy(tiny_ckpt, tiny_weights):
    """The byte view the loader makes, dequantized by MLX, equals an independent numpy E2M1 decoder."""
    gpt = mlx_gptoss.load(tiny_ckpt)
    experts = gpt.model.model.layers[1].mlp.experts
    ours = mx.dequantize(experts.gate_up_proj, experts.gate_up_proj_scales, group_size=32, bits=4,
                         mode="mxfp4", dtype=mx.float32)
    ref = decode_mxfp4(tiny_weights[EXPERT + "_blocks"], tiny_weights[EXPERT + "_scales"])
    np.testing.assert_array_equal(np.array(ours), ref)


def test_numpy_decoder_known_values():
    """Pin the decoder itself: low nibble is the even element, LUT and E8M0 scale as in the OCP MX spec."""
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, 0] = 0x71  # element 0: code 1 (+0.5), element 1: code 7 (+6)
    blocks[0, 1] = 0xF9  # element 2: code 9 (-0.5), element 3: code 15 (-6)
    out = decode_mxfp4(blocks, np.array([128], np.uint8))  # scale 2^1
    np.testing.assert_array_equal(out[:4], [1.0, 12.0, -1.0, -12.0])
    assert not out[4:].any()


def test_load_returns_configured_model(tiny_ckpt):
    gpt = mlx_gptoss.load(tiny_ckpt)
    assert gpt.config.num_local_experts == 8 and gpt.config.rope.truncate is False
    assert gpt.dtype == mx.float32  # CPU backend policy
    logits = gpt.model(mx.array([[1, 2, 3]], dtype=mx.int32))
    assert logits.shape == (1, 3, 512) and np.isfinite(np.array(logits)).all()
    assert len(gpt.model.make_cache()) == 4


def test_load_peak_memory_near_checkpoint_size(tmp_path):
    """MXFP4 experts are a byte view (no dequantize/requantize); peak stays ~1.2x the checkpoint bytes plus
    what the dtype policy adds (bf16 -> float32 doubles the non-expert weights)."""
    cfg = hub_config(hidden_size=512, intermediate_size=512, num_local_experts=32, vocab_size=2048)
    from tiny_checkpoint import random_weights

    w = random_weights(cfg, seed=0)
    path = write_hub_checkpoint(tmp_path / "mid", cfg, w, shards=3)
    total = sum(a.nbytes for a in w.values())
    floats = sum(a.nbytes for n, a in w.items() if a.dtype == np.uint16)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()  # arrays other tests in this process still hold
    gpt = mlx_gptoss.load(path, dtype=mx.float32)
    peak = mx.get_peak_memory() - before
    print(f"peak {peak / 1e6:.1f} MB, checkpoint {total / 1e6:.1f} MB, of which floats {floats / 1e6:.1f} MB")
    assert total > 20e6
    assert peak <= 1.2 * total + floats, f"peak {peak / 1e6:.1f} MB for a {total / 1e6:.1f} MB checkpoint"
    del gpt


# --- broken input: each case names the file and tensor at fault -------------------------------------


@pytest.fixture
def ckpt(tmp_path, tiny_ckpt):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def shard_of(folder, tensor):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][tensor]


def rewrite(path, edit):
    """Re-write one shard after `edit(tensors, dtypes)`; tensors are read back with our test writer's inverse."""
    from safetensors.numpy import load_file  # noqa: F401  (numpy cannot hold bf16: go through raw bytes)
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    np_dtype = {"U8": np.uint8, "BF16": np.uint16, "F32": np.float32}
    tensors, dtypes = {}, {}
    for name, meta in header.items():
        lo, hi = meta["data_offsets"]
        tensors[name] = np.frombuffer(raw[8 + n + lo:8 + n + hi], np_dtype[meta["dtype"]]).reshape(meta["shape"])
        dtypes[name] = meta["dtype"]
    edit(tensors, dtypes)
    write_safetensors(path, tensors, dtypes)


def expect(exc, *needles, path):
    with pytest.raises(exc) as info:
        mlx_gptoss.load(path)
    msg = str(info.value)
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


def test_missing_tensor(ckpt):
    f = shard_of(ckpt, EXPERT + "_scales")
    rewrite(f, lambda t, d: t.pop(EXPERT + "_scales"))
    expect(CheckpointError, "missing tensor", EXPERT + "_scales", path=ckpt)


def test_wrong_shape(ckpt):
    name = "model.layers.0.self_attn.q_proj.weight"
    rewrite(shard_of(ckpt, name), lambda t, d: t.__setitem__(name, t[name][:-1]))
    expect(CheckpointError, shard_of(ckpt, name).name, name, "shape", path=ckpt)


def test_wrong_dtype(ckpt):
    name = "model.layers.2.mlp.router.weight"

    def edit(t, d):
        t[name] = t[name].astype(np.int32)
        d[name] = "I32"

    rewrite(shard_of(ckpt, name), edit)
    expect(CheckpointError, name, "dtype I32", path=ckpt)


def test_blocks_and_scales_disagree(ckpt):
    name = EXPERT + "_scales"
    rewrite(shard_of(ckpt, name), lambda t, d: t.__setitem__(name, t[name][:, :, :-1]))
    expect(CheckpointError, name, "blocks and scales disagree", path=ckpt)


def test_truncated_file(ckpt):
    f = shard_of(ckpt, EXPERT + "_blocks")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    expect(CheckpointError, f.name, "truncated", path=ckpt)


def test_corrupt_header(ckpt):
    f = shard_of(ckpt, EXPERT + "_blocks")
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00\xff" * 16
    f.write_bytes(bytes(data))
    expect(CheckpointError, f.name, "corrupt", path=ckpt)


def test_garbage_file(ckpt):
    f = shard_of(ckpt, EXPERT + "_blocks")
    f.write_bytes(b"<html>not found</html>")
    expect(CheckpointError, f.name, path=ckpt)


def test_missing_shard(ckpt):
    f = shard_of(ckpt, EXPERT + "_blocks")
    f.unlink()
    expect(CheckpointError, f.name, "missing shard", path=ckpt)


def test_unexpected_tensor(ckpt):
    name = "model.layers.0.self_attn.q_norm.weight"
    f = shard_of(ckpt, "model.norm.weight")
    rewrite(f, lambda t, d: t.__setitem__(name, t["model.norm.weight"]))
    expect(CheckpointError, name, "unexpected", path=ckpt)


def test_no_weights(tmp_path, tiny_cfg):
    (tmp_path / "config.json").write_text(json.dumps(tiny_cfg))
    expect(CheckpointError, "no *.safetensors", path=tmp_path)


def test_other_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect(ConfigError, "config.json", "llama", path=ckpt)


@pytest.mark.parametrize("field,value,needle", [
    ("hidden_size", None, "`hidden_size` is missing"),
    ("num_key_value_heads", 3, "`num_key_value_heads`"),
    ("layer_types", ["sliding_attention"], "`layer_types`"),
    ("layer_types", ["sliding_attention", "full", "full_attention", "full_attention"], "unknown type 'full'"),
    ("num_experts_per_tok", 0, "`num_experts_per_tok` must be >= 1"),
    ("num_experts_per_tok", 9, "exceeds num_local_experts"),
    ("swiglu_limit", "seven", "`swiglu_limit` must be a number"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_type 'linear'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": -1}, "rope_scaling.factor"),
    ("rope_scaling", {"rope_type": "yarn", "truncate": "no"}, "rope_scaling.truncate"),
    ("quantization_config", {"quant_method": "gptq"}, "only 'mxfp4'"),
])
def test_invalid_config_field(ckpt, field, value, needle):
    cfg = json.loads((ckpt / "config.json").read_text())
    if value is None:
        del cfg[field]
    else:
        cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect(ConfigError, "config.json", needle, path=ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    expect(ConfigError, "config.json", "not valid JSON", path=ckpt)


def test_folder_without_config(tmp_path):
    expect(ConfigError, "no config.json", path=tmp_path)


def test_no_such_path(tmp_path):
    expect(GptOssError, "no such folder", path=str(tmp_path / "nope"))


def test_config_defaults_follow_the_hub():
    cfg = GptOssConfig.from_dict(hub_config(layer_types=None) | {"layer_types": None})
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    assert cfg.rope.theta == 150000 and cfg.rope.factor == 32 and cfg.swiglu_alpha == 1.702
