"""The serving engine: a bounded queue of planned calls and the worker that runs them on the
pipelines, with per-step progress events.

The interface the server uses, and that a step-level scheduler (issue 19, item 1) implements in
turn: `Engine.submit(work) -> Job` (raises `QueueFullError` or `ShuttingDownError`), each `Job`
a future for its images plus a stream of progress events, and `policy`, the way queued calls
share the network:

- ``"single"``: one request per pipeline call. A request's images are the images
  `pydiff.generate` gives for its seed.
- ``"step"``: step-level batching (`pydiff.serving.scheduler.StepScheduler`): the generate
  requests in flight share every network call, each row at its own step, sampler, guidance scale,
  thresholding and seed; a request joins at the next step and leaves when done, and its images are
  the same whatever it ran beside (they agree with `pydiff.generate`'s to float32 rounding, and
  equal them but for that with one image per request). Other kinds run alone, between ticks.
- ``"batch"``: whole-request batching. Requests waiting together that share every stage's
  settings but the guidance scale (which the kernel takes per row) run as one call, their rows
  concatenated. The core's noise depends on a row's position in its batch and on the call's one
  seed, so a request batched with others does not get the images its seed alone gives; requests
  that name a seed therefore always run alone, and only requests without one are batched (their
  response says which batch seed and rows made them).
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pydiff import imageio
from pydiff.errors import CancelledJobError, QueueFullError, ShuttingDownError
from pydiff.pipeline import Pipeline
from pydiff.pipeline.requests import GenerateRequest, Plan, Request
from pydiff.sampling import random_seed, repaint_schedule
from pydiff.serving.scheduler import StepScheduler

POLICIES = ("single", "step", "batch")


@dataclass
class Work:
    """One planned request: what `Engine.submit` takes."""

    model: str
    request: Request
    plan: Plan
    seed_given: bool  # the client named the seed (the batch policy then runs it alone)
    previews: bool = False  # send a preview PNG with each step event
    on_event: Callable[[dict], None] | None = None  # called from the worker thread


@dataclass
class Job:
    """A submitted request: `future` resolves to a `Result`; `cancel()` stops it."""

    id: str
    work: Work
    submitted: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    started: float | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return self.work.plan.batch

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: dict) -> None:
        if self.work.on_event is not None:
            try:
                self.work.on_event(event)
            except Exception:  # noqa: BLE001 - a listener's failure never stops the call
                pass


@dataclass
class Result:
    images: list  # PIL images, this request's own rows
    seed: int | None  # the seed that remakes them alone; None when batched with others
    batch: dict | None  # {"seed", "size", "rows": [start, stop]} when batched with others
    seconds: float
    queued_seconds: float


def stage_step_counts(plan: Plan) -> dict[str, int]:
    """How many callbacks (steps) each stage of `plan` makes: the progress totals."""
    out = {}
    for st in plan.stages:
        s = plan.settings[st.name]
        n = s.steps
        if plan.kind == "img2img":
            n = int(s.steps * s.strength)  # img2img starts at step steps - int(steps * strength)
        elif plan.kind == "inpaint" and not st.has_mask_channel:
            n = sum(op[0] == "step" for op in repaint_schedule(s.steps, s.jump_length, s.jump_n_sample))
        out[st.name] = n
    return out


def preview_png(x: np.ndarray, size: int = 64) -> bytes:
    """A small PNG of model array rows [n, C, H, W] (x, clipped to [-1, 1]), tiled in one row."""
    pics = imageio.to_pil(np.clip(np.asarray(x, np.float32), -1.0, 1.0))
    scale = max(1, size // max(1, pics[0].width))
    if scale > 1:
        pics = [p.resize((p.width * scale, p.height * scale), resample=0) for p in pics]
    grid = imageio.make_grid(pics, cols=len(pics), pad=1) if len(pics) > 1 else pics[0]
    return png_bytes(grid)


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class _NullMetrics:
    def observe_call(self, rows: int, requests: int) -> None: ...
    def observe_step(self, model: str, stage: str, seconds: float) -> None: ...
    def observe_images(self, model: str, n: int) -> None: ...


def _batch_key(work: Work):
    """Requests with equal keys may share one call (the batch policy)."""
    plan = work.plan
    if work.seed_given or plan.kind != "generate" or plan.guidance_type != "cfg":
        return None
    if plan.class_labels is not None and any(c is None for c in plan.class_labels):
        return None  # "no class" rows: the combined request could not say so beside labelled ones
    settings = []
    for name, s in plan.settings.items():
        d = s.as_dict()
        d.pop("guidance_scale")
        settings.append((name, tuple(sorted((k, repr(v)) for k, v in d.items()))))
    return (work.model, tuple(settings), plan.negative_prompts is None)


def _combined_request(works: list[Work], seed: int) -> GenerateRequest:
    """One generate request whose rows are the rows of `works`, in order (prompt-major each)."""
    prompts, negatives, labels = [], [], []
    gscale = {name: [] for name in works[0].plan.settings}
    for w in works:
        p = w.plan
        for j in range(p.n_prompts):
            for _ in range(p.num_images):
                if p.prompts is not None:
                    prompts.append(p.prompts[j])
                if p.negative_prompts is not None:
                    negatives.append(p.negative_prompts[j])
                if p.class_labels is not None:
                    labels.append(p.class_labels[j])
        for name, s in p.settings.items():
            gscale[name].extend(float(v) for v in s.guidance_scale)
    first = works[0].plan.settings
    per_stage = lambda key: {n: getattr(s, key) for n, s in first.items()}  # noqa: E731
    noise = {n: s.noise_aug_level for n, s in first.items() if s.noise_aug_level is not None}
    return GenerateRequest(
        prompt=prompts or None,
        negative_prompt=negatives or None,
        class_label=None if not labels or all(c is None for c in labels) else labels,
        num_images=1,
        steps=per_stage("steps"),
        sampler=per_stage("sampler"),
        thresholding=per_stage("thresholding"),
        eta={n: s.eta for n, s in first.items() if s.sampler == "ddim"} or None,
        guidance_scale=gscale,
        guidance_interval={n: s.guidance_interval or "all" for n, s in first.items()},
        noise_aug_level=noise or None,
        seed=seed,
        output_type="pil",
        progress=False,
    )


class Engine:
    """A bounded queue of planned requests and `workers` threads that run them on `pipelines`
    (model name -> `Pipeline`) by `policy` ("single" or "batch"; see the module docstring)."""

    def __init__(
        self,
        pipelines: dict[str, Pipeline],
        *,
        policy: str = "single",
        max_queue: int = 64,
        max_batch: int = 16,
        batch_wait_s: float = 0.005,
        workers: int = 1,
        metrics=None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
        if max_queue < 1 or max_batch < 1 or workers < 1:
            raise ValueError("max_queue, max_batch and workers must be >= 1")
        self.pipelines = pipelines
        self.policy = policy
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.metrics = metrics or _NullMetrics()
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._running = 0  # calls in progress
        self._closed = False
        self._draining = False
        self._recent: collections.deque[float] = collections.deque(maxlen=32)  # seconds per call
        if policy == "step":  # one scheduler thread: every request in flight shares its calls
            workers = 1
        target = self._step_worker if policy == "step" else self._worker
        self._threads = [
            threading.Thread(target=target, name=f"pydiff-engine-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ the interface

    def submit(self, work: Work) -> Job:
        """Queue `work`; raises QueueFullError (queue at `max_queue`) or ShuttingDownError."""
        if work.model not in self.pipelines:
            raise KeyError(work.model)
        with self._cv:
            if self._draining or self._closed:
                raise ShuttingDownError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(
                    f"the queue is full ({self.max_queue} requests waiting)", self.retry_after()
                )
            job = Job(id=f"job-{next(self._ids)}", work=work, submitted=time.monotonic())
            self._queue.append(job)
            self._cv.notify()
        job.emit({"event": "queued", "id": job.id, "position": self.queue_depth})
        return job

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """Work is queued or running."""
        return bool(self._queue) or self._running > 0

    def retry_after(self) -> int:
        """Seconds until a queue slot frees, estimated from recent calls (at least 1)."""
        per_call = sorted(self._recent)[len(self._recent) // 2] if self._recent else 1.0
        return max(1, math.ceil(per_call * max(1, len(self._queue)) / len(self._threads)))

    def drain(self) -> None:
        """Take no new work; what is queued or running finishes."""
        with self._cv:
            self._draining = True

    def close(self) -> None:
        """Stop the workers once the queue is empty."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    # ------------------------------------------------------------ the worker

    def _take(self) -> list[Job] | None:
        """The next call's jobs (cancelled ones dropped), or None when closed and empty."""
        with self._cv:
            while True:
                while self._queue and self._queue[0].cancelled:
                    self._drop(self._queue.popleft())
                if self._queue:
                    break
                if self._closed:
                    return None
                self._cv.wait(0.5)
            first = self._queue.popleft()
            jobs = [first]
            key = _batch_key(first.work) if self.policy == "batch" else None
            if key is not None:
                if self.batch_wait_s > 0:  # let requests that arrive together meet
                    self._cv.wait(self.batch_wait_s)
                rows = first.rows
                for job in list(self._queue):
                    if job.cancelled or _batch_key(job.work) != key or rows + job.rows > self.max_batch:
                        continue
                    self._queue.remove(job)
                    jobs.append(job)
                    rows += job.rows
            self._running += 1
            return jobs

    def _drop(self, job: Job) -> None:
        if not job.future.done():
            job.future.set_exception(CancelledJobError("cancelled before it ran"))

    def _worker(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                self._run(jobs)
            except BaseException as e:  # noqa: BLE001 - a call's failure is its requests' answer
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                with self._cv:
                    self._running -= 1
                    self._cv.notify_all()

    def _step_worker(self) -> None:
        """The "step" policy: admit what is queued, tick every model's scheduler, resolve what is done."""
        schedulers: dict[str, StepScheduler] = {}  # made on first use: the pipelines load after start
        flying: dict[int, tuple[Job, object, str]] = {}  # id(scheduled job) -> (job, scheduled, model)
        while True:
            with self._cv:
                while not self._queue and not flying and not self._closed:
                    self._cv.wait(0.5)
                if not self._queue and not flying and self._closed:
                    return
                taken = [j for j in self._queue if not j.cancelled]
                for j in self._queue:
                    if j.cancelled:
                        self._drop(j)
                self._queue.clear()
                self._running += len(taken)
            for job in taken:
                plan = job.work.plan
                if StepScheduler.accepts(plan) is not None:  # inpaint, img2img, upscale, guidance models
                    self._run_alone(job)
                    continue
                model = job.work.model
                if model not in schedulers:
                    schedulers[model] = StepScheduler(self.pipelines[model], max_batch=self.max_batch)
                plan.output_type = "pil"
                job.started = time.monotonic()
                sj = schedulers[model].submit(plan, on_step=self._step_events(job, plan))
                flying[id(sj)] = (job, sj, model)
            for model, sched in schedulers.items():
                for item in list(flying.values()):
                    job, sj, m = item
                    if m == model and job.cancelled and not sj.done:
                        sched.cancel(sj, CancelledJobError("cancelled while it ran"))
                if not sched.idle:
                    start = time.monotonic()
                    try:
                        report = sched.tick()
                    except Exception as e:  # noqa: BLE001 - pydiff's bug: fail the requests, keep serving
                        for job, sj, m in flying.values():
                            if m == model:
                                sched.cancel(sj, e)
                        schedulers[model] = StepScheduler(self.pipelines[model], max_batch=self.max_batch)
                        continue
                    for call in report.calls:
                        self.metrics.observe_call(call["rows"], call["requests"])
                        self.metrics.observe_step(model, call["stage"], time.monotonic() - start)
            for key, (job, sj, model) in list(flying.items()):
                if not sj.done:
                    continue
                del flying[key]
                if sj.error is not None:
                    if not job.future.done():
                        job.future.set_exception(sj.error)
                else:
                    seconds = time.monotonic() - job.started
                    self._recent.append(seconds)
                    self.metrics.observe_images(model, len(sj.images))
                    if not job.future.done():
                        job.future.set_result(
                            Result(
                                images=sj.images,
                                seed=sj.plan.seed,
                                batch=None,
                                seconds=seconds,
                                queued_seconds=job.started - job.submitted,
                            )
                        )
                with self._cv:
                    self._running -= 1
                    self._cv.notify_all()

    def _run_alone(self, job: Job) -> None:
        try:
            self._run([job])
        except BaseException as e:  # noqa: BLE001 - the call's failure is its request's answer
            if not job.future.done():
                job.future.set_exception(e)
        finally:
            with self._cv:
                self._running -= 1
                self._cv.notify_all()

    def _step_events(self, job: Job, plan: Plan):
        """The scheduler's per-step callback for `job`: the progress events `_run` sends."""
        totals = stage_step_counts(plan)
        counts: dict[str, int] = {}

        def on_step(stage, i, t, x):
            counts[stage] = counts.get(stage, 0) + 1
            if job.work.on_event is None or job.cancelled:
                return
            ev = {
                "event": "step",
                "id": job.id,
                "stage": stage,
                "step": counts[stage],
                "steps": totals.get(stage),
                "t": int(t),
            }
            if job.work.previews:
                ev["preview_png"] = preview_png(x)
            job.emit(ev)

        return on_step

    def _run(self, jobs: list[Job]) -> None:
        pipe = self.pipelines[jobs[0].work.model]
        start = time.monotonic()
        for job in jobs:
            job.started = start
        if len(jobs) == 1:
            plan, batch = jobs[0].work.plan, None
        else:
            seed = random_seed()
            plan = pipe.plan(_combined_request([j.work for j in jobs], seed))
            batch = {"seed": plan.seed, "size": plan.batch}
        offsets = list(itertools.accumulate([0] + [j.rows for j in jobs]))
        totals = stage_step_counts(plan)
        state = {"stage": None, "n": 0, "last": time.monotonic()}
        model = jobs[0].work.model

        def callback(stage, i, t, x):
            now = time.monotonic()
            if stage != state["stage"]:
                state["stage"], state["n"] = stage, 0
            elif state["n"] > 0:  # the first step of a stage also pays for its setup
                self.metrics.observe_step(model, stage, now - state["last"])
            state["n"] += 1
            state["last"] = now
            if all(j.cancelled for j in jobs):
                raise CancelledJobError("every request of this call was cancelled")
            for j, a, b in zip(jobs, offsets, offsets[1:]):
                if j.work.on_event is None or j.cancelled:
                    continue
                ev = {
                    "event": "step",
                    "id": j.id,
                    "stage": stage,
                    "step": state["n"],
                    "steps": totals.get(stage),
                    "t": int(t),
                }
                if j.work.previews:
                    ev["preview_png"] = preview_png(x[a:b])
                j.emit(ev)
            return None

        plan.callback = callback
        plan.output_type = "pil"
        plan.progress = False
        self.metrics.observe_call(plan.batch, len(jobs))
        images = pipe.execute(plan)
        seconds = time.monotonic() - start
        self._recent.append(seconds)
        self.metrics.observe_images(model, len(images))
        for j, a, b in zip(jobs, offsets, offsets[1:]):
            res = Result(
                images=images[a:b],
                seed=None if batch else plan.seed,
                batch=None if batch is None else {**batch, "rows": [a, b]},
                seconds=seconds,
                queued_seconds=start - j.submitted,
            )
            if not j.future.done():
                j.future.set_result(res)


__all__ = [
    "POLICIES",
    "Engine",
    "Work",
    "Job",
    "Result",
    "QueueFullError",
    "ShuttingDownError",
    "CancelledJobError",
    "stage_step_counts",
    "preview_png",
    "png_bytes",
]
