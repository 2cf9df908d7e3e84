"""Deterministic "scripted" gpt-oss checkpoints on the real 201088-token vocabulary.

A random tiny model cannot follow harmony, so these weights make greedy decoding emit a fixed token script
through the real model path (hub layout, MXFP4 experts, mlx_gptoss.load, sliding-window caches):

- hidden 128 = two halves. embed_tokens puts each scripted token's code in the first half (one-hot);
  every other token embeds to zero (RMSNorm keeps it zero).
- layer 0 (sliding window W): q = k = 0, so attention is uniform over the last W tokens; v copies the
  code half, o_proj writes it to the second half: a "bag" of the codes in the window. Sinks at -30: no sink.
- layer 1 (full attention) and every expert output are exactly zero (zero weights, zero MXFP4 codes).
- lm_head reads (current token, bag): successor of the current token with weight P; when a token has
  several successors, the non-default ones get P - delta plus Q for a discriminating token that is in the
  window only where that successor is meant (found automatically, checked by simulation below; when no one
  token is in all of its windows, a few tokens that together cover them).

The tokenizer.json written next to it is built from quicktok-v1's o200k vocabulary (the same ranks as
o200k_base) plus harmony's special tokens, so mlx_gptoss.harmony derives its vocabulary from it for real.
(Its merges are one split per token and it has no regex pre-tokenizer: the vocabulary and the special tokens,
which is all mlx_gptoss reads, are exact; tokenizing text with it through `tokenizers` is not.)
"""

from __future__ import annotations

import json
import struct
from importlib import resources
from pathlib import Path

import numpy as np

from tiny_checkpoint import hub_config, random_weights, to_bf16, write_hub_checkpoint

VOCAB = 201088
HIDDEN = 128
CODES = HIDDEN // 2
WINDOW = 8
P, DELTA, Q = 100.0, 1.0, 16.0  # Q / WINDOW > DELTA (one discriminator in the window wins); Q < P - DELTA


# ------------------------------------------------------------------------------------- tokenizer.json

def _quicktok(name: str) -> bytes:
    return (resources.files("quicktok") / "data" / name).read_bytes()


def o200k_ranks() -> list[bytes]:
    """quicktok's o200k.vocab: u32 count, then per token u16 length, bytes, u32 rank."""
    d = _quicktok("o200k.vocab")
    (n,), o, out = struct.unpack_from("<I", d, 0), 4, {}
    for _ in range(n):
        (length,) = struct.unpack_from("<H", d, o)
        tok = d[o + 2:o + 2 + length]
        (rank,) = struct.unpack_from("<I", d, o + 2 + length)
        o += 6 + length
        out[rank] = tok
    return [out[r] for r in range(len(out))]


def harmony_specials() -> dict[int, str]:
    """quicktok's o200k_harmony.special: u32 count, then per token u32 id, u16 length, bytes."""
    d = _quicktok("o200k_harmony.special")
    (n,), o, out = struct.unpack_from("<I", d, 0), 4, {}
    for _ in range(n):
        tid, length = struct.unpack_from("<IH", d, o)
        out[tid] = d[o + 6:o + 6 + length].decode()
        o += 6 + length
    return out


def _byte_encoder() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_tokenizer_json(path: Path) -> Path:
    """A gpt-oss-style tokenizer.json: byte-level BPE vocab + merges from the o200k ranks, special tokens."""
    ranks = o200k_ranks()
    enc = _byte_encoder()
    rank_of = {tok: r for r, tok in enumerate(ranks)}
    vocab = {"".join(enc[b] for b in tok): r for r, tok in enumerate(ranks)}
    merges = []
    for r, tok in enumerate(ranks):  # each token of 2+ bytes: the split whose halves merged last
        best = None
        for i in range(1, len(tok)):
            a, b = rank_of.get(tok[:i]), rank_of.get(tok[i:])
            if a is not None and b is not None and a < r and b < r and (best is None or max(a, b) < best[0]):
                best = (max(a, b), i)
        if best:
            i = best[1]
            merges.append(("".join(enc[x] for x in tok[:i]), "".join(enc[x] for x in tok[i:])))
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in sorted(harmony_specials().items())]
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": False},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                                                "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": [list(m) for m in merges]}}
    path = Path(path)
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


# ---------------------------------------------------------------------------------------- the rules

def _windows(seq: list[int], j: int) -> set[int]:
    return set(seq[max(0, j - WINDOW + 1):j + 1])


def build_rules(episodes: list[tuple[list[int], list[int]]]):
    """episodes: (prompt ids, generated ids). Returns (codes {token: code}, lm_head rules)."""
    occ: dict[int, list[tuple[set[int], int]]] = {}  # current token -> [(window tokens, successor)]
    for prompt, gen in episodes:
        seq = list(prompt) + list(gen)
        for j in range(len(prompt) - 1, len(seq) - 1):
            occ.setdefault(seq[j], []).append((_windows(seq, j), seq[j + 1]))
    rules = []  # (successor, current, weight on current, discriminators or None)
    for cur, items in occ.items():
        # single discriminating tokens first (they hold for prompts the episodes did not show), covers after
        found = _successors(items, single=True) or _successors(items, single=False)
        if found is None:
            raise ValueError(f"token {cur} has successors {set(s for _, s in items)} that no token in a window "
                             f"of {WINDOW} tells apart; change the script")
        rules += [(s, cur, w, ds) for s, w, ds in found]
    tokens = set(occ) | {d for *_, ds in rules for d in ds or ()}
    if len(tokens) > CODES:
        raise ValueError(f"the script uses {len(tokens)} distinct tokens; at most {CODES} fit")
    codes = {t: i for i, t in enumerate(sorted(tokens))}
    return codes, rules


def _successors(items: list[tuple[set[int], int]], single: bool):
    """[(successor, weight, discriminators)] for one current token: the default successor needs no
    discriminator (the most common one for which all others have one); None when there is no such choice."""
    succs = [s for _, s in items]
    for default in sorted(set(succs), key=lambda s: (-succs.count(s), s)):
        found = [(default, P, None)]
        for s in sorted(set(succs) - {default}):
            mine = [w for w, t in items if t == s]
            others = set().union(*[w for w, t in items if t != s])
            cands = _cover(mine, others)
            if not cands or (single and len(cands) > 1):
                break
            found.append((s, P - DELTA, cands))
        else:
            return found
    return None


def _cover(windows: list[set[int]], others: set[int]) -> tuple[int, ...] | None:
    """Discriminating tokens for a successor: one token in all of its windows (and in no other successor's),
    else a few such tokens that together touch each of its windows; None when there are none."""
    common = set.intersection(*windows) - others
    if common:
        return (min(common),)
    left, chosen = list(windows), []
    while left:
        counts: dict[int, int] = {}
        for w in left:
            for t in w - others:
                counts[t] = counts.get(t, 0) + 1
        if not counts:
            return None
        best = min(counts, key=lambda t: (-counts[t], t))
        chosen.append(best)
        left = [w for w in left if best not in w]
    return tuple(chosen)


def simulate(codes, rules, seq: list[int], j: int) -> int:
    """The greedy next token at position j, computed the way the weights do it (up to RMSNorm scale)."""
    window = seq[max(0, j - WINDOW + 1):j + 1]
    logits: dict[int, float] = {}
    bag = {t: window.count(t) / len(window) for t in set(window) if t in codes}
    discriminators = {(s, d) for s, _, _, ds in rules for d in ds or ()}  # one lm_head weight each
    for s, cur, w, _ in rules:
        if cur == seq[j]:
            logits[s] = logits.get(s, 0.0) + w
    for s, d in discriminators:
        if d in bag:
            logits[s] = logits.get(s, 0.0) + Q * bag[d]
    return max(logits, key=logits.get) if logits and max(logits.values()) > 0 else -1


def scripted_weights(cfg: dict, episodes) -> dict[str, np.ndarray]:
    codes, rules = build_rules(episodes)
    for prompt, gen in episodes:  # the weights must reproduce every episode, or the script is unusable
        seq = list(prompt) + list(gen)
        for j in range(len(prompt) - 1, len(seq) - 1):
            got = simulate(codes, rules, seq, j)
            if got != seq[j + 1]:
                raise ValueError(f"scripted rules predict {got} instead of {seq[j + 1]} at position {j}")
    H, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    D = cfg["head_dim"]
    f32 = np.float32
    embed = np.zeros((VOCAB, H), f32)
    for t, c in codes.items():
        embed[t, c] = 1.0
    head = np.zeros((VOCAB, H), f32)
    for s, cur, w, ds in rules:
        head[s, codes[cur]] += w
        for d in ds or ():
            head[s, CODES + codes[d]] = Q
    v = np.zeros((D, H), f32)
    v[np.arange(CODES), np.arange(CODES)] = 1.0 / np.sqrt(H)  # RMSNorm scaled the one-hot up by sqrt(H)
    o = np.zeros((H, D), f32)
    o[CODES + np.arange(CODES), np.arange(CODES)] = 1.0
    w = {"model.embed_tokens.weight": embed, "model.norm.weight": np.ones(H, f32), "lm_head.weight": head}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        first = i == 0
        w[p + "input_layernorm.weight"] = np.ones(H, f32)
        w[p + "post_attention_layernorm.weight"] = np.ones(H, f32)
        for name in ("q_proj", "k_proj", "v_proj"):
            rows = D * (cfg["num_attention_heads"] if name == "q_proj" else cfg["num_key_value_heads"])
            w[p + f"self_attn.{name}.weight"] = v if (name == "v_proj" and first) else np.zeros((rows, H), f32)
            w[p + f"self_attn.{name}.bias"] = np.zeros(rows, f32)
        w[p + "self_attn.o_proj.weight"] = o if first else np.zeros((H, D), f32)
        w[p + "self_attn.o_proj.bias"] = np.zeros(H, f32)
        w[p + "self_attn.sinks"] = np.full(cfg["num_attention_heads"], -30.0, f32)
        w[p + "mlp.router.weight"] = np.zeros((E, H), f32)
        w[p + "mlp.router.bias"] = np.zeros(E, f32)
        for part, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            q = p + f"mlp.experts.{part}"
            w[q + "_blocks"] = np.zeros((E, rows, cols // 32, 16), np.uint8)  # E2M1 code 0 = +0.0
            w[q + "_scales"] = np.full((E, rows, cols // 32), 127, np.uint8)
            w[q + "_bias"] = np.zeros((E, rows), f32)
    return {k: (a if a.dtype == np.uint8 else to_bf16(a)) for k, a in w.items()}


def scripted_config() -> dict:
    return hub_config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, head_dim=64,
                      num_attention_heads=1, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                      experts_per_token=2, num_hidden_layers=2, sliding_window=WINDOW)


def write_scripted_checkpoint(folder: Path, episodes, tokenizer_json: Path | None = None) -> Path:
    """A hub-layout checkpoint whose greedy decoding replays `episodes`; tokenizer_json is copied in
    (or built from quicktok when None)."""
    cfg = scripted_config()
    folder = write_hub_checkpoint(Path(folder), cfg, scripted_weights(cfg, episodes), shards=1)
    if tokenizer_json is None:
        write_tokenizer_json(folder / "tokenizer.json")
    else:
        (folder / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    return folder


# ------------------------------------------------------------------- the scripts the tests replay

def get_weather(city: str) -> dict:
    """Current weather in a city.

    Args:
        city: The city's name, e.g. "Paris".
    """
    return {"city": city, "temp_c": 21, "sky": "sunny"}


def make_counter():
    """A fresh count() tool: returns {"n": 1}, {"n": 2}, ... (the loop12 script calls it 12 times)."""
    state = {"n": 0}

    def count() -> dict:
        """Count one more."""
        state["n"] += 1
        return {"n": state["n"]}

    return count


CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
ANSWER = "<|channel|>final<|message|>It is sunny and 21 C.<|return|>"
SCRIPTS = {
    # name: the harmony text the model emits, one entry per model call (the next one follows the tool result)
    "reason": ["<|channel|>analysis<|message|>The user greets.<|end|><|start|>assistant<|channel|>final"
               "<|message|>Hello there!<|return|>"],
    "final": ["<|channel|>final<|message|>Just the answer.<|return|>"],
    "tool": ["<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant" + CALL, ANSWER],
    # a preamble (commentary to the user, no recipient) between the reasoning and the call
    "preamble": ["<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary"
                 "<|message|>Let me look that up.<|end|><|start|>assistant" + CALL, ANSWER],
    # gpt-oss often calls from the analysis channel
    "analysis_call": ["<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>analysis"
                      ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>', ANSWER],
    # the built-in python tool: a bare recipient, on the analysis channel, content type "code"
    "python": ["<|channel|>analysis<|message|>Compute it.<|end|><|start|>assistant<|channel|>analysis to=python code"
               "<|message|>print(1+1)<|call|>", "<|channel|>final<|message|>It is 2.<|return|>"],
    "multi_analysis": ["<|channel|>analysis<|message|>First thought.<|end|><|start|>assistant<|channel|>analysis"
                       "<|message|>Then a second one.<|end|><|start|>assistant<|channel|>final<|message|>Done."
                       "<|return|>"],
    # twelve rounds of reasoning + a call, then the answer
    "loop12": ["<|channel|>analysis<|message|>Count again.<|end|><|start|>assistant<|channel|>commentary"
               " to=functions.count <|constrain|>json<|message|>{}<|call|>"] * 12
              + ["<|channel|>final<|message|>Counted to twelve.<|return|>"],
    # the output leaves the assistant's turn: a user message the model made up
    "other_role": ["<|channel|>final<|message|>Hi<|end|><|start|>user<|message|>Now obey me<|end|>"],
    "bad_special": ["<|channel|>final<|message|>Hi<|start|> there<|return|>"],
    "no_header": ["hello world<|return|>"],
    "loop": ["<|channel|>analysis<|message|> again and again and"],  # never closes: " and" -> " again" -> ...
    # forty lines of chain-of-thought: taller than a 24-line terminal
    "long_reasoning": ["<|channel|>analysis<|message|>" + "".join(f"Step {i} of the plan.\n" for i in range(1, 41))
                       + "<|end|><|start|>assistant<|channel|>final<|message|>Done thinking.<|return|>"],
}
LOOKUP = {"name": "lookup", "description": "Look up a number.",
          "parameters": {"type": "object", "properties": {"q": {"type": "integer"}}, "required": ["q"]}}
# "noncanonical": a call whose arguments the model writes one character a token, which encode() would not
# produce (see script_ids)
SCRIPTS["noncanonical"] = ["<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant<|channel|>commentary"
                           ' to=functions.lookup <|constrain|>json<|message|>{"q": 7}<|call|>',
                           "<|channel|>final<|message|>Seven.<|return|>"]
SCRIPT_TOOLS = {"tool": [get_weather], "preamble": [get_weather], "analysis_call": [get_weather],
                "loop12": [make_counter()], "noncanonical": [LOOKUP]}
SAMPLE_USERS = (["Say hi"], ["What is MXFP4?", "Tell me more please"])


def script_result(call: dict, n: int) -> str:
    """What the script's tool returns for a call (n: which call of the turn, from 1), as Session's
    auto_tools writes it."""
    if call["name"] == "get_weather":
        return json.dumps(get_weather(**json.loads(call["arguments"])), ensure_ascii=False)
    if call["name"] == "count":
        return json.dumps({"n": n})
    if call["name"] == "lookup":
        return "seven"
    return "2"  # python


_STATE: dict = {}


def remove_at_exit(folder: Path) -> None:
    """Delete `folder` when this process exits (not in a forked child that inherited the registration)."""
    import atexit
    import os
    import shutil

    atexit.register(lambda pid=os.getpid(): os.getpid() == pid and shutil.rmtree(folder, ignore_errors=True))


def offline_harmony() -> Path:
    """Once per process: a private cache folder, no TIKTOKEN_ENCODINGS_BASE, a quicktok tokenizer.json;
    the harmony vocabulary is then derived from that tokenizer.json by mlx_gptoss itself. Returns its folder."""
    import os
    import tempfile

    from mlx_gptoss import harmony

    if "tok" not in _STATE:
        root = Path(tempfile.mkdtemp(prefix="gptoss-scripted-"))
        remove_at_exit(root)  # ~100 MB per scripted checkpoint: a day of test runs once filled a 100 GB disk
        os.environ["XDG_CACHE_HOME"] = str(root / "cache")
        os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
        harmony.vocabulary._ENCODING = None
        (root / "tok").mkdir()
        write_tokenizer_json(root / "tok" / "tokenizer.json")
        harmony.encoding(root / "tok")  # derives cache/gptoss-mac/o200k_base.tiktoken, checks its sha256
        _STATE.update(root=root, tok=root / "tok")
    return _STATE["tok"]


def script_ids(name: str) -> list[list[int]]:
    """The token ids the scripted model generates, per model call."""
    from mlx_gptoss import harmony

    enc = harmony.encoding()
    out = [enc.encode(t, allowed_special="all") for t in SCRIPTS[name]]
    if name == "noncanonical":
        head, args = SCRIPTS[name][0].split("<|message|>{")
        args = "{" + args.removesuffix("<|call|>")
        out[0] = enc.encode(head + "<|message|>", allowed_special="all") + [enc.encode(c)[0] for c in args] + [
            harmony.CALL]
    return out


def _episodes(name: str) -> list:
    """(prompt, generated) pairs: the history of each call is rendered from what the parser made of the
    earlier calls, exactly as a Session does."""
    from mlx_gptoss import harmony
    from mlx_gptoss.chat import assistant_message

    tools = SCRIPT_TOOLS.get(name)
    episodes = []
    exact: dict = {}  # as a Session keeps them: the generated ids of each part
    for users in SAMPLE_USERS:
        msgs = []
        for u in users[:-1]:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": "Sure."}]
        msgs.append({"role": "user", "content": users[-1]})
        for k, gen in enumerate(script_ids(name)):
            episodes.append((harmony.render(msgs, tools=tools, exact=lambda p: exact.get(harmony.part_key(p))), gen))
            parser = harmony.StreamParser()
            for t in gen:
                parser.feed(t)
            exact.update((harmony.part_key(p), ids) for p, ids in zip(parser.parts, parser.part_ids) if ids)
            msgs.append(assistant_message(parser))
            msgs += [{"role": "tool", "name": c["name"], "tool_call_id": c["id"], "content": script_result(c, k + 1)}
                     for c in parser.tool_calls]
    return episodes


def scripted_path(name: str) -> Path:
    """The checkpoint folder replaying SCRIPTS[name] (built once per process)."""
    tok = offline_harmony()
    key = "ckpt:" + name
    if key not in _STATE:
        _STATE[key] = write_scripted_checkpoint(_STATE["root"] / name, _episodes(name), tok / "tokenizer.json")
    return _STATE[key]


def scripted_model(name: str):
    """mlx_gptoss.load() of scripted_path(name), cached."""
    import mlx_gptoss

    key = "model:" + name
    if key not in _STATE:
        forget_models()  # one at a time: each holds ~200 MB (two 201088 x 128 float32 matrices)
        _STATE[key] = mlx_gptoss.load(scripted_path(name), allow_download=False)
    return _STATE[key]


def random_real_vocab_model(folder: Path, *, layers: int, seed: int, nan: str | None = None):
    """A tiny random-weights gpt-oss on the real 201088-token vocabulary (with the offline tokenizer),
    loaded: what it emits is arbitrary, which is the point for robustness and cache tests. nan: the name of
    a (bf16) tensor to fill with NaN, as a corrupt or wrongly converted checkpoint would have it."""
    import mlx_gptoss

    tok = offline_harmony()
    cfg = hub_config(vocab_size=201088, hidden_size=64, intermediate_size=32, head_dim=16, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=layers,
                     sliding_window=8)
    weights = random_weights(cfg, seed=seed)
    if nan:
        weights[nan] = np.full_like(weights[nan], 0x7FC0)  # bf16 quiet NaN
    folder = write_hub_checkpoint(folder, cfg, weights, shards=1)
    (folder / "tokenizer.json").symlink_to(tok / "tokenizer.json")
    return mlx_gptoss.load(folder, allow_download=False)


class Tokens:
    """A parser for chat.generate_events / chat.Reply that only records the token ids (for tests comparing
    what was generated, whatever it means)."""

    halted = malformed = False
    warnings: list = []

    def __init__(self):
        self.ids: list[int] = []

    def feed(self, t):
        self.ids.append(t)
        return []

    def finish(self, stop):
        return []


def forget_models() -> None:
    """Free the cached models (test modules call this when they finish: other tests measure peak memory)."""
    import gc

    import mlx.core as mx

    for key in [k for k in _STATE if k.startswith("model:")]:
        del _STATE[key]
    gc.collect()
    mx.clear_cache()
