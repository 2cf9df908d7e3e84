"""OpenAI's error object for every failure a client can cause, and the status codes the server uses.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

400  the request is wrong: bad JSON (also lone surrogates, integers over 4,300 digits, nesting too deep),
     wrong types, values out of range, metadata over OpenAI's bounds, tool_choice naming an unknown tool, a
     tool result without its call, a prompt over the context (code context_length_exceeded)
401  a missing or wrong API key (code invalid_api_key)
403  without an API key: a Host header that is not the loopback, an IP address or a configured name
404  an unknown model (code model_not_found), an unknown path or stored response
413  a request body over the size limit
415  a POST whose Content-Type is not JSON
422  a well-formed request asking for something this server does not do (images, n > 1, stop sequences,
     logprobs, ...): the message says what instead. Unknown fields and tools it cannot offer are not errors
     (ignored; a tool left out is named in the response's `warnings`).
429  the queue is full (a Retry-After header says when to try again)
500  a bug or a fault inside generation: the message names the exception, never a traceback
503  the model thread has stopped, or a reply was cut off by the shutdown
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
         404: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error the client gets as OpenAI's error object with this HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(message: str, param: str | None = None) -> APIError:
    return APIError(422, message, param=param, code="unsupported")


def refuse(flag, message: str, param: str) -> None:
    """422 when a request asks for something this server does not do."""
    if flag:
        raise unsupported(message, param=param)


def from_validation(err, prefix: str = "") -> APIError:
    """pydantic's ValidationError -> one 400 naming the first field at fault (as `a.b[0].c`)."""
    first = err.errors()[0]
    param, union = prefix, False
    for part in first.get("loc", ()):
        if isinstance(part, int):
            param += f"[{part}]"
        elif _TYPE_TAG.match(part):  # a member of a Union (str, int, list[...]) is not a field
            union = True
        else:
            param += f".{part}" if param else part
    kind, msg = first.get("type", ""), first.get("msg", "invalid")
    got = first.get("input")
    if kind == "extra_forbidden":
        msg = "unknown field (not part of this API, or not supported here)"
    elif kind == "missing":
        msg = "required"
    elif union:
        msg = f"wrong type ({type(got).__name__} given)"
    shown = "" if kind in ("missing", "extra_forbidden") or union or isinstance(got, (dict, list)) else f" (got {got!r})"
    return bad(f"{param or 'request body'}: {msg}{shown}", param=param or None)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|bytes|any|list\[.*|dict\[.*|tuple\[.*|literal\[.*|function-.*)$",
                       re.IGNORECASE)
