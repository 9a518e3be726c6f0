"""The Ray Serve ingress without a cluster: `RayIngressState` behind `pydiff serve`'s own routes
(Starlette's test client), its engine handle a fake whose replicas die on cue. Seeds given at the
ingress, retries bounded with backoff, the 503 when every attempt fails, errors passed through;
`app_builder`'s arguments and `pydiff serve --ray`'s refusals. The real cluster:
tests/test_ray_cluster.py."""

from __future__ import annotations

import asyncio
import json

import pytest

pytestmark = pytest.mark.ray

ray_exceptions = pytest.importorskip("ray.exceptions")
pytest.importorskip("ray.serve")
testclient = pytest.importorskip("starlette.testclient")

from pydiff.cli import main  # noqa: E402
from pydiff.serving.app import create_app  # noqa: E402
from pydiff.serving.ray_serve import ENGINE, INGRESS, RayIngressState, app_builder  # noqa: E402


class FakeResponse:
    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def __await__(self):
        async def get():
            await asyncio.sleep(0)
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return get().__await__()

    def cancel(self):
        self.cancelled = True


class FakeMethod:
    def __init__(self, outcomes):
        self.outcomes, self.calls = list(outcomes), []

    def remote(self, *args):
        self.calls.append(args)
        return FakeResponse(self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0])


class FakeEngine:
    """A DeploymentHandle's shape: `.run.remote(...)`, `.readiness.remote()`, `.model_cards.remote()`."""

    def __init__(self, run_outcomes):
        self.run = FakeMethod(run_outcomes)
        self.readiness = FakeMethod([{"status": "ready", "models": ["digits"], "queue_depth": 0, "pid": 1}])
        self.model_cards = FakeMethod([[{"id": "digits", "object": "model"}]])


def answer(seed):
    return 200, {"object": "pydiff.images", "seed": seed, "images": []}, {}


def died():
    return ray_exceptions.ActorDiedError()


def client(engine, **options):
    state = RayIngressState(engine, backoff_s=0.01, max_backoff_s=0.02, **options)
    return testclient.TestClient(create_app(None, state=state)), state


def retries(state) -> float:
    return sum(s.value for m in state.retries.collect() for s in m.samples if s.name.endswith("_total"))


def test_a_request_lost_with_its_replica_runs_again_with_the_same_seed():
    engine = FakeEngine([died(), ray_exceptions.ActorUnavailableError("gone", None), answer(7)])
    c, state = client(engine)
    with c:
        r = c.post("/v1/generate", json={"model": "digits", "class_label": 3})
    assert r.status_code == 200, r.text
    seeds = {call[1]["seed"] for call in engine.run.calls}
    assert len(engine.run.calls) == 3 and len(seeds) == 1  # one seed, given before the first attempt
    assert isinstance(seeds.pop(), int)
    assert retries(state) == 2


def test_a_given_seed_is_kept():
    engine = FakeEngine([answer(5)])
    c, _ = client(engine)
    with c:
        assert c.post("/v1/generate", json={"class_label": 3, "seed": 5}).status_code == 200
    assert engine.run.calls[0][1]["seed"] == 5


def test_every_attempt_failing_is_a_503_naming_the_cause():
    engine = FakeEngine([died()])
    c, state = client(engine, max_attempts=3)
    with c:
        r = c.post("/v1/generate", json={"class_label": 3})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "replicas_unavailable" and "3 attempt(s)" in err["message"]
    assert "ActorDiedError" in err["message"]
    assert r.headers["retry-after"] == "5"
    assert len(engine.run.calls) == 3 and retries(state) == 3


def test_a_replica_answer_other_than_200_passes_through_without_retry():
    bad = (
        400,
        {"error": {"message": "steps must be >= 1", "type": "invalid_request_error", "param": "steps"}},
        {},
    )
    engine = FakeEngine([bad])
    c, state = client(engine)
    with c:
        r = c.post("/v1/generate", json={"class_label": 3, "steps": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steps"
    assert len(engine.run.calls) == 1 and retries(state) == 0


def test_a_draining_replica_hands_the_request_to_another():
    draining = (503, {"error": {"message": "shutting down", "code": "shutting_down"}}, {})
    engine = FakeEngine([draining, answer(1)])
    c, state = client(engine)
    with c:
        assert c.post("/v1/generate", json={"class_label": 3}).status_code == 200
    assert retries(state) == 1


def test_the_ingress_has_the_servers_routes_auth_and_errors():
    engine = FakeEngine([answer(1)])
    c, _ = client(engine, api_key="k")
    auth = {"Authorization": "Bearer k"}
    with c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").json()["status"] == "ready"
        assert c.post("/v1/generate", json={"class_label": 1}).status_code == 401
        assert c.get("/v1/models", headers=auth).json()["data"][0]["id"] == "digits"
        assert c.get("/v1/models/nope", headers=auth).status_code == 404
        r = c.post("/v1/generate", content=b"{not json", headers=auth)
        assert r.status_code == 400  # parsed at the ingress, before any routing
        assert "pydiff_ray_retries" in c.get("/metrics", headers=auth).text


def test_readyz_is_503_when_no_replica_answers():
    engine = FakeEngine([answer(1)])
    engine.readiness = FakeMethod([died()])
    c, _ = client(engine)
    with c:
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "replicas_unavailable"


def test_app_builder_reads_a_serve_config_files_args():
    app = app_builder({"models": "digits,shapes", "num_replicas": "2", "threads": "2", "max_images": "4"})
    engine = app._bound_deployment.init_args[0]._bound_deployment
    assert app._bound_deployment.name == INGRESS and engine.name == ENGINE
    assert engine.init_args[0] == ["digits", "shapes"]
    assert engine.num_replicas == 2
    assert engine.ray_actor_options["num_cpus"] == 2.0
    assert engine.init_kwargs["limits"].max_images == 4
    auto = app_builder({"models": ["digits"], "min_replicas": 1, "max_replicas": 3})
    cfg = auto._bound_deployment.init_args[0]._bound_deployment._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 3, 8.0)
    with pytest.raises(ValueError, match="policy 'batch'"):
        app_builder({"models": "digits", "policy": "batch"})


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--policy", "batch"], "--policy batch"),
        (["--replicas", "0"], "--replicas"),
        (["--min-replicas", "3", "--max-replicas", "2"], "--max-replicas 2"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_pydiff_serve_ray_refuses_bad_settings(argv, needle, capsys):
    assert main(["serve", "--ray", "--model", "digits", *argv]) == 2
    assert needle in capsys.readouterr().err


class FakeStream:
    """A DeploymentResponseGenerator's shape: async iteration, `cancel()`."""

    def __init__(self, events, then=None):
        self.events, self.then, self.cancelled = list(events), then, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if self.events:
            return self.events.pop(0)
        if self.then is not None:
            raise self.then
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class FakeStreamingEngine(FakeEngine):
    def __init__(self, streams):
        super().__init__([answer(1)])
        self.streams, self.stream_calls = list(streams), []

    def options(self, stream=False):
        assert stream
        engine = self

        class M:
            def remote(self, *args):
                engine.stream_calls.append(args)
                return engine.streams.pop(0)

        return type("H", (), {"run_stream": M()})()


def test_a_stream_cut_by_a_dead_replica_resumes_without_repeating_steps():
    def step(i):
        return {"event": "step", "stage": "base", "step": i, "steps": 4, "t": 10 - i}

    done = {"event": "done", "body": {"object": "pydiff.images", "seed": 9, "images": []}}
    first = FakeStream([{"event": "started"}, {"event": "queued"}, step(1), step(2)], then=died())
    second = FakeStream([{"event": "started"}, {"event": "queued"}, step(1), step(2), step(3), step(4), done])
    engine = FakeStreamingEngine([first, second])
    c, state = client(engine)
    with c:
        r = c.post("/v1/generate?stream=true", json={"class_label": 3, "steps": 4})
    assert r.status_code == 200
    events = [line[len("event: ") :] for line in r.text.splitlines() if line.startswith("event: ")]
    assert events == ["queued", "step", "step", "step", "step", "done"]
    assert [json.loads(line[6:])["step"] for line in r.text.splitlines() if '"event":"step"' in line] == [
        1,
        2,
        3,
        4,
    ]
    seeds = {args[1]["seed"] for args in engine.stream_calls}
    assert len(engine.stream_calls) == 2 and len(seeds) == 1
    assert retries(state) == 1


def test_a_stream_refused_by_the_replica_is_an_http_error_not_a_stream():
    bad = {
        "event": "error",
        "status": 400,
        "body": {"error": {"message": "bad", "param": "steps"}},
        "headers": {},
    }
    engine = FakeStreamingEngine([FakeStream([bad])])
    c, _ = client(engine)
    with c:
        r = c.post("/v1/generate?stream=true", json={"class_label": 3, "steps": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steps"
