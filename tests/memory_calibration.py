"""One case of the memory calibration: in this (fresh) process, load a test checkpoint under the memory plan,
prefill a prompt through chat.Runner (the engine's prefill, in the plan's chunks) and decode a few tokens;
print the plan's figures and mx.get_peak_memory() over all of it as one JSON line.

    python tests/memory_calibration.py '{"folder": ..., "config": {...}, "ctx": 2048, "load": {...}}'

tests/test_memory_calibration.py and benchmarks/memory_calibration.py run it; the checkpoint is written by
tiny_checkpoint.py when the folder does not hold one yet.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DECODE = 3


def checkpoint(folder: str, config: dict) -> Path:
    from tiny_checkpoint import hub_config, random_weights, write_hub_checkpoint

    folder = Path(folder)
    if not (folder / "model.safetensors.index.json").exists():
        cfg = hub_config(**config)
        write_hub_checkpoint(folder, cfg, random_weights(cfg, seed=1))
    return folder


def levers(spec):
    from mlx_gptoss.offload import Levers

    return Levers(**spec) if isinstance(spec, dict) else spec


def run(case: dict) -> dict:
    import mlx.core as mx

    import mlx_gptoss
    from mlx_gptoss.chat import Runner

    folder = checkpoint(case["folder"], case["config"])
    kw = dict(case.get("load", {}))
    if "offload" in kw:
        kw["offload"] = levers(kw["offload"])
    if "dtype" in kw:
        kw["dtype"] = getattr(mx, kw["dtype"])
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    gpt = mlx_gptoss.load(folder, ctx=case["ctx"], memory=case.get("memory", "20GB"), **kw)
    load_peak = mx.get_peak_memory()
    runner = Runner(gpt)
    n = case["ctx"] - DECODE
    prompt = [(i * 7919) % gpt.config.vocab_size for i in range(n)]
    logits, _ = runner.prefill(prompt)
    for _ in range(DECODE - 1):
        logits = runner.step(int(mx.argmax(logits)))
    mx.eval(logits)
    p = gpt.plan
    return {"peak": mx.get_peak_memory(), "load_peak": load_peak, "planned": p.peak, "needed": p.needed,
            "weights": p.weight_bytes, "kv": p.kv_bytes, "activations": p.activations, "loading": p.loading,
            "chunk": p.prefill_chunk, "what": p.activations_note, "levers": getattr(p, "levers", None) and
            p.levers.names(), "slots": getattr(getattr(p, "levers", None), "expert_slots", None),
            "last_logits": [float(x) for x in logits[:8].tolist()], "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
