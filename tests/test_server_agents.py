"""Agents against the server: a 10-step tool loop prefills only what each step adds, two agents interleaving
both stay incremental, 8 concurrent clients all get their whole answer, a client that disconnects stops its
generation within one token and leaves its slot consistent, a full queue answers 429, queued requests are
cancelled by their client going away."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from scripted_checkpoint import forget_models
from server_fixtures import CHAT_WEATHER_TOOL, WEATHER_TOOL, client, running, sse_events, wait_for

STEPS = 10


@pytest.fixture(scope="module")
def agent():
    with running("agent") as s:
        yield s
    forget_models()


def result(step: int) -> str:
    return json.dumps({"city": "Paris", "temp_c": 20 + step, "step": step})


def responses_loop(c, question: str, steps: int = STEPS, use_previous: bool = True):
    """A Responses tool loop; yields the usage of every step."""
    items = [{"role": "user", "content": question}]
    prev = None
    for step in range(steps):
        r = c.responses.create(model="gpt-oss-20b", input=items if not (use_previous and prev) else items[-1:],
                               previous_response_id=prev.id if (use_previous and prev) else None,
                               tools=[WEATHER_TOOL], temperature=0)
        call = next(o for o in r.output if o.type == "function_call")
        assert call.name == "get_weather" and r.status == "completed"
        items += [o.model_dump(exclude_none=True) for o in r.output]
        items.append({"type": "function_call_output", "call_id": call.call_id, "output": result(step)})
        prev = r
        yield r.usage


def assert_incremental(usages):
    """Each step's cached tokens = the previous prompt + the previous reply: only the tool result is new."""
    for before, now in zip(usages, usages[1:]):
        assert now.input_tokens_details.cached_tokens == before.input_tokens + before.output_tokens, (before, now)
        added = now.input_tokens - now.input_tokens_details.cached_tokens
        assert 0 < added < 40  # the tool message: its header, the JSON result, <|end|><|start|>assistant


def test_ten_step_tool_loop_previous_response_id(agent):
    usages = list(responses_loop(client(agent), "What is the weather in Paris?"))
    assert len(usages) == STEPS and usages[0].input_tokens_details.cached_tokens == 0
    assert_incremental(usages)


def test_tool_loop_items_resent(agent):
    usages = list(responses_loop(client(agent), "And what about the weather in Lyon?", steps=4, use_previous=False))
    assert_incremental(usages)


def test_ten_step_chat_completions_loop(agent):
    c = client(agent)
    msgs = [{"role": "user", "content": "Weather in Nice, step by step?"}]
    usages = []
    for step in range(STEPS):
        r = c.chat.completions.create(model="gpt-oss-20b", messages=msgs, tools=[CHAT_WEATHER_TOOL], temperature=0)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        msgs.append({"role": "assistant", "content": m.content, "reasoning_content": m.model_extra["reasoning_content"],
                     "tool_calls": [t.model_dump() for t in m.tool_calls]})
        msgs.append({"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": result(step)})
        usages.append(r.usage)
    for before, now in zip(usages, usages[1:]):
        assert now.prompt_tokens_details.cached_tokens == before.prompt_tokens + before.completion_tokens
        assert 0 < now.prompt_tokens - now.prompt_tokens_details.cached_tokens < 40


def test_two_agents_interleaving_both_stay_incremental(agent):
    a = responses_loop(client(agent), "Agent A asks: weather in Paris?", steps=4)
    b = responses_loop(client(agent), "Agent B wonders about the weather in Oslo today", steps=4)
    ua, ub = [], []
    for _ in range(4):
        ua.append(next(a))
        ub.append(next(b))
    assert_incremental(ua)
    assert_incremental(ub)


# ----------------------------------------------------------------------------------- concurrency

@pytest.fixture(scope="module")
def reason():
    with running("reason") as s:
        yield s


def test_eight_concurrent_clients_each_get_the_whole_answer(reason):
    def one(i):
        c = client(reason, timeout=120)
        if i % 2:
            chunks = list(c.chat.completions.create(model="gpt-oss-20b", temperature=0, stream=True,
                                                    messages=[{"role": "user", "content": f"Hi from client {i}"}]))
            return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        return c.responses.create(model="gpt-oss-20b", input=f"Hi from client {i}", temperature=0).output_text

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(8)]
        answers = [f.result(timeout=300) for f in futures]
    assert answers == ["Hello there!"] * 8
    jobs = list(reason.worker.done)[-8:]
    assert all(j.stats.stop_reason == "return" for j in jobs)


@pytest.fixture(scope="module")
def looping():
    with running("loop", max_queue=1, max_batch=1) as s:  # one at a time: a second request waits
        yield s
    forget_models()


def open_stream(server, text: str, max_tokens: int = 5000):
    body = {"model": "gpt-oss-20b", "input": text, "stream": True, "temperature": 0, "max_output_tokens": max_tokens}
    cm = httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=60)
    return cm, cm.__enter__()


def test_disconnect_mid_stream_stops_within_one_token(looping):
    cm, resp = open_stream(looping, "Loop forever, please")
    lines = resp.iter_lines()
    deltas = 0
    for line in lines:  # read a few reasoning deltas, then hang up
        if line.startswith("event: response.reasoning_text.delta"):
            deltas += 1
            if deltas == 5:
                break
    job = looping.worker.current
    assert job is not None
    cm.__exit__(None, None, None)
    wait_for(lambda: job.finished.is_set(), 30, "the cancelled job to finish")
    assert job.stats.stop_reason == "cancelled"
    assert job.cancelled_at is not None and job.stats.generated_tokens - job.cancelled_at <= 1
    assert job.stats.generated_tokens < 1000  # it did not run on to max_output_tokens
    # the slot is consistent: the same prompt again is all cached and continues exactly as before
    c = client(looping)
    r = c.responses.create(model="gpt-oss-20b", input="Loop forever, please", temperature=0, max_output_tokens=8)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens_details.cached_tokens == r.usage.input_tokens
    fresh = c.responses.create(model="gpt-oss-20b", input="Loop forever, please!", temperature=0, max_output_tokens=8)
    assert r.output[0].content[0].text == fresh.output[0].content[0].text


def test_a_non_streaming_client_that_leaves_cancels_its_generation(looping):
    n = len(looping.worker.done)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while tokens are still flowing
        httpx.post(looping.url + "/v1/chat/completions", timeout=httpx.Timeout(60, read=2),
                   json={"messages": [{"role": "user", "content": "Loop on"}], "max_tokens": 5000, "temperature": 0})
    job = wait_for(lambda: len(looping.worker.done) > n and looping.worker.done[-1], 30, "the job to stop")
    assert job.stats.stop_reason == "cancelled" and job.stats.generated_tokens < 5000
    assert job.stats.generated_tokens - job.cancelled_at <= 1


def test_full_queue_gets_429_and_queued_requests_can_be_cancelled(looping):
    cm_a, resp_a = open_stream(looping, "First, loop")
    job_a = wait_for(lambda: looping.worker.current, what="the first job to run")
    cm_b, resp_b = open_stream(looping, "Second, waiting")
    wait_for(lambda: looping.worker.queue.qsize() == 1, what="the second job to be queued")
    job_b = looping.worker.queue.queue[0]
    with pytest.raises(openai.RateLimitError) as e:
        client(looping).responses.create(model="gpt-oss-20b", input="Third", temperature=0)
    assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["code"] == "queue_full"
    cm_b.__exit__(None, None, None)  # the queued client goes away
    wait_for(lambda: job_b.cancel.is_set(), 10, "the queued job to be cancelled")
    cm_a.__exit__(None, None, None)
    wait_for(lambda: job_b.finished.is_set() and job_a.finished.is_set(), 30, "both jobs to end")
    assert job_a.stats.stop_reason == "cancelled"
    assert job_b.stats.stop_reason == "cancelled" and job_b.stats.generated_tokens == 0 and job_b.tokens == 0


def test_shutdown_gives_open_streams_a_final_event():
    from mlx_gptoss.server import ServerThread
    from server_fixtures import model

    server = ServerThread(model("loop"), model_id="gpt-oss-20b").start()
    try:
        cm, resp = open_stream(server, "Loop until the server stops")
        got = []

        def read():
            got.extend(sse_events(resp.iter_lines()))
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: server.worker.current and server.worker.current.tokens > 3, what="generation")
    finally:
        server.stop()
    reader.join(30)
    assert not reader.is_alive()
    last = json.loads(got[-1][1])
    assert last["type"] == "response.failed" and last["response"]["error"]["code"] == "server_shutting_down"
    cm.__exit__(None, None, None)
