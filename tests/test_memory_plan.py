"""The memory planner on fake gpt-oss-20b / gpt-oss-120b checkpoints with the real tensor names and shapes.

The files hold real safetensors headers; the tensor data is a hole (truncate), so a "13.8 GB" checkpoint
takes no disk and nothing reads it. Figures are checked against numbers nobody here computed: the hub's
model.safetensors.index.json total_size and llama.cpp's published sizes (see the comments below).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from mlx_gptoss import memory
from mlx_gptoss.errors import GptOssError
from mlx_gptoss.memory import Budget, ContextLengthError, make_plan, parse_size, read_checkpoint
from tiny_checkpoint import hub_config

GB, GIB = 10**9, 1 << 30

H, I, D, NQ, NKV, V = 2880, 2880, 64, 64, 8, 201088
# The hub's model.safetensors.index.json "total_size" of openai/gpt-oss-20b (an external figure).
HUB_TOTAL_20B = 13_761_264_768


def real_tensors(layers: int, experts: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The hub checkpoint's tensors, written out by hand from the published layout (not from our loader)."""
    t = {
        "model.embed_tokens.weight": ("BF16", (V, H)),
        "model.norm.weight": ("BF16", (H,)),
        "lm_head.weight": ("BF16", (V, H)),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": ("BF16", (H,)),
            p + "post_attention_layernorm.weight": ("BF16", (H,)),
            p + "self_attn.q_proj.weight": ("BF16", (NQ * D, H)),
            p + "self_attn.q_proj.bias": ("BF16", (NQ * D,)),
            p + "self_attn.k_proj.weight": ("BF16", (NKV * D, H)),
            p + "self_attn.k_proj.bias": ("BF16", (NKV * D,)),
            p + "self_attn.v_proj.weight": ("BF16", (NKV * D, H)),
            p + "self_attn.v_proj.bias": ("BF16", (NKV * D,)),
            p + "self_attn.o_proj.weight": ("BF16", (H, NQ * D)),
            p + "self_attn.o_proj.bias": ("BF16", (H,)),
            p + "self_attn.sinks": ("BF16", (NQ,)),
            p + "mlp.router.weight": ("BF16", (experts, H)),
            p + "mlp.router.bias": ("BF16", (experts,)),
            p + "mlp.experts.gate_up_proj_blocks": ("U8", (experts, 2 * I, H // 32, 16)),
            p + "mlp.experts.gate_up_proj_scales": ("U8", (experts, 2 * I, H // 32)),
            p + "mlp.experts.gate_up_proj_bias": ("BF16", (experts, 2 * I)),
            p + "mlp.experts.down_proj_blocks": ("U8", (experts, H, I // 32, 16)),
            p + "mlp.experts.down_proj_scales": ("U8", (experts, H, I // 32)),
            p + "mlp.experts.down_proj_bias": ("BF16", (experts, H)),
        }
    return t


def write_sparse_checkpoint(folder: Path, layers: int, experts: int, shards: int) -> Path:
    """config.json + shards whose headers are real and whose data is a hole + the index."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = hub_config(num_hidden_layers=layers, num_local_experts=experts, experts_per_token=4,
                     vocab_size=V, hidden_size=H, intermediate_size=I, head_dim=D,
                     num_attention_heads=NQ, num_key_value_heads=NKV, sliding_window=128)
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = real_tensors(layers, experts)
    size = {"BF16": 2, "U8": 1}
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s:05d}-of-{shards - 1:05d}.safetensors"
        header, off = {}, 0
        for n in names[s * per:(s + 1) * per]:
            dt, shape = tensors[n]
            nbytes = size[dt]
            for d in shape:
                nbytes *= d
            header[n] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
            weight_map[n] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + off)  # the data: a hole, no disk used
        total += off
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def ckpt20(tmp_path_factory):
    return write_sparse_checkpoint(tmp_path_factory.mktemp("p") / "gpt-oss-20b", 24, 32, 3)


@pytest.fixture(scope="module")
def ckpt120(tmp_path_factory):
    return write_sparse_checkpoint(tmp_path_factory.mktemp("p") / "gpt-oss-120b", 36, 128, 15)


def mac(memory_gb: float, usable: float | None = None) -> Budget:
    """A Mac with memory_gb GiB; the budget defaults to macOS's default GPU working set (2/3 up to
    32 GiB, 3/4 above: recommendedMaxWorkingSetSize as reported by llama.cpp's Metal log on such Macs)."""
    total = int(memory_gb * GIB)
    usable = usable if usable is not None else total * (2 / 3 if memory_gb <= 32 else 3 / 4)
    return Budget(int(usable), "Metal recommended working set", total, metal=True)


def budget(gb: float) -> Budget:
    return Budget(int(gb * GB), f"--memory {gb}GB")


def test_sparse_files_take_no_disk(ckpt20):
    files = list(ckpt20.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) > 13 * GB
    assert sum(f.stat().st_blocks * 512 for f in files) < 10 * 2**20


def test_exact_weight_bytes(ckpt20, ckpt120):
    c20, c120 = read_checkpoint(ckpt20), read_checkpoint(ckpt120)
    f20, f120 = c20.file_bytes(), c120.file_bytes()
    # the hub index's total_size for openai/gpt-oss-20b, byte for byte
    assert sum(f20.values()) == HUB_TOTAL_20B
    assert f20 == {"experts": 24 * 423_567_360, "attention": 24 * 53_100_288,
                   "embedding": 1_158_266_880, "unembedding": 1_158_266_880, "other": 24 * 195_904 + 5760}
    assert sum(f120.values()) == 65_248_815_744
    assert f120["experts"] == 36 * 128 * 13_236_480
    # Loaded for Metal (bf16), every part keeps its stored size; on the CPU backend (float32 activations)
    # every bf16 tensor doubles: the MXFP4 expert blocks and scales stay, their biases double.
    assert c20.loaded_bytes(2) == f20
    l32 = c20.loaded_bytes(4)
    assert l32["embedding"] == 2 * f20["embedding"] and l32["attention"] == 2 * f20["attention"]
    assert l32["experts"] == f20["experts"] + 24 * 32 * (5760 + 2880) * 2


def test_figures_match_llama_cpp(ckpt20, ckpt120):
    """llama.cpp's gpt-oss guide: 20b 12.0 GB of model data and ~0.2 GB of KV per 8k tokens; 120b 61.0 GB
    and ~0.3 GB per 8k.

    KV: llama.cpp keeps K and V in f16, and the sliding-window layers keep only their window, so per 8k
    tokens only the full-attention layers count: 12 (20b) / 18 (120b) layers x 2 x 8 heads x 64 x 2 bytes
    x 8192 = 0.20 / 0.30 GB. Ours at bf16 is the same, exactly.

    Weights: we load the hub checkpoint as it is: 13.76 GB (12.82 GiB) for 20b, 65.25 GB (60.77 GiB) for
    120b. ggml-org's GGUFs, which llama.cpp's figures describe, store embedding, attention and
    unembedding in Q8_0 (34 bytes per 32 values) instead of bf16, 1.7 / 2.0 GB less: 12.07 GB (llama-bench
    prints 11.27 GiB) and 63.25 GB (59.02 GiB). The guide's 12.0 is that 20b GGUF; its 120b "61.0" matches
    the bf16 figure counted in GiB (60.8), i.e. the same bytes as ours. Both are checked below.
    """
    p20 = make_plan(read_checkpoint(ckpt20), context=8192, budget=budget(1000), dtype="bfloat16", metal=True)
    p120 = make_plan(read_checkpoint(ckpt120), context=8192, budget=budget(1000), dtype="bfloat16", metal=True)
    assert p20.kv_per_token * 8192 == 201_326_592  # 0.20 GB
    assert p120.kv_per_token * 8192 == 301_989_888  # 0.30 GB
    for p, gguf_gib in ((p20, 11.27), (p120, 59.02)):
        dense = sum(v for k, v in p.file_bytes.items() if k != "experts") - 5760 - p.config.num_hidden_layers * 11520
        q8 = p.file_bytes["experts"] + dense * 34 // 64 + 5760 + p.config.num_hidden_layers * 11520
        assert abs(q8 / GIB - gguf_gib) / gguf_gib < 0.005, (q8 / GIB, gguf_gib)
    assert round(p20.weight_bytes / 1e9, 1) == 13.8
    assert abs(p120.weight_bytes / GIB - 61.0) < 0.3


def test_kv_at_full_context(ckpt20, ckpt120):
    p = make_plan(read_checkpoint(ckpt20), context=131072, budget=budget(1000), dtype="bfloat16", metal=True)
    assert p.status == "fits" and p.context == 131072
    assert p.kv_per_token == 12 * 2 * 8 * 64 * 2
    assert p.kv_per_token * 131072 == 3_221_225_472
    # the sliding layers: window (128) + one prefill chunk of keys, whatever the context, and the Runner's
    # window snapshots; the full layers' caches grow in 256-token steps: up to one chunk's steps more
    assert p.kv_sliding == 12 * 2 * 8 * 64 * 2 * (128 + p.prefill_chunk + memory.MAX_SNAPSHOTS * 128)
    assert p.kv_slack == 511 and p.kv_bytes == p.kv_per_token * (131072 + 511) + p.kv_sliding
    p = make_plan(read_checkpoint(ckpt120), context=131072, budget=budget(1000), dtype="bfloat16", metal=True)
    assert p.kv_per_token * 131072 == 4_831_838_208
    # on the CPU backend: float32 KV, twice the bytes
    p = make_plan(read_checkpoint(ckpt120), context=131072, budget=budget(1000), metal=False)
    assert p.dtype == "float32" and p.kv_per_token * 131072 == 2 * 4_831_838_208


@pytest.mark.parametrize("gb,want20,want120", [
    (16, "smaller context", "does not fit"),
    (24, "fits", "does not fit"),
    (32, "fits", "does not fit"),
    (64, "fits", "does not fit"),
    (96, "fits", "fits"),
])
def test_decisions(ckpt20, ckpt120, gb, want20, want120):
    p20 = make_plan(read_checkpoint(ckpt20), budget=budget(gb), metal=True)
    p120 = make_plan(read_checkpoint(ckpt120), budget=budget(gb), metal=True)
    assert (p20.status, p120.status) == (want20, want120)
    for p in (p20, p120):
        assert p.needed <= gb * GB if p.fits else p.min_needed > gb * GB
        if p.status == "smaller context":
            # the largest context that fits: one step more does not
            assert memory.MIN_CONTEXT <= p.context < 131072 and p.context % memory.CONTEXT_STEP == 0
            bigger = make_plan(read_checkpoint(ckpt20), context=p.context + memory.CONTEXT_STEP,
                               budget=budget(gb), metal=True)
            assert bigger.status != "fits"
            assert f"at most {p.context:,} tokens" in p.message and f"--ctx {p.context}" in p.message
    if want120 == "does not fit":
        assert "Use the 20b model: openai/gpt-oss-20b needs" in p120.message
        assert "within this budget" in p120.message  # 20b at 8k: 14.2 GB
        assert "smaller --ctx does not help" in p120.message


def test_remedy_sysctl_on_a_16gb_mac(ckpt20):
    """macOS lets the GPU use 2/3 of a 16 GiB Mac (10.7 GiB): 20b does not fit until the wired limit is raised."""
    p = make_plan(read_checkpoint(ckpt20), budget=mac(16), metal=True)
    assert p.status == "does not fit"
    m = re.search(r"`sudo sysctl iogpu.wired_limit_mb=(\d+)`", p.message)
    assert m, p.message
    n = int(m.group(1)) << 20
    assert p.min_needed <= n <= 14 * GIB  # enough for the smallest context, and 2 GiB left to macOS
    assert "Use the 20b model" not in p.message
    # with that limit (the new working set) it fits, at a reduced context
    p2 = make_plan(read_checkpoint(ckpt20), budget=mac(16, usable=n), metal=True)
    assert p2.status == "smaller context" and p2.context >= memory.MIN_CONTEXT


def test_remedy_on_other_macs(ckpt120, ckpt20):
    p = make_plan(read_checkpoint(ckpt120), budget=mac(64), metal=True)
    assert p.status == "does not fit"
    assert "Even raising the GPU wired limit" in p.message and "Use the 20b model" in p.message
    p = make_plan(read_checkpoint(ckpt120), budget=mac(96), metal=True)
    assert p.status == "fits"
    p = make_plan(read_checkpoint(ckpt20), budget=mac(24), metal=True)
    assert p.status == "smaller context"  # a 16 GiB working set: short of the full 131k context
    m = re.search(r"`sudo sysctl iogpu.wired_limit_mb=(\d+)`", p.message)
    assert m and make_plan(read_checkpoint(ckpt20), budget=mac(24, usable=int(m.group(1)) << 20),
                           metal=True).status == "fits"


def test_the_prefill_chunk_is_the_largest_that_fits(ckpt20):
    """A tight budget gets a smaller prefill chunk before a smaller context or a refusal: without fused
    attention (the CPU backend) a chunk's score matrices grow with the context."""
    c = read_checkpoint(ckpt20)
    roomy = make_plan(c, context=131072, budget=budget(1000), metal=False)
    assert roomy.prefill_chunk == memory.PREFILL_CHUNK
    # 131072 tokens in float32 on the CPU: 512-token chunks need ~62 GB; a 40 GB budget runs them 32 at a time
    tight = make_plan(c, context=131072, budget=budget(40), metal=False)
    assert tight.status == "fits" and memory.MIN_PREFILL_CHUNK <= tight.prefill_chunk < memory.PREFILL_CHUNK
    assert tight.needed <= 40 * GB < roomy.needed
    doubled = memory.size(c, 131072, 2 * tight.prefill_chunk, mx.float32, False, budget(40))
    assert doubled.needed > 40 * GB  # the largest chunk that fits
    # the terms name every part of the total
    assert sum(n for _, n, _ in tight.terms()) == tight.needed
    assert "attention of a" in tight.activations_note and "score matrices" in tight.activations_note
    assert tight.sum_line().startswith("weights 17.4 GB + KV cache") and tight.sum_line().endswith(
        memory.gb(tight.needed))


def test_the_plan_line_names_every_term(tiny_ckpt):
    """Issue 20: "weights 0.1 GB + KV cache 0.1 GB ... = 7.4 GB" named parts that did not add up to the total."""
    import mlx_gptoss
    from mlx_gptoss.cli.chat import plan_line

    gpt = mlx_gptoss.load(tiny_ckpt, ctx=256)  # available RAM: the reserve is a term too
    line = plan_line(gpt)
    terms = re.findall(r"(weights|KV cache|activations|loading|reserve) ([0-9.]+) (GB|MB)", line)
    total = re.search(r"= ([0-9.]+) (GB|MB)", line)
    assert {"weights", "KV cache", "activations", "reserve"} <= {name for name, _, _ in terms}, line
    size = {"GB": 1e9, "MB": 1e6}
    parts = sum(float(n) * size[u] for _, n, u in terms)
    # each figure is rounded to 0.1 of its unit: the parts add up to the total within that
    assert abs(parts - float(total.group(1)) * size[total.group(2)]) <= 0.05 * size[total.group(2)] * (len(terms) + 1)


def test_plan_without_ctx_does_not_say_a_context_was_asked_for(ckpt20, ckpt120):
    """Issue 20: `plan` without --ctx said "(not the 8,192 asked for…)" when nothing was asked."""
    from mlx_gptoss.offload import make_offload_plan

    p = make_plan(read_checkpoint(ckpt20), budget=budget(16), metal=False, dtype="bfloat16")
    assert p.status == "smaller context" and "asked for" not in p.message
    assert "not the model's full 131,072" in p.message
    asked = make_plan(read_checkpoint(ckpt20), context=131072, budget=budget(16), metal=False, dtype="bfloat16")
    assert "(not the 131,072 asked for)" in asked.message
    # with the levers: 120b streaming in 6.3 GB does not reach 8,192 tokens (the context planned without --ctx)
    o = make_offload_plan(read_checkpoint(ckpt120), budget=Budget(int(6.3 * GB), "--memory 6.3GB", metal=True),
                          offload="experts")
    assert o.status == "smaller context" and "asked for" not in o.message, o.message
    assert "planned for when no --ctx is given" in o.message


def test_kv8_without_offloading_does_not_say_offloading(ckpt20):
    """Issue 20: `plan --kv-bits 8 --offload none` said "fits with offloading"."""
    from mlx_gptoss.cli.app import app

    r = CliRunner().invoke(app, ["plan", "--model", str(ckpt20), "--memory", "24GB", "--kv-bits", "8",
                                 "--offload", "none"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "offloading" not in text and "fits with an 8-bit KV cache" in text


def test_bad_input(ckpt20, tmp_path):
    with pytest.raises(GptOssError, match="--ctx 200000: more than"):
        make_plan(read_checkpoint(ckpt20), context=200000, budget=budget(96))
    with pytest.raises(GptOssError, match="--memory 'lots'"):
        parse_size("lots")
    assert parse_size("16GB") == 16 * GB and parse_size("16GiB") == 16 * GIB and parse_size("512M") == 512 * 10**6
    assert parse_size("24") == 24 * GB
    with pytest.raises(GptOssError, match="no such folder"):
        read_checkpoint(tmp_path / "nope")


def test_apply_and_context_cap(tiny_ckpt):
    import mlx_gptoss

    with pytest.raises(GptOssError, match="does not fit"):
        mlx_gptoss.load(tiny_ckpt, memory="1MB")
    gpt = mlx_gptoss.load(tiny_ckpt, memory="8GB", ctx=40)
    try:
        assert gpt.plan.status == "fits" and gpt.max_context == 40
        assert mx.get_memory_limit() == 8 * GB  # set_memory_limit from the plan
        cache = gpt.make_cache()
        gpt.model(mx.zeros((1, 30), dtype=mx.int32), cache=cache)
        with pytest.raises(ContextLengthError, match="allows a context of 40"):
            gpt.model(mx.zeros((1, 11), dtype=mx.int32), cache=cache)
        assert all(c.offset == 30 for c in cache)  # refused before any layer's cache changed
        gpt.model(mx.zeros((1, 10), dtype=mx.int32), cache=cache)  # exactly at the cap is fine
        with pytest.raises(ContextLengthError):
            gpt.check_context(41)
    finally:
        mx.set_memory_limit(int(mx.device_info().get("max_recommended_working_set_size", 0)) or 1 << 40)
        mx.set_cache_limit(1 << 40)


def test_plan_command(ckpt20, ckpt120):
    from mlx_gptoss.cli.app import app

    r = CliRunner().invoke(app, ["plan", "--model", str(ckpt20), "--memory", "24GB"], env={"COLUMNS": "150"})
    assert r.exit_code == 0, r.output
    assert "experts" in r.output and "fits" in r.output and "13.8 GB" in r.output
    r = CliRunner().invoke(app, ["plan", "--model", str(ckpt120), "--memory", "32GB", "--ctx", "8192", "--offload", "none"],
                           env={"COLUMNS": "150"})
    assert r.exit_code == 1 and "does not fit" in r.output and "20b" in r.output
    r = subprocess.run([sys.executable, "-m", "mlx_gptoss.cli.app", "plan", "--model", str(ckpt20), "--memory",
                        "many"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'--memory': not a size" in r.stderr and "'many'" in r.stderr  # an option error
    assert "Traceback" not in r.stderr


def plan_cli(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_gptoss.cli.app", "plan", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_plan_of_a_repo_id_in_the_hf_cache_works_offline(tmp_path):
    """A cached snapshot whose shards hold only headers (the data never downloaded) is enough."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--openai--gpt-oss-120b"
    write_sparse_checkpoint(repo / "snapshots" / commit, 36, 128, 15)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", COLUMNS="150")
    r = plan_cli(env, "--model", "openai/gpt-oss-120b", "--memory", "96GB", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert "sized from headers" in r.stdout and "65.2 GB" in r.stdout and "fits" in r.stdout


def test_plan_of_a_repo_id_from_hub_metadata(tiny_ckpt, tmp_path):
    """Not cached: the hub's safetensors metadata (a local fake hub here, never the network) sizes it,
    reading only each shard's header (HTTP Range requests), the same numbers as the local files give."""
    from fake_hub import FakeHub

    files = {p.name: p.read_bytes() for p in tiny_ckpt.iterdir()}
    local = make_plan(read_checkpoint(tiny_ckpt), budget=budget(8))
    with FakeHub("openai/gpt-oss-20b", files) as fake:
        env = dict(os.environ, HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
                   COLUMNS="150")
        r = plan_cli(env, "--model", "openai/gpt-oss-20b", "--memory", "8GB")
        log = list(fake.log)
    assert r.returncode == 0, r.stderr
    assert "sized from hub metadata" in r.stdout and local.message.split(": ", 1)[1] in r.stdout.replace("\n", " ")
    shard_gets = [(p, rng) for m, p, rng in log if m == "GET" and p.endswith(".safetensors")]
    assert shard_gets and all(rng.startswith("bytes=0-") for _, rng in shard_gets)


def test_plan_of_an_uncached_repo_id_offline_is_one_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    r = plan_cli(env, "--model", "openai/gpt-oss-20b")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in " ".join(r.stderr.split())


def test_float32_that_does_not_fit_says_whether_bfloat16_does(ckpt20, ckpt120):
    p = make_plan(read_checkpoint(ckpt20), budget=budget(16), metal=False)
    assert p.dtype == "float32" and p.status == "does not fit"
    half = make_plan(read_checkpoint(ckpt20), budget=budget(16), metal=False, dtype="bfloat16")
    assert half.status == "smaller context" and half.context >= 32768
    assert f"In bfloat16 (`--dtype bfloat16`, the default on a Mac) it fits at a context of {half.context:,} " \
           "tokens" in p.message
    assert p.message.index("In bfloat16") < p.message.index("A smaller --ctx does not help")
    # not said when bf16 does not fit either, nor when the plan is already bf16
    assert "In bfloat16" not in make_plan(read_checkpoint(ckpt120), budget=budget(16), metal=False).message
    assert "In bfloat16" not in make_plan(read_checkpoint(ckpt20), budget=budget(12), metal=True).message


def test_plan_for_a_mac_from_another_machine(ckpt20):
    """--device metal --memory 16GiB: bf16, fused attention, the working set of a 16 GiB Mac, its sysctl."""
    b = memory.device_budget("metal", "16GiB")
    assert b.metal and b.total == 16 * GIB and b.usable == 16 * GIB * 2 // 3
    assert memory.device_budget("metal", "64GiB").usable == 48 * GIB
    p = memory.plan(ckpt20, memory="16GiB", device="metal")
    assert p.dtype == "bfloat16" and p.fused_attention and p.status == "does not fit"
    assert "`sudo sysctl iogpu.wired_limit_mb=" in p.message and "Mac with 16GiB of memory" in p.message
    assert memory.plan(ckpt20, memory="24GiB", device="metal").status != "does not fit"
    cpu = memory.plan(ckpt20, memory="64GB", device="cpu")
    assert cpu.dtype == "float32" and not cpu.fused_attention and not cpu.budget.metal
    if not mx.metal.is_available():
        with pytest.raises(GptOssError, match="--device metal on a machine without Metal: give the Mac's memory"):
            memory.plan(ckpt20, device="metal")
    with pytest.raises(GptOssError, match="--device 'gpu': use auto, metal or cpu"):
        memory.plan(ckpt20, device="gpu")


def test_plan_json_for_scripts(ckpt20):
    from mlx_gptoss.cli.app import app

    r = CliRunner().invoke(app, ["plan", "--model", str(ckpt20), "--memory", "24GB", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert set(d) == {"model", "sized_from", "backend", "dtype", "weights", "kv_cache", "activations", "loading",
                      "overhead", "terms", "needed", "needed_at_min_context", "budget", "context", "decision", "fits",
                      "message", "remedies", "levers", "lever_notes"}
    p = make_plan(read_checkpoint(ckpt20), budget=budget(24))
    assert d["weights"]["in_memory"] == p.weights and sum(d["weights"]["on_disk"].values()) == HUB_TOTAL_20B
    assert d["weights"]["total"] == p.weight_bytes and d["kv_cache"]["total"] == p.kv_bytes
    assert d["budget"]["usable"] == 24 * GB and d["budget"]["source"] == "--memory 24GB"
    assert d["context"] == {"requested": 131072, "planned": p.context, "min": memory.MIN_CONTEXT}
    assert d["decision"] == p.status and d["needed"] == p.needed and d["remedies"] == p.remedies
    assert sum(t["bytes"] for t in d["terms"]) == d["needed"] and [t["name"] for t in d["terms"]][:3] == [
        "weights", "KV cache", "activations"]
    assert d["activations"]["prefill_chunk"] == p.prefill_chunk and d["activations"]["decode_per_sequence"] > 0
    assert d["activations"]["measured"]["attention"] > 0  # the CPU backend's multiples, measured here
    r = CliRunner().invoke(app, ["plan", "--model", str(ckpt20), "--memory", "8GB", "--json", "--device", "cpu",
                                 "--offload", "none"])
    d = json.loads(r.stdout)
    assert r.exit_code == 1 and d["decision"] == "does not fit" and not d["fits"] and d["needed"] is None
    assert d["remedies"] and d["needed_at_min_context"] > 8 * GB and d["levers"] == []
    # the default --offload auto streams experts instead, and says so
    r = CliRunner().invoke(app, ["plan", "--model", str(ckpt20), "--memory", "8GB", "--json", "--device", "cpu"])
    d = json.loads(r.stdout)
    assert r.exit_code == 0 and d["fits"] and "experts" in d["levers"] and d["lever_notes"]


def test_memory_with_a_space_is_accepted(ckpt20):
    env = dict(os.environ, COLUMNS="200")
    for args in (["--memory", "24 GB"], ["--memory", "24", "GB"], ["--memory=24", "GB"]):
        r = plan_cli(env, "--model", str(ckpt20), *args)
        assert r.returncode == 0, (args, r.stderr)
        assert "(--memory 24GB)" in r.stdout.replace("24 GB", "24GB")


def test_plan_without_network_is_one_line_at_once(tmp_path):
    """No cache, no network: one sentence, without huggingface_hub's retries or an exception's class name."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for endpoint in (f"http://127.0.0.1:{port}", "https://no-such-host.invalid"):
        env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path), HF_HUB_OFFLINE="0",
                   HF_ENDPOINT=endpoint, COLUMNS="300")
        r = plan_cli(env, "--model", "openai/gpt-oss-20b")
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [
            "error: openai/gpt-oss-20b: not in the local Hugging Face cache, and the Hugging Face hub cannot be "
            "reached (no network?); connect and run again, or pass a local folder"], r.stderr  # no retry lines


def test_the_server_slot_budget_uses_the_plan_figures(ckpt20):
    """server/slots.token_budget: what the plan leaves for KV after weights, activations and reserve, each of
    MAX_SLOTS slots holding its sliding-window layers and a growth step; the same figures `plan --json` prints."""
    from types import SimpleNamespace

    from mlx_gptoss.server.slots import MAX_SLOTS, token_budget

    p = make_plan(read_checkpoint(ckpt20), context=8192, budget=budget(24), metal=False)
    spare = 24 * GB - p.weight_bytes - p.activations - p.overhead
    per_slot = p.kv_sliding + p.kv_per_token * p.kv_slack
    assert token_budget(SimpleNamespace(plan=p)) == (spare - MAX_SLOTS * per_slot) // p.kv_per_token > 8192
    # a batch of B sequences decoding together: B x (KV per token x context + decode_activations)
    assert 0 < p.decode_activations < p.activations
