"""`load()` and the GptOss handle that scripts use: config + weights -> a ready model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

from . import metal_selftest
from .checkpoint import load_weights
from .config import GptOssConfig
from .errors import GptOssError
from .harmony import check_vocabulary
from .hub import resolve
from .memory import Plan, apply as apply_plan, bounded_cache, check_context, local_checkpoint
from .model import Transformer
from .offload import Levers, make_offload_plan, prepare


def default_dtype() -> mx.Dtype:
    """bf16 on Metal; float32 on MLX's CPU backend, where bf16 inputs to mxfp4 matmuls are ~10x slower."""
    return mx.bfloat16 if mx.default_device() == mx.gpu and mx.metal.is_available() else mx.float32


@dataclass
class GptOss:
    """A loaded model. `model(tokens [B, T] int32, cache=None)` -> logits [B, T, vocab]."""

    model: Transformer
    config: GptOssConfig
    path: Path
    dtype: mx.Dtype
    plan: "Plan | None" = None  # the memory plan load() applied (mlx_gptoss.memory)
    max_context: int = 0  # the most tokens a cache may hold under that plan (0: unbounded)
    offload: "object | None" = None  # mlx_gptoss.offload.Offloaded when the plan chose levers (.stats)
    group: object = None  # the mx.distributed group this rank's share belongs to (mlx_gptoss.distributed)

    def make_cache(self) -> list:
        """model.make_cache(), refusing (ContextLengthError) to grow past max_context tokens."""
        return bounded_cache(self.model, self.max_context)

    def check_context(self, n_tokens: int) -> None:
        """Raise ContextLengthError if a prompt of n_tokens does not fit the planned context."""
        check_context(n_tokens, self.max_context)

    # --- harmony chat (mlx_gptoss.chat, mlx_gptoss.harmony); the tokenizer is read lazily from self.path

    def encode_chat(self, messages: list[dict], *, reasoning_effort: str = "medium", tools=None,
                    developer: str | None = None, date: str | None = None) -> list[int]:
        """The exact prompt ids chat() feeds the model, ending with <|start|>assistant."""
        from .harmony import render

        check_vocabulary(self.config.vocab_size, self.path)
        return render(messages, model_path=self.path, reasoning_effort=reasoning_effort, tools=tools,
                      developer=developer, date=date)

    def chat(self, messages: list[dict], *, reasoning_effort: str = "medium", tools=None,
             developer: str | None = None, max_tokens: int | None = None, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None,
             max_context: int | None = None, date: str | None = None):
        """Stream one assistant reply to `messages` as Events (mlx_gptoss.chat): reasoning, preamble, content,
        tool_call, then done with the Stats. A bad option raises GptOssError here; a prompt over the context
        cap (or a model whose output is NaN) raises it at the first next()."""
        from .chat import context_cap, check_sampling, generate_events, runner_for

        check_vocabulary(self.config.vocab_size, self.path)
        check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                       max_tokens=max_tokens)
        prompt = self.encode_chat(messages, reasoning_effort=reasoning_effort, tools=tools, developer=developer,
                                  date=date)
        return generate_events(runner_for(self), prompt, cap=context_cap(self, max_context), max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)

    def generate(self, prompt: str, **kw) -> str:
        """One user message in, the final answer out (reasoning hidden); keyword arguments as chat()."""
        return "".join(ev.text for ev in self.chat([{"role": "user", "content": prompt}], **kw)
                       if ev.kind == "content")

    def session(self, **kw):
        """A multi-turn chat keeping its KV cache between turns: mlx_gptoss.chat.Session(self, **kw)."""
        from .chat import Session

        return Session(self, **kw)  # which refuses a vocabulary without the harmony tokens


def load(model: str | Path, *, dtype: mx.Dtype | None = None, allow_download: bool = True,
         progress: Callable[[int, int], None] | None = None, memory: str | int | None = None,
         ctx: int | None = None, for_chat: bool = False, offload: "str | Levers" = "auto",
         kv_bits: int | None = None, resident_experts: float | None = None, group=None) -> GptOss:
    """Load a gpt-oss checkpoint from a local folder or a Hugging Face repo id (downloaded if needed).

    progress(done, total) is called as the layers are read, for a progress bar. Before any weight is read
    the memory plan (mlx_gptoss.memory) must fit: memory= overrides the budget ("16GB"), ctx= the context
    (default: the model's full context, reduced to what fits). A plan that does not fit raises GptOssError.

    A model whose vocabulary cannot hold the harmony tokens (a test or pruned checkpoint) loads for raw
    forward passes; its chat(), session() and encode_chat() raise ConfigError. for_chat=True refuses it
    here instead, before any weight is read.

    When the model does not fit resident, offload="auto" lets the plan pick levers (mlx_gptoss.offload:
    expert streaming, 8-bit weights and KV cache); "none" refuses instead, "experts" streams experts anyway
    (resident_experts: the share kept resident), a mlx_gptoss.offload.Levers takes exactly those levers.
    kv_bits=8|16 fixes the full-attention KV cache's width.
    group: a mx.distributed group, or "auto" (the one mlx.launch started, if any): each rank then reads and
    holds only its share, and every rank calls the model (mlx_gptoss.distributed.lead_or_follow instead
    lets rank 0 alone run the program). The offload levers are for one machine: a sharded load takes none."""
    path = resolve(str(model), allow_download=allow_download)
    ckpt = local_checkpoint(path, check_size=True)  # config + every header, checked before any data is read
    cfg = ckpt.config
    if for_chat:
        check_vocabulary(cfg.vocab_size, path / "config.json")
    dtype = dtype or default_dtype()
    if group is not None:
        from .distributed import join
        from .distributed.loading import load_rank

        group = join(group)
        if group is not None:
            if offload not in ("auto", "none") or kv_bits == 8 or resident_experts is not None:
                raise GptOssError(f"offload={offload!r}, kv_bits={kv_bits!r}: the offload levers run on one machine; "
                                  "a model sharded over several ranks is loaded resident (drop these options, or "
                                  "add a rank: gptoss-mac plan --ranks N)")
            metal_selftest.prepare(dtype)
            net, plan, _ = load_rank(ckpt, group, dtype=dtype, memory=memory, ctx=ctx, progress=progress)
            return GptOss(model=net, config=cfg, path=path, dtype=dtype, plan=plan, max_context=plan.context,
                          group=group)
    plan = make_offload_plan(ckpt, context=ctx, memory_=memory, dtype=dtype, offload=offload, kv_bits=kv_bits,
                             resident_experts=resident_experts)
    apply_plan(plan)
    # The MoE backend is decided here, before any weight is read (a due self-test runs now, in a child
    # process with the memory the plan leaves free), so that no decode step ever decides it.
    metal_selftest.prepare(dtype)
    net = Transformer(cfg)
    net.set_dtype(dtype)
    levers = getattr(plan, "levers", None)
    offloaded, extra = prepare(net, ckpt, levers, dtype) if levers and levers.active else (None, [])
    weights = [(n, a) for n, a in load_weights(ckpt.tensors, dtype) if not offloaded or offloaded.keeps(n)]
    # Evaluate layer by layer so peak memory stays near the checkpoint's size.
    net.load_weights(weights + extra, strict=True)
    del weights, extra  # the module holds what it needs; replaced arrays must be freed
    layers = net.model.layers
    for i, layer in enumerate(layers):
        mx.eval(layer.parameters())
        if offloaded:
            offloaded.finish_layer(layer)
        if progress:
            progress(i + 1, len(layers) + 1)
    mx.eval(net.parameters())
    if progress:
        progress(len(layers) + 1, len(layers) + 1)
    net.eval()
    if offloaded:
        offloaded.reset_counts()
    return GptOss(model=net, config=cfg, path=path, dtype=dtype, plan=plan, max_context=plan.context,
                  offload=offloaded)
