"""Shared fixtures: tiny checkpoints in the hub layout, written once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

from tiny_checkpoint import hub_config, random_weights, write_hub_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg() -> dict:
    return hub_config()


@pytest.fixture(scope="session")
def tiny_weights(tiny_cfg) -> dict:
    return random_weights(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_cfg, tiny_weights):
    """A 4-layer, 8-expert MXFP4 checkpoint (sliding window 8) in the hub layout, two shards + index."""
    return write_hub_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", tiny_cfg, tiny_weights)
