"""`pydiff serve` over real HTTP on 127.0.0.1: the OpenAI images API through the official client,
pydiff's endpoints and their images against the library's, Server-Sent progress, limits, errors,
auth, the queue bound, deadlines, batching, metrics, and a bounded fuzz of request bodies."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import pydiff  # noqa: E402
from pydiff.serving import BackgroundServer, Limits  # noqa: E402

PROMPT = "a red circle on a blue background"
FAST = {"base": 4, "sr64": 3}  # shapes, a few steps: the images still go through every stage


def png_array(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def pil_arrays(images) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def b64_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def gate_pipeline(pipe, gate: threading.Event):
    """Every network call of `pipe` waits for `gate` (at most 20 s): work held at will."""
    orig = pipe.backend.model

    def model(name):
        m = orig(name)

        def call(*a, **k):
            gate.wait(20)
            return m(*a, **k)

        return call

    pipe.backend.model = model
    return pipe


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(["digits", "shapes"], limits=Limits(max_images=8, max_steps=200)) as s:
        assert s.state.status == "ready"
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def error_of(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# ------------------------------------------------------------------ health, models, page


def test_health_ready_models_page(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.get("/readyz")
    assert r.status_code == 200 and r.json()["models"] == ["digits", "shapes"]
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["digits", "shapes"]
    shapes = http.get("/v1/models/shapes").json()["pydiff"]
    assert shapes["size"] == "64x64" and [s["name"] for s in shapes["stages"]] == ["base", "sr64"]
    error_of(http.get("/v1/models/nope"), 404, "model")
    page = http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/generate?stream=true" in page.text
    error_of(http.get("/nowhere"), 404)
    error_of(http.get("/v1/generate"), 405)


# ------------------------------------------------------------------ the OpenAI client


def test_openai_client_images_equal_pydiff_generate(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    res = client.images.generate(
        model="shapes",
        prompt=PROMPT,
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 1, "steps": FAST},  # pydiff's settings as extra fields (few steps: speed)
    )
    got = [png_array(d.b64_json) for d in res.data]
    want = pil_arrays(
        pydiff.generate(PROMPT, model="shapes", num_images=2, seed=1, steps=FAST, progress=False)
    )
    assert len(got) == 2 and got[0].shape == (64, 64, 3)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="shapes", prompt=PROMPT, response_format="url")
    assert "b64_json" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(model="shapes", prompt=PROMPT, size="1024x1024")


# ------------------------------------------------------------------ pydiff's endpoints


def test_generate_equals_library_with_per_stage_settings(http):
    body = {
        "model": "shapes",
        "prompt": [PROMPT, "a green square on a white background"],
        "num_images": 1,
        "steps": FAST,
        "guidance_scale": {"base": [3.0, 5.0], "sr64": 1.0},
        "sampler": {"base": "ddim", "sr64": "dpmpp_2m"},
        "thresholding": "dynamic",
        "guidance_interval": {"base": [0.5, 4.0]},
        "seed": 7,
    }
    r = http.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    kwargs = {k: v for k, v in body.items() if k not in ("model", "prompt")}
    want = pil_arrays(pydiff.generate(body["prompt"], model="shapes", progress=False, **kwargs))
    for im, w in zip(out["images"], want):
        np.testing.assert_array_equal(png_array(im["b64_json"]), w)
    assert out["seed"] == 7 and out["batch"] is None
    assert [im["settings"]["base"]["guidance_scale"] for im in out["images"]] == [3.0, 5.0]
    assert out["settings"]["base"]["sampler"] == "ddim" and out["settings"]["sr64"]["steps"] == 3
    assert out["settings"]["base"]["guidance_interval"] == [0.5, 4.0]
    assert out["request"]["guidance_interval"] == {"base": [0.5, 4.0]}
    # the response's "request" remakes the images
    again = http.post("/v1/generate", json=out["request"]).json()
    assert [i["b64_json"] for i in again["images"]] == [i["b64_json"] for i in out["images"]]


def test_inpaint_img2img_upscale_json_and_multipart(http):
    pipe = pydiff.load("digits")
    base = pipe.generate(class_label=3, seed=0, progress=False)[0]  # an 8x8 'L' image
    mask = base.point(lambda v: 0).copy()
    mask.paste(255, (0, 0, 4, 8))
    common = {"model": "digits", "class_label": 5, "steps": 6, "seed": 3}

    r = http.post("/v1/img2img", json={**common, "image": b64_png(base), "strength": 0.5})
    assert r.status_code == 200, r.text
    want = pipe.img2img(base, class_label=5, steps=6, seed=3, strength=0.5, progress=False)
    np.testing.assert_array_equal(png_array(r.json()["images"][0]["b64_json"]), np.asarray(want[0]))

    fields = {k: json.dumps(v) for k, v in {**common, "jump_length": 2, "jump_n_sample": 2}.items()}
    fields["model"] = "digits"
    files = {
        "image": ("in.png", base64.b64decode(b64_png(base)), "image/png"),
        "mask": ("mask.png", base64.b64decode(b64_png(mask)), "image/png"),
    }
    r = http.post("/v1/inpaint", data=fields, files=files)
    assert r.status_code == 200, r.text
    want = pipe.inpaint(
        base, mask, class_label=5, steps=6, seed=3, jump_length=2, jump_n_sample=2, progress=False
    )
    np.testing.assert_array_equal(png_array(r.json()["images"][0]["b64_json"]), np.asarray(want[0]))

    small = pydiff.load("shapes").generate(
        PROMPT, steps={"base": 4}, seed=0, output_type="numpy", progress=False
    )
    from PIL import Image

    low = Image.fromarray(np.round(small[0] * 255).astype(np.uint8)).resize((16, 16))
    r = http.post(
        "/v1/upscale",
        json={
            "model": "shapes",
            "image": "data:image/png;base64," + b64_png(low),
            "prompt": PROMPT,
            "steps": 3,
            "seed": 2,
        },
    )
    assert r.status_code == 200, r.text
    want = pydiff.upscale(low, PROMPT, model="shapes", steps=3, seed=2, progress=False)
    np.testing.assert_array_equal(png_array(r.json()["images"][0]["b64_json"]), np.asarray(want[0]))
    error_of(http.post("/v1/upscale", json={"model": "digits", "image": b64_png(base)}), 400)


def test_progress_as_server_sent_events(http):
    events = []
    with http.stream(
        "POST",
        "/v1/generate?stream=true",
        json={"model": "shapes", "prompt": PROMPT, "num_images": 2, "steps": FAST, "seed": 5},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[-1] == "done" and names.count("step") == 4 + 3
    steps = [e for n, e in events if n == "step"]
    assert [(e["stage"], e["step"], e["steps"]) for e in steps] == [("base", i, 4) for i in range(1, 5)] + [
        ("sr64", i, 3) for i in range(1, 4)
    ]
    preview = png_array(steps[-1]["preview_png"])  # the two images of the request, side by side
    assert preview.shape[0] == 64 and preview.shape[1] > 64
    done = events[-1][1]
    want = pil_arrays(
        pydiff.generate(PROMPT, model="shapes", num_images=2, steps=FAST, seed=5, progress=False)
    )
    np.testing.assert_array_equal(png_array(done["images"][1]["b64_json"]), want[1])


# ------------------------------------------------------------------ limits and errors


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/generate", {"model": "digits", "class_label": 3, "steps": "x"}, 400, "steps"),
        ("/v1/generate", {"model": "digits", "class_label": 3, "sampler": "lms"}, 400, "sampler"),
        ("/v1/generate", {"model": "digits", "class_label": 30}, 400, "class_label"),
        ("/v1/generate", {"model": "digits", "class_label": 3, "seed": -1}, 400, "seed"),
        ("/v1/generate", {"model": "digits", "class_label": 3, "num_images": 0}, 400, "num_images"),
        ("/v1/generate", {"model": "digits", "class_label": 3, "num_images": 9}, 400, "num_images"),
        ("/v1/generate", {"model": "digits", "class_label": 3, "steps": 201}, 400, "steps"),
        ("/v1/generate", {"model": "digits", "class_label": 3, "colour": "red"}, 400, "colour"),
        ("/v1/generate", {"model": "nope"}, 400, "model"),
        ("/v1/generate", {"model": "shapes", "prompt": "x" * 1001}, 400, "prompt"),
        (
            "/v1/generate",
            {"model": "shapes", "prompt": PROMPT, "guidance_scale": {"sr99": 2}},
            400,
            "guidance_scale",
        ),
        (
            "/v1/generate",
            {"model": "shapes", "prompt": PROMPT, "guidance_interval": [5.0, 1.0]},
            400,
            "guidance_interval",
        ),
        ("/v1/img2img", {"model": "digits", "image": "not base64!"}, 400, "image"),
        ("/v1/img2img", {"model": "digits", "image": base64.b64encode(b"not a png").decode()}, 400, "image"),
        ("/v1/inpaint", {"model": "digits", "class_label": 1}, 400, None),
        ("/v1/images/generations", {"model": "shapes", "prompt": PROMPT, "n": 9}, 400, "n"),
        (
            "/v1/images/generations",
            {"model": "shapes", "prompt": PROMPT, "response_format": "url"},
            400,
            "response_format",
        ),
        ("/v1/images/generations", {"model": "shapes"}, 400, "prompt"),
        ("/v1/images/generations", {"model": "digits", "prompt": PROMPT}, 400, "model"),
    ],
)
def test_bad_fields_are_400s_naming_them(http, path, body, status, param):
    err = error_of(http.post(path, json=body), status, param)
    assert err["type"] == "invalid_request_error"


def test_bodies_that_are_not_requests(http):
    error_of(http.post("/v1/generate", content=b"{not json"), 400)
    error_of(http.post("/v1/generate", content=b"[1, 2]"), 400)
    error_of(http.post("/v1/generate", content=b"\xff\xfe"), 400)
    error_of(http.post("/v1/generate", content=b"{}", headers={"content-type": "image/png"}), 415)
    error_of(http.post("/v1/generate", content=b"x" * (16 * 2**20 + 1)), 413)
    from PIL import Image

    big = Image.new("L", (1025, 8))
    error_of(http.post("/v1/img2img", json={"model": "digits", "image": b64_png(big)}), 400, "image")


def test_nan_network_is_a_500_naming_the_stage():
    pipe = pydiff.load("digits")
    orig = pipe.backend.model
    pipe.backend.model = lambda name: lambda *a, **k: np.full_like(orig(name)(*a, **k), np.nan)
    with BackgroundServer({"digits": pipe}, warm=False) as s:
        r = httpx.post(s.url + "/v1/generate", json={"class_label": 1, "steps": 3}, timeout=30)
        err = error_of(r, 500)
        assert err["code"] == "non_finite" and "stage 'base'" in err["message"]
        assert httpx.get(s.url + "/readyz").status_code == 200  # still serving
        assert 'pydiff_errors_total{kind="non_finite"} 1.0' in httpx.get(s.url + "/metrics").text


# ------------------------------------------------------------------ auth, queue, deadline, batching


def test_bearer_token_auth_refuses_without_doing_work():
    openai = pytest.importorskip("openai")
    with BackgroundServer(["digits"], api_key="s3cret", warm=False) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(s.url + "/v1/generate", json={"class_label": 1, "steps": 2}, headers=headers)
            assert error_of(r, 401)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(s.url + "/metrics").status_code == 401
        assert httpx.get(s.url + "/healthz").status_code == 200
        metrics = httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer s3cret"}).text
        assert "pydiff_batch_size_rows_count 0.0" in metrics  # no call ran
        ok = httpx.post(
            s.url + "/v1/generate",
            json={"class_label": 1, "steps": 2},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert ok.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()


def _post_async(url, body, out, key):
    def go():
        out[key] = httpx.post(url, json=body, timeout=30)

    t = threading.Thread(target=go)
    t.start()
    return t


def _wait_until(cond, timeout=10.0):
    stop = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < stop, "timed out"
        time.sleep(0.01)


def test_full_queue_is_429_with_retry_after_and_deadline_is_504():
    gate = threading.Event()
    pipe = gate_pipeline(pydiff.load("digits"), gate)
    with BackgroundServer({"digits": pipe}, warm=False, max_queue=1, timeout_s=1.5) as s:
        url, out = s.url + "/v1/generate", {}
        try:
            a = _post_async(url, {"class_label": 1, "steps": 2}, out, "a")  # runs, held at the gate
            _wait_until(lambda: s.state.engine._running == 1)
            b = _post_async(url, {"class_label": 2, "steps": 2}, out, "b")  # waits in the queue
            _wait_until(lambda: s.state.engine.queue_depth == 1)
            r = httpx.post(url, json={"class_label": 3, "steps": 2})
            assert error_of(r, 429)["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
            a.join(10), b.join(10)
        finally:
            gate.set()
        assert out["a"].status_code == 504 and out["a"].json()["error"]["code"] == "deadline_exceeded"
        assert out["b"].status_code == 504
        assert 'pydiff_errors_total{kind="queue_full"} 1.0' in httpx.get(s.url + "/metrics").text
        _wait_until(lambda: not s.state.engine.busy)
        assert httpx.post(url, json={"class_label": 3, "steps": 2}).status_code == 200


def test_batch_policy_joins_unseeded_requests_and_keeps_seeded_ones_alone():
    gate = threading.Event()
    pipe = gate_pipeline(pydiff.load("digits"), gate)
    with BackgroundServer({"digits": pipe}, warm=False, policy="batch", max_batch=8) as s:
        url, out = s.url + "/v1/generate", {}
        try:
            first = _post_async(url, {"class_label": 0, "steps": 3}, out, "first")
            _wait_until(lambda: s.state.engine._running == 1)
            threads = [
                _post_async(url, {"class_label": [1, 2], "steps": 3, "guidance_scale": 2.0}, out, "x"),
                _post_async(url, {"class_label": 3, "steps": 3, "num_images": 2}, out, "y"),
                _post_async(url, {"class_label": 4, "steps": 3, "seed": 11}, out, "seeded"),
                _post_async(url, {"class_label": 5, "steps": 4}, out, "other_steps"),
            ]
            _wait_until(lambda: s.state.engine.queue_depth == 4)
        finally:
            gate.set()
        for t in [first, *threads]:
            t.join(30)
        x, y = out["x"].json(), out["y"].json()
        assert x["batch"]["size"] == 4 and x["batch"]["seed"] == y["batch"]["seed"]
        assert {tuple(x["batch"]["rows"]), tuple(y["batch"]["rows"])} == {(0, 2), (2, 4)}
        assert x["seed"] is None and [i["class_label"] for i in y["images"]] == [3, 3]
        assert [i["settings"]["base"]["guidance_scale"] for i in x["images"]] == [2.0, 2.0]
        seeded = out["seeded"].json()
        assert seeded["batch"] is None and seeded["seed"] == 11
        want = pydiff.generate(class_label=4, model="digits", steps=3, seed=11, progress=False)
        np.testing.assert_array_equal(png_array(seeded["images"][0]["b64_json"]), np.asarray(want[0]))
        assert out["other_steps"].json()["batch"] is None
        metrics = httpx.get(s.url + "/metrics").text
        assert 'pydiff_batch_size_requests_bucket{le="2.0"} 4.0' in metrics  # 4 calls: 1+2+1+1 requests


def test_metrics_in_prometheus_format(http, server):
    http.post("/v1/generate", json={"model": "digits", "class_label": [1, 2], "steps": 3})
    text = http.get("/metrics").text
    for name in (
        "pydiff_queue_depth",
        "pydiff_batch_size_rows_bucket",
        "pydiff_step_latency_seconds_bucket",
        "pydiff_images_per_second",
        "pydiff_images_total",
        "pydiff_errors_total",
        "pydiff_request_latency_seconds_bucket",
    ):
        assert name in text, name
    assert 'pydiff_step_latency_seconds_count{model="digits",stage="base"}' in text
    rate = [ln for ln in text.splitlines() if ln.startswith("pydiff_images_per_second ")][0]
    assert float(rate.split()[1]) > 0


# ------------------------------------------------------------------ nothing a client sends crashes it


def test_fuzzed_bodies_never_crash_the_server():
    st = hypothesis.strategies
    fields = [
        "model",
        "prompt",
        "negative_prompt",
        "class_label",
        "num_images",
        "n",
        "steps",
        "sampler",
        "guidance_scale",
        "thresholding",
        "eta",
        "seed",
        "noise_aug_level",
        "guidance_type",
        "image",
        "mask",
        "strength",
        "stage",
        "size",
        "response_format",
        "jump_length",
        "jump_n_sample",
        "bogus",
    ]
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 12),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=12),
        st.sampled_from(
            ["base", "sr64", "digits", "shapes", "ddim", "dynamic", "b64_json", "64x64", "iVBORw0KGgo="]
        ),
    )
    values = st.recursive(
        scalars,
        lambda c: (
            st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(["base", "sr64", "x"]), c, max_size=3)
        ),
        max_leaves=6,
    )
    bodies = st.dictionaries(st.sampled_from(fields), values, max_size=6)
    paths = st.sampled_from(
        ["/v1/generate", "/v1/img2img", "/v1/inpaint", "/v1/upscale", "/v1/images/generations"]
    )
    limits = Limits(max_images=2, max_steps=4)  # a valid body is cheap: the fuzz stays bounded in time
    with (
        BackgroundServer(["digits", "shapes"], limits=limits, timeout_s=20) as s,
        httpx.Client(base_url=s.url, timeout=30) as c,
    ):
        statuses = []

        @hypothesis.settings(
            max_examples=300,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(path=paths, body=bodies)
        def one(path, body):
            r = c.post(path, content=json.dumps(body))
            statuses.append(r.status_code)
            assert r.status_code in (200, 400, 413), (path, body, r.status_code, r.text)
            if r.status_code != 200:
                assert r.json()["error"]["message"]

        one()
        assert c.get("/readyz").status_code == 200
        assert statuses.count(400) > 100
