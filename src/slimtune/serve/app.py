"""The FastAPI app of `slimtune serve`: routes, bearer-token auth, body and text limits, Prometheus
metrics, dynamic batching, server-sent generation, feedback, and atomic hot reload.

Nothing here logs a request body or a token: uvicorn's access log has the method, path and status only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimtune.errors import SlimtuneError
from slimtune.feedback import FeedbackStore
from slimtune.serve.backends import Backend, load_backend
from slimtune.serve.batcher import Batcher, QueueFull
from slimtune.serve.guard import Guard, json_error
from slimtune.serve.metrics import ROLLING, ServerMetrics

log = logging.getLogger("slimtune.serve")
PAGE = Path(__file__).with_name("page")


@dataclass(frozen=True)
class ServeOptions:
    model_dir: str
    token: str | None = None
    max_batch: int | None = None  # None: the backend's own (32 in torch, 1 for an int8 ONNX graph: measured)
    max_wait_ms: float = 0.0  # the model idle: run at once; busy: whatever queued meanwhile forms the batch
    max_queue: int = 256  # texts (or prompts) waiting, and the most one request may send
    max_body_bytes: int = 1 << 20
    max_text_chars: int = 10_000
    feedback: str | None = None
    threads: int | None = None


class FieldError(Exception):
    """A request field that is well-formed JSON but unacceptable: 422 naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] | None = None
    pairs: list[tuple[str, str]] | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    max_new_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.7, ge=0.0, le=10.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    seed: int = 0
    stream: bool = True


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    pair: str | None = None
    label: str
    predicted: str | None = None
    model_version: str | None = None


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_dir: str | None = None


class Serving:
    """One model version and its batcher: a reload builds a new one and swaps the reference."""

    def __init__(self, backend: Backend, options: ServeOptions, metrics: ServerMetrics):
        self.backend = backend
        self.max_batch = options.max_batch or backend.max_batch
        self.batcher = Batcher(backend.classify, self.max_batch, options.max_wait_ms, options.max_queue,
                               on_batch=metrics.batch_size.observe, on_depth=metrics.queue_depth.set)


class ServerState:
    def __init__(self, options: ServeOptions, backend: Backend):
        self.options, self.metrics = options, ServerMetrics()
        self.current = Serving(backend, options, self.metrics)
        self.metrics.serving(backend.version, backend.runtime)
        self.store = FeedbackStore(options.feedback) if options.feedback else None
        self.disagreement: tuple[int, float | None] = (0, None)  # (recent feedback rows, share disagreeing)
        if self.store is not None:
            self._update_disagreement()
        self.reload_lock = asyncio.Lock()
        self.generation = ThreadPoolExecutor(1, thread_name_prefix="slimtune-generate")
        self.generations_waiting = 0
        self.started = time.time()

    def _update_disagreement(self) -> None:
        n, share = self.store.disagreement(ROLLING)
        self.disagreement = (n, share)
        self.metrics.disagreement.set(share or 0.0)

    async def reload(self, model_dir: str | None) -> dict:
        async with self.reload_lock:
            target = model_dir or self.options.model_dir
            old = self.current
            try:
                backend = await asyncio.get_running_loop().run_in_executor(
                    None, load_backend, target, self.options.threads)
            except SlimtuneError:
                self.metrics.reloads.labels(result="refused").inc()
                raise
            if backend.kind != old.backend.kind or backend.labels != old.backend.labels:
                self.metrics.reloads.labels(result="refused").inc()
                raise SlimtuneError(f"{target}: serves {backend.kind} {backend.labels or ''}, the server serves "
                                    f"{old.backend.kind} {old.backend.labels or ''}; start a new server for it")
            new = Serving(backend, self.options, self.metrics)
            new.batcher.start()
            self.current = new  # atomic: requests from now on queue on the new version
            self.metrics.serving(backend.version, backend.runtime)
            self.metrics.reloads.labels(result="switched").inc()
            await old.batcher.close()  # what was queued on the old version finishes on it
            log.info("serving %s (was %s)", backend.version, old.backend.version)
            return {"model_version": backend.version, "previous": old.backend.version}


def create_app(options: ServeOptions, backend: Backend) -> FastAPI:
    """The app for a backend already loaded (loading first means a bad model directory is a one-line error
    before any port is bound)."""
    state = ServerState(options, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.current.batcher.start()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload_on_signal()))
        yield
        await state.current.batcher.close()  # uvicorn has drained the connections: finish the queue
        state.generation.shutdown(wait=True)
        if state.store is not None:
            state.store.close()

    async def _reload_on_signal():
        try:
            await state.reload(None)
        except SlimtuneError as e:
            log.error("SIGHUP reload refused: %s", e)

    app = FastAPI(title="slimtune serve", version="1", lifespan=lifespan,
                  description="A slimtune model over HTTP. Every route but /health needs `Authorization: Bearer "
                              "TOKEN` when the server was started with a token.")
    app.state.slimtune = state

    # --------------------------------------------------------------- errors: one line, the field named
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]  # no input echo
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return json_error(422, {"error": f"{where}: {first['msg']}", "detail": errors})

    @app.exception_handler(FieldError)
    async def _field(request: Request, exc: FieldError):
        return json_error(422, {"error": str(exc), "detail": [{"loc": ["body", *exc.field.split(".")],
                                                           "msg": exc.message}]})

    @app.exception_handler(SlimtuneError)
    async def _slimtune(request: Request, exc: SlimtuneError):
        return json_error(422, {"error": str(exc)})

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull):
        return json_error(429, {"error": f"busy: {exc}; retry shortly"}, {"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return json_error(exc.status_code, {"error": str(exc.detail)}, getattr(exc, "headers", None))

    # ----------------------------------------------------------------------------------------- routes
    @app.get("/health", tags=["ops"])
    async def health():
        return {"status": "ok", "model_version": state.current.backend.version}

    @app.get("/metrics", tags=["ops"])
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", tags=["model"])
    async def info():
        b = state.current.backend
        return {"kind": b.kind, "labels": b.labels, "paired": b.paired, "model_version": b.version,
                "runtime": b.runtime}

    @app.get("/v1/status", tags=["ops"])
    async def status():
        b = state.current.backend
        n, share = state.disagreement
        return {"model_version": b.version, "model_dir": str(b.path), "kind": b.kind, "runtime": b.runtime,
                "uptime_s": round(time.time() - state.started, 1), "queue_depth": state.current.batcher.waiting,
                "predictions_seen": len(state.metrics.recent), "rolling_confidence": state.metrics.rolling_mean(),
                "feedback": {"store": options.feedback, "recent_rows": n, "disagreement": share},
                "max_batch": state.current.max_batch, "max_wait_ms": options.max_wait_ms}

    @app.post("/v1/classify", tags=["model"])
    async def classify(body: ClassifyRequest, request: Request):
        serving = state.current
        b = serving.backend
        if b.kind != "classify":
            raise FieldError("texts", "this server serves a causal language model; use /v1/generate")
        if (body.texts is None) == (body.pairs is None):
            raise FieldError("texts", 'send exactly one of "texts" or "pairs"')
        if body.pairs is not None and not b.paired:
            raise FieldError("pairs", "this model classifies single texts; send \"texts\"")
        if body.texts is not None and b.paired:
            raise FieldError("texts", "this model was trained on text pairs; send \"pairs\": [[a, b], ...]")
        items = body.texts if body.texts is not None else body.pairs
        field = "texts" if body.texts is not None else "pairs"
        if not items:
            raise FieldError(field, "at least one is needed")
        if len(items) > options.max_queue:
            raise FieldError(field, f"{len(items)} in one request; at most {options.max_queue} (--max-queue)")
        for i, item in enumerate(items):
            for j, text in enumerate([item] if field == "texts" else item):
                if len(text) > options.max_text_chars:
                    where = f"{field}.{i}" + (f".{j}" if field == "pairs" else "")
                    raise FieldError(where, f"{len(text)} characters; at most {options.max_text_chars} "
                                            "(--max-text-chars)")
        texts = list(body.texts) if body.texts is not None else [a for a, _ in body.pairs]
        pairs = None if body.pairs is None else [p for _, p in body.pairs]
        results = await _until_disconnect(request, serving.batcher.submit(texts, pairs))
        state.metrics.predicted(results)
        return {"predictions": results, "model_version": b.version}

    @app.post("/v1/generate", tags=["model"])
    async def generate(body: GenerateRequest, request: Request):
        b = state.current.backend
        if b.kind != "generate":
            raise FieldError("prompt", "this server serves a classifier; use /v1/classify")
        if len(body.prompt) > options.max_text_chars:
            raise FieldError("prompt", f"{len(body.prompt)} characters; at most {options.max_text_chars} "
                                       "(--max-text-chars)")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, b.check_prompt, body.prompt, body.max_new_tokens)
        except SlimtuneError as e:
            raise FieldError("prompt", str(e)) from None
        if state.generations_waiting >= options.max_queue:
            raise QueueFull(f"{state.generations_waiting} prompts are waiting")
        sampling = body.model_dump(include={"max_new_tokens", "temperature", "top_p", "top_k", "seed"})
        events = _generation(state, b, body.prompt, sampling)
        if body.stream:
            return StreamingResponse(_server_sent_events(events, b.version), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = None
        async for kind, value in events:  # a plain JSON answer: the same generation, collected
            if kind == "done":
                text = value
            elif kind == "error":
                raise SlimtuneError(value)
        return {"text": text, "model_version": b.version}

    @app.post("/v1/feedback", tags=["model"])
    async def feedback(body: FeedbackRequest):
        b = state.current.backend
        if state.store is None:
            raise StarletteHTTPException(503, "no feedback store: start the server with --feedback DB")
        if b.kind != "classify":
            raise FieldError("label", "this model generates text and has no labels")
        for field in ("label", "predicted"):
            value = getattr(body, field)
            if value is not None and value not in b.labels:
                raise FieldError(field, f"{value!r} is not one of the model's labels ({', '.join(b.labels)})")
        for field in ("text", "pair"):
            value = getattr(body, field)
            if value is not None and len(value) > options.max_text_chars:
                raise FieldError(field, f"{len(value)} characters; at most {options.max_text_chars}")
        loop = asyncio.get_running_loop()
        row = await loop.run_in_executor(None, lambda: state.store.add(
            body.text, body.label, predicted=body.predicted, model_version=body.model_version or b.version,
            pair=body.pair))
        state.metrics.feedback.inc()
        await loop.run_in_executor(None, state._update_disagreement)
        return {"id": row, "stored": True}

    @app.post("/admin/reload", tags=["ops"])
    async def reload(body: ReloadRequest | None = None):
        return await state.reload(body.model_dir if body else None)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE / "index.html")

    app.mount("/static", StaticFiles(directory=PAGE), name="static")
    return Guard(app, state.metrics, options.token, options.max_body_bytes)


async def _until_disconnect(request: Request, work):
    """Await `work`, cancelling it if the client goes away first (its queued texts are then never run)."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise StarletteHTTPException(499, "client closed the request")
    return task.result()


class _StopGeneration(Exception):
    """Raised inside the model's streamer when the client has gone: generation stops at the next token."""


async def _generation(state: ServerState, backend: Backend, prompt: str, sampling: dict):
    """(kind, value) as the model decodes: `token` (each decoded piece), then `done` (the whole text) or
    `error`. Generation runs on the server's generation thread; when the consumer stops (the client left),
    the model stops at its next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()

    def put(kind: str, value: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def write(piece: str) -> None:
        if gone.is_set():
            raise _StopGeneration
        if piece:
            put("token", piece)

    def work() -> None:
        loop.call_soon_threadsafe(_one_less_waiting, state)
        if gone.is_set():  # the client left while the prompt waited its turn
            return
        try:
            put("done", backend.generate(prompt, sampling, write))
        except _StopGeneration:
            pass
        except SlimtuneError as e:
            put("error", str(e))
        except Exception:
            log.exception("generation failed")
            put("error", "internal error (see the server's log)")

    state.generations_waiting += 1
    loop.run_in_executor(state.generation, work)
    try:
        while True:
            kind, value = await queue.get()
            yield kind, value
            if kind != "token":
                return
    finally:
        gone.set()


async def _server_sent_events(events, version: str):
    try:
        async for kind, value in events:
            payload = {"text": value} if kind == "token" else (
                {"text": value, "model_version": version} if kind == "done" else {"error": value})
            yield f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"
    finally:
        await events.aclose()  # a client that left stops the model now, not when the generator is collected


def _one_less_waiting(state: ServerState) -> None:
    state.generations_waiting -= 1


def run_server(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Load the model (a bad directory is a one-line error before any port is bound), then serve until
    SIGINT / SIGTERM, which stop taking connections and drain the requests in flight."""
    import uvicorn

    backend = load_backend(options.model_dir, options.threads)
    app = create_app(options, backend)
    where = f"http://{host}:{port}"
    print(f"serving {backend.kind} model {backend.version} ({backend.runtime}) on {where}  "
          f"playground: {where}/  docs: {where}/docs  metrics: {where}/metrics"
          + ("  (bearer token required)" if options.token else ""), flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                            server_header=False, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn drains, restores this handler and re-raises the signal: a drained SIGTERM then exits 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
    if not server.started:  # the port was taken or the address is wrong: uvicorn logged why
        raise SlimtuneError(f"could not listen on {host}:{port} (see the message above)")
