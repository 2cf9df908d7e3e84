"""What a hub download fetches: the root files that run the model, never original/ or metal/."""

from __future__ import annotations

from huggingface_hub.utils import filter_repo_objects

from mlx_gptoss.hub import ALLOW_PATTERNS, IGNORE_PATTERNS, looks_like_path

# The file list of openai/gpt-oss-20b on the hub.
GPT_OSS_20B_FILES = [
    ".gitattributes", "LICENSE", "README.md", "USAGE_POLICY", "chat_template.jinja", "config.json",
    "generation_config.json", "metal/model.bin", "model-00000-of-00002.safetensors",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    "original/config.json", "original/dtypes.json", "original/model.safetensors", "special_tokens_map.json",
    "tokenizer.json", "tokenizer_config.json",
]


def test_download_takes_only_root_model_files():
    got = set(filter_repo_objects(GPT_OSS_20B_FILES, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    assert got == {
        "chat_template.jinja", "config.json", "generation_config.json", "model-00000-of-00002.safetensors",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    }


def test_repo_ids_and_paths_are_told_apart():
    assert not looks_like_path("openai/gpt-oss-20b")
    for p in ("./gpt-oss-20b", "/models/gpt-oss", "~/m", "models/openai/gpt-oss-20b", "gpt-oss-20b"):
        assert looks_like_path(p), p
