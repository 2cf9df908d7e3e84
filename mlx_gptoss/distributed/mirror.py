"""Rank 0 leads, the other ranks follow: every model call and KV-cache operation of rank 0 is replayed on them.

Rank 0 runs the program (chat, bench, serve, a script) on a LeaderModel in place of the model. Before each
forward pass it broadcasts a fixed-size header (what to do, on which cache, how many tokens), then the token
ids themselves (lazily: a token sampled on rank 0 and not yet known to Python is broadcast inside the same
graph, so pipelined decoding stays pipelined). Followers block on the next header, replay the operation on
their own shard and caches, and loop until QUIT. Sampling happens on rank 0 only; followers just run the
tokens they receive, so every rank runs exactly the same tokens.

Broadcast is an all_sum where the followers contribute zeros (MLX has no broadcast collective). Every
collective must run on every rank in the same order: rank 0 builds a forward pass's graph first (so a
refusal, such as the context cap, happens before anything is sent), then sends, then schedules the final
layer's summed output (shard.last_output), which depends on every all_sum of the pass, whatever part of the
result the caller evaluates.

Ending: rank 0 sends QUIT when its program ends (atexit; if a rank is gone it gives up after 10 s). A rank
that dies closes its sockets: the others' collectives fail ("[ring] connection to a peer was lost"), and
mlx.launch sends SIGTERM to the remaining ranks when one exits non-zero or is killed. on_sigterm() makes
each of them say so on stderr and exit, even when it is blocked inside a collective that never returns.
"""

from __future__ import annotations

import atexit
import itertools
import os
import signal
import statistics
import sys
import threading
import time
import weakref

import mlx.core as mx

from ..chat import Runner, restore_cache, sliding_state
from ..errors import GptOssError
from ..memory import check_context
from .shard import last_output

HEADER = 5  # op, cache key, two arguments, how many snapshot positions follow
FORWARD, NEW_CACHE, FREE, SNAPSHOT, RESTORE, BACKEND, QUIT, COMM = range(1, 9)
DTYPES = (mx.float32, mx.bfloat16, mx.float16)
BACKENDS = ("auto", "builtin", "metal")


class Link:
    """Rank 0's broadcasts (header, then payload) to the group; followers receive them in the same order."""

    def __init__(self, group):
        self.group = group
        self.leader = group.rank() == 0
        self.freed: list[int] = []  # caches rank 0 dropped: freed on the followers with the next message
        self.closed = False

    def bcast(self, a: mx.array) -> mx.array:
        return mx.distributed.all_sum(a if self.leader else mx.zeros_like(a), group=self.group)

    def send(self, op: int, key: int = 0, a: int = 0, b: int = 0, kept: list[int] = ()) -> None:
        """Header [op, key, a, b, len(kept)], then the kept snapshot positions, if any."""
        if self.closed:
            raise GptOssError("the distributed group was closed (QUIT sent): the other ranks have exited")
        while self.freed and op != QUIT:
            self._send([FREE, self.freed.pop(), 0, 0, 0])
        self._send([op, key, a, b, len(kept)])
        if kept:
            self._send(list(kept))

    def _send(self, values: list[int]) -> None:
        mx.async_eval(self.bcast(mx.array(values, dtype=mx.int32)))

    def recv(self, n: int = HEADER) -> list[int]:
        h = self.bcast(mx.zeros((n,), dtype=mx.int32))
        mx.eval(h)
        return h.tolist()


class Mirrored(list):
    """rank 0's per-layer caches, with the key the followers know them by."""

    key = 0


class LeaderModel:
    """Stands for the sharded model on rank 0: a forward pass or a new cache is mirrored on every rank.
    Anything else (parameters, layers, config) is the model's own."""

    def __init__(self, net, link: Link):
        self.net, self.link = net, link
        self._keys = itertools.count(1)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        key = 0
        if cache is not None:
            key = getattr(cache, "key", 0)
            if not key:
                raise GptOssError("under mlx.launch, caches must come from make_cache() so every rank has one")
            cap = getattr(cache[0], "max_context", 0)
            check_context(cache[0].offset + tokens.shape[-1], cap)
        B, T = tokens.shape
        out = self.net(tokens, cache=cache)  # graph only: nothing has run yet, nothing is sent yet
        self.link.send(FORWARD, key, B, T)
        mx.async_eval(self.link.bcast(tokens.astype(mx.int32).reshape(-1)))
        mx.async_eval(last_output(self.net))
        return out

    def make_cache(self) -> list:
        cache = Mirrored(self.net.make_cache())
        cache.key = next(self._keys)
        self.link.send(NEW_CACHE, cache.key)
        weakref.finalize(cache, self.link.freed.append, cache.key)
        return cache

    def set_moe_backend(self, backend: str) -> None:
        self.net.set_moe_backend(backend)
        self.link.send(BACKEND, BACKENDS.index(backend))

    def __getattr__(self, name):
        return getattr(self.net, name)


def comm_chain(group, count: int, size: int, dtype) -> mx.array:
    """`count` dependent all_sums of `size` values: the collectives of one decoded token, alone."""
    x = mx.zeros((1, size), dtype=dtype)
    for _ in range(count):
        x = mx.distributed.all_sum(x, group=group)
    return x


def time_comm(gpt, repetitions: int = 20) -> dict:
    """Rank 0 of a leading gpt: the all_sums one decoded token needs (two per layer, of hidden_size
    activations), timed alone on every rank, and the bytes they carry."""
    net, link = gpt.model.net, gpt.model.link
    cfg, n = net.config, link.group.size()
    count, size, dtype = 2 * cfg.num_hidden_layers, cfg.hidden_size, net.model.norm.weight.dtype
    secs = []
    for _ in range(repetitions + 1):  # the first one warms up
        t0 = time.perf_counter()
        link.send(COMM, DTYPES.index(dtype), count, size)
        mx.eval(comm_chain(link.group, count, size, dtype))
        secs.append(time.perf_counter() - t0)
    payload = count * size * dtype.size
    return {"ranks": n, "all_sums_per_token": count, "bytes_per_all_sum": size * dtype.size,
            "payload_bytes_per_token": payload,
            # a ring all_sum sends 2 (N-1)/N of the buffer from each rank (reduce-scatter + all-gather)
            "sent_bytes_per_token_per_rank": payload * 2 * (n - 1) // n,
            "seconds_per_token": statistics.median(secs[1:]),
            "seconds_per_all_sum": statistics.median(secs[1:]) / count}


class LeaderRunner(Runner):
    """chat.Runner on rank 0: its cache snapshots and restores are mirrored too (by prompt position)."""

    def _snapshot(self, logits) -> None:
        super()._snapshot(logits)
        self.gpt.model.link.send(SNAPSHOT, self.cache.key, len(self.ids), kept=[s.n for s in self.snapshots])

    def _restore(self, s) -> None:
        super()._restore(s)
        self.gpt.model.link.send(RESTORE, self.cache.key, s.n, kept=[t.n for t in self.snapshots])


def lead(gpt, group):
    """Rank 0: route gpt's model calls through the group; QUIT is sent when the program ends."""
    link = Link(group)
    gpt.model = LeaderModel(gpt.model, link)
    gpt.runner_class = LeaderRunner
    atexit.register(quit_followers, link)
    return gpt


def quit_followers(link: Link, timeout: float = 10.0) -> None:
    """Tell the followers to exit. If a rank is gone the collective may never finish: the process then
    exits anyway after `timeout` seconds rather than hang at exit."""
    if link.closed:
        return
    link.closed = True
    guard = threading.Timer(timeout, os._exit, args=(1,))
    guard.daemon = True
    guard.start()
    try:
        link.closed = False
        link.send(QUIT)
        link.closed = True
        mx.synchronize()
    except RuntimeError:  # a follower is already gone: nothing to tell it
        pass
    guard.cancel()


def follow(net, group) -> None:
    """A follower rank: replay rank 0's operations on this rank's shard until QUIT."""
    link = Link(group)
    caches: dict[int, list | None] = {0: None}
    snaps: dict[int, dict[int, dict]] = {}
    while True:
        op, key, a, b, k = link.recv()
        kept = set(link.recv(k)) if k else set()
        if op == FORWARD:
            tokens = link.bcast(mx.zeros((a * b,), dtype=mx.int32)).reshape(a, b)
            net(tokens, cache=caches[key])
            mx.async_eval(last_output(net), [c.state for c in caches[key] or []])
        elif op == NEW_CACHE:
            caches[key], snaps[key] = net.make_cache(), {}
        elif op == FREE:
            caches.pop(key, None), snaps.pop(key, None)
        elif op == SNAPSHOT:
            snaps[key][a] = sliding_state(caches[key])
            snaps[key] = {n: s for n, s in snaps[key].items() if n in kept}
        elif op == RESTORE:
            restore_cache(caches[key], snaps[key][a], a)
            snaps[key] = {n: s for n, s in snaps[key].items() if n in kept}
        elif op == BACKEND:
            net.set_moe_backend(BACKENDS[key])
        elif op == COMM:
            mx.eval(comm_chain(link.group, a, b, DTYPES[key]))
        elif op == QUIT:
            mx.synchronize()
            return
        else:
            raise GptOssError(f"follower: unknown operation {op} from rank 0 (different gptoss-mac versions?)")


def follow_and_exit(net, group) -> None:
    """Run follow(); exit 0 at QUIT, 1 with one clear line when rank 0 or another rank is gone."""
    rank = group.rank()
    main = threading.current_thread() is threading.main_thread()
    if main:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle (it stops the reply)
    code = 0
    try:
        follow(net, group)
    except RuntimeError as e:
        print(f"gptoss-mac rank {rank}: stopping: {peer_lost_message(e)}", file=sys.stderr, flush=True)
        code = 1
    except Exception as e:  # out of memory, a bad operation...: this rank cannot follow any more
        print(f"gptoss-mac rank {rank}: stopping: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    if not main:  # e.g. a server's model thread: the whole process ends, not just this thread
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def peer_lost_message(e: BaseException) -> str:
    text = str(e)
    if "peer" in text or "[ring]" in text or "[jaccl]" in text or "[mpi]" in text:
        return f"another rank of the mlx.launch group is gone ({text}); all ranks stop"
    return text


def on_sigterm(rank: int) -> None:
    """mlx.launch ends the other ranks with SIGTERM when one exits with an error or is killed. A rank may then
    be blocked inside a collective that does not return (MLX fails the pending tasks of a lost ring, but an
    eval can be left waiting), where Python's signal handlers, which run on the main thread, never run. So
    the signal also wakes a watcher thread (signal.set_wakeup_fd), and whichever sees it first says why
    and exits."""
    if threading.current_thread() is not threading.main_thread() or _WATCHING:
        return
    _WATCHING.append(rank)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def stop(*_):
        print(f"gptoss-mac rank {rank}: stopped by mlx.launch: another rank exited with an error or was killed",
              file=sys.stderr, flush=True)
        os._exit(143)

    def watch():
        while True:
            got = os.read(read_fd, 64)
            if not got or signal.SIGTERM in got:
                break
        stop()

    signal.signal(signal.SIGTERM, stop)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=watch, name="gptoss-sigterm", daemon=True).start()


_WATCHING: list[int] = []
