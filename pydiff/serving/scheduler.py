"""Step-level (continuous) batching across requests: one network call per stage per tick on every
active row, whatever step, sampler, guidance scale, thresholding or seed each row has.

Each request (a generate `Plan` with classifier-free guidance) runs its cascade stage by stage. At a
tick, every stage with active requests calls its network once on their rows (the conditional and
unconditional halves stacked, as `pydiff.sample` does; unguided rows in a call of their own), then
`pydiff.ops.fused_step_rows` advances every row by its own step. A request is admitted at the next
tick after it is submitted, moves on to its next stage when its last step is done, and retires with
its images. Requests are served first come, first served: at each stage the oldest requests are
taken first, up to `max_batch` rows a call (a request with more rows than that runs alone), so
none waits behind later ones.

A request's images depend on nothing but the request:

- its starting noise comes from its images' own generators, `PCG64(seed_j)` per image j
  (`Pipeline.generators`), drawn as the pipeline draws them (x_T of each stage, then the
  augmentation noise of a super-resolution stage);
- the in-kernel noise of image j at stage k is keyed by its own (seed_j + k, step), and element i
  within the sample (`fused_step_rows`): never by its row position or its neighbours. These are
  the keys `pydiff.generate` uses (seed_j = (seed + j * 0x9E3779B97F4A7C15) mod 2**64, or the
  caller's per-image seeds);
- the network is evaluated on at least two rows (a lone unguided row is evaluated twice), since ONNX
  Runtime's CPU kernels take another path at batch 1 (results 1 ulp apart); from two rows on, a row's
  output does not depend on the batch (tests/test_step_scheduler.py checks it end to end).

So a request's images are bit-identical whether it runs alone, batched with others, at any row
position, or joined mid-way by other requests. Against `pydiff.generate` with the same seed they
agree to float32 rounding (identical noise and conditioning; the network's batch differs), and for
several images per request too (each image's noise is its own there as well).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pydiff import ops
from pydiff.errors import NonFiniteError
from pydiff.guidance import in_interval
from pydiff.package import Stage
from pydiff.pipeline import Pipeline
from pydiff.pipeline.pipeline import threshold_kwargs
from pydiff.pipeline.requests import Plan
from pydiff.samplers import SAMPLERS, make_sampler


@dataclass
class _StageRun:
    """One request at one stage: its rows and where they are."""

    stage: Stage
    sampler: object
    x: np.ndarray  # [B, C, R, R]
    cond: dict
    uncond: dict
    guided_stage: bool  # classifier-free guidance at this stage (at the steps of its interval)
    scales: np.ndarray  # float32 [B]
    seeds: list[int]
    interval: tuple[float, float] | None = None  # guidance_interval: noise levels guided
    i: int = 0
    x0: np.ndarray | None = None  # the previous step's x0 (multistep samplers)

    @property
    def steps(self) -> int:
        return len(self.sampler.timesteps)

    @property
    def guided(self) -> bool:
        """Whether the next step (i) mixes conditional and unconditional outputs."""
        if not self.guided_stage or self.interval is None:  # no interval: no per-step work
            return self.guided_stage
        c = self.sampler.coefficients(self.i)
        return in_interval(self.interval, c.alpha, c.sigma)


@dataclass
class ScheduledJob:
    """A request in the scheduler. `images` is set when `done`; `error` when it failed."""

    id: int
    plan: Plan
    on_step: Callable | None = None  # on_step(stage, i, t, x) after each of its steps
    done: bool = False
    images: list | np.ndarray | None = None
    error: BaseException | None = None
    _rng: np.random.Generator | None = None
    _text: tuple | None = None
    _stage_index: int = 0
    _run: _StageRun | None = None
    _x_prev: np.ndarray | None = None


@dataclass
class TickReport:
    """What one tick did: per stage, the rows and requests of each network call."""

    calls: list[dict] = field(default_factory=list)


class StepScheduler:
    """Step-level batching of generate requests on one pipeline (see the module docstring).

    Not thread-safe: one thread submits and ticks (the serving engine's worker does both).
    """

    def __init__(self, pipe: Pipeline, *, max_batch: int = 16):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.pipe = pipe
        self.max_batch = max_batch
        self._ids = itertools.count(1)
        self._waiting: list[ScheduledJob] = []  # admitted at the next tick
        self._active: list[ScheduledJob] = []  # in submission order
        self._samplers: dict[tuple, object] = {}  # (stage, sampler, steps, eta, thresholding) -> sampler

    # ------------------------------------------------------------ the interface

    @staticmethod
    def accepts(plan: Plan) -> str | None:
        """None if step-level batching runs `plan`, else why not."""
        if plan.kind != "generate":
            return f"{plan.kind} requests run alone (step-level batching runs generate requests)"
        if plan.guidance_model is not None:
            return "requests guided by a guidance model run alone"
        for name, s in plan.settings.items():
            cls = SAMPLERS[s.sampler]
            if cls.history_slots > 1 or cls.history_output:  # fused_step_rows keeps one x0 per row
                return f"requests sampled by {s.sampler!r} (stage {name!r}) run alone"
        return None

    def submit(self, plan: Plan, on_step: Callable | None = None) -> ScheduledJob:
        """Queue a validated plan (`pipe.plan(GenerateRequest(...))`); it joins at the next tick."""
        why = self.accepts(plan)
        if why is not None:
            raise ValueError(why)
        job = ScheduledJob(id=next(self._ids), plan=plan, on_step=on_step)
        self._waiting.append(job)
        return job

    def cancel(self, job: ScheduledJob, error: BaseException) -> None:
        """Stop `job` (its deadline passed, its client left): it fails with `error` and leaves its rows."""
        if not job.done:
            self._fail(job, error)
        self._waiting = [j for j in self._waiting if j is not job]
        self._active = [j for j in self._active if j is not job]

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._active

    @property
    def active_rows(self) -> int:
        return sum(j.plan.batch for j in self._active)

    def run_until_idle(self, max_ticks: int = 1_000_000) -> None:
        for _ in range(max_ticks):
            if self.idle:
                return
            self.tick()
        raise RuntimeError(f"not idle after {max_ticks} ticks")

    def tick(self) -> TickReport:
        """Admit the waiting requests, then one network call per stage (and guidance) on the oldest
        active rows that fit in `max_batch`, one step for each of them."""
        for job in self._waiting:
            try:
                self._start(job)
            except Exception as e:  # noqa: BLE001 - the request's answer, not the scheduler's
                self._fail(job, e)
                continue
            self._active.append(job)
        self._waiting.clear()
        report = TickReport()
        for st in reversed(self.pipe.package.stages):  # later stages first: they finish requests
            for guided in (True, False):
                group, rows = [], 0
                for job in self._active:
                    run = job._run
                    if run is None or run.stage.name != st.name or run.guided != guided:
                        continue
                    if group and rows + job.plan.batch > self.max_batch:
                        break
                    group.append(job)
                    rows += job.plan.batch
                if group:
                    self._step(st, group, guided)
                    report.calls.append(
                        {"stage": st.name, "guided": guided, "rows": rows, "requests": len(group)}
                    )
        self._active = [j for j in self._active if not j.done]
        return report

    # ------------------------------------------------------------ a request's life

    def _start(self, job: ScheduledJob) -> None:
        plan = job.plan
        job._rng = self.pipe.generators(plan)
        job._text = self.pipe.text_conditions(plan)
        self._enter(job, 0)

    def _enter(self, job: ScheduledJob, k: int) -> None:
        """Set `job` at the start of its stage k: the pipeline's draws, in the pipeline's order."""
        plan, pipe = job.plan, self.pipe
        st = plan.stages[k]
        s = plan.settings[st.name]
        x, cond, uncond, _, _ = pipe.stage_inputs(plan, st, job._rng, job._text, job._x_prev)
        thr = threshold_kwargs(s)
        key = (st.name, s.sampler, s.steps, s.eta, tuple(sorted(thr.items())))
        sampler = self._samplers.get(key)  # params(i, seed) is pure: one sampler serves every request
        if sampler is None:
            sampler = self._samplers[key] = make_sampler(
                s.sampler, pipe.schedule(st.name), s.steps, eta=s.eta, **thr
            )
        guided = st.conditioning != "none" and s.uses_guidance
        job._stage_index = k
        job._run = _StageRun(
            stage=st,
            sampler=sampler,
            x=x,
            cond=cond,
            uncond=uncond,
            guided_stage=guided,
            interval=s.guidance_interval,
            scales=np.ascontiguousarray(s.guidance_scale, np.float32),
            seeds=[(sj + st.index) % 2**64 for sj in plan.image_seeds()],
        )

    def _finish_stage(self, job: ScheduledJob) -> None:
        job._x_prev = job._run.x
        job._run = None
        k = job._stage_index + 1
        if k < len(job.plan.stages):
            self._enter(job, k)
            return
        job.images = self.pipe.output(job.plan, job._x_prev)  # decoded, clipped, with .seeds
        job.done = True

    def _fail(self, job: ScheduledJob, error: BaseException) -> None:
        job.error = error
        job.done = True
        job._run = None

    # ------------------------------------------------------------ one call

    def _step(self, st: Stage, group: list[ScheduledJob], guided: bool) -> None:
        runs = [j._run for j in group]
        x = np.concatenate([r.x for r in runs])
        N = x.shape[0]
        # the network's timesteps as the sampler has them (fractional for the Euler family's sigmas)
        t = np.concatenate([np.full(r.x.shape[0], r.sampler.timesteps[r.i], np.float32) for r in runs])
        cond = {k: np.concatenate([r.cond[k] for r in runs]) for k in runs[0].cond}
        if guided:
            uncond = {k: np.concatenate([r.uncond[k] for r in runs]) for k in runs[0].uncond}
            net_x, net_t = np.concatenate([x, x]), np.concatenate([t, t])
            net_c = {k: np.concatenate([cond[k], uncond[k]]) for k in cond}
        elif N == 1:  # two rows: ONNX Runtime's batch-1 path rounds differently
            net_x, net_t, net_c = (
                np.concatenate([x, x]),
                np.concatenate([t, t]),
                {k: np.concatenate([v, v]) for k, v in cond.items()},
            )
        else:
            net_x, net_t, net_c = x, t, cond
        model = self.pipe.backend.model(st.name)
        try:
            out = model(net_x, net_t, net_c if net_c else None)
        except Exception as e:  # noqa: BLE001 - every request of the call gets the network's error
            for job in group:
                self._fail(
                    job,
                    type(e)(f"stage {st.name!r} ({st.onnx.name}): {e}") if isinstance(e, ValueError) else e,
                )
            return
        out = np.ascontiguousarray(out, np.float32)
        if not guided and N == 1:
            out = out[:1]
        rows = []
        for r in runs:
            for seed in r.seeds:
                rows.append(r.sampler.params(r.i, seed))
        table = ops.step_params_table(rows)
        x0_prev = np.concatenate([r.x0 if r.x0 is not None else np.zeros_like(r.x) for r in runs])
        x0_out = np.empty_like(x)
        res, bad = ops.fused_step_rows(
            x,
            out,
            table,
            guidance_scale=np.concatenate([r.scales for r in runs]) if guided else None,
            x0_prev=x0_prev,
            x0_out=x0_out,
        )
        offsets = list(itertools.accumulate([0] + [r.x.shape[0] for r in runs]))
        for job, r, a, b in zip(group, runs, offsets, offsets[1:]):
            if bad and not (np.all(np.isfinite(res[a:b])) and _finite_rows(out, a, b, N, guided)):
                self._fail(
                    job,
                    NonFiniteError(
                        f"stage {st.name!r} ({st.onnx.name}): step {r.i} "
                        f"(t={int(r.sampler.timesteps[r.i])}): NaN or Inf"
                    ),
                )
                continue
            r.x, r.x0 = res[a:b].copy(), x0_out[a:b].copy()
            r.i += 1
            if job.on_step is not None:
                job.on_step(st.name, r.i - 1, int(r.sampler.timesteps[r.i - 1]), r.x)
            if r.i == r.steps:
                try:
                    self._finish_stage(job)
                except Exception as e:  # noqa: BLE001 - the request's answer (e.g. its next stage's setup)
                    self._fail(job, e)


def _finite_rows(out: np.ndarray, a: int, b: int, n: int, guided: bool) -> bool:
    ok = np.all(np.isfinite(out[a:b]))
    return bool(ok and (not guided or np.all(np.isfinite(out[n + a : n + b]))))


__all__ = ["StepScheduler", "ScheduledJob", "TickReport"]
