"""The model configuration, read once from the hub's config.json.

Accepts both spellings of the rotary settings: `rope_scaling` + `rope_theta` (transformers 4.x, the hub
files) and `rope_parameters` (transformers 5.x). Every field the model depends on is checked here, so a
bad config fails with one message naming the field instead of a wrong model later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class YarnConfig:
    """YaRN rotary scaling as in OpenAI's reference (gpt_oss/torch/model.py, RotaryEmbedding)."""

    theta: float = 150000.0
    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_context: int = 4096
    truncate: bool = False  # the hub config says false: the correction range is not floored/ceiled


@dataclass(frozen=True)
class GptOssConfig:
    num_hidden_layers: int
    num_local_experts: int
    num_experts_per_tok: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    sliding_window: int
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    max_position_embeddings: int = 131072
    rope: YarnConfig = field(default_factory=YarnConfig)
    layer_types: tuple[str, ...] = ()
    quantization: str | None = None  # "mxfp4" for the hub checkpoints, None for bf16 ones
    eos_token_ids: tuple[int, ...] = ()

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "GptOssConfig":
        return _parse(d, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "GptOssConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json here; is this a gpt-oss model folder?")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return _parse(d, str(path))


def _parse(d: dict, source: str) -> GptOssConfig:
    def bad(name, why):
        return ConfigError(f"{source}: field `{name}` {why}")

    model_type = d.get("model_type")
    if model_type != "gpt_oss":
        raise ConfigError(
            f"{source}: model_type is {model_type!r}, not 'gpt_oss'; this program runs only "
            "gpt-oss checkpoints (openai/gpt-oss-20b, openai/gpt-oss-120b)"
        )

    def get(name, kind, default=None, *, alias=None, minimum=1):
        v = d.get(name, d.get(alias) if alias else None)
        if v is None:
            if default is None:
                raise bad(name, "is missing")
            return default
        if kind is int:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
                raise bad(name, f"must be an integer, got {v!r}")
            v = int(v)
        elif kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, f"must be a number, got {v!r}")
            v = float(v)
        if minimum is not None and v < minimum:
            raise bad(name, f"must be >= {minimum}, got {v!r}")
        return v

    n_layers = get("num_hidden_layers", int)
    n_experts = get("num_local_experts", int, alias="num_experts")
    k = get("num_experts_per_tok", int, alias="experts_per_token")
    if k > n_experts:
        raise bad("num_experts_per_tok", f"({k}) exceeds num_local_experts ({n_experts})")
    hidden = get("hidden_size", int)
    inter = get("intermediate_size", int)
    n_heads = get("num_attention_heads", int)
    n_kv = get("num_key_value_heads", int)
    if n_heads % n_kv:
        raise bad("num_key_value_heads", f"({n_kv}) must divide num_attention_heads ({n_heads})")
    head_dim = get("head_dim", int, hidden // n_heads)
    if head_dim % 2:
        raise bad("head_dim", f"must be even for rotary embeddings, got {head_dim}")

    layer_types = d.get("layer_types")
    if layer_types is None:
        layer_types = [LAYER_TYPES[i % 2] for i in range(n_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise bad("layer_types", f"must list one type per layer ({n_layers})")
    for t in layer_types:
        if t not in LAYER_TYPES:
            raise bad("layer_types", f"has unknown type {t!r}; expected one of {LAYER_TYPES}")

    rope = _parse_rope(d, bad)
    q = d.get("quantization_config")
    quant = None
    if q is not None:
        if not isinstance(q, dict) or q.get("quant_method") != "mxfp4":
            method = q.get("quant_method") if isinstance(q, dict) else q
            raise bad("quantization_config", f"has quant_method {method!r}; only 'mxfp4' is supported")
        quant = "mxfp4"

    eos = d.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())

    return GptOssConfig(
        num_hidden_layers=n_layers,
        num_local_experts=n_experts,
        num_experts_per_tok=k,
        vocab_size=get("vocab_size", int),
        hidden_size=hidden,
        intermediate_size=inter,
        head_dim=head_dim,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        sliding_window=get("sliding_window", int, 128),
        rms_norm_eps=get("rms_norm_eps", float, 1e-5, minimum=0),
        swiglu_limit=get("swiglu_limit", float, 7.0, minimum=0),
        swiglu_alpha=get("swiglu_alpha", float, 1.702, minimum=0),
        max_position_embeddings=get("max_position_embeddings", int, 131072),
        rope=rope,
        layer_types=tuple(layer_types),
        quantization=quant,
        eos_token_ids=eos,
    )


def _parse_rope(d: dict, bad) -> YarnConfig:
    # transformers 5.x: rope_parameters holds everything, theta included.
    # transformers 4.x / the hub files: rope_scaling + a top-level rope_theta.
    if d.get("rope_parameters") is not None:
        name, p = "rope_parameters", d["rope_parameters"]
        theta = p.get("rope_theta", d.get("rope_theta")) if isinstance(p, dict) else None
    else:
        name, p = "rope_scaling", d.get("rope_scaling")
        theta = d.get("rope_theta")
    if p is None:
        raise bad("rope_scaling", "is missing (gpt-oss uses YaRN rotary scaling)")
    if not isinstance(p, dict):
        raise bad(name, f"must be an object, got {p!r}")
    kind = p.get("rope_type", p.get("type"))
    if kind != "yarn":
        raise bad(name, f"has rope_type {kind!r}; gpt-oss uses 'yarn'")
    defaults = YarnConfig()

    def num(key, default):
        v = p.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise bad(f"{name}.{key}", f"must be a positive number, got {v!r}")
        return v

    if theta is None:
        theta = defaults.theta
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1:
        raise bad("rope_theta", f"must be a number > 1, got {theta!r}")
    truncate = p.get("truncate", True)  # transformers' default when the key is absent
    if not isinstance(truncate, bool):
        raise bad(f"{name}.truncate", f"must be true or false, got {truncate!r}")
    return YarnConfig(
        theta=float(theta),
        factor=float(num("factor", defaults.factor)),
        beta_fast=float(num("beta_fast", defaults.beta_fast)),
        beta_slow=float(num("beta_slow", defaults.beta_slow)),
        original_context=int(num("original_max_position_embeddings", defaults.original_context)),
        truncate=truncate,
    )
