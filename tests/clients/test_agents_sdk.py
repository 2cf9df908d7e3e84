"""The OpenAI Agents SDK (openai-agents, pinned in the test extras) end to end against a real `gptoss-mac serve`
process: an agent with a function tool runs its loop (call, tool output sent back, answer) over the Responses
API and over Chat Completions, tracing off."""

from __future__ import annotations

import asyncio

import pytest

from harness import assert_loop_cached, mark, scripted_client_model, serve, tool_turns
from install_clients import required

pytestmark = pytest.mark.slow
try:
    import agents
except ImportError:  # pinned in the test extras
    if required():
        raise
    pytest.skip("openai-agents is not installed: pip install -e \".[test]\"", allow_module_level=True)

QUESTION = "What is the weather in Paris?"
WEATHER = "sunny, 21 C"
ANSWER = "It is sunny and 21 C in Paris."


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    eps = tool_turns(QUESTION, "get_weather", [({"city": "Paris"}, WEATHER)], ANSWER)
    with serve(scripted_client_model("agents", eps), tmp_path_factory.mktemp("agents")) as s:
        yield s


def run_agent(served, api: str):
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    seen = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return WEATHER

    client = AsyncOpenAI(base_url=served.url + "/v1", api_key=served.api_key, max_retries=0, timeout=60)
    model_cls = agents.OpenAIResponsesModel if api == "responses" else agents.OpenAIChatCompletionsModel
    agent = agents.Agent(name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
                         model=model_cls(model=served.model_id, openai_client=client),
                         model_settings=agents.ModelSettings(temperature=0))
    result = asyncio.run(asyncio.wait_for(agents.Runner.run(agent, QUESTION, max_turns=4), 120))
    return result, seen


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_agent_with_a_function_tool(served, api):
    since = mark(served)
    result, seen = run_agent(served, api)
    assert result.final_output == ANSWER and seen == ["Paris"], served.report()
    reqs = assert_loop_cached(served, since, min_requests=2, share=0.5)
    assert [r["stop"] for r in reqs] == ["call", "return"]
    path = "/v1/responses" if api == "responses" else "/v1/chat/completions"
    assert all(e.path == path for e in served.recorder.exchanges[since[0]:])
