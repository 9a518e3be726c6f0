"""What enters the sampler's state between steps is checked and named, and no array handed to a
model or a callback is written again (issue 18, part 2)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import pydiff
from pydiff import ops
from pydiff.errors import CallbackError, ModelOutputError, NetworkRunError
from pydiff.schedules import Schedule

BACKEND = "native" if ops.native_available() else "reference"
SCHEDULE = Schedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})


def run(model, x_T=None, **kw):
    args = dict(schedule=SCHEDULE, sampler="ddim", steps=5, backend=BACKEND, seed=0)
    args.update(kw)
    x_T = np.random.default_rng(0).standard_normal((2, 3, 4, 4), dtype=np.float32) if x_T is None else x_T
    return pydiff.sample(model, x_T, **args)


class Keeper:
    """A model that keeps every array it is given (and a copy of each), to check later that none
    changed under it."""

    def __init__(self):
        self.kept = []

    def __call__(self, x, t, cond=None):
        for a in (x, t) + (tuple(cond.values()) if isinstance(cond, dict) else (cond,)):
            if a is not None:
                self.kept.append((a, np.array(a, copy=True)))
        return np.tanh(x) * 0.5

    def check(self):
        assert self.kept
        for i, (a, copy) in enumerate(self.kept):
            np.testing.assert_array_equal(a, copy, err_msg=f"array {i} changed after the model was handed it")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("guided", [False, True])
def test_a_model_may_keep_every_array_it_is_given(sampler, guided):
    m = Keeper()
    kw = dict(sampler=sampler, eta=1.0 if sampler == "ddim" else 0.0)
    if guided:
        kw.update(
            cond={"c": np.ones((2, 5), np.float32)},
            uncond={"c": np.zeros((2, 5), np.float32)},
            guidance_scale=3.0,
        )
    run(m, **kw)  # no callback: the path that reused two x buffers in turn
    m.check()


def test_a_model_and_a_callback_may_keep_their_arrays_in_repaint():
    m, seen = Keeper(), []

    def callback(i, t, x):
        seen.append((x, x.copy()))

    x_T = np.random.default_rng(1).standard_normal((2, 3, 4, 4), dtype=np.float32)
    image = np.zeros((1, 3, 4, 4), np.float32)
    mask = np.zeros((1, 1, 4, 4), np.float32)
    mask[..., :2] = 1
    pydiff.repaint(
        m,
        x_T,
        image,
        mask,
        schedule=SCHEDULE,
        steps=6,
        jump_length=2,
        jump_n_sample=2,
        backend=BACKEND,
        seed=0,
        callback=callback,
    )
    m.check()
    for a, copy in seen:
        np.testing.assert_array_equal(a, copy)


def test_a_callback_may_keep_x():
    seen = []
    run(lambda x, t: np.tanh(x), callback=lambda i, t, x: seen.append((x, x.copy())), sampler="dpmpp_2m")
    assert len(seen) == 5
    for a, copy in seen:
        np.testing.assert_array_equal(a, copy)


@pytest.mark.parametrize(
    "ret,frag",
    [
        (lambda x: np.full_like(x, np.nan), "the callback returned NaN or Inf"),
        (lambda x: np.full(x.shape, 1e39), "the callback returned NaN or Inf \\(in float32\\)"),
        (lambda x: np.zeros(x.shape, np.int64), "the callback returned dtype int64"),
        (lambda x: np.zeros((1,) + x.shape[1:], np.float32), "the callback returned shape"),
    ],
)
def test_what_a_callback_returns_is_checked(ret, frag):
    with pytest.raises(CallbackError, match=r"step 2 \(t=\d+\): " + frag) as e:
        run(lambda x, t: np.tanh(x), callback=lambda i, t, x: ret(x) if i == 2 else None)
    assert e.value.source == "callback"


def test_a_callback_that_leaves_nan_in_x_in_place_is_named():
    def callback(i, t, x):
        x[0, 0, 0, 0] = np.nan

    with pytest.raises(CallbackError, match="the callback left NaN or Inf in x"):
        run(lambda x, t: np.tanh(x), callback=callback)


@pytest.mark.parametrize(
    "noise,frag",
    [
        (lambda i, s: np.full(s, 1e39), "the noise function returned NaN or Inf"),
        (lambda i, s: np.full(s, np.nan, np.float32), "the noise function returned NaN or Inf"),
        (lambda i, s: np.zeros(s, np.int32), "the noise function returned dtype int32"),
        (lambda i, s: np.zeros((3,), np.float32), "the noise function returned shape"),
    ],
)
def test_what_a_noise_function_returns_is_checked(noise, frag):
    with pytest.raises(CallbackError, match=frag) as e:
        run(lambda x, t: np.tanh(x), sampler="ddpm", noise=noise)
    assert e.value.source == "noise"


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_guidance_term_infinite_in_float32_is_the_guidance_functions(sampler):
    with pytest.raises(CallbackError, match="the guidance function's terms overflow float32") as e:
        run(lambda x, t: np.tanh(x), sampler=sampler, guidance_fn=lambda x, t: np.full(x.shape, 1e39))
    assert e.value.source == "guidance_fn"


def test_a_guidance_correction_that_overflows_beside_the_output_is_the_guidance_functions():
    big = pydiff.guidance.EpsCorrection(np.full((2, 3, 4, 4), 3e38, np.float32))
    with pytest.raises(CallbackError, match="guidance function"):
        run(lambda x, t: np.full_like(x, 3e38), guidance_fn=lambda x, t: big)


def test_nan_from_the_network_is_still_the_networks():
    with pytest.raises(pydiff.NonFiniteError, match="NaN or Inf in the network's output"):
        run(lambda x, t: np.full(x.shape, 1e39))  # float64, infinite once float32


# ------------------------------------------------------------------------------- the pipeline

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pydiff.tools.testing import make_tiny_package

    return make_tiny_package(tmp_path_factory.mktemp("state") / "text")


@pytest.fixture()
def pipe(tiny, monkeypatch):
    from pydiff.pipeline import pipeline as pl

    if BACKEND == "reference":
        monkeypatch.setattr(pl, "sample", functools.partial(pl.sample, backend="reference"))
    return pl.Pipeline(tiny, backend="onnxruntime", providers="cpu")


def test_a_callbacks_nan_at_a_stages_last_step_names_that_stage_not_the_next_file(pipe):
    def callback(stage, i, t, x):
        if stage == "base" and i == 1:
            return np.full_like(x, np.nan)
        return None

    with pytest.raises(CallbackError) as e:
        pipe.generate("red", steps=2, callback=callback, seed=0)
    msg = str(e.value)
    assert "stage 'base'" in msg and "the callback" in msg, msg
    assert "sr16" not in msg and ".onnx" not in msg, msg


def test_an_onnx_runtime_failure_is_pydiffs_error_naming_the_stage_and_file(pipe, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    model = pipe.backend.model("sr16")

    class Broken:
        def __init__(self, session):
            self._s = session

        def run(self, *a, **k):
            raise Fail(
                "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node"
            )

        def __getattr__(self, name):
            return getattr(self._s, name)

    monkeypatch.setattr(model, "session", Broken(model.session))
    with pytest.raises(NetworkRunError) as e:
        pipe.generate("red", steps=2, seed=0)
    msg = str(e.value)
    assert isinstance(e.value, ModelOutputError)
    assert msg.startswith("stage 'sr16' (sr16.onnx): ONNX Runtime failed") and "Conv node" in msg, msg
    assert msg.count("stage 'sr16'") == 1, msg


def test_a_text_encoder_that_returns_nan_is_named(pipe, monkeypatch):
    enc = pipe.backend.text_encoder
    real = enc.encode

    def nan_encode(prompts):
        s, m = real(prompts)
        return np.full_like(s, np.nan), m

    monkeypatch.setattr(enc, "encode", nan_encode)
    with pytest.raises(ModelOutputError, match="the text encoder .*NaN"):
        pipe.generate("red", steps=2, seed=0)
