"""`gptoss-mac serve`: an HTTP server for gpt-oss (OpenAI's Responses, Chat Completions, Completions; Anthropic's
Messages).

One module per wire protocol, over one shared conversation model and one scheduler:

    responses.py         the Responses API: input items and tools in; output items, streaming events, the store
    chat_completions.py  Chat Completions: messages and tools in; chat.completion and its chunks out
    completions.py       raw harmony text completions
    anthropic.py         Anthropic's Messages API (Claude Code): content blocks in and out, its events and errors
    conversation.py      protocol-neutral messages and tools -> the harmony prompt (namespaces, tool_choice,
                         sealed reasoning); generated calls and reasoning -> what the protocols call them
    sealed.py            the HMAC-checked blob of a reasoning message's exact generated tokens
    app.py               routes, request reading (JSON, limits), API key / Host checks, CORS, SSE
    schemas.py           request bodies (pydantic: strict types, unknown fields ignored)
    worker.py            the model thread: bounded queue, jobs, cancellation; Engine = the model calls
    slots.py             the KV slot pool (longest cached prefix, LRU, the memory plan's token budget)
    run.py               uvicorn in the foreground or in a thread; clean shutdown
    errors.py            OpenAI's error object and the status codes
"""

from .app import Settings, create_app
from .run import ServerThread, free_port, make_server
from .worker import Engine, Worker

__all__ = ["Settings", "create_app", "ServerThread", "free_port", "make_server", "Engine", "Worker"]
