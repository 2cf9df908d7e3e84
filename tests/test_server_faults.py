"""Faults found by probing the server (issue 17 §3), each a regression test: a client that stops reading, a
reply with no max tokens, web pages (text/plain POSTs, DNS rebinding), a dead model thread, a fault inside
generation, replies cut by the shutdown, the response store's size. (Malformed JSON bodies and metadata bounds
are in test_server_errors' corpus.)"""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from mlx_gptoss.server import ServerThread, responses
from scripted_checkpoint import forget_models
from server_fixtures import client, model, stream_cut_by_shutdown, wait_for

ASK = {"model": "gpt-oss-20b", "input": "Loop forever, please", "temperature": 0}


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    forget_models()


def test_a_stream_client_that_never_reads_is_cut_by_the_write_timeout(monkeypatch):
    """It sends a streaming request and then never reads: once the (small) socket buffers fill, the writes
    block, and after write_timeout seconds the stream is closed and its job cancelled, long before the cap."""
    from mlx_gptoss.server import run

    monkeypatch.setattr(run, "SEND_BUFFER", 4096)  # fills sooner than the default 64 KB: a faster test
    with ServerThread(model("loop"), model_id="gpt-oss-20b", write_timeout=1.0, default_max_tokens=100_000) as s:
        body = json.dumps({**ASK, "stream": True}).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        try:
            wait_for(lambda: s.worker.done, 120, "the job of the client that does not read to be cancelled")
            job = s.worker.done[-1]
            assert job.stats.stop_reason == "cancelled" and job.stats.generated_tokens < 5_000
            # the server goes on serving others
            r = client(s).responses.create(**ASK, max_output_tokens=5)
            assert r.status == "incomplete"
        finally:
            sock.close()


def test_a_request_without_max_tokens_stops_at_the_default_cap():
    with ServerThread(model("loop"), model_id="gpt-oss-20b", default_max_tokens=40) as s:
        r = client(s).responses.create(**ASK)
        assert r.status == "incomplete" and r.usage.output_tokens == 40
        c = client(s).chat.completions.create(model="gpt-oss-20b", temperature=0,
                                              messages=[{"role": "user", "content": "Loop forever, please"}])
        assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 40
        r = client(s).responses.create(**ASK, max_output_tokens=50)  # the client's own value wins
        assert r.usage.output_tokens == 50


@pytest.fixture(scope="module")
def looping():
    with ServerThread(model("loop"), model_id="gpt-oss-20b") as s:
        yield s


def test_posts_must_be_json(looping):
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        resp = httpx.post(looping.url + "/v1/responses", content=json.dumps(ASK), timeout=30,
                          headers={"Content-Type": kind} if kind else {})
        assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type", kind
    assert looping.worker.queue.qsize() == 0 and not looping.worker.current  # nothing ran


@pytest.mark.parametrize("host,ok", [("127.0.0.1:{port}", True), ("localhost:{port}", True), ("[::1]:{port}", True),
                                     ("app.localhost", True), ("192.168.1.7:{port}", True),
                                     ("evil.example:{port}", False), ("evil.example", False), ("", False)])
def test_without_a_key_only_loopback_or_ip_hosts(looping, host, ok):
    resp = httpx.get(looping.url + "/v1/models", headers={"Host": host.format(port=looping.port)}, timeout=30)
    assert resp.status_code == (200 if ok else 403), resp.text
    if not ok:
        assert resp.json()["error"]["code"] == "host_not_allowed"


def test_with_a_key_any_host_and_configured_names():
    with ServerThread(model("loop"), model_id="gpt-oss-20b", api_key="k") as s:
        resp = httpx.get(s.url + "/v1/models", headers={"Host": "my-mac.example", "Authorization": "Bearer k"})
        assert resp.status_code == 200
    with ServerThread(model("loop"), model_id="gpt-oss-20b", allowed_hosts=["my-mac.lan"]) as s:
        assert httpx.get(s.url + "/v1/models", headers={"Host": "my-mac.lan:8000"}).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"Host": "other.lan"}).status_code == 403


def test_health_reports_a_dead_model_thread(monkeypatch):
    s = ServerThread(model("loop"), model_id="gpt-oss-20b").start()
    try:
        assert httpx.get(s.url + "/health").json()["model_thread"] == "running"

        def die():
            raise RuntimeError("the model thread died")

        monkeypatch.setattr(threading, "excepthook", lambda args: None)  # its traceback is expected
        s.worker._admit = die  # the scheduler's next pass raises out of the thread
        assert s.worker.stopped.wait(10) and not s.worker.alive
        resp = httpx.get(s.url + "/health")
        assert resp.status_code == 503 and resp.json()["model_thread"] == "stopped"
        resp = httpx.post(s.url + "/v1/responses", json={**ASK, "max_output_tokens": 3}, timeout=30)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_thread_stopped"
    finally:
        s.stop()


def test_a_fault_inside_generation_is_a_server_error(looping, monkeypatch):
    from mlx_gptoss.errors import GptOssError

    from mlx_gptoss import batch

    def broken(*a, **kw):  # the request's first prefill chunk, on the model thread
        raise GptOssError("the model produced non-finite logits (NaN or inf)")

    monkeypatch.setattr(batch.Request, "advance", broken)
    resp = httpx.post(looping.url + "/v1/chat/completions", timeout=30,
                      json={"model": "gpt-oss-20b", "messages": [{"role": "user", "content": "Hi"}]})
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "generation_failed"
    assert "non-finite" in resp.json()["error"]["message"]


def test_a_chat_stream_cut_by_the_shutdown_ends_with_an_error_not_stop():
    s = ServerThread(model("loop"), model_id="gpt-oss-20b").start()
    body = {"model": "gpt-oss-20b", "stream": True, "messages": [{"role": "user", "content": "Loop forever, please"}]}
    got = stream_cut_by_shutdown(s, "/v1/chat/completions", body)
    chunks = [json.loads(d) for _, d in got if d != "[DONE]"]
    assert chunks[-1]["error"]["code"] == "server_shutting_down"
    assert not any(c.get("choices") and c["choices"][0]["finish_reason"] for c in chunks)


def test_the_response_store_is_bounded_by_bytes():
    store = responses.Store(size=100, max_bytes=10_000)
    for i in range(50):
        store.put({"id": f"resp_{i}", "output": "x" * 1000}, [{"role": "user", "content": "y" * 500}])
    assert store.bytes <= 10_000 and 0 < len(store.items) < 10
    assert store.get("resp_49") is not None and store.get("resp_0") is None  # the newest are kept
    store.put({"id": "huge", "output": "x" * 20_000}, [])  # bigger than the whole budget: not stored
    assert store.get("huge") is None and store.get("resp_49") is not None
    with pytest.raises(Exception, match="previous_response_id"):
        store.messages("resp_0")
