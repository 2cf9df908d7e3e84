"""The ASGI app (FastAPI): routes, request reading (size limit, JSON), API-key and Host checks, CORS, SSE.

Routes: POST /v1/responses, GET /v1/responses/{id}, POST /v1/chat/completions, POST /v1/completions,
GET /v1/models, GET /v1/models/{id}, GET /health; anthropic.py adds POST /v1/messages and
/v1/messages/count_tokens. Every failure is OpenAI's error object (errors.py; Anthropic's on its routes).
Each protocol module reads its request into the shared conversation model (conversation.py), which renders
the prompt here (off the event loop); generation happens on the model thread (worker.py), whose events come
back through the job's queue and go out as JSON or as server-sent events.

What a request body must be: JSON (Content-Type application/json: a web page cannot send that without a CORS
preflight), at most max_body bytes, nested at most MAX_DEPTH levels, no lone UTF-16 surrogates, integers within
Python's 4,300 digits; each is a 400, never a 500. Without an API key, the Host header must name the loopback,
an IP address or a configured host name (a DNS-rebinding page names its own domain).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from .. import harmony
from ..chat import assistant_message, check_sampling
from ..errors import GptOssError
from . import anthropic, chat_completions, completions, conversation, responses
from . import schemas as S
from .errors import APIError, bad, error_body, refuse
from .worker import Job, Worker

log = logging.getLogger("gptoss_mac.server")
POLL = 0.25  # seconds between checks for a disconnected client or a shutdown while waiting for events
MAX_DEPTH = 128  # JSON nesting (openai-harmony's JSON reader stops at 128 too); real requests nest ~10 deep
LOOPBACK_NAMES = ("localhost",)


@dataclass
class Settings:
    model_id: str  # the id /v1/models shows and requests name
    api_key: str | None = None
    cors: list[str] = field(default_factory=list)
    max_body: int = 16 << 20
    store_size: int = 256  # stored responses (previous_response_id), at most
    store_bytes: int = 256 << 20  # ... and at most this many bytes of them
    default_max_tokens: int = 16384  # the output cap of a request that gives none (a runaway reply ends there)
    write_timeout: float = 30.0  # seconds a stream may wait for a client that does not read before it is cut
    allowed_hosts: list[str] = field(default_factory=list)  # Host names accepted without an API key

    def served(self) -> set[str]:
        return {self.model_id, Path(self.model_id.rstrip("/")).name}


def error_for(path: str, status: int, message: str, code: str | None = None) -> dict:
    """The error object of the protocol a path speaks: Anthropic's on /v1/messages*, else OpenAI's."""
    if path.startswith("/v1/messages"):
        return anthropic.error_body(status, message)
    return error_body(status, message, code=code)


def create_app(worker: Worker, settings: Settings) -> FastAPI:
    app = FastAPI(title="gptoss-mac", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.settings = worker, settings
    app.state.store = store = responses.Store(settings.store_size, settings.store_bytes)
    app.state.stopping = stopping = threading.Event()
    app.state.calls = calls = responses.CallMemory()

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        msg = {404: f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/responses, "
                    "/v1/chat/completions, /v1/completions, /v1/messages",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_for(request.url.path, e.status_code, msg), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return bad(f"invalid request: {e.errors()[0].get('msg')}").response()

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_for(request.url.path, 500, f"internal error: {type(e).__name__}: {e}"),
                            status_code=500)

    # ------------------------------------------------------------------------------- helpers
    async def read(request: Request, model: type):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
            raise APIError(415, f"the request body must be JSON, sent with Content-Type: application/json "
                           f"(got {kind or 'no Content-Type'})", code="unsupported_media_type")
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > settings.max_body:
            raise too_large(int(size))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body:
                raise too_large(len(body))
        # a big body is checked off the event loop
        data = await run_in_threadpool(parse_json, bytes(body)) if len(body) > 1 << 18 else parse_json(bytes(body))
        req = S.validate(model, data, "")
        check_model(req.model, settings.served(), settings.model_id)
        return req

    def too_large(n: int) -> APIError:
        return APIError(413, f"the request body has {n:,} bytes, over the limit of {settings.max_body:,} "
                        "(gptoss-mac serve --max-body)", code="request_too_large")

    def gpt():
        return worker.engine.gpt

    def check_length(prompt: list[int], param: str) -> None:
        cap = worker.engine.cap
        if len(prompt) >= cap:
            raise bad(f"the prompt has {len(prompt):,} tokens, and this server's context is {cap:,} tokens "
                      "(with room for at least one token of reply); shorten the conversation or restart the "
                      "server with a larger --ctx", param=param, code="context_length_exceeded")

    def render(turn: conversation.Turn, developer: str | None, param: str):
        ids, parser = conversation.render(turn, gpt().path, developer, param)
        check_length(ids, param)
        return ids, parser

    def submit(kind: str, jid: str, prompt, parser, **sampling) -> Job:
        if sampling.get("max_tokens") is None:  # a reply that never ends stops here
            sampling["max_tokens"] = settings.default_max_tokens
        sampling = {k: v for k, v in sampling.items() if v is not None}
        try:  # the engine's own checks, before the request is queued (and before a stream says 200)
            check_sampling(**sampling)
        except GptOssError as e:
            raise bad(str(e), param=str(e).split()[0]) from None
        job = Job(jid, kind, prompt, parser, sampling, asyncio.get_running_loop())
        worker.submit(job)
        return job

    def stop_reason(stats) -> str:
        """The job's stop reason; a job cancelled because the server is stopping was cut by the shutdown."""
        return "shutdown" if stats.stop_reason == "cancelled" and stopping.is_set() else stats.stop_reason

    async def events(job: Job, request: Request | None):
        """The job's Events until "done"; an APIError from the model thread is raised. Leaving early (a
        disconnect, a cancelled stream, a stream the client stopped reading) cancels the job."""
        checked = time.monotonic()
        try:
            while True:
                item = await job.next(POLL)
                if item is None or time.monotonic() - checked > POLL:  # also while tokens flow
                    checked = time.monotonic()
                    if stopping.is_set():
                        job.stop("shutdown")
                    elif request is not None and await request.is_disconnected():
                        job.stop()
                    if not worker.alive:
                        raise APIError(503, "the model thread has stopped; restart the server",
                                       code="model_thread_stopped")
                if item is None:
                    continue
                if isinstance(item, APIError):
                    raise item
                if item.kind == "done":
                    item.stats.stop_reason = stop_reason(item.stats)
                yield item
                if item.kind == "done":
                    return
        finally:
            if not job.finished.is_set():
                job.stop()

    def cut_error(stats) -> APIError | None:
        """A non-streamed reply cut off by the server (a cancel, the shutdown) is an error, not an answer."""
        cut = responses.cut_reason(stats.stop_reason)
        return APIError(503, cut[1], code=cut[0]) if cut else None

    def sse(gen):
        # a client that stops reading blocks the writes: after write_timeout seconds the stream is closed,
        # which cancels its job (run.py keeps the socket buffers small so this happens soon)
        return StreamResponse(gen, ping=15, send_timeout=settings.write_timeout)

    # -------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        """ok while the model thread runs (503 once it has died: nothing can be answered any more)."""
        alive = worker.alive and worker.error is None
        body = {"status": "ok" if alive else "error", "model": settings.model_id, "context": context(),
                "model_thread": "running" if alive else "stopped", "queued": worker.queue.qsize(),
                "busy": worker.current is not None, "batch": worker.batch_size, "max_batch": worker.max_batch}
        if not alive:
            body["error"] = f"the model thread has stopped{f': {worker.error}' if worker.error else ''}; restart"
        return JSONResponse(body, status_code=200 if alive else 503)

    def context() -> int | None:
        """Tokens one request may hold, prompt and reply (the plan's context; None before the model loads)."""
        return worker.engine.cap if worker.engine else None

    def model_card():
        return {"id": settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "openai",
                "context_length": context()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name, settings.served(), settings.model_id)
        return model_card()

    @app.get("/v1/responses/{rid}")
    async def get_response(rid: str):
        r = store.get(rid)
        if r is None:
            raise APIError(404, f"no stored response has the id {rid!r}", param="response_id", code="not_found")
        return r

    @app.post("/v1/responses")
    async def create_response(request: Request):
        req = await read(request, S.ResponsesRequest)
        refuse(req.background, "background responses are not supported", "background")
        refuse(req.text and req.text.format and req.text.format.type != "text",
               "structured output (text.format other than text) is not supported", "text.format")
        refuse(req.top_logprobs, "logprobs are not supported", "top_logprobs")
        refuse(req.max_tool_calls is not None, "max_tool_calls is not supported", "max_tool_calls")
        refuse(req.conversation is not None, "conversations are not supported; use previous_response_id",
               "conversation")
        refuse(req.prompt is not None, "prompt templates are not supported", "prompt")
        refuse(req.truncation not in (None, "disabled"), "truncation \"auto\" is not supported", "truncation")
        prior = store.messages(req.previous_response_id) if req.previous_response_id else []
        turn = responses.read_turn(req, prior, calls.calls, store.exact(req.previous_response_id))
        conversation.apply_tool_choice(turn, req.tool_choice)
        prompt, parser = await run_in_threadpool(render, turn, req.instructions, "input")
        rid = responses.new_id("resp")
        sealing = "reasoning.encrypted_content" in (req.include or [])
        builder = responses.ResponseBuilder(
            responses.response_object(rid, req, settings.model_id, req.tools or [], turn.effort), turn,
            (lambda n: conversation.sealed_message(parser, n)) if sealing else None)
        job = submit("responses", rid, prompt, parser, max_tokens=req.max_output_tokens,
                     temperature=req.temperature, top_p=req.top_p)

        def finish(stats):
            calls.remember(parser.parts, parser.part_ids)
            out = builder.finish(stats)
            if req.store and not responses.cut_reason(stats.stop_reason):
                store.put(builder.snapshot(), turn.messages + [assistant_message(parser)],
                          {**turn.exact, **conversation.generated_ids(parser)})
            return out

        if not req.stream:
            async for ev in events(job, request):
                if ev.kind == "done":
                    finish(ev.stats)
                else:
                    builder.feed(ev)
            return builder.snapshot()

        async def stream():
            for e in builder.start():
                yield {"event": e["type"], "data": json.dumps(e)}
            try:
                async for ev in events(job, None):
                    for e in (finish(ev.stats) if ev.kind == "done" else builder.feed(ev)):
                        yield {"event": e["type"], "data": json.dumps(e)}
            except APIError as err:
                e = builder.event("error", code=err.code, message=err.message, param=err.param)
                yield {"event": "error", "data": json.dumps(e)}
        return sse(stream())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await read(request, S.ChatRequest)
        refuse(req.n not in (None, 1), "n > 1 is not supported (one choice per request)", "n")
        refuse(req.stop, "stop sequences are not supported (harmony's stop tokens end every reply)", "stop")
        refuse(req.logprobs or req.top_logprobs, "logprobs are not supported", "logprobs")
        refuse(req.logit_bias, "logit_bias is not supported", "logit_bias")
        refuse(req.response_format and req.response_format.get("type") != "text",
               "response_format other than text is not supported", "response_format")
        refuse(req.frequency_penalty or req.presence_penalty, "frequency and presence penalties are not "
               "supported", "frequency_penalty" if req.frequency_penalty else "presence_penalty")
        refuse(req.functions is not None or req.function_call is not None,
               "the legacy functions/function_call fields are not supported; use tools", "functions")
        refuse(req.modalities not in (None, ["text"]), "only text output is supported", "modalities")
        turn = chat_completions.read_turn(req, calls.calls)
        conversation.apply_tool_choice(turn, req.tool_choice)
        prompt, parser = await run_in_threadpool(render, turn, None, "messages")
        cid = responses.new_id("chatcmpl")
        builder = chat_completions.ChatBuilder(cid, settings.model_id, turn.warnings)
        job = submit("chat.completions", cid, prompt, parser, max_tokens=req.max_completion_tokens or req.max_tokens,
                     temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        if not req.stream:
            async for ev in events(job, request):
                if ev.kind == "done":
                    calls.remember(parser.parts, parser.part_ids)
                    if err := cut_error(ev.stats):
                        raise err
                    return builder.completion(ev.stats)
                builder.feed(ev)
        usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream():
            for c in builder.start():
                yield {"data": json.dumps(c)}
            try:
                async for ev in events(job, None):
                    if ev.kind == "done":
                        calls.remember(parser.parts, parser.part_ids)
                    for c in (builder.finish(ev.stats, usage) if ev.kind == "done" else builder.feed(ev)):
                        yield {"data": json.dumps(c)}
            except APIError as err:
                yield {"data": json.dumps(err.body())}
            yield {"data": "[DONE]"}
        return sse(stream())

    @app.post("/v1/completions")
    async def complete(request: Request):
        req = await read(request, S.CompletionRequest)
        refuse(req.n not in (None, 1) or req.best_of not in (None, 1), "n > 1 is not supported", "n")
        refuse(req.stop, "stop sequences are not supported", "stop")
        refuse(req.echo, "echo is not supported", "echo")
        refuse(req.logprobs, "logprobs are not supported", "logprobs")
        refuse(req.suffix, "suffix is not supported", "suffix")
        refuse(req.logit_bias, "logit_bias is not supported", "logit_bias")
        refuse(req.frequency_penalty or req.presence_penalty, "penalties are not supported", "frequency_penalty")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            refuse(len(prompt) > 1, "one prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = await run_in_threadpool(harmony.encoding().encode, prompt, allowed_special="all")
        else:
            vocab = gpt().config.vocab_size
            bad_ids = [t for t in prompt if not 0 <= t < vocab]
            if bad_ids:
                raise bad(f"prompt: token id {bad_ids[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
            ids = list(prompt)
        if not ids:
            raise bad("prompt: empty; give text or token ids", param="prompt")
        check_length(ids, "prompt")
        cid = responses.new_id("cmpl")
        job = submit("completions", cid, ids, completions.RawText(harmony.encoding()), max_tokens=req.max_tokens,
                     temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        if not req.stream:
            text = []
            async for ev in events(job, request):
                if ev.kind == "done":
                    if err := cut_error(ev.stats):
                        raise err
                    return completions.completion(cid, settings.model_id, "".join(text), ev.stats)
                text.append(ev.text)
        usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream():
            try:
                async for ev in events(job, None):
                    if ev.kind != "done":
                        yield {"data": json.dumps(completions.completion(cid, settings.model_id, ev.text))}
                        continue
                    if err := cut_error(ev.stats):
                        raise err
                    last = completions.completion(cid, settings.model_id, "", ev.stats)
                    u = last.pop("usage")
                    yield {"data": json.dumps(last)}
                    if usage:
                        yield {"data": json.dumps({**last, "choices": [], "usage": u})}
            except APIError as err:
                yield {"data": json.dumps(err.body())}
            yield {"data": "[DONE]"}
        return sse(stream())

    anthropic.add_routes(app, read=read, render=render, submit=submit, events=events, settings=settings, calls=calls)

    # the API key guards everything but /health (without a key, the Host check guards everything); CORS is
    # outermost so its headers reach errors too
    if settings.api_key:
        app.add_middleware(RequireKey, key=settings.api_key)
    else:
        app.add_middleware(RequireLocalHost, names=settings.allowed_hosts)
    if settings.cors:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"])
    return app


class StreamResponse(EventSourceResponse):
    """Server-sent events; a stream cut by the write timeout is one log line, not a traceback."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info("%s: the client did not read the stream for %s s; its reply was cancelled", scope.get("path"),
                     self.send_timeout)


def check_model(asked: str | None, served: set[str], shown: str) -> None:
    if asked is not None and asked not in served:
        raise APIError(404, f"The model {asked!r} does not exist here; this server runs {shown!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object, or a 400 for anything Python's json would take but the server cannot
    hold: lone surrogates (not UTF-8 text), integers over 4,300 digits, nesting deeper than MAX_DEPTH."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e}); send a JSON object") from None
    except RecursionError:
        raise bad(f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise bad(f"the request body holds a number this server cannot read ({e})") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {type(data).__name__}")
    depth, level = 0, [data]
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise bad(f"the request body nests deeper than {MAX_DEPTH} levels")
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, (dict, list))]
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"the request body holds a lone UTF-16 surrogate ({e.object[e.start:e.end]!r} is not a "
                  "character); send valid Unicode text") from None
    return data


class RequireLocalHost:
    """Pure ASGI middleware for a server without an API key: the Host header must name the loopback, an IP
    address or one of `names`. A page on evil.example whose DNS name is rebound to 127.0.0.1 sends
    Host: evil.example, so it cannot read this server's answers."""

    def __init__(self, app, names=()):
        self.app, self.names = app, {n.lower() for n in names}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").strip().lower()
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if allowed_host(name, self.names):
            return await self.app(scope, receive, send)
        resp = JSONResponse(error_for(scope["path"], 403, f"the Host header {host!r} is not this server: without an "
                                      "API key it answers only requests to localhost, an IP address or the names given "
                                      "(gptoss-mac serve --allowed-host NAME, or --api-key KEY for any name)", code="host_not_allowed"),
                            status_code=403)
        await resp(scope, receive, send)


def allowed_host(name: str, names=()) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost") or name in names:
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class RequireKey:
    """Pure ASGI middleware: `Authorization: Bearer KEY` (or `api-key: KEY`, or Anthropic's `x-api-key: KEY`),
    compared in constant time."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        given = (auth[7:].strip() if auth[:7].lower() == b"bearer " else
                 headers.get(b"api-key") or headers.get(b"x-api-key") or b"")
        if hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        msg = ("Incorrect API key provided" if given else
               "Missing API key: send it as `Authorization: Bearer KEY`") + " (gptoss-mac serve --api-key)"
        resp = JSONResponse(error_for(scope["path"], 401, msg, code="invalid_api_key"), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)
