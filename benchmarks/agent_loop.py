"""A 10-step agent tool loop against `gptoss-mac serve` and `mlx_lm.server`, on the same checkpoint.

    python benchmarks/agent_loop.py              # writes benchmarks/RESULTS_agent_loop.md and results_agent_loop.json
    python benchmarks/agent_loop.py --steps 4 --no-write

The checkpoint: tests/scripted_checkpoint.py's construction (real 201088-token vocabulary, hub layout, MXFP4
experts) replaying one agent turn under greedy decoding: a sentence of reasoning and a get_weather call,
whatever the conversation. Layers after the first are zeros but full-size work (by default 24 layers, 32
experts top-4, expert intermediate 2880), so prefill costs what the shapes cost. Both servers load the same
files, each in float32 activations (mlx-lm's best setting on a CPU, where bf16 inputs to the MXFP4 matmul are
~10x slower; the wrapper below casts it as benchmarks/compare_mlx_lm.py does; on a Mac drop --float32).

The loop: a user question, then 10 times: the model reasons and calls get_weather, the client appends the
call and a tool result, and sends the whole conversation again (as agents do).
- gptoss-mac serve: POST /v1/responses with all items resent (the output items it returned + the
  function_call_output); usage.input_tokens_details.cached_tokens says what came from its KV slots.
- mlx_lm.server: the scripted checkpoint has no chat template, so its /v1/chat/completions would not speak
  harmony; it is driven through /v1/completions with the same conversation rendered to harmony text by
  openai-harmony (what a harmony-aware client sends), max_tokens = the scripted turn's length;
  usage.prompt_tokens_details.cached_tokens is its prompt cache's count.
Prefilled tokens per step = prompt tokens - cached tokens; wall time per step as the client sees it.
Both servers are warmed up with one unrelated completion first. The servers run one after the other, each
alone, and bind 127.0.0.1 on a free port.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

QUESTION = "What is the weather in Paris? Check it every few minutes."
WRAP_MLX_LM = """
import sys, mlx.core as mx, mlx_lm.server as srv
_load = srv.load
def load(*a, **k):
    out = _load(*a, **k)
    if {float32}:
        out[0].set_dtype(mx.float32)
    return out
srv.load = load
sys.argv = ["mlx_lm.server"] + sys.argv[1:]
srv.main()
"""


def build_checkpoint(folder: Path, layers: int, experts: int, intermediate: int) -> Path:
    """The scripted agent checkpoint at a heavier shape (see the module docstring)."""
    from mlx_gptoss import harmony
    from scripted_checkpoint import offline_harmony, scripted_config, scripted_weights
    from server_fixtures import AGENT_SCRIPT, WEATHER_TOOL
    from tiny_checkpoint import hub_config, write_hub_checkpoint

    tok = offline_harmony()
    enc = harmony.encoding()
    gen = enc.encode(AGENT_SCRIPT, allowed_special="all")
    first = [{"role": "user", "content": QUESTION}]
    call = {"role": "assistant", "reasoning": "Need the weather.",
            "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]}
    result = {"role": "tool", "name": "get_weather", "tool_call_id": "call_1", "content": tool_result(0)}
    episodes = [(harmony.render(first, tools=[WEATHER_TOOL]), gen),
                (harmony.render(first + [call, result], tools=[WEATHER_TOOL]), gen)]
    base = scripted_config()
    over = dict(num_hidden_layers=layers, num_local_experts=experts, intermediate_size=intermediate)
    cfg = hub_config(**{**{k: v for k, v in base.items() if k != "layer_types"}, **over})
    folder = write_hub_checkpoint(folder, cfg, scripted_weights(cfg, episodes), shards=1)
    (folder / "tokenizer.json").write_bytes((tok / "tokenizer.json").read_bytes())
    return folder


def tool_result(step: int) -> str:
    return json.dumps({"city": "Paris", "temp_c": 18 + step % 5, "sky": "sunny", "checked": f"12:{step:02d}"})


# ------------------------------------------------------------------------------------------- servers

def free_port() -> int:
    from mlx_gptoss.server import free_port as fp

    return fp()


class Proc:
    def __init__(self, args: list[str], port: int, log: Path):
        self.port, self.log = port, open(log, "w")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, HF_HUB_OFFLINE="1"))
        deadline = time.monotonic() + 300
        while True:
            if self.p.poll() is not None:
                raise SystemExit(f"{args[:4]} exited; see {log}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{args[:4]} did not come up in 300 s; see {log}")
            time.sleep(0.5)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(30)
        self.log.close()


def post(port: int, path: str, body: dict) -> tuple[dict, float]:
    t0 = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}{path}", json=body, timeout=1800)
    dt = time.perf_counter() - t0
    if not r.is_success:
        raise SystemExit(f"{path}: {r.status_code} {r.text[:500]}")
    return r.json(), dt


def warm_up(port: int) -> None:
    post(port, "/v1/completions", {"prompt": "<|start|>user<|message|>warm up<|end|><|start|>assistant",
                                   "max_tokens": 4, "temperature": 0})


# ---------------------------------------------------------------------------------------------- loops

def loop_gptoss(port: int, steps: int) -> list[dict]:
    from server_fixtures import WEATHER_TOOL

    items = [{"role": "user", "content": QUESTION}]
    rows = []
    for step in range(steps):
        r, dt = post(port, "/v1/responses", {"input": items, "tools": [WEATHER_TOOL], "temperature": 0,
                                             "store": False})
        calls = [o for o in r["output"] if o["type"] == "function_call"]
        ok = len(calls) == 1 and calls[0]["arguments"] == '{"city": "Paris"}'
        u = r["usage"]
        rows.append({"step": step + 1, "prompt": u["input_tokens"], "cached": u["input_tokens_details"]["cached_tokens"],
                     "generated": u["output_tokens"], "seconds": dt, "as_scripted": ok})
        items += r["output"]
        items.append({"type": "function_call_output", "call_id": calls[0]["call_id"] if calls else "call_x",
                      "output": tool_result(step)})
    return rows


def loop_mlx_lm(port: int, steps: int) -> list[dict]:
    from mlx_gptoss import harmony
    from server_fixtures import AGENT_SCRIPT, WEATHER_TOOL

    enc = harmony.encoding()
    n_script = len(enc.encode(AGENT_SCRIPT, allowed_special="all"))
    msgs = [{"role": "user", "content": QUESTION}]
    rows = []
    for step in range(steps):
        prompt = enc.decode(harmony.render(msgs, tools=[WEATHER_TOOL]))
        r, dt = post(port, "/v1/completions", {"prompt": prompt, "max_tokens": n_script, "temperature": 0})
        u = r["usage"]
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        rows.append({"step": step + 1, "prompt": u["prompt_tokens"], "cached": cached,
                     "generated": u["completion_tokens"], "seconds": dt,
                     "as_scripted": r["choices"][0]["text"] == AGENT_SCRIPT})
        cid = f"call_{step}"
        parts = [{"channel": "analysis", "content": "Need the weather.", "recipient": None, "content_type": None,
                  "id": None},
                 {"channel": "commentary", "content": '{"city": "Paris"}', "recipient": "functions.get_weather",
                  "content_type": "<|constrain|>json", "id": cid}]
        msgs += [{"role": "assistant", "parts": parts, "reasoning": "Need the weather.",
                  "tool_calls": [{"id": cid, "name": "get_weather", "arguments": '{"city": "Paris"}'}]},
                 {"role": "tool", "name": "get_weather", "tool_call_id": cid, "content": tool_result(step)}]
    return rows


# --------------------------------------------------------------------------------------------- report

def totals(rows):
    pre = sum(r["prompt"] - r["cached"] for r in rows)
    return pre, sum(r["seconds"] for r in rows)


def report(ours, theirs, args, ckpt_desc: str) -> str:
    import mlx.core as mx
    import mlx_lm

    from mlx_gptoss import machine

    po, so = totals(ours)
    pt, st = totals(theirs)
    lines = [
        "# Agent loop: gptoss-mac serve vs mlx_lm.server", "",
        f"`python benchmarks/agent_loop.py{' --steps ' + str(args.steps) if args.steps != 10 else ''}` "
        f"(raw numbers: `results_agent_loop.json`), {datetime.date.today().isoformat()}.", "",
        f"**Machine**: {machine.chip()}, {os.cpu_count()} CPUs; {machine.os_name()}; Python "
        f"{sys.version.split()[0]}; MLX {mx.__version__} ({'Metal' if mx.metal.is_available() else 'CPU backend'}, "
        f"{machine.blas()}), mlx-lm {mlx_lm.__version__}. The cores are shared with other jobs: single wall "
        "times vary; token counts do not.", "",
        f"**Checkpoint**: {ckpt_desc}", "",
        "**Loop**: see the docstring of benchmarks/agent_loop.py. Prefilled = prompt tokens - cached tokens, as each "
        "server reports them in usage. (The two count prompt tokens differently: mlx-lm tokenizes the harmony "
        "text with the checkpoint's tokenizer.json, gptoss-mac renders token ids directly.)", "",
        "| step | gptoss-mac prompt | cached | prefilled | s | mlx_lm.server prompt | cached | prefilled | s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(ours, theirs):
        lines.append(f"| {a['step']} | {a['prompt']} | {a['cached']} | {a['prompt'] - a['cached']} | {a['seconds']:.2f} "
                     f"| {b['prompt']} | {b['cached']} | {b['prompt'] - b['cached']} | {b['seconds']:.2f} |")
    lines.append(f"| **total** | | | **{po}** | **{so:.1f}** | | | **{pt}** | **{st:.1f}** |")
    ok = all(r["as_scripted"] for r in ours), all(r["as_scripted"] for r in theirs)
    rp, rs = (pt / po if po else float("inf")), (st / so if so else float("inf"))
    lines += ["", f"Every reply followed the script: gptoss-mac {'yes' if ok[0] else 'NO'}, mlx_lm.server "
              f"{'yes' if ok[1] else 'NO'}.", "",
              f"**Ratios (mlx_lm.server / gptoss-mac)**: prefilled tokens {rp:.1f}x, wall time {rs:.1f}x. "
              f"Goal: >= 5x fewer prefilled tokens ({'met' if rp >= 5 else 'NOT met'}) and >= 3x less wall time "
              f"({'met' if rs >= 3 else 'NOT met'}) over the loop."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=2880)
    ap.add_argument("--no-float32", dest="float32", action="store_false",
                    help="leave mlx-lm in the checkpoint's bf16 (its default; on a Mac)")
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gptoss-agent-loop-"))
    ckpt = build_checkpoint(work / "ckpt", args.layers, args.experts, args.intermediate)
    desc = (f"the scripted agent (tests/scripted_checkpoint.py), vocab 201088, hidden 128, {args.layers} layers "
            f"(sliding window 8 / full, alternating), {args.experts} experts top-4 of intermediate "
            f"{args.intermediate} (MXFP4), 1 query / 1 KV head of 64; written to {ckpt} by this script.")

    port = free_port()
    ours = Proc([sys.executable, "-m", "mlx_gptoss.cli.app", "serve", "--model", str(ckpt), "--port", str(port)],
                port, work / "gptoss.log")
    try:
        warm_up(port)
        rows_ours = loop_gptoss(port, args.steps)
    finally:
        ours.stop()
    port = free_port()
    theirs = Proc([sys.executable, "-c", WRAP_MLX_LM.format(float32=args.float32), "--model", str(ckpt),
                   "--port", str(port)], port, work / "mlx_lm.log")
    try:
        warm_up(port)
        rows_theirs = loop_mlx_lm(port, args.steps)
    finally:
        theirs.stop()
    text = report(rows_ours, rows_theirs, args, desc)
    print(text)
    if args.write:
        (ROOT / "benchmarks" / "RESULTS_agent_loop.md").write_text(text)
        (ROOT / "benchmarks" / "results_agent_loop.json").write_text(json.dumps(
            {"gptoss_mac": rows_ours, "mlx_lm": rows_theirs, "args": vars(args)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
