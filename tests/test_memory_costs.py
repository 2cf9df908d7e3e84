"""memory_costs: the attention and MoE multiples are measured once per machine and setup, then read back."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlx_gptoss import memory_costs


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(memory_costs, "_known", {})
    return tmp_path / "gptoss-mac" / "memory-costs.json"


def test_measured_once_then_read_back(fresh_cache, monkeypatch):
    here = mx.metal.is_available()
    c = memory_costs.costs(mx.float32, here)
    assert c.source.startswith("measured on this machine")
    if not here:  # MLX's CPU backend composes attention from ops: several score matrices are alive at once
        assert 2.5 < c.attention < 4 and 2.5 < c.attention_kv8 < 5
    assert 3 < c.moe_hidden < 8 and 3 < c.moe_intermediate < 8
    stored = json.loads(fresh_cache.read_text())
    key = memory_costs.setup_key(mx.float32)
    assert list(stored) == [key] and "mlx " + mx.__version__ in key and "|float32|" in key
    monkeypatch.setattr(memory_costs, "_known", {})
    monkeypatch.setattr(memory_costs, "measure", lambda dtype: pytest.fail("measured again"))
    assert memory_costs.costs(mx.float32, here) == c  # from the file
    # another backend than this machine's cannot be measured here: the multiples the ops name, said so
    other = memory_costs.costs(mx.bfloat16, not here)
    assert other == (memory_costs.FIRST_PRINCIPLES_CPU if here else memory_costs.FIRST_PRINCIPLES)
    assert other.source == "first principles"


def test_an_unreadable_cache_is_measured_again(fresh_cache):
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text("{not json")
    assert memory_costs.costs(mx.float32, mx.metal.is_available()).moe_hidden > 0
    assert memory_costs.setup_key(mx.float32) in json.loads(fresh_cache.read_text())
