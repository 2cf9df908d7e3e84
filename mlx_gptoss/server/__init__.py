"""`gptoss-mac serve`: an OpenAI-compatible HTTP server for gpt-oss (Responses, Chat Completions, Completions).

    app.py               routes, body limit, API key, CORS, SSE (FastAPI + sse-starlette under uvicorn)
    schemas.py           request bodies (pydantic, strict)
    inputs.py            Responses items / Chat messages -> the engine's harmony message dicts; tool_choice
    responses.py         Responses output items, streaming events, the store behind previous_response_id
    chat_completions.py  chat.completion and its chunks (reasoning_content, tool_calls)
    completions.py       raw harmony text completions
    worker.py            the model thread: bounded queue, jobs, cancellation; Engine = the model calls
    slots.py             the KV slot pool (longest cached prefix, LRU, the memory plan's token budget)
    run.py               uvicorn in the foreground or in a thread; clean shutdown
    errors.py            OpenAI's error object and the status codes
"""

from .app import Settings, create_app
from .run import ServerThread, free_port, make_server
from .worker import Engine, Worker

__all__ = ["Settings", "create_app", "ServerThread", "free_port", "make_server", "Engine", "Worker"]
