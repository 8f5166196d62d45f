"""The outer ASGI layer of `slimtune serve`: request metrics, bearer-token auth and the body size cap, all
before FastAPI parses anything (a 401 reads no body; a 413 never buffers more than the cap)."""

from __future__ import annotations

import hmac
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.routing import Match

from slimtune.serve.metrics import ServerMetrics

OPEN_PATHS = ("/health", "/", "/favicon.ico")  # the page's shell holds no data: every call it makes needs the token


def json_error(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _route_of(app, scope) -> str:
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "other")
    return "unmatched"


class Guard:
    """The outer ASGI layer: request metrics, bearer-token auth and the body size cap, before FastAPI parses
    anything (a 413 never buffers more than the cap; a 401 reads no body)."""

    def __init__(self, app: FastAPI, metrics: ServerMetrics, token: str | None, max_body_bytes: int):
        self.app, self.metrics, self.cap = app, metrics, max_body_bytes
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, route = time.perf_counter(), _route_of(self.app, scope)
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - started)

    async def _guarded(self, scope, receive, send):
        path = scope["path"]
        if self.token and path not in OPEN_PATHS and not path.startswith("/static/"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            if not (given[:7].lower() == b"bearer " and hmac.compare_digest(given[7:].strip(), self.token)):
                return await json_error(401, {"error": "missing or wrong bearer token (Authorization: Bearer TOKEN)"},
                                   {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        cap = self.cap
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            return await json_error(413, {"error": f"body of {int(length)} bytes; at most {cap} (--max-body-bytes)"}
                               )(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # read the body here, counting: a chunked upload has no content-length to check up front
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > cap:
                too_big = json_error(413, {"error": f"body over {cap} bytes (--max-body-bytes)"})
                return await too_big(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect notice

        return await self.app(scope, replay, send)
