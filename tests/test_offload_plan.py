"""The offload plan's decisions for sparse copies of the real gpt-oss-20b and -120b checkpoints (headers
as published, data a hole: tests/test_memory_plan.py's builder) on 16 GB and 64 GB Macs, with the figures.

Independent figures, from the published layout (not from our code): one expert is 16 bytes of E2M1 codes
plus 1 scale byte per 32 values of its 5760x2880 gate_up and 2880x2880 down matrices = 13,219,200 bytes;
the bf16 embedding table is 201088 x 2880 x 2 = 1,158,266,880 bytes; MLX's 8-bit affine quantization of the
unembedding stores 1 byte per value plus a bf16 scale and bias per 64 values.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from mlx_gptoss import memory
from mlx_gptoss.errors import GptOssError
from mlx_gptoss.offload import OffloadPlan, make_offload_plan
from mlx_gptoss.offload.plan import MIN_RESIDENT_SHARE, STREAM_KEEP, Levers, sized
from test_memory_plan import mac, write_sparse_checkpoint

EXPERT = (5760 * 2880 + 2880 * 2880) * 17 // 32
EMBEDDING = 201088 * 2880 * 2
LM_HEAD_8BIT = 201088 * 2880 + 2 * 201088 * (2880 // 64) * 2


@pytest.fixture(scope="module")
def c20(tmp_path_factory):
    return memory.local_checkpoint(write_sparse_checkpoint(tmp_path_factory.mktemp("o") / "gpt-oss-20b", 24, 32, 3))


@pytest.fixture(scope="module")
def c120(tmp_path_factory):
    return memory.local_checkpoint(write_sparse_checkpoint(tmp_path_factory.mktemp("o") / "gpt-oss-120b", 36, 128, 15))


def check_maximal(ckpt, p: OffloadPlan, budget):
    """The plan fits, and one more resident expert per layer would not at its prefill chunk; the chunk is
    the largest keeping STREAM_KEEP of the most experts any chunk allows."""
    assert p.needed <= budget.usable
    lv = replace(p.levers, expert_slots=p.levers.expert_slots + 1)
    more = sized(ckpt, lv, p.context, memory._dtype(p.dtype, True), True, budget, p.prefill_chunk)
    assert more.needed > budget.usable
    most = make_offload_plan(ckpt, budget=budget, context=p.context, offload=replace(lv, expert_slots=round(
        p.levers.expert_slots / STREAM_KEEP) + 1))
    assert not most.fits  # more than p's slots / STREAM_KEEP fit at no chunk


def test_20b_on_a_16gb_mac(c20):
    b = mac(16)  # 2/3 of 16 GiB: 11.5 GB
    assert make_offload_plan(c20, budget=b, context=8192, offload="none").status == "does not fit"
    p = make_offload_plan(c20, budget=b, context=8192)
    assert isinstance(p, OffloadPlan) and p.fits and p.context == 8192
    assert p.levers.names() == ["embedding", "kv8", "attention8", "experts"]
    assert p.expert_bytes == EXPERT
    # 29 of 32 resident (91%) with 128-token prefill chunks: the activations the plan reserved before (a 0.8 GB
    # guess) kept 27 (84%). 16-token chunks would keep 30, for 8x the prefill steps (STREAM_KEEP).
    assert p.levers.expert_slots == 29 and p.prefill_chunk == 128
    assert p.weights["embedding"] == 0 and p.resident_weights["embedding"] == EMBEDDING
    assert p.weights["unembedding"] == LM_HEAD_8BIT
    assert p.streamed_per_token == round(24 * 4 * (32 - 29) / 32 * EXPERT)  # ~0.12 GB per token
    check_maximal(c20, p, b)
    assert "91% resident" in p.message and "0.1 GB streamed per token" in p.message
    # the whole 131k context: the 8-bit KV cache leaves room for 21 experts per layer (as before: its unfused attention sets the peak)
    full = make_offload_plan(c20, budget=b, context=131072)
    assert full.fits and full.levers.expert_slots == 21 and full.kv_per_token == 12 * 2 * 8 * (64 + 2 * 2)
    check_maximal(c20, full, b)


def test_20b_on_a_64gb_mac_is_resident(c20):
    p = make_offload_plan(c20, budget=mac(64))
    assert type(p) is memory.Plan and p.status == "fits" and p.context == 131072
    forced = make_offload_plan(c20, budget=mac(64), context=8192, offload="experts")
    assert forced.levers == Levers(expert_slots=32)  # streaming asked for, everything fits resident


def test_120b_on_a_64gb_mac(c120):
    b = mac(64)  # 3/4 of 64 GiB: 51.5 GB
    assert make_offload_plan(c120, budget=b, context=8192, offload="none").status == "does not fit"
    p = make_offload_plan(c120, budget=b)  # no context asked for: a chat's 8192
    assert p.fits and p.context == 8192
    assert p.levers.names() == ["embedding", "kv8", "attention8", "experts"]
    assert p.levers.expert_slots == 98  # 77% of 128 resident, now with 512-token prefill chunks (256 before)
    assert p.streamed_per_token == round(36 * 4 * 30 / 128 * EXPERT)  # ~0.45 GB per token
    # one prefill step of one layer can use all 128 experts: stacked + read
    assert p.prefill_chunk == 512 and p.stream_buffer == (128 + 30) * EXPERT
    check_maximal(c120, p, b)


def test_120b_on_a_16gb_mac_is_refused_with_remedies(c120):
    p = make_offload_plan(c120, budget=mac(16), context=8192)
    assert not p.fits and p.levers.expert_slots < math.ceil(MIN_RESIDENT_SHARE * 128)
    assert "--offload experts" in p.message and "20b" in p.message
    with pytest.raises(GptOssError, match="does not fit"):
        memory.apply(p)
    forced = make_offload_plan(c120, budget=mac(16), context=8192, offload="experts")
    assert forced.fits and forced.levers.names() == ["experts"] and forced.levers.expert_slots > 0


def test_too_small_for_anything(c120):
    p = make_offload_plan(c120, budget=memory.Budget(2 * 10**9, "--memory 2GB"), context=8192, offload="experts")
    assert p.status == "does not fit" and "does not fit even with offloading" in p.message


def test_kv_bits(c20):
    b = mac(16)
    p16 = make_offload_plan(c20, budget=b, context=131072, kv_bits=16)
    p8 = make_offload_plan(c20, budget=b, context=131072, kv_bits=8)
    assert "kv8" not in p16.levers.names() and p8.levers.kv_bits == 8
    assert p16.levers.expert_slots < p8.levers.expert_slots  # the float cache leaves less room for experts
    # kv_bits=8 on a model that fits: the largest context with the 8-bit cache
    small = memory.Budget(20 * 10**9, "--memory 20GB")  # float32 on the CPU: fits at a smaller context
    base = make_offload_plan(c20, budget=small)
    more = make_offload_plan(c20, budget=small, kv_bits=8)
    assert base.status == "smaller context" and more.levers.names() == ["kv8"] and more.context > base.context
