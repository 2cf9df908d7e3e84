"""Servers for the server tests: scripted checkpoints behind a real uvicorn on a free 127.0.0.1 port.

Each scripted model replays a fixed harmony script under greedy decoding (tests/scripted_checkpoint.py);
"agent" is built here: it always reasons one sentence and calls get_weather, so a client can run a tool
loop of any length against it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import openai

from mlx_gptoss.server import ServerThread
from scripted_checkpoint import _STATE, get_weather, offline_harmony, scripted_model, write_scripted_checkpoint

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                          "description": "The city's name."}},
                               "required": ["city"]}}
CHAT_WEATHER_TOOL = {"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}
AGENT_SCRIPT = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary"
                ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>')


def agent_model():
    """A scripted model that answers every prompt with the reasoning + get_weather call of AGENT_SCRIPT."""
    import mlx_gptoss
    from mlx_gptoss import harmony
    from scripted_checkpoint import forget_models

    tok = offline_harmony()
    if "model:agent" not in _STATE:
        enc = harmony.encoding()
        gen = enc.encode(AGENT_SCRIPT, allowed_special="all")
        tools = [WEATHER_TOOL]
        first = [{"role": "user", "content": "What is the weather in Paris?"}]
        call = {"role": "assistant", "reasoning": "Need the weather.",
                "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]}
        result = {"role": "tool", "name": "get_weather", "tool_call_id": "call_1",
                  "content": json.dumps(get_weather("Paris"))}
        episodes = [(harmony.render(first, tools=tools), gen),
                    (harmony.render(first + [call, result], tools=tools), gen)]
        path = write_scripted_checkpoint(_STATE["root"] / "agent", episodes, tok / "tokenizer.json")
        forget_models()
        _STATE["model:agent"] = mlx_gptoss.load(path, allow_download=False)
    return _STATE["model:agent"]


def model(name: str):
    return agent_model() if name == "agent" else scripted_model(name)


@contextlib.contextmanager
def running(name: str, **kw):
    with ServerThread(model(name), model_id="gpt-oss-20b", **kw) as s:
        yield s


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                         timeout=kw.pop("timeout", 60), **kw)


def wait_for(cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def sse_events(lines) -> list[tuple[str | None, str]]:
    """(event name, data) pairs from the lines of a text/event-stream."""
    out, name, data = [], None, []
    for line in lines:
        if line == "":
            if data:
                out.append((name, "\n".join(data)))
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        out.append((name, "\n".join(data)))
    return out


def stream_cut_by_shutdown(server, path: str, body: dict) -> list[tuple[str | None, str]]:
    """POST a streamed request to `path`, stop the server once its generation is a few tokens in, and return
    the (event, data) pairs the client received to the end of the stream."""
    got: list = []
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as resp:
        reader = threading.Thread(target=lambda: got.extend(sse_events(resp.iter_lines())), daemon=True)
        reader.start()
        try:
            wait_for(lambda: server.worker.current and server.worker.current.tokens > 3, what="generation")
        finally:
            server.stop()
        reader.join(30)
    return got
