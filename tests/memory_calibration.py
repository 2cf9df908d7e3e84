"""The memory calibration: each case loads a test checkpoint under the memory plan in a fresh process,
prefills a prompt through chat.Runner (the engine's prefill, in the plan's chunks) and decodes a few tokens,
and reports the plan's figures with mx.get_peak_memory() over all of it.

    python tests/memory_calibration.py CASES_JSON     # one JSON line per case, in order

CASES_JSON is a list of {"folder", "config", "ctx", "load": load() keywords, "memory", "chunk"}. This
launcher writes the checkpoints, imports the modules once, allocates nothing in MLX, and forks one child per
case (two at a time), so every case starts with MLX untouched without paying the imports again; on a system
where fork is not safe for MLX (macOS) each case is a new interpreter instead. tests/test_memory_calibration.py and
benchmarks/memory_calibration.py use it; the checkpoints are written by tiny_checkpoint.py.

A test checkpoint needs at least two full-attention layers: during prefill only the cache is evaluated, so
the last layer's attention and MoE never run (a 2-layer model's single full layer would never show its
score matrices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DECODE = 3  # tokens decoded after the prefill
WORKERS = 2

# The matrix's checkpoint: small enough that a 2k prefill takes seconds on a loaded 2-core machine; 4 layers
# (2 full-attention), 16 experts, MXFP4 as the hub stores them.
CONFIG = {"hidden_size": 128, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 32, "num_local_experts": 16, "num_hidden_layers": 4, "vocab_size": 2048,
          "sliding_window": 64}
# name -> (context, load() keywords, slow)
CASES = {
    "resident, 2k": (2048, {}, False),
    "experts 25% resident, 2k": (2048, {"offload": "experts", "resident_experts": 0.25}, False),
    "kv8, 2k": (2048, {"kv_bits": 8, "offload": "none"}, False),
    "8-bit weights, 2k": (2048, {"offload": {"weight_bits": 8}}, False),
    "experts 0% resident, 2k": (2048, {"offload": "experts", "resident_experts": 0.0}, True),
    "experts 75% resident, 2k": (2048, {"offload": "experts", "resident_experts": 0.75}, True),
    "every lever, 2k": (2048, {"offload": {"embedding": True, "kv_bits": 8, "weight_bits": 8, "expert_slots": 6}},
                        True),
    "bfloat16, 2k": (2048, {"dtype": "bfloat16"}, True),
    "resident, 4k": (4096, {}, True),
    "kv8, 4k": (4096, {"kv_bits": 8, "offload": "none"}, True),
    "experts 50% resident, 4k": (4096, {"offload": "experts", "resident_experts": 0.5}, True),
    "resident, 8k": (8192, {}, True),
}


def checkpoint(folder: str, config: dict) -> Path:
    from tiny_checkpoint import hub_config, random_weights, write_hub_checkpoint

    folder = Path(folder)
    if not (folder / "model.safetensors.index.json").exists():
        cfg = hub_config(**config)
        write_hub_checkpoint(folder, cfg, random_weights(cfg, seed=1))
    return folder


def run(case: dict) -> dict:
    """One case in this process (which must not have used MLX before)."""
    import mlx.core as mx

    import mlx_gptoss
    from mlx_gptoss.chat import Runner
    from mlx_gptoss.offload import Levers

    folder = checkpoint(case["folder"], case["config"])
    kw = dict(case.get("load", {}))
    if isinstance(kw.get("offload"), dict):
        kw["offload"] = Levers(**kw["offload"])
    if "dtype" in kw:
        kw["dtype"] = getattr(mx, kw["dtype"])
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    gpt = mlx_gptoss.load(folder, ctx=case["ctx"], memory=case.get("memory", "20GB"), **kw)
    load_peak = mx.get_peak_memory()
    runner = Runner(gpt)
    runner.chunk = case.get("chunk") or runner.chunk
    prompt = [(i * 7919) % gpt.config.vocab_size for i in range(case["ctx"] - DECODE)]
    logits, _ = runner.prefill(prompt)
    for _ in range(DECODE - 1):
        logits = runner.step(int(mx.argmax(logits)))
    mx.eval(logits)
    p = gpt.plan
    levers = getattr(p, "levers", None)
    return {"peak": mx.get_peak_memory(), "load_peak": load_peak, "planned": p.peak, "needed": p.needed,
            "budget": p.budget.usable, "weights": p.weight_bytes, "kv": p.kv_bytes, "activations": p.activations,
            "loading": p.loading, "chunk": runner.chunk, "what": p.activations_note,
            "levers": levers.names() if levers else [], "slots": getattr(levers, "expert_slots", None),
            "logits": logits.tolist(), "seconds": round(time.perf_counter() - t0, 2)}


def run_fresh(cases: list[dict], timeout: float = 900) -> list[dict]:
    """Every case in a fresh process (see the module's docstring), in order; an error becomes {"error": ...}."""
    r = subprocess.run([sys.executable, __file__, json.dumps(cases)], capture_output=True, text=True,
                       timeout=timeout)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode or len(lines) != len(cases):
        raise RuntimeError(f"calibration launcher failed ({r.returncode}): {r.stderr[-3000:]}")
    return lines


def _child(case: dict) -> str:
    try:
        return json.dumps(run(case))
    except Exception as e:  # reported, not raised: the launcher prints one line per case
        return json.dumps({"error": f"{type(e).__name__}: {e}"})


def _launch(cases: list[dict]) -> None:
    # the checkpoints first, once each: two children that both found one missing wrote it at the same time,
    # and one read a shard the other was rewriting ("[read] Unable to read from file.", seen in CI)
    for case in cases:
        checkpoint(case["folder"], case["config"])
    fork = sys.platform == "linux"
    if fork:
        import mlx_gptoss.chat  # noqa: F401  imports only: MLX allocates nothing before the fork
    results: dict[int, str] = {}
    running: dict[int, tuple] = {}
    pending = list(enumerate(cases))
    while pending or running:
        while pending and len(running) < WORKERS:
            i, case = pending.pop(0)
            if fork:
                out = Path(tempfile.mkstemp(prefix="calibration-", suffix=".json")[1])
                pid = os.fork()
                if pid == 0:
                    out.write_text(_child(case))
                    os._exit(0)
                running[pid] = (i, out)
            else:
                proc = subprocess.Popen([sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[2]); "
                                         "import memory_calibration as m; print(m._child(json.loads(sys.argv[1])))",
                                         json.dumps(case), str(HERE)], stdout=subprocess.PIPE, text=True)
                running[proc.pid] = (i, proc)
        pid, _ = os.wait()
        i, handle = running.pop(pid)
        if fork:
            results[i] = handle.read_text() or json.dumps({"error": "the case's process died"})
            handle.unlink()
        else:
            results[i] = handle.stdout.read().strip() or json.dumps({"error": "the case's process died"})
    for i in range(len(cases)):
        print(results[i], flush=True)


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
