"""What real clients send is accepted (issue 17 §1): Codex's Responses requests as codex-rs builds them
(codex-api ResponsesApiRequest, tools/tool_spec.rs, protocol ResponseItem), its namespace tools and the way it
parses a namespaced call back (ToolName::new(namespace, name)), sealed reasoning round trips, unknown fields;
everything checked with the installed openai SDK's own types."""

from __future__ import annotations

import json

import httpx
import pytest
from openai.types.responses import Response

from mlx_gptoss import harmony
from scripted_checkpoint import _STATE, forget_models, offline_harmony, write_scripted_checkpoint
from server_fixtures import AGENT_SCRIPT, running, sse_events

EXEC_COMMAND = {"type": "function", "name": "exec_command", "description": "Runs a command in a PTY.", "strict": False,
                "parameters": {"type": "object", "properties": {"cmd": {"type": "string"},
                                                                "yield_time_ms": {"type": "number"}},
                               "required": ["cmd"], "additionalProperties": False}}
SPAWN = {"type": "function", "name": "spawn_agent", "description": "Spawn a sub-agent.", "strict": False,
         "parameters": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"],
                        "additionalProperties": False}}
MULTI_AGENT = {"type": "namespace", "name": "multi_agent_v1", "description": "Tools in the multi_agent_v1 namespace.",
               "tools": [SPAWN]}
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.", "strict": False,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Use the `apply_patch` tool to edit files.",
               "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch" LF'}}
SPAWN_SCRIPT = ("<|channel|>analysis<|message|>Delegate it.<|end|><|start|>assistant<|channel|>commentary"
                ' to=multi_agent_v1.spawn_agent <|constrain|>json<|message|>{"message": "count files"}<|call|>')


def codex_body(user: str, tools: list, history: list | None = None) -> dict:
    """A request as Codex CLI sends it to a `wire_api = "responses"` provider."""
    return {"model": "gpt-oss-20b", "instructions": "You are Codex, a coding agent.",
            "input": [{"type": "message", "role": "developer",
                       "content": [{"type": "input_text", "text": "<permissions instructions>sandboxed"}]},
                      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": user}]},
                      *(history or [])],
            "tools": tools, "tool_choice": "auto", "parallel_tool_calls": False,
            "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "0199-thread-id",
            "text": {"verbosity": "medium"}, "client_metadata": {"x-codex-turn": "1"}}


def post_stream(server, body: dict, **headers) -> tuple[Response, list[dict]]:
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=60,
                      headers={"originator": "codex_exec", "session-id": "0199", **headers}) as resp:
        assert resp.status_code == 200, resp.read()
        events = [json.loads(d) for _, d in sse_events(resp.iter_lines())]
    assert events[-1]["type"] == "response.completed", events[-1]
    return Response.model_validate(events[-1]["response"]), events


def one_call_model(script: str, tools: list, key: str):
    """A scripted model that answers every prompt with `script` (reasoning, then one call)."""
    import mlx_gptoss

    tok = offline_harmony()
    if key not in _STATE:
        gen = harmony.encoding().encode(script, allowed_special="all")
        specs = [{"name": t["name"], "description": t["description"], "parameters": t["parameters"],
                  "namespace": ns} for ns, t in tools]
        first = [{"role": "user", "content": "Delegate counting the files."}]
        path = write_scripted_checkpoint(_STATE["root"] / key, [(harmony.render(first, tools=specs), gen)],
                                         tok / "tokenizer.json")
        forget_models()
        _STATE[key] = mlx_gptoss.load(path, allow_download=False)
    return _STATE[key]


@pytest.fixture(scope="module")
def agent():
    with running("agent") as s:
        yield s


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _STATE.pop("model:spawn", None)
    forget_models()


def test_codex_request_is_accepted_and_the_response_validates(agent):
    tools = [EXEC_COMMAND, WEATHER, MULTI_AGENT, {"type": "web_search", "external_web_access": False}, APPLY_PATCH]
    r, events = post_stream(agent, codex_body("What is the weather in Paris?", tools))
    assert r.status == "completed"
    # the hosted web_search is left out of the prompt, and said so
    assert any("web_search" in w for w in r.model_extra["warnings"])
    reasoning, call = r.output[0], r.output[-1]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content.startswith("gm1.")
    assert reasoning.summary == [] and reasoning.content[0].text == "Need the weather."
    assert call.type == "function_call" and call.name == "get_weather" and call.namespace is None
    assert r.usage.input_tokens_details.cache_write_tokens == r.usage.input_tokens  # all prefilled, first time
    # the prompt offered the function tools, the namespace of its own and the freeform tool as a function
    prompt = harmony.encoding().decode(agent.worker.done[-1].prompt)
    assert "namespace multi_agent_v1 {" in prompt and "type spawn_agent" in prompt and "type exec_command" in prompt
    assert "type apply_patch" in prompt and "web_search" not in prompt


def test_unknown_fields_are_ignored_everywhere(agent):
    body = codex_body("What is the weather in Paris?", [WEATHER])
    body["input"][1]["phase"] = "commentary"  # a field on an item this server does not know
    body["frobnicate"] = {"deep": [1, 2]}
    r, _ = post_stream(agent, body)
    assert r.status == "completed"
    chat = httpx.post(agent.url + "/v1/chat/completions", timeout=60, json={
        "model": "gpt-oss-20b", "messages": [{"role": "user", "content": "Hi", "cache_control": {"type": "x"}}],
        "tools": [{"type": "function", "function": {**{k: v for k, v in WEATHER.items() if k != "type"}}},
                  {"type": "custom", "custom": {"name": "grammar_tool"}}],
        "store": False, "verbosity": "low", "web_search_options": {}, "prediction": None})
    assert chat.status_code == 200, chat.text
    assert any("custom" in w for w in chat.json()["warnings"])


def test_a_function_name_with_a_dash_works(agent):
    tool = {**WEATHER, "name": "resolve-library-id"}
    r, _ = post_stream(agent, codex_body("Hi", [tool]))
    assert r.status == "completed"
    assert "type resolve-library-id" in harmony.encoding().decode(agent.worker.done[-1].prompt)


def test_sealed_reasoning_renders_back_token_for_token_after_a_restart():
    """Codex's stateless loop: its second request carries the first reply's items (reasoning with its
    encrypted_content, the call, the output). A new server (a restart: empty caches, no stored state) renders
    that history as exactly the tokens the first server's model generated."""
    body = codex_body("What is the weather in Paris?", [WEATHER])
    with running("agent") as first:
        r1, _ = post_stream(first, body)
        job1 = first.worker.done[-1]
    items = [i.model_dump(exclude_none=True, exclude={"id", "status"}) for i in r1.output]
    items.append({"type": "function_call_output", "call_id": r1.output[-1].call_id, "output": '{"temp_c": 21}'})
    generated = harmony.encoding().encode(AGENT_SCRIPT, allowed_special="all")
    with running("agent") as second:
        r2, _ = post_stream(second, codex_body("What is the weather in Paris?", [WEATHER], items))
        job2 = second.worker.done[-1]
        assert job2.prompt[:len(job1.prompt) + len(generated)] == job1.prompt + generated
        # the same history again is a cache hit up to its end
        r3, _ = post_stream(second, codex_body("What is the weather in Paris?", [WEATHER], items))
        assert r3.usage.input_tokens_details.cached_tokens >= r2.usage.input_tokens - 1
        # a tampered or foreign blob is never trusted: the item's text is used as plain text
        bad = [dict(items[0], encrypted_content=items[0]["encrypted_content"][:-2] + "AA",
                    content=[{"type": "reasoning_text", "text": "Something else entirely."}])] + items[1:]
        post_stream(second, codex_body("What is the weather in Paris?", [WEATHER], bad))
        prompt = harmony.encoding().decode(second.worker.done[-1].prompt)
        assert "Something else entirely." in prompt and "Need the weather." not in prompt


def test_a_namespace_call_comes_back_as_codex_parses_it():
    """Codex routes a call by ToolName::new(namespace, name): the item must say name spawn_agent, namespace
    multi_agent_v1. Sent back that way, it renders as the model wrote it (the next prompt extends the last)."""
    model = one_call_model(SPAWN_SCRIPT, [("multi_agent_v1", SPAWN)], "model:spawn")
    from mlx_gptoss.server import ServerThread

    with ServerThread(model, model_id="gpt-oss-20b") as s:
        r, events = post_stream(s, codex_body("Delegate counting the files.", [EXEC_COMMAND, MULTI_AGENT]))
        call = r.output[-1]
        assert (call.type, call.name, call.namespace) == ("function_call", "spawn_agent", "multi_agent_v1")
        assert json.loads(call.arguments) == {"message": "count files"}
        deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
        assert len(deltas) > 2 and "".join(deltas) == call.arguments  # streamed as generated
        job1 = s.worker.done[-1]
        items = [i.model_dump(exclude_none=True, exclude={"id", "status"}) for i in r.output]
        items.append({"type": "function_call_output", "call_id": call.call_id, "output": "agent 7 started"})
        r2, _ = post_stream(s, codex_body("Delegate counting the files.", [EXEC_COMMAND, MULTI_AGENT], items))
        generated = harmony.encoding().encode(SPAWN_SCRIPT, allowed_special="all")
        assert s.worker.done[-1].prompt[:len(job1.prompt) + len(generated)] == job1.prompt + generated
        assert r2.usage.input_tokens_details.cached_tokens >= len(job1.prompt) + len(generated) - 1
        assert "<|start|>multi_agent_v1.spawn_agent to=assistant" in harmony.encoding().decode(s.worker.done[-1].prompt)


def test_custom_and_local_shell_calls_map_both_ways():
    """A freeform tool is offered as a function taking {"input": TEXT} and answered as a custom_tool_call;
    local_shell as a function taking the argv, answered as a local_shell_call; both render back as called."""
    from mlx_gptoss.server import conversation, responses

    offline_harmony()
    tools = responses.read_tools([APPLY_PATCH, {"type": "local_shell"}, MULTI_AGENT])
    turn = tools.turn([], "medium")
    patch = responses.call_item(turn, "functions.apply_patch", '{"input": "*** Begin Patch\\n"}')
    assert patch == {"type": "custom_tool_call", "name": "apply_patch", "input": "*** Begin Patch\n"}
    shell = responses.call_item(turn, "functions.local_shell", '{"command": ["ls", "-l"], "workdir": "/tmp"}')
    assert shell["type"] == "local_shell_call" and shell["action"]["command"] == ["ls", "-l"]
    assert shell["action"]["working_directory"] == "/tmp"
    spawn = responses.call_item(turn, "multi_agent_v1.spawn_agent", "{}")
    assert (spawn["name"], spawn["namespace"]) == ("spawn_agent", "multi_agent_v1")
    # arguments that do not fit the shape stay a function_call (nothing is lost)
    assert responses.call_item(turn, "functions.apply_patch", "not json")["type"] == "function_call"
    known = {"c1": {"channel": "commentary", "recipient": "functions.apply_patch",
                    "content_type": "<|constrain|>json", "content": '{"input":"*** Begin Patch\\n"}'}}
    msgs = responses.read_input([
        {"type": "message", "role": "user", "content": "patch it"},
        {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** Begin Patch\n"},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done"},
        {"type": "local_shell_call", "call_id": "c2", "status": "completed",
         "action": {"type": "exec", "command": ["ls"], "timeout_ms": None, "working_directory": None,
                    "env": {}, "user": None}},
        {"type": "function_call_output", "call_id": "c2", "output": "a.txt"},
        {"type": "function_call", "call_id": "c3", "name": "spawn_agent", "namespace": "multi_agent_v1",
         "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c3", "output": "ok"},
        {"type": "web_search_call", "status": "completed", "action": {"type": "search", "query": "x"}},
    ], [], known, turn)
    parts = [p for m in msgs if m["role"] == "assistant" for p in m["parts"]]
    # the custom call's text is the one the model wrote (known), not a re-serialization
    assert [(p["recipient"], p["content"]) for p in parts] == [
        ("functions.apply_patch", '{"input":"*** Begin Patch\\n"}'), ("functions.local_shell", '{"command": ["ls"]}'),
        ("multi_agent_v1.spawn_agent", "{}")]
    assert [m["content"] for m in msgs if m["role"] == "tool"] == ["Done", "a.txt", "ok"]
    assert any("web_search_call" in w for w in turn.warnings)
    assert conversation.call_name("multi_agent_v1.spawn_agent", turn.namespaces) == ("multi_agent_v1", "spawn_agent")


def test_outputs_validate_with_the_openai_types(agent):
    """Non-streamed replies of both APIs parse with the installed openai client's own models."""
    from openai.types.chat import ChatCompletion

    body = {**codex_body("What is the weather in Paris?", [WEATHER, MULTI_AGENT]), "stream": False}
    r = Response.model_validate(httpx.post(agent.url + "/v1/responses", json=body, timeout=60).json())
    assert r.usage.input_tokens_details.cache_write_tokens >= 0 and r.output[0].encrypted_content
    chat = httpx.post(agent.url + "/v1/chat/completions", timeout=60, json={
        "model": "gpt-oss-20b", "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]})
    c = ChatCompletion.model_validate(chat.json())
    assert c.choices[0].finish_reason == "tool_calls"
    assert c.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_a_bare_recipient_sent_back_renders_as_generated():
    """A call the model addressed to `python` (no functions. namespace) comes back from a Chat client as the
    name "python": it is matched by call id and rendered to `python` again."""
    from mlx_gptoss.server import chat_completions, conversation

    known = {"call_p": {"channel": "analysis", "recipient": "python", "content_type": "code", "content": "1+1"}}
    turn = conversation.Tools().turn([], "medium")
    msgs = chat_completions.read_messages([
        {"role": "user", "content": "Compute"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_p", "type": "function", "function": {"name": "python", "arguments": "1+1"}}]},
        {"role": "tool", "tool_call_id": "call_p", "content": "2"}], known, turn)
    part = msgs[1]["parts"][0]
    assert (part["channel"], part["recipient"], part["content_type"]) == ("analysis", "python", "code")


def test_each_unknown_field_is_logged_once_at_debug_level(caplog):
    from mlx_gptoss.server import schemas as S

    with caplog.at_level("DEBUG", logger="gptoss_mac.server"):
        for _ in range(3):
            S.ResponsesRequest.model_validate({"input": "Hi", "zz_unknown_once": 1, "client_metadata": {}})
    said = [r.getMessage() for r in caplog.records if "zz_unknown_once" in r.getMessage()]
    assert len(said) == 1 and "ResponsesRequest" in said[0]


@pytest.mark.parametrize("stateless", [False, True])
def test_a_tokenization_encode_would_not_give_stays_cached(stateless):
    """The model writes a call's arguments one character a token (not as encode() would). With
    previous_response_id the store keeps the generated ids; stateless, the call id (and the sealed reasoning)
    bring them back: either way the next prompt extends the last token for token."""
    from scripted_checkpoint import LOOKUP

    tool = {"type": "function", **LOOKUP}
    with running("noncanonical") as s:
        c = httpx.Client(base_url=s.url + "/v1", timeout=60)
        body = {"model": "gpt-oss-20b", "input": "Say hi", "tools": [tool], "temperature": 0,
                "store": not stateless, "include": ["reasoning.encrypted_content"]}
        r = Response.model_validate(c.post("/responses", json=body).json())
        call = r.output[-1]
        out = {"type": "function_call_output", "call_id": call.call_id, "output": "seven"}
        if stateless:
            items = [{"role": "user", "content": "Say hi"}] + [
                o.model_dump(exclude_none=True, exclude={"id", "status"}) for o in r.output] + [out]
            body2 = {**body, "input": items}
        else:
            body2 = {**body, "input": [out], "previous_response_id": r.id}
        r2 = Response.model_validate(c.post("/responses", json=body2).json())
        assert r2.output_text == "Seven."
        assert r2.usage.input_tokens_details.cached_tokens == r.usage.input_tokens + r.usage.output_tokens
