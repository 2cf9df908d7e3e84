"""Every bad request gets OpenAI's error object with the right status (400, 401, 404, 413, 422, 429 is in
test_server_agents); auth on and off; CORS off unless asked; no traceback ever reaches a client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import mlx_gptoss
from mlx_gptoss.server import ServerThread
from scripted_checkpoint import forget_models, scripted_path
from server_fixtures import WEATHER_TOOL, client, running, sse_events

KEY = "s3cret-key"
R, C, X = "/v1/responses", "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"}}]}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}

# (path, body, status, param, code)
CORPUS = [
    (R, b"{not json", 400, None, None),
    (R, b"[1, 2]", 400, None, None),
    (R, b"\xff\xfe", 400, None, None),
    (R, {}, 400, "input", None),
    (R, {"input": 5}, 400, "input", None),
    (R, {"input": "Hi", "temperature": "hot"}, 400, "temperature", None),
    (R, {"input": "Hi", "temperature": 3}, 400, "temperature", None),
    (R, {"input": "Hi", "top_p": 0}, 400, "top_p", None),
    (R, {"input": "Hi", "max_output_tokens": 0}, 400, "max_output_tokens", None),
    (R, {"input": "Hi", "max_output_tokens": "10"}, 400, "max_output_tokens", None),
    (R, {"input": "Hi", "stream": "yes"}, 400, "stream", None),
    (R, {"input": "Hi", "reasoning": {"effort": "extreme"}}, 400, "reasoning.effort", None),
    (R, {"input": "Hi", "model": "gpt-4o"}, 404, "model", "model_not_found"),
    (R, {"input": [{"type": "telepathy"}]}, 400, "input[0].type", None),
    (R, {"input": [{"role": "user", "content": 7}]}, 400, "input[0].content", None),
    (R, {"input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role", None),
    (R, {"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, 400,
     "input[0].call_id", None),
    (R, {"input": [{"type": "function_call", "name": "f"}]}, 400, "input[0].call_id", None),
    (R, {"input": "Hi", "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "nope"}}, 400,
     "tool_choice", None),
    (R, {"input": "Hi", "tool_choice": "required"}, 400, "tool_choice", None),
    (R, {"input": "Hi", "tool_choice": "sometimes"}, 400, "tool_choice", None),
    (R, {"input": "Hi", "tools": [{"type": "function", "name": "bad name"}]}, 400, "tools[0].name", None),
    (R, {"input": "Hi", "tools": [WEATHER_TOOL, WEATHER_TOOL]}, 400, "tools", None),
    (R, {"input": "Hi", "previous_response_id": "resp_missing"}, 400, "previous_response_id",
     "previous_response_not_found"),
    (R, {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 422,
     "input[0].content[0].type", "unsupported"),
    (R, {"input": "Hi", "tools": [{"name": "x"}]}, 400, "tools[0].type", None),
    (R, {"input": "Hi", "tools": [{"type": "function"}]}, 400, "tools[0].name", None),
    (R, {"input": "Hi", "tools": [{"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "a b"}]}]},
     400, "tools[0].tools[0].name", None),
    (R, {"input": "Hi", "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata", None),
    (R, {"input": "Hi", "metadata": {"k" * 65: "v"}}, 400, "metadata", None),
    (R, {"input": "Hi", "metadata": {"k": "v" * 513}}, 400, "metadata", None),
    (R, {"input": "Hi", "metadata": {"k": 5}}, 400, "metadata.k", None),
    (R, b'{"input": "Hi \\ud800 there"}', 400, None, None),  # a lone surrogate (harmony cannot encode it)
    (R, b'{"input": [{"role": "user", "content": [{"type": "input_text", "text": "\\udc00"}]}]}', 400, None, None),
    (R, b'{"input": "Hi", "max_output_tokens": 1' + b"0" * 5000 + b"}", 400, None, None),  # over 4,300 digits
    (R, b'{"input": "Hi", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None, None),  # Python's limit
    (R, b'{"input": "Hi", "tools": [{"type": "function", "name": "f", "parameters": ' + b'{"a": ' * 300
     + b"1" + b"}" * 300 + b"}]}", 400, None, None),  # deeper than MAX_DEPTH
    (C, {"messages": USER, "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata", None),
    (C, {"messages": USER + [{**CALL, "tool_calls": [{**CALL["tool_calls"][0], "function": {"name": "a b",
                                                                                         "arguments": "{}"}}]}]},
     400, "messages[1].tool_calls[0].function.name", None),
    (R, {"input": [{"type": "function_call", "call_id": "c", "name": "f", "namespace": "bad ns", "arguments": "{}"}]},
     400, "input[0].name", None),
    # within the body's depth limit, past openai-harmony's JSON limit for a tool schema
    (C, b'{"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function", "function": {"name": "f", '
     b'"parameters": ' + b'{"type": "object", "properties": {"a": ' * 60 + b"{}" + b"}}" * 60 + b"}}]}", 400,
     "messages", None),
    (R, {"input": "Hi", "background": True}, 422, "background", "unsupported"),
    (R, {"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, 422,
     "text.format", "unsupported"),
    (C, {"messages": []}, 400, "messages", None),
    (C, {"messages": "Hi"}, 400, "messages", None),
    (C, {"messages": [{"role": "user"}], "max_tokens": -1}, 400, "max_tokens", None),
    (C, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
    (C, {"messages": USER + [{"role": "tool", "content": "21 C"}]}, 400, "messages[1].tool_call_id", None),
    (C, {"messages": USER + [{"role": "tool", "tool_call_id": "call_9", "content": "21 C"}]}, 400,
     "messages[1].tool_call_id", None),
    (C, {"messages": USER + [CALL, {"role": "tool", "tool_call_id": "call_2", "content": "x"}],
         "tools": [CHAT_TOOL]}, 400, "messages[2].tool_call_id", None),
    (C, {"messages": USER, "tools": [CHAT_TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     400, "tool_choice", None),
    (C, {"messages": USER, "model": "llama"}, 404, "model", "model_not_found"),
    (C, {"messages": USER, "seed": -1, "stream": True}, 400, "seed", None),
    (C, {"messages": USER, "n": 2}, 422, "n", "unsupported"),
    (C, {"messages": USER, "stop": ["\n"]}, 422, "stop", "unsupported"),
    (C, {"messages": USER, "logprobs": True}, 422, "logprobs", "unsupported"),
    (C, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 422,
     "messages[0].content[0].type", "unsupported"),
    (X, {"prompt": [999999999]}, 400, "prompt", None),
    (X, {"prompt": ""}, 400, "prompt", None),
    (X, {"prompt": ["a", "b"]}, 422, "prompt", "unsupported"),
    (X, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
]


@pytest.fixture(scope="module")
def strict():
    """Key required, a 64 KB body limit, the smallest planned context (2048 tokens)."""
    gpt = mlx_gptoss.load(scripted_path("reason"), allow_download=False, ctx=2048)
    with ServerThread(gpt, model_id="openai/gpt-oss-20b", api_key=KEY, max_body=64_000) as s:
        yield s
    forget_models()


def post(server, path, body, key=KEY, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60, **kw)


def assert_error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["message"] and "Traceback" not in err["message"]
    assert err["param"] == param and err["code"] == code, err
    return err


@pytest.mark.parametrize("path,body,status,param,code", CORPUS,
                         ids=[f"{i}-{c[0].rsplit('/', 1)[-1]}-{c[2]}" for i, c in enumerate(CORPUS)])
def test_bad_request_corpus(strict, path, body, status, param, code):
    assert_error(post(strict, path, body), status, param, code)


def test_model_names_that_are_served(strict):
    for name in ("openai/gpt-oss-20b", "gpt-oss-20b", None):
        body = {"input": "Hi", "max_output_tokens": 2, **({"model": name} if name else {})}
        assert post(strict, R, body).status_code == 200


def test_prompt_over_the_context(strict):
    long = "word " * 3000
    err = assert_error(post(strict, R, {"input": long}), 400, "input", "context_length_exceeded")
    assert "2,048" in err["message"]
    assert_error(post(strict, C, {"messages": [{"role": "user", "content": long}]}), 400, "messages",
                 "context_length_exceeded")
    assert_error(post(strict, X, {"prompt": long}), 400, "prompt", "context_length_exceeded")


def test_body_over_the_limit(strict):
    big = {"input": "x" * 70_000}
    assert_error(post(strict, R, big), 413, None, "request_too_large")

    def chunks():  # no content-length: counted while reading
        yield b'{"input": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'
    resp = httpx.post(strict.url + R, content=chunks(), timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert_error(resp, 413, None, "request_too_large")


def test_auth_required_when_a_key_is_set(strict):
    assert_error(post(strict, R, {"input": "Hi"}, key=None), 401, None, "invalid_api_key")
    assert_error(post(strict, R, {"input": "Hi"}, key="wrong"), 401, None, "invalid_api_key")
    assert httpx.get(strict.url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(strict.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).is_success
    assert httpx.get(strict.url + "/health", timeout=10).is_success  # health checks need no key
    with pytest.raises(openai.AuthenticationError):
        client(strict, api_key="wrong").models.list()
    ok = client(strict, api_key=KEY).responses.create(model="gpt-oss-20b", input="Hi", max_output_tokens=2)
    assert ok.status == "incomplete"


def test_client_errors_are_typed(strict):
    c = client(strict, api_key=KEY)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="gpt-5", input="Hi")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="gpt-oss-20b", messages=[{"role": "user", "content": "Hi"}], temperature=9)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError):
        c.chat.completions.create(model="gpt-oss-20b", messages=[{"role": "user", "content": "Hi"}], n=3)


def test_unknown_routes_and_methods(strict):
    h = {"Authorization": f"Bearer {KEY}"}
    assert_error(httpx.get(strict.url + "/v1/nothing", headers=h, timeout=10), 404)
    assert_error(httpx.get(strict.url + C, headers=h, timeout=10), 405)
    assert_error(httpx.get(strict.url + "/v1/responses/resp_nope", headers=h, timeout=10), 404, "response_id",
                 "not_found")
    assert_error(httpx.get(strict.url + "/v1/models/other", headers=h, timeout=10), 404, "model", "model_not_found")


def test_a_bug_in_the_engine_is_a_500_error_object_and_the_server_goes_on(strict, monkeypatch):
    def boom(*a, **k):
        raise ZeroDivisionError("simulated bug")
    monkeypatch.setattr(strict.worker.engine, "run", boom)
    err = assert_error(post(strict, C, {"messages": USER}), 500)
    assert err["type"] == "server_error" and "ZeroDivisionError: simulated bug" in err["message"]
    with httpx.stream("POST", strict.url + R, json={"input": "Hi", "stream": True}, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        events = [json.loads(d) for _, d in sse_events(resp.iter_lines())]
    assert events[-1]["type"] == "error" and "simulated bug" in events[-1]["message"]
    monkeypatch.undo()
    assert post(strict, C, {"messages": USER, "max_tokens": 2}).status_code == 200


def test_no_auth_and_no_cors_by_default():
    with running("reason") as s:
        assert httpx.get(s.url + "/v1/models", timeout=10).is_success
        pre = httpx.options(s.url + R, headers={"Origin": "http://app.test", "Access-Control-Request-Method": "POST"},
                            timeout=10)
        assert "access-control-allow-origin" not in pre.headers
        r = httpx.post(s.url + R, json={"input": "Hi", "max_output_tokens": 2}, headers={"Origin": "http://app.test"},
                       timeout=60)
        assert r.is_success and "access-control-allow-origin" not in r.headers


def test_cors_when_asked():
    with running("reason", cors=["http://app.test"], api_key=KEY) as s:
        pre = httpx.options(s.url + R, headers={"Origin": "http://app.test", "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "authorization,content-type"},
                            timeout=10)
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.test"
        denied = httpx.post(s.url + R, json={"input": "Hi"}, headers={"Origin": "http://app.test"}, timeout=10)
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://app.test"
        other = httpx.options(s.url + R, headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"},
                              timeout=10)
        assert other.headers.get("access-control-allow-origin") != "http://evil.test"
