"""The ASGI app of `pydiff serve` (Starlette): the OpenAI-compatible images endpoint, pydiff's
own endpoints with per-step progress as Server-Sent Events, models, health, readiness, metrics,
bearer-token auth and the web page at `/`.

Work runs on the `Engine`'s threads; the event loop only parses, waits and answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import threading
import time
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pydiff.backends.ort import server_session_options
from pydiff.errors import ModelOutputError, NonFiniteError
from pydiff.pipeline import Pipeline, load
from pydiff.pipeline.requests import ColorizeRequest, GenerateRequest
from pydiff.serving import api
from pydiff.serving.api import ApiError, Limits
from pydiff.serving.engine import CancelledJobError, Engine, QueueFullError, ShuttingDownError, Work
from pydiff.serving.metrics import Metrics

PAGE = Path(__file__).with_name("static") / "index.html"
WORK_PATHS = (
    "/v1/images/generations",
    "/v1/generate",
    "/v1/inpaint",
    "/v1/img2img",
    "/v1/upscale",
    "/v1/colorize",
)
OPEN_PATHS = ("/", "/healthz", "/readyz")  # answered without the API key: they do no work


class ServerState:
    """The models, the engine, readiness and the shutdown drain of one app."""

    def __init__(
        self,
        models,
        *,
        backend="auto",
        api_key=None,
        policy="single",
        max_queue=64,
        max_batch=16,
        timeout_s=300.0,
        limits: Limits | None = None,
        warm=True,
    ):
        self.models = models
        self.backend = backend
        self.api_key = api_key or None
        self.timeout_s = float(timeout_s)
        self.limits = limits or Limits()
        self.warm = warm
        self.pipelines: dict[str, Pipeline] = {}
        self.metrics = Metrics(queue_depth=lambda: self.engine.queue_depth)
        self.engine = Engine(
            self.pipelines, policy=policy, max_queue=max_queue, max_batch=max_batch, metrics=self.metrics
        )
        self.status = "loading"  # loading | ready | failed | draining
        self.load_error: str | None = None
        self.inflight = 0
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None

    def start(self) -> None:
        """Load and warm the models in the background: /healthz answers meanwhile, /readyz says 503."""
        if self._loader is None:
            self._loader = threading.Thread(target=self._load, name="pydiff-load", daemon=True)
            self._loader.start()

    def _load(self) -> None:
        try:
            items = self.models.items() if isinstance(self.models, dict) else [(None, m) for m in self.models]
            loaded = {}
            for name, m in items:
                pipe = m if isinstance(m, Pipeline) else load_pipeline(m, self.backend)
                loaded[name or pipe.package.name] = pipe
            if self.warm:
                for pipe in loaded.values():
                    _warm(pipe)
            self.pipelines.update(loaded)
            if self.status == "loading":
                self.status = "ready"
        except Exception as e:  # noqa: BLE001 - reported by /readyz, and the server stays up
            self.status, self.load_error = "failed", f"{type(e).__name__}: {e}"

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def begin_drain(self) -> None:
        """Shutdown, first half: new work gets 503; queued and running work finishes."""
        self.status = "draining"
        self.engine.drain()

    def idle(self) -> bool:
        return self.inflight == 0 and not self.engine.busy

    def enter(self) -> None:
        with self._lock:
            self.inflight += 1

    def leave(self) -> None:
        with self._lock:
            self.inflight -= 1

    def close(self) -> None:
        self.engine.close()

    def readiness(self) -> dict:
        """/readyz's body (200 when `ready`)."""
        body = {"status": self.status, "models": list(self.pipelines), "queue_depth": self.engine.queue_depth}
        if self.load_error:
            body["error"] = self.load_error
        return body

    def model_cards(self) -> list[dict]:
        return [_model_card(n, p) for n, p in self.pipelines.items()]

    async def start_work(self, kind: str, body: dict, *, openai: bool, deadline: float, on_event=None):
        """Start one work request: `body` (JSON or multipart fields) parsed for `kind` (or the
        OpenAI endpoint), planned and queued, or ApiError. Returns the coroutine of its answer (a
        dict, or ApiError), waited for until `deadline` (monotonic). `on_event(ev)`, when given,
        gets the progress events with preview PNGs (from the engine's thread)."""
        if openai:
            parsed = await run_in_threadpool(api.parse_openai, body, self.pipelines, self.limits)
        else:
            parsed = await run_in_threadpool(api.parse_request, kind, body, self.pipelines, self.limits)
        pipe = self.pipelines[parsed.model]
        plan = await run_in_threadpool(api.plan_request, pipe, parsed, self.limits, openai)
        w = Work(
            parsed.model,
            parsed.request,
            plan,
            parsed.seed_given,
            previews=on_event is not None,
            on_event=on_event,
        )
        try:
            job = self.engine.submit(w)
        except QueueFullError as e:
            raise ApiError(
                429,
                f"{e}; retry after {e.retry_after} s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        except ShuttingDownError as e:
            raise ApiError(503, str(e), type="service_unavailable", code="shutting_down") from None
        return self._answer(job, parsed, plan, openai, deadline)

    async def _answer(self, job, parsed, plan, openai: bool, deadline: float) -> dict:
        try:
            result = await _wait(self, job, deadline)
            if openai:
                return await run_in_threadpool(api.openai_response, parsed, plan, result)
            return await run_in_threadpool(api.generate_response, job.id, parsed, plan, result)
        finally:
            job.cancel()  # no-op once done; stops the work when the answer failed or was dropped


def load_pipeline(model, backend="auto", threads: int | None = None) -> Pipeline:
    """The pipeline a server runs `model` on: ONNX Runtime sessions whose idle threads block
    (`server_session_options`) rather than spin against the server's other work, with `threads`
    intra-op threads each (default: ONNX Runtime's, one per core)."""
    options = {}
    if isinstance(backend, str) and backend.lower() in ("auto", "onnxruntime", "ort"):
        options["session_options"] = server_session_options()
        if threads:
            options["session_options"].intra_op_num_threads = int(threads)
    return load(model, backend=backend, **options)


def _warm(pipe: Pipeline) -> None:
    """One 2-step image per model: the sessions' first runs (allocations, kernels) happen here."""
    steps = {s.name: 2 for s in pipe.package.stages}
    first = pipe.package.stages[0]
    if first.image_condition is not None:  # a colorization package runs colorize requests only
        grey = np.zeros((first.resolution, first.resolution), np.float32)
        pipe.execute(pipe.plan(ColorizeRequest(image=grey, steps=steps, seed=0, progress=False)))
        return
    try:
        plan = pipe.plan(GenerateRequest(steps=steps, seed=0, progress=False, output_type="numpy"))
    except ValueError:  # a class network with no "no class" label needs a label
        plan = pipe.plan(
            GenerateRequest(class_label=0, guidance_scale=1.0, steps=steps, seed=0, progress=False)
        )
    pipe.execute(plan)


class InflightMiddleware:
    """Counts work requests until their last byte (streams included) and, while the server
    drains for shutdown, answers new ones 503."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in WORK_PATHS:
            return await self.app(scope, receive, send)
        if self.state.status == "draining":
            self.state.metrics.error("shutting_down")
            err = ApiError(
                503, "the server is shutting down", type="service_unavailable", code="shutting_down"
            )
            return await _error_response(err)(scope, receive, send)
        self.state.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.leave()


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(models, *, state=None, **options) -> Starlette:
    """The app for `models`: a list of package names or paths, or a dict name -> path or
    `Pipeline`. Options: backend, api_key, policy, max_queue, max_batch, timeout_s, limits
    (`Limits`), warm. `app.state.pydiff` is the `ServerState`.

    `state` replaces the `ServerState` (models and options then unused): any object with its
    interface (`api_key`, `limits`, `timeout_s`, `metrics`, `status`, `ready`, `start`,
    `begin_drain`, `close`, `enter`, `leave`, `readiness`, `model_cards` (both may be
    coroutines), `start_work`). The Ray Serve ingress (`pydiff.serving.ray_serve`) is one: the same
    routes, its work run on engine replicas."""
    state = state if state is not None else ServerState(models, **options)

    def endpoint(name, fn, auth=True):
        async def handler(request: Request):
            t0 = time.monotonic()
            try:
                if auth:
                    _check_auth(state, request)
                response = await fn(request, t0)
            except ApiError as e:
                state.metrics.error(_error_kind(e))
                response = _error_response(e)
            except Exception as e:  # noqa: BLE001 - nothing a client sends stops the server
                state.metrics.error("internal")
                response = _error_response(
                    ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
                )
            state.metrics.requests.labels(name, str(response.status_code)).inc()
            if name in WORK_PATHS:
                state.metrics.request_latency.labels(name).observe(time.monotonic() - t0)
            return response

        return handler

    async def page(request, t0):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def healthz(request, t0):
        return JSONResponse({"status": "ok"})

    async def readyz(request, t0):
        return JSONResponse(await _maybe_await(state.readiness()), status_code=200 if state.ready else 503)

    async def metrics(request, t0):
        return Response(state.metrics.exposition(), media_type=state.metrics.content_type)

    async def models(request, t0):
        return JSONResponse({"object": "list", "data": await _maybe_await(state.model_cards())})

    async def model(request, t0):
        name = request.path_params["name"]
        cards = {c["id"]: c for c in await _maybe_await(state.model_cards())}
        if name not in cards:
            raise ApiError(
                404,
                f"unknown model {name!r}; this server has {list(cards)}",
                param="model",
                code="model_not_found",
            )
        return JSONResponse(cards[name])

    def work(kind, openai=False):
        async def run(request: Request, t0):
            if not state.ready:
                raise ApiError(
                    503,
                    f"the server is {state.status}",
                    type="service_unavailable",
                    code=state.status,
                    headers={"Retry-After": "5"},
                )
            body = api.parse_body(
                await _read_body(request, state.limits), request.headers.get("content-type", "")
            )
            stream = not openai and request.query_params.get("stream", "").lower() in ("1", "true", "yes")
            deadline = t0 + state.timeout_s
            if not stream:
                answer = await state.start_work(kind, body, openai=openai, deadline=deadline)
                return JSONResponse(await answer)
            events: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def on_event(ev):
                if isinstance(ev.get("preview_png"), bytes):
                    ev["preview_png"] = base64.b64encode(ev["preview_png"]).decode("ascii")
                loop.call_soon_threadsafe(events.put_nowait, ev)

            answer = await state.start_work(kind, body, openai=openai, deadline=deadline, on_event=on_event)

            async def sse():
                task = asyncio.ensure_future(answer)
                try:
                    while True:
                        getter = asyncio.ensure_future(events.get())
                        done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                        if getter in done:
                            yield _sse(getter.result())
                            continue
                        getter.cancel()
                        while not events.empty():
                            yield _sse(events.get_nowait())
                        break
                    try:
                        yield _sse({"event": "done", **task.result()})
                    except ApiError as e:
                        state.metrics.error(_error_kind(e))
                        yield _sse({"event": "error", "status": e.status, **e.body()})
                    except Exception as e:  # noqa: BLE001
                        state.metrics.error("internal")
                        err = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
                        yield _sse({"event": "error", "status": 500, **err.body()})
                finally:
                    task.cancel()

            return StreamingResponse(
                sse(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        return run

    routes = [
        Route("/", endpoint("/", page, auth=False)),
        Route("/healthz", endpoint("/healthz", healthz, auth=False)),
        Route("/readyz", endpoint("/readyz", readyz, auth=False)),
        Route("/metrics", endpoint("/metrics", metrics)),
        Route("/v1/models", endpoint("/v1/models", models)),
        Route("/v1/models/{name}", endpoint("/v1/models/{name}", model)),
        Route(
            "/v1/images/generations",
            endpoint("/v1/images/generations", work("generate", openai=True)),
            methods=["POST"],
        ),
    ]
    for kind in ("generate", "inpaint", "img2img", "upscale", "colorize"):
        routes.append(Route(f"/v1/{kind}", endpoint(f"/v1/{kind}", work(kind)), methods=["POST"]))

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        msg = "method not allowed" if status == 405 else f"no such endpoint: {request.url.path}"
        return _error_response(ApiError(status, msg, code="not_found" if status == 404 else None))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.start()
        yield
        state.begin_drain()
        state.close()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.pydiff = state
    app.add_middleware(InflightMiddleware, state=state)
    return app


async def _maybe_await(value):
    return await value if asyncio.iscoroutine(value) else value


def _check_auth(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise ApiError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer KEY'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def _read_body(request: Request, limits: Limits) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        raise ApiError(413, f"the body is {length} bytes; the limit is {limits.max_body_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise ApiError(413, f"the body is over the limit of {limits.max_body_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait(state: ServerState, job, deadline: float):
    """The job's result; ApiError 504 past the deadline, 500 naming the stage for a bad network."""
    remaining = deadline - time.monotonic()
    fut = asyncio.wrap_future(job.future)
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, even after a 504
    try:
        return await asyncio.wait_for(asyncio.shield(fut), max(0.0, remaining))
    except TimeoutError:
        job.cancel()
        where = "running" if job.started is not None else "queued"
        raise ApiError(
            504,
            f"the request deadline of {state.timeout_s:g} s passed while it was {where}",
            type="timeout_error",
            code="deadline_exceeded",
        ) from None
    except NonFiniteError as e:
        raise ApiError(
            500, f"the network returned NaN or Inf: {e}", type="server_error", code="non_finite"
        ) from None
    except ModelOutputError as e:
        raise ApiError(
            500, f"the network returned a bad output: {e}", type="server_error", code="model_output"
        ) from None
    except (ValueError, TypeError) as e:  # input only the run could check (e.g. the tokenizer's)
        raise ApiError(400, str(e)) from None
    except CancelledJobError as e:
        raise ApiError(
            504, f"the request was cancelled: {e}", type="timeout_error", code="deadline_exceeded"
        ) from None


def _error_kind(e: ApiError) -> str:
    return e.code or {
        400: "invalid_request",
        401: "unauthorized",
        413: "too_large",
        415: "invalid_request",
        404: "not_found",
        500: "internal",
    }.get(e.status, str(e.status))


def _sse(event: dict) -> bytes:
    name = event.get("event", "message")
    return f"event: {name}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def _model_card(name: str, pipe: Pipeline) -> dict:
    pkg = pipe.package
    defaults = {}
    try:
        plan = pipe.plan(GenerateRequest(seed=0, progress=False))
        defaults = api.settings_of(plan)
    except ValueError:
        try:
            defaults = api.settings_of(pipe.plan(GenerateRequest(class_label=0, seed=0, progress=False)))
        except ValueError:
            pass
    last = pkg.stages[-1]
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "pydiff",
        "pydiff": {
            "stages": [
                {
                    "name": s.name,
                    "resolution": s.resolution,
                    "channels": s.channels,
                    "conditioning": s.conditioning,
                    **({"num_classes": s.num_classes} if s.conditioning == "class" else {}),
                }
                for s in pkg.stages
            ],
            "size": f"{last.resolution}x{last.resolution}",
            "text": any(s.conditioning == "text" for s in pkg.stages),
            "defaults": defaults,
            "kinds": ["colorize"]
            if pkg.stages[0].image_condition is not None
            else ["generate", "inpaint", "img2img"]
            + (["upscale"] if any(s.is_super_resolution for s in pkg.stages) else []),
        },
    }


__all__ = ["create_app", "ServerState"]
