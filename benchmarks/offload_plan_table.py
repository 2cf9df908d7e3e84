"""The README's "which Mac runs which model" table: the offload plan's arithmetic, not a measurement.

    python benchmarks/offload_plan_table.py

Sparse copies of the real gpt-oss-20b / -120b checkpoints (real headers, no data: tests/test_memory_plan.py's
builder) are planned for Macs of each memory size with macOS's default GPU working set (2/3 of memory up
to 32 GiB, 3/4 above), bf16 activations and fused attention (Metal), at three contexts.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

MACS = (8, 16, 24, 32, 48, 64, 96, 128)  # GiB
CONTEXTS = (8192, 32768, 131072)
SHORT = {"embedding": "E", "kv8": "K8", "attention8": "W8"}


def cell(p) -> str:
    from mlx_gptoss.memory import gb

    if not p.fits:
        return "no"
    lv = getattr(p, "levers", None)
    if lv is None or not lv.active:
        return f"resident, {gb(p.needed)}"
    parts = [SHORT[n] for n in lv.names() if n in SHORT]
    if lv.expert_slots is not None:
        parts.append(f"experts {p.resident_share:.0%} ({p.streamed_per_token / 1e9:.1f} GB/token)")
    return " + ".join(parts)


def main() -> None:
    from mlx_gptoss import memory
    from mlx_gptoss.offload import make_offload_plan
    from test_memory_plan import mac, write_sparse_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        models = {"gpt-oss-20b": memory.local_checkpoint(write_sparse_checkpoint(Path(tmp) / "20b", 24, 32, 3)),
                  "gpt-oss-120b": memory.local_checkpoint(write_sparse_checkpoint(Path(tmp) / "120b", 36, 128, 15))}
        lines = ["| Mac (GPU working set) | model | " + " | ".join(f"{c // 1024}k context" for c in CONTEXTS) + " |",
                 "|---|---|" + "---|" * len(CONTEXTS)]
        for g in MACS:
            b = mac(g)
            for name, ckpt in models.items():
                cells = [cell(make_offload_plan(ckpt, budget=b, context=c)) for c in CONTEXTS]
                lines.append(f"| {g} GB ({b.usable / 1e9:.1f} GB) | {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
