"""`pydiff serve --ray`: the server on Ray Serve (the `[ray]` extra), scaled out over a cluster.

Two deployments: `PydiffIngress`, the HTTP API of `pydiff serve` (app.py's routes, the same
parsing), and `PydiffEngine`, replicas that each load the models and batch with pydiff's own
engine (the step-level `StepScheduler` by default, not `@serve.batch`, which batches only whole
requests). The ingress gives a request without a seed one before routing it, so that the request
is the same wherever it runs; when the replica running it dies, the ingress sends it again to
another, with a bounded number of attempts and backoff, and the client gets the images the dead
replica would have made, bit for bit (the step policy's images do not depend on what else ran).
Only when every attempt fails is the answer a 503 (`replicas_unavailable`). docs/ray.md says how
to deploy it on a cluster.

    from pydiff.serving.ray_serve import build_app, deploy
    url = deploy(build_app(["digits"], num_replicas=2), port=8000)

or, with a Serve config file: `serve run pydiff.serving.ray_serve:app_builder models=digits`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time

from prometheus_client import Counter

from pydiff import ops
from pydiff.sampling import random_seed
from pydiff.serving.api import ApiError, Limits
from pydiff.serving.app import ServerState, create_app, load_pipeline
from pydiff.serving.metrics import Metrics

INGRESS = "PydiffIngress"
ENGINE = "PydiffEngine"
# pydiff's defaults (docs/ray.md): one replica, one thread each, the step policy; a replica takes
# up to 16 requests at once (the rows of one network call, --max-batch), and autoscaling aims at
# 8 in flight per replica (enough to batch, a second replica before the first's queue grows)
DEFAULTS = dict(
    num_replicas=1,
    threads=1,
    policy="step",
    max_ongoing_requests=16,
    target_ongoing_requests=8.0,
    max_attempts=4,
    backoff_s=0.5,
    max_backoff_s=4.0,
    health_check_period_s=5.0,
    health_check_timeout_s=30.0,
)


def _retryable() -> tuple[type[BaseException], ...]:
    """What a lost replica (or node) raises at the caller: the request may run again elsewhere."""
    import ray.exceptions as rex  # the [ray] extra: imported only where a Ray deployment runs
    import ray.serve.exceptions as sex

    return (
        rex.RayActorError,  # ActorDiedError, ActorUnavailableError: the replica died or is unreachable
        rex.NodeDiedError,
        rex.WorkerCrashedError,
        rex.ObjectLostError,
        sex.ReplicaUnavailableError,
        sex.DeploymentUnavailableError,
        sex.BackPressureError,
    )


def _api_error(status: int, body: dict, headers: dict) -> ApiError:
    err = body.get("error", {})
    return ApiError(
        status,
        err.get("message", ""),
        param=err.get("param"),
        type=err.get("type", "invalid_request_error"),
        code=err.get("code"),
        headers=headers,
    )


class EngineReplica:
    """One engine replica: the models loaded with `threads` threads each, `pydiff serve`'s
    `ServerState` (engine, policy, limits) running their work. Its constructor returns once
    the models are loaded and warmed, so Serve routes to it only then; `check_health` is its
    readiness."""

    def __init__(
        self,
        models,
        *,
        backend="auto",
        threads=1,
        policy="step",
        max_queue=64,
        max_batch=16,
        timeout_s=300.0,
        limits: Limits | None = None,
        warm=True,
        load_timeout_s=600.0,
    ):
        if threads:
            ops.set_num_threads(int(threads))  # the fused step's OpenMP threads, this process only
        pipelines = {}
        for m in models:
            pipe = load_pipeline(m, backend, threads=threads or None)
            pipelines[pipe.package.name] = pipe
        self.state = ServerState(
            pipelines,
            policy=policy,
            max_queue=max_queue,
            max_batch=max_batch,
            timeout_s=timeout_s,
            limits=limits,
            warm=warm,
        )
        self.state.start()
        stop = time.monotonic() + load_timeout_s
        while self.state.status == "loading" and time.monotonic() < stop:
            time.sleep(0.05)
        if not self.state.ready:  # Serve replaces a replica whose constructor fails
            raise RuntimeError(
                f"pydiff engine replica not ready: {self.state.status} {self.state.load_error}"
            )

    async def run(self, kind: str, body: dict, openai: bool, timeout_s: float):
        """One request's answer as (status, body, headers): 200 and the response, or an error."""
        try:
            answer = await self.state.start_work(
                kind, body, openai=openai, deadline=time.monotonic() + timeout_s
            )
            return 200, await answer, {}
        except ApiError as e:
            return e.status, e.body(), e.headers

    async def run_stream(self, kind: str, body: dict, timeout_s: float):
        """The same with progress: yields {"event": "started"} (or one "error"), the "queued" and
        "step" events (previews in base64), then "done" with the response or "error"."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(ev):
            if isinstance(ev.get("preview_png"), bytes):
                ev["preview_png"] = base64.b64encode(ev["preview_png"]).decode("ascii")
            loop.call_soon_threadsafe(events.put_nowait, ev)

        try:
            answer = await self.state.start_work(
                kind, body, openai=False, deadline=time.monotonic() + timeout_s, on_event=on_event
            )
        except ApiError as e:
            yield {"event": "error", "status": e.status, "body": e.body(), "headers": e.headers}
            return
        yield {"event": "started"}
        task = asyncio.ensure_future(answer)
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not events.empty():
                    yield events.get_nowait()
                break
            try:
                yield {"event": "done", "body": task.result()}
            except ApiError as e:
                yield {"event": "error", "status": e.status, "body": e.body(), "headers": e.headers}
        finally:
            task.cancel()

    def readiness(self) -> dict:
        return {**self.state.readiness(), "pid": os.getpid()}

    def model_cards(self) -> list[dict]:
        return self.state.model_cards()

    def check_health(self) -> None:
        """Serve's health check: the replica is ready and its engine threads run."""
        if not self.state.ready:
            raise RuntimeError(f"pydiff engine replica is {self.state.status}")
        if not all(t.is_alive() for t in self.state.engine._threads):
            raise RuntimeError("pydiff engine replica: an engine thread stopped")


class RayIngressState:
    """The ingress's side of `create_app(state=...)`: the routes of `pydiff serve`, their work
    sent to `engine` (a Serve DeploymentHandle of `EngineReplica`) with seeds, retries and a
    deadline."""

    def __init__(
        self,
        engine,
        *,
        api_key=None,
        timeout_s=300.0,
        limits: Limits | None = None,
        max_attempts=DEFAULTS["max_attempts"],
        backoff_s=DEFAULTS["backoff_s"],
        max_backoff_s=DEFAULTS["max_backoff_s"],
    ):
        self.engine = engine
        self.api_key = api_key or None
        self.timeout_s = float(timeout_s)
        self.limits = limits or Limits()
        self.max_attempts = max(1, int(max_attempts))
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.inflight = 0
        self.metrics = Metrics(queue_depth=lambda: self.inflight)
        self.retries = Counter(
            "pydiff_ray_retries",
            "Requests sent again to another engine replica, by the error that lost them",
            ["error"],
            registry=self.metrics.registry,
        )
        self.status = "ready"  # Serve routes to the ingress once the engine deployment is up
        self.load_error = None
        self._cards: list[dict] | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def start(self) -> None: ...

    def begin_drain(self) -> None:
        self.status = "draining"

    def close(self) -> None: ...

    def idle(self) -> bool:
        return self.inflight == 0

    def enter(self) -> None:
        self.inflight += 1  # the event loop's thread only

    def leave(self) -> None:
        self.inflight -= 1

    async def readiness(self) -> dict:
        """An engine replica's readiness (ApiError 503 when none answers within 10 s)."""
        try:
            body = await asyncio.wait_for(_awaited(self.engine.readiness.remote()), 10.0)
        except Exception as e:  # noqa: BLE001 - no replica: not ready, whatever the reason
            raise ApiError(
                503,
                f"no engine replica is ready: {type(e).__name__}: {e}",
                type="service_unavailable",
                code="replicas_unavailable",
                headers={"Retry-After": "5"},
            ) from None
        return {**body, "status": self.status if body.get("status") == "ready" else body.get("status")}

    async def model_cards(self) -> list[dict]:
        if self._cards is None:
            self._cards = await self._call(self.engine.model_cards, (), time.monotonic() + 30.0)
        return self._cards

    async def start_work(self, kind: str, body: dict, *, openai: bool, deadline: float, on_event=None):
        if body.get("seed") is None:  # before routing: a retry on another replica is the same request
            body = {**body, "seed": random_seed()}
        if on_event is None:
            return self._run(kind, body, openai, deadline)
        stream, first = await self._open_stream(kind, body, deadline)
        return self._follow(stream, first, kind, body, deadline, on_event)

    async def _run(self, kind, body, openai, deadline) -> dict:
        status, out, headers = await self._call(self.engine.run, (kind, body, openai), deadline, timed=True)
        if status != 200:
            raise _api_error(status, out, headers)
        return out

    async def _call(self, method, args, deadline, timed=False):
        """`method.remote(*args)` (plus the time left when `timed`), sent again on a lost replica."""
        retryable, last = _retryable(), None
        for attempt in range(self.max_attempts):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            response = method.remote(*args, left) if timed else method.remote(*args)
            try:
                out = await asyncio.wait_for(_awaited(response), left)
            except TimeoutError:
                response.cancel()
                break
            except retryable as e:
                last = e
                self.retries.labels(type(e).__name__).inc()
                await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2**attempt))
                continue
            except asyncio.CancelledError:
                response.cancel()  # the client left: the replica cancels the work at its next step
                raise
            if timed and out[0] == 503 and out[1]["error"].get("code") == "shutting_down":
                last = RuntimeError("the replica is shutting down")  # scaled down: another takes it
                self.retries.labels("shutting_down").inc()
                await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2**attempt))
                continue
            return out
        if last is None:
            raise ApiError(
                504,
                f"the request deadline of {self.timeout_s:g} s passed",
                type="timeout_error",
                code="deadline_exceeded",
            )
        raise ApiError(
            503,
            f"no engine replica answered: {attempt + 1} attempt(s) failed, the last with "
            f"{type(last).__name__}: {str(last).strip().splitlines()[0] if str(last).strip() else ''}",
            type="service_unavailable",
            code="replicas_unavailable",
            headers={"Retry-After": "5"},
        )

    async def _open_stream(self, kind, body, deadline):
        """A replica's event stream past its first event ("started", or the error it answers)."""
        retryable, last = _retryable(), None
        for attempt in range(self.max_attempts):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            stream = self.engine.options(stream=True).run_stream.remote(kind, body, left)
            try:
                first = await asyncio.wait_for(stream.__anext__(), left)
            except TimeoutError:
                stream.cancel()
                break
            except retryable as e:
                last = e
                self.retries.labels(type(e).__name__).inc()
                await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2**attempt))
                continue
            if first["event"] == "error":
                stream.cancel()
                raise _api_error(first["status"], first["body"], first["headers"])
            return stream, first
        raise ApiError(
            503 if last is not None else 504,
            f"no engine replica answered: {last!r}" if last is not None else "the request deadline passed",
            type="service_unavailable" if last is not None else "timeout_error",
            code="replicas_unavailable" if last is not None else "deadline_exceeded",
        )

    async def _follow(self, stream, first, kind, body, deadline, on_event) -> dict:
        """Forward the stream's events; on a lost replica, open it again elsewhere and skip the
        events already sent (the same request makes the same events)."""
        sent, retries = 0, 0
        try:
            while True:
                seen = 0
                try:
                    async for ev in stream:
                        if ev["event"] == "done":
                            return ev["body"]
                        if ev["event"] == "error":
                            raise _api_error(ev["status"], ev["body"], ev["headers"])
                        seen += 1
                        if seen > sent:
                            sent += 1
                            on_event(ev)
                    raise ApiError(500, "the engine replica's stream ended early", type="server_error")
                except _retryable() as e:
                    retries += 1
                    self.retries.labels(type(e).__name__).inc()
                    if retries >= self.max_attempts:
                        raise ApiError(
                            503,
                            f"no engine replica answered: {retries} attempt(s) failed, the last with {e!r}",
                            type="service_unavailable",
                            code="replicas_unavailable",
                        ) from None
                    await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (retries - 1)))
                    stream, first = await self._open_stream(kind, body, deadline)
        finally:
            stream.cancel()


async def _awaited(response):
    return await response


class Ingress:
    """The ingress deployment's class: `pydiff serve`'s app over `RayIngressState`."""

    def __init__(self, engine, options: dict):
        self.state = RayIngressState(engine, **options)

    def __serve_build_asgi_app__(self):
        return create_app(None, state=self.state)


def build_app(
    models=("shapes",),
    *,
    num_replicas: int = DEFAULTS["num_replicas"],
    autoscaling: dict | None = None,
    threads: int = DEFAULTS["threads"],
    max_ongoing_requests: int = DEFAULTS["max_ongoing_requests"],
    policy: str = DEFAULTS["policy"],
    max_queue: int = 64,
    max_batch: int = 16,
    timeout_s: float = 300.0,
    limits: Limits | None = None,
    backend: str = "auto",
    api_key: str | None = None,
    warm: bool = True,
    max_attempts: int = DEFAULTS["max_attempts"],
    backoff_s: float = DEFAULTS["backoff_s"],
    ingress_replicas: int = 1,
    engine_resources: dict | None = None,
    health_check_period_s: float = DEFAULTS["health_check_period_s"],
    health_check_timeout_s: float = DEFAULTS["health_check_timeout_s"],
):
    """The Serve application: `PydiffIngress` in front of `PydiffEngine` replicas.

    `num_replicas` engine replicas, or `autoscaling` (Serve's autoscaling_config: min_replicas,
    max_replicas, target_ongoing_requests (default 8), upscale_delay_s, downscale_delay_s, ...);
    each replica reserves `threads` CPUs and runs its networks and fused step on that many threads,
    takes up to `max_ongoing_requests` at once and batches them by `policy` ("step" or "single":
    the policies whose images do not depend on their neighbours, so that a retry is invisible).
    `engine_resources`: Ray custom resources each replica needs (pins replicas to nodes). The
    other options are `pydiff serve`'s."""
    from ray import serve  # the [ray] extra: only a Ray deployment needs it

    if policy not in ("step", "single"):
        raise ValueError(
            f"policy {policy!r}: on Ray only 'step' and 'single', whose images are the same on any "
            "replica whatever ran beside them (a retried request must get the same images)"
        )
    if isinstance(models, str):
        models = [m for m in models.split(",") if m]
    scaling = {"num_replicas": int(num_replicas)}
    if autoscaling:
        scaling = {
            "autoscaling_config": {
                "target_ongoing_requests": DEFAULTS["target_ongoing_requests"],
                **autoscaling,
            }
        }
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE,
        max_ongoing_requests=int(max_ongoing_requests),
        ray_actor_options={"num_cpus": float(threads), "resources": dict(engine_resources or {})},
        health_check_period_s=float(health_check_period_s),
        health_check_timeout_s=float(health_check_timeout_s),
        **scaling,
    ).bind(
        list(models),
        backend=backend,
        threads=int(threads),
        policy=policy,
        max_queue=int(max_queue),
        max_batch=int(max_batch),
        timeout_s=float(timeout_s),
        limits=limits,
        warm=warm,
    )
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name=INGRESS,
        num_replicas=int(ingress_replicas),
        ray_actor_options={"num_cpus": 0},  # it parses and waits: leave the CPUs to the engines
        max_ongoing_requests=10_000,  # the engine replicas bound the work; the ingress only waits
    )
    options = dict(
        api_key=api_key,
        timeout_s=float(timeout_s),
        limits=limits,
        max_attempts=int(max_attempts),
        backoff_s=float(backoff_s),
    )
    return ingress.bind(engine, options)


LIMIT_ARGS = ("max_prompt_chars", "max_images", "max_steps", "max_image_side")


def app_builder(args: dict):
    """`build_app` from a Serve config file's `args` (or `serve run ... key=value`): the same
    keywords, `models` a list or a comma-separated string, the limits by name, `autoscaling` a
    dict (or `min_replicas`/`max_replicas`/`target_ongoing_requests` at the top level)."""
    args = dict(args)
    limits = {k: int(args.pop(k)) for k in LIMIT_ARGS if k in args}
    auto = dict(args.pop("autoscaling", None) or {})
    for key in (
        "min_replicas",
        "max_replicas",
        "target_ongoing_requests",
        "upscale_delay_s",
        "downscale_delay_s",
    ):
        if key in args:
            auto[key] = float(args.pop(key)) if key.endswith(("_s", "requests")) else int(args.pop(key))
    for key in ("num_replicas", "threads", "max_ongoing_requests", "max_queue", "max_batch", "max_attempts"):
        if key in args:
            args[key] = int(args[key])
    if isinstance(args.get("warm"), str):
        args["warm"] = args["warm"].lower() not in ("0", "false", "no")
    return build_app(
        args.pop("models", ("shapes",)),
        autoscaling=auto or None,
        limits=Limits(**limits) if limits else None,
        **args,
    )


def available() -> bool:
    """Ray Serve imports (the [ray] extra is installed)."""
    try:
        import ray.serve  # noqa: F401 - the [ray] extra, checked for
    except ImportError:
        return False
    return True


def undeploy(name="pydiff") -> None:
    """Delete the application `name` from the cluster this process is connected to."""
    from ray import serve  # the [ray] extra

    serve.delete(name)


def connect(address=None) -> None:
    """Join the Ray cluster at `address` (see `deploy`), unless this process already has."""
    import ray  # the [ray] extra

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)


def deploy(app, *, host="127.0.0.1", port=8000, name="pydiff", address=None) -> str:
    """Run `app` (from `build_app`) on the Ray cluster at `address` (default: $RAY_ADDRESS or the
    cluster `ray start` began on this machine, else a new local one), its HTTP proxy on host:port;
    returns the URL once every deployment is up."""
    from ray import serve  # the [ray] extra

    connect(address)
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(app, name=name, route_prefix="/")
    return f"http://{host}:{port}"


__all__ = [
    "build_app",
    "app_builder",
    "deploy",
    "undeploy",
    "available",
    "EngineReplica",
    "RayIngressState",
    "DEFAULTS",
]
