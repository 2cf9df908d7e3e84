"""Running gpt-oss where it does not fit resident: expert streaming from the checkpoint files with a cache
of resident experts, 8-bit attention/unembedding weights, the embedding table left in the file, an 8-bit
KV cache for the full-attention layers, and the plan that picks among them (plan.py, cheapest first).

load(path, offload="auto"|"none"|"experts", kv_bits=None|8|16) uses them; `gpt.offload.stats` counts hits,
misses and bytes streamed.
"""

from .build import Offloaded, prepare
from .experts import StreamStats
from .plan import LEVERS, OFFLOAD_MODES, Levers, OffloadPlan, make_offload_plan

__all__ = ["LEVERS", "OFFLOAD_MODES", "Levers", "OffloadPlan", "Offloaded", "StreamStats", "make_offload_plan",
           "prepare"]
