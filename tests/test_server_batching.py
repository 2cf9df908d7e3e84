"""The server's scheduler (worker.py over mlx_gptoss.batch): concurrent clients each get exactly their solo
answer while decoding together; a batch where one request calls a tool, one stops and one hits max tokens;
SIGTERM semantics (a running reply says "shutdown", a queued request gets a 503), at the worker and over
HTTP; a client leaving during a long prefill stops it between chunks; no slot leaks after a thousand mixed requests (joins, cancels, refusals) driven at the worker level."""

from __future__ import annotations

import asyncio
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mlx_gptoss import harmony
from mlx_gptoss.chat import Runner, generate_events
from mlx_gptoss.server import ServerThread
from mlx_gptoss.server.errors import APIError
from mlx_gptoss.server.worker import Job, Worker
from scripted_checkpoint import Tokens, _episodes, forget_models, random_real_vocab_model, scripted_model


def run_jobs(worker: Worker, specs, *, during=None, timeout: float = 120.0):
    """Submit (prompt, parser, sampling) specs at once; each job's items up to "done" or an APIError.
    during(jobs) runs on another thread once they are submitted."""
    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(f"j{i}", "test", p, parser, sampling, loop) for i, (p, parser, sampling) in enumerate(specs)]
        for j in jobs:
            worker.submit(j)
        side = loop.run_in_executor(None, during, jobs) if during else None

        async def drain(j):
            items = []
            while True:
                item = await j.next(timeout)
                assert item is not None, f"{j.id}: no event for {timeout} s"
                items.append(item)
                if isinstance(item, APIError) or item.kind == "done":
                    return items
        out = await asyncio.gather(*(drain(j) for j in jobs))
        if side:
            await side
        return jobs, out
    return asyncio.run(main())


def solo(gpt, prompt, parser, **sampling):
    return list(generate_events(Runner(gpt), prompt, cap=4096, parser=parser, **sampling))


@pytest.fixture(scope="module")
def rnd(tmp_path_factory):
    g = random_real_vocab_model(tmp_path_factory.mktemp("srvbatch") / "ckpt", layers=2, seed=5)
    yield g
    forget_models()


def test_concurrent_clients_each_get_their_solo_answer(rnd):
    prompts = [[200006, 1428, 200008] + [(3000 + 97 * i + 13 * k) % 190000 for k in range(4 + 7 * i)]
               for i in range(4)]
    sampling = [dict(temperature=0, max_tokens=24), dict(temperature=1.0, seed=3, max_tokens=24),
                dict(temperature=0.7, top_p=0.9, seed=4, max_tokens=20), dict(temperature=0, max_tokens=8)]
    enc = harmony.encoding()
    alone = []
    for p, s in zip(prompts, sampling):
        parser = Tokens()
        solo(rnd, p, parser, **s)
        alone.append(enc.decode(parser.ids))
    with ServerThread(rnd, model_id="gpt-oss-20b", max_batch=4) as server:
        def one(i):
            body = {"model": "gpt-oss-20b", "prompt": prompts[i], "stream": True, **sampling[i]}
            text = []
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        text += [c["text"] for c in json.loads(line[6:])["choices"]]
            return "".join(text)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, range(4)))
        health = httpx.get(server.url + "/health", timeout=10).json()
        jobs = list(server.worker.done)[-4:]
    assert answers == alone
    assert max(j.batch for j in jobs) >= 2  # they did decode together
    assert health["batch"] == 0 and health["max_batch"] == 4


@pytest.fixture(scope="module")
def tool():
    yield scripted_model("tool")
    forget_models()


def test_one_batch_where_one_calls_a_tool_one_stops_one_hits_max_tokens(tool):
    eps = _episodes("tool")  # (prompt, generated): a call, then the answer after the tool's result
    call, answer, other_call = eps[0][0], eps[1][0], eps[2][0]
    specs = [(call, harmony.StreamParser(), dict(temperature=0)),
             (answer, harmony.StreamParser(), dict(temperature=0)),
             (other_call, harmony.StreamParser(), dict(temperature=0, max_tokens=5))]
    worker = Worker(tool, max_batch=3).start(60)
    try:
        jobs, out = run_jobs(worker, specs)
    finally:
        worker.shutdown()
    stops = [items[-1].stats.stop_reason for items in out]
    assert stops == ["call", "return", "max_tokens"]
    assert max(j.batch for j in jobs) == 3
    calls = [e for e in out[0] if e.kind == "tool_call"]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]
    assert "".join(e.text for e in out[1] if e.kind == "content") == "It is sunny and 21 C."
    for (p, _, s), items in zip(specs, out):  # and each exactly as alone
        ref = solo(tool, p, harmony.StreamParser(), **s)
        assert [(e.kind, e.text) for e in items] == [(e.kind, e.text) for e in ref]


@pytest.fixture(scope="module")
def loop_model():
    yield scripted_model("loop")
    forget_models()


def test_shutdown_cuts_running_replies_and_refuses_queued_ones(loop_model):
    worker = Worker(loop_model, max_batch=2).start(60)
    specs = [(_episodes("loop")[0][0], Tokens(), dict(temperature=0, max_tokens=5000)) for _ in range(3)]

    def stop(jobs):
        for _ in range(3000):  # at most 30 s
            if all(j.tokens > 3 for j in jobs[:2]):
                break
            time.sleep(0.01)
        assert len(worker.running) == 2 and worker.queue.qsize() == 1
        worker.shutdown(30)
    jobs, out = run_jobs(worker, specs, during=stop)
    assert [items[-1].stats.stop_reason for items in out[:2]] == ["shutdown", "shutdown"]
    assert isinstance(out[2][-1], APIError) and out[2][-1].status == 503
    assert not worker.alive
    with pytest.raises(APIError) as e:
        worker.submit(Job("late", "test", specs[0][0], Tokens(), {}, asyncio.new_event_loop()))
    assert e.value.status == 503


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    import mlx_gptoss

    return mlx_gptoss.load(tiny_ckpt, allow_download=False)  # a 512-token vocabulary: fast steps


def test_no_slot_leaks_after_a_thousand_mixed_requests(tiny):
    rng = random.Random(0)
    base = [(7 * i + 3) % 512 for i in range(40)]
    prompts = [base, base[:-3] + base[-2:], base + [100, 200]]  # cache hits and misses across 4 slots
    worker = Worker(tiny, slots=4, max_batch=3, max_queue=1000).start(60)
    try:
        specs, kinds = [], []
        for i in range(1000):
            kind = rng.choice(["ok", "ok", "ok", "cancel_queued", "cancel_running", "refused"])
            sampling = dict(temperature=0, max_tokens=rng.randint(1, 3))
            if kind == "cancel_running":
                sampling["max_tokens"] = 200
            if kind == "refused":
                sampling["temperature"] = -1.0  # the engine's own check refuses it (a 400)
            specs.append((rng.choice(prompts), Tokens(), sampling))
            kinds.append(kind)

        def cancel(jobs):
            for j, k in zip(jobs, kinds):
                if k == "cancel_queued":
                    j.stop()
            deadline = time.monotonic() + 120
            pending = [j for j, k in zip(jobs, kinds) if k == "cancel_running"]
            while pending and time.monotonic() < deadline:
                for j in [j for j in pending if j.tokens >= 1 or j.finished.is_set()]:
                    j.stop()
                    pending.remove(j)
                time.sleep(0.002)
        jobs, out = run_jobs(worker, specs, during=cancel, timeout=300)
        engine = worker.engine
        assert all(j.finished.is_set() for j in jobs)
        assert not worker.running and engine.batch.idle and not engine.pool.busy and worker.queue.empty()
        assert len(engine.pool.slots) <= 4
        for k, items in zip(kinds, out):
            last = items[-1]
            if k == "refused":
                assert isinstance(last, APIError) and last.status == 400
            elif k == "ok":
                assert last.stats.stop_reason == "max_tokens"
            else:
                assert last.stats.stop_reason in ("cancelled", "max_tokens")
        assert sum(isinstance(i[-1], APIError) for i in out) == kinds.count("refused")
        assert max(j.batch for j in jobs) == 3
        # the slots still serve: the same prompt again continues exactly as alone
        jobs, out = run_jobs(worker, [(base, Tokens(), dict(temperature=0, max_tokens=6))])
        ref = Tokens()
        solo(tiny, base, ref, temperature=0, max_tokens=6)
        assert jobs[0].parser._parser.ids == ref.ids
    finally:
        worker.shutdown()


def test_sigterm_over_http_cut_stream_says_so_and_a_queued_request_gets_503(loop_model):
    server = ServerThread(loop_model, model_id="gpt-oss-20b", max_batch=1).start()
    got = {}
    body = {"model": "gpt-oss-20b", "messages": [{"role": "user", "content": "Loop on"}], "max_tokens": 5000,
            "temperature": 0}

    def streaming():
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as r:
            got["stream"] = [line for line in r.iter_lines() if line.startswith("data:")]

    def queued():
        got["queued"] = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    pool = ThreadPoolExecutor(2)
    try:
        fa = pool.submit(streaming)
        deadline = time.monotonic() + 30
        while not (server.worker.current and server.worker.current.tokens > 3) and time.monotonic() < deadline:
            time.sleep(0.02)
        fb = pool.submit(queued)
        while server.worker.queue.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.worker.queue.qsize() == 1
    finally:
        server.stop()
    fa.result(30), fb.result(30)
    assert got["queued"].status_code == 503 and got["queued"].json()["error"]["code"] == "server_shutting_down"
    assert [j.stats.stop_reason for j in server.worker.done if j.stats] == ["shutdown"]
    assert got["stream"][-1] == "data: [DONE]" and len(got["stream"]) > 4


def test_a_client_leaving_during_a_long_prefill_stops_it(rnd):
    with ServerThread(rnd, model_id="gpt-oss-20b") as server:
        server.worker.engine.batch.chunk = 2  # a long prefill: 6,000 chunks, the cancel flag checked between them
        prompt = [(5000 + 31 * k) % 190000 for k in range(12000)]
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while the prompt is still prefilling
            httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4},
                       timeout=httpx.Timeout(60, read=1.5))
        deadline = time.monotonic() + 60
        while not server.worker.done and time.monotonic() < deadline:
            time.sleep(0.05)
        job = server.worker.done[-1]
        slot = server.worker.engine.pool.slots[-1]
    assert job.stats.stop_reason == "cancelled" and job.stats.generated_tokens == 0
    assert 0 < len(slot.ids) < len(prompt)  # stopped part way, between two chunks
