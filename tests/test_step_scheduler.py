"""Step-level batching (pydiff.serving.scheduler): a request's images are bit-identical whether it
runs alone, batched with others, at any row position, or joined mid-way, for every sampler and
thresholding mode; the batch is bounded and served first come, first served."""

from __future__ import annotations

import numpy as np
import pytest

import pydiff
from pydiff.pipeline.requests import GenerateRequest, InpaintRequest
from pydiff.serving.engine import Engine, Work
from pydiff.serving.scheduler import StepScheduler

STEPS = {"base": 3, "sr64": 2}
# every sampler and thresholding mode, several prompts and images, per-prompt scales, different steps
REQUESTS = [
    dict(prompt="a red circle on a blue background", seed=1),
    dict(
        prompt="a green square on a yellow background",
        seed=2,
        sampler="ddpm",
        thresholding="dynamic",
        num_images=2,
    ),
    dict(
        prompt=["a blue triangle on a white background", "a red square on a black background"],
        seed=3,
        sampler="ddim",
        eta=0.5,
        guidance_scale=[3.0, 8.0],
    ),
    dict(
        prompt="a yellow circle on a purple background",
        seed=4,
        sampler="ddim",
        thresholding="none",
        steps={"base": 5, "sr64": 3},
    ),
    dict(prompt="a white square on a green background", seed=5, sampler="dpmpp_2m", thresholding="static"),
    dict(
        prompt="a black triangle on a orange background",
        seed=2**64 - 1,
        sampler="ddpm",
        thresholding="none",
        guidance_scale={"base": 1.0},
    ),
    # guidance in an interval: its guided and unguided steps in calls of their own
    dict(
        prompt="a red triangle on a white background",
        seed=6,
        sampler="ddim",
        steps={"base": 6, "sr64": 2},
        guidance_interval={"base": [0.5, 4.0]},
    ),
    # the Euler family: the network at fractional timesteps
    dict(
        prompt="a blue circle on a yellow background",
        seed=7,
        sampler={"base": "euler", "sr64": "euler_ancestral"},
    ),
]


@pytest.fixture(scope="module")
def pipe():
    return pydiff.load("shapes")


def _plan(pipe, **kw):
    return pipe.plan(GenerateRequest(**{"output_type": "numpy", "progress": False, "steps": STEPS, **kw}))


@pytest.fixture(scope="module")
def alone(pipe):
    out = []
    for r in REQUESTS:
        s = StepScheduler(pipe)
        job = s.submit(_plan(pipe, **r))
        s.run_until_idle()
        assert job.error is None, job.error
        out.append(job.images)
    return out


@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4, 5, 6, 7), (5, 7, 6, 3, 1, 4, 2, 0)])
def test_batched_equals_alone_bit_for_bit(pipe, alone, order):
    s = StepScheduler(pipe, max_batch=32)
    jobs = {k: s.submit(_plan(pipe, **REQUESTS[k])) for k in order}
    calls = []
    while not s.idle:
        calls += s.tick().calls
    assert max(c["requests"] for c in calls) >= 4  # they really shared calls
    for k, job in jobs.items():
        assert job.error is None
        np.testing.assert_array_equal(job.images, alone[k], err_msg=f"request {k}")


def test_joined_mid_way_equals_alone(pipe, alone):
    s = StepScheduler(pipe, max_batch=32)
    jobs = {0: s.submit(_plan(pipe, **REQUESTS[0])), 3: s.submit(_plan(pipe, **REQUESTS[3]))}
    s.tick()
    jobs[1] = s.submit(_plan(pipe, **REQUESTS[1]))  # joins while 0 and 3 are at step 1
    s.tick()
    s.tick()
    jobs[2] = s.submit(_plan(pipe, **REQUESTS[2]))  # joins while 0 is in its SR stage
    jobs[5] = s.submit(_plan(pipe, **REQUESTS[5]))
    s.run_until_idle()
    for k, job in jobs.items():
        np.testing.assert_array_equal(job.images, alone[k], err_msg=f"request {k}")


def test_a_request_matches_generate(pipe, alone):
    """Same noise and conditioning as pydiff.generate (each image's own seed, for its x_T and its
    in-kernel noise); only the network's batch differs (rounding)."""
    for k in (0, 1, 7):
        ref = pydiff.generate(**REQUESTS[k], steps=STEPS, output_type="numpy", progress=False)
        assert np.abs(ref - alone[k]).max() <= 1e-5, f"request {k}"
    assert len(alone[1]) > 1 and not np.array_equal(alone[1][0], alone[1][1])  # its images differ


def test_a_guidance_interval_request_matches_generate(pipe, alone):
    """The interval's unguided steps run one row twice (ONNX Runtime's batch-1 path rounds
    differently: 3.6e-4 apart after 6 steps); generate of two copies of the image runs the network
    on the same two rows, and agrees bit for bit."""
    r = {k: v for k, v in REQUESTS[6].items() if k != "seed"}
    ref = pydiff.generate(**r, generator=[6, 6], num_images=2, output_type="numpy", progress=False)
    np.testing.assert_array_equal(ref[:1], alone[6])
    unguided = pydiff.generate(**{**r, "guidance_interval": None, "guidance_scale": {"base": 1.0}},
                               seed=6, output_type="numpy", progress=False)  # fmt: skip
    guided = pydiff.generate(**{**r, "guidance_interval": None}, seed=6, output_type="numpy", progress=False)
    assert np.abs(alone[6] - unguided).max() > 0.05 and np.abs(alone[6] - guided).max() > 0.05


def test_per_image_seeds_are_the_pipelines(pipe):
    """A request given one seed per image (`generator=[...]`) gets, image for image, what a
    one-image request with that seed gets."""
    s = StepScheduler(pipe)
    prompt = "a green square on a white background"
    two = s.submit(
        pipe.plan(
            kind="generate", prompt=prompt, num_images=2, generator=[11, 12], steps=STEPS, progress=False
        )
    )
    one = s.submit(pipe.plan(kind="generate", prompt=prompt, generator=[12], steps=STEPS, progress=False))
    s.run_until_idle()
    assert two.images.seeds == [11, 12] and one.images.seeds == [12]
    np.testing.assert_array_equal(np.asarray(two.images[1]), np.asarray(one.images[0]))


def test_batch_is_bounded_and_first_come_first_served(pipe):
    s = StepScheduler(pipe, max_batch=3)
    jobs = [
        s.submit(_plan(pipe, prompt="a red circle on a blue background", seed=i, num_images=2))
        for i in range(4)
    ]
    finished, sizes = [], []
    while not s.idle:
        for c in s.tick().calls:
            sizes.append(c["rows"])
        finished += [j.id for j in jobs if j.done and j.id not in finished]
    assert max(sizes) <= 3  # two-image requests, three rows a call: one request a call
    assert finished == sorted(finished)  # the oldest finish first: none overtaken
    big = s.submit(_plan(pipe, prompt="a red circle on a blue background", seed=9, num_images=5))
    s.run_until_idle()  # a request larger than max_batch runs alone
    assert big.error is None and big.images.shape[0] == 5


def test_refuses_what_it_does_not_batch(pipe):
    s = StepScheduler(pipe)
    img = np.zeros((64, 64, 3), np.uint8)
    plan = pipe.plan(
        InpaintRequest(image=img, mask=np.ones((64, 64), bool), prompt="x", steps=STEPS, jump_n_sample=1)
    )
    with pytest.raises(ValueError, match="inpaint requests run alone"):
        s.submit(plan)
    with pytest.raises(ValueError, match="max_batch"):
        StepScheduler(pipe, max_batch=0)


def test_a_non_finite_network_fails_only_its_own_request(pipe, monkeypatch):
    s = StepScheduler(pipe)
    good = s.submit(_plan(pipe, **REQUESTS[0]))
    bad = s.submit(_plan(pipe, prompt="a red circle on a blue background", seed=11))
    model = pipe.backend.model("base")
    real = type(model).__call__

    def poisoned(self, x, t, cond=None):
        out = real(self, x, t, cond)
        if (
            self.stage.name == "base" and x.shape[0] >= 4
        ):  # both requests in the call: poison the second's rows
            out = out.copy()
            out[1] = np.nan
            out[3] = np.nan
        return out

    monkeypatch.setattr(type(model), "__call__", poisoned)
    s.run_until_idle()
    assert isinstance(bad.error, pydiff.NonFiniteError) and "stage 'base'" in str(bad.error)
    assert good.error is None and good.images is not None


def test_engine_step_policy_serves_concurrent_requests(pipe, alone):
    engine = Engine({"shapes": pipe}, policy="step", max_batch=16)
    try:
        jobs = []
        for k in (0, 1, 2, 3):
            plan = _plan(pipe, **REQUESTS[k])
            jobs.append((k, engine.submit(Work(model="shapes", request=None, plan=plan, seed_given=True))))
        for k, job in jobs:
            res = job.future.result(timeout=120)
            got = np.stack([np.asarray(im, np.float32) / 255.0 for im in res.images])
            want = np.round(alone[k] * 255.0) / 255.0
            assert res.seed == REQUESTS[k]["seed"]
            np.testing.assert_allclose(got, want, atol=1.01 / 255)  # PIL rounding of the same images
    finally:
        engine.drain()
        engine.close()


def test_server_step_policy_over_http(pipe):
    """`pydiff serve --policy step`: concurrent HTTP requests share calls and each gets the images it
    gets alone through the same policy."""
    import base64
    import concurrent.futures
    import io

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    from PIL import Image

    from pydiff.serving import BackgroundServer

    bodies = [
        {"model": "shapes", "prompt": "a red circle on a blue background", "seed": 1, "steps": STEPS},
        {
            "model": "shapes",
            "prompt": "a green square on a yellow background",
            "seed": 2,
            "steps": STEPS,
            "sampler": "ddpm",
            "n": 2,
        },
        {
            "model": "shapes",
            "prompt": "a blue triangle on a white background",
            "seed": 3,
            "steps": STEPS,
            "guidance_scale": 3.0,
            "thresholding": "dynamic",
        },
    ]

    def call(url, body):
        r = httpx.post(url + "/v1/images/generations", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in r.json()["data"]]

    with BackgroundServer({"shapes": pipe}, policy="step", warm=False) as s:
        solo = [call(s.url, b) for b in bodies]
        with concurrent.futures.ThreadPoolExecutor(len(bodies) * 2) as ex:
            together = list(ex.map(lambda b: call(s.url, b), bodies * 2))
        metrics = httpx.get(s.url + "/metrics").text
    for k, imgs in enumerate(together):
        for a, b in zip(imgs, solo[k % len(bodies)]):
            np.testing.assert_array_equal(a, b)
    assert "pydiff_batch_size_requests" in metrics


@pytest.mark.parametrize("sampler", ["dpmpp_3m", "pndm"])
def test_samplers_with_a_deeper_history_run_alone(pipe, sampler):
    """fused_step_rows keeps one x0 per row: 3M's and PLMS's older history runs on the alone path."""
    plan = _plan(pipe, prompt="a red circle on a blue background", seed=1, sampler={"base": sampler})
    assert sampler in StepScheduler.accepts(plan)
    with pytest.raises(ValueError, match="run alone"):
        StepScheduler(pipe).submit(plan)
