"""The training loop: data streams, condition dropout, noise augmentation, checkpoint resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
torch.set_num_threads(1)

from pydiff.tools.training.trainer import TrainConfig, Trainer, load_run_model, train  # noqa: E402

TINY = dict(
    in_channels=1,
    base_channels=8,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attn_levels=[1],
    self_attention=True,
    head_dim=8,
    dropout=0.0,
    num_groups=4,
    conditioning="class",
    num_classes=10,
    text_dim=None,
    cross_attention=True,
    low_res=False,
    inpaint=False,
)


def digits_cfg(**kw):
    args = dict(model=dict(TINY), batch_size=16, steps=6, warmup=2, threads=1)
    args.update(kw)
    return TrainConfig.for_task("digits", **args)


def test_digits_batch_and_dropout():
    tr = Trainer(digits_cfg(cond_drop=0.5))
    b = tr.task.batch(np.random.default_rng(0), 400)
    assert b["x0"].shape == (400, 1, 8, 8)
    frac = float((b["class_labels"] == 10).float().mean())
    assert 0.4 < frac < 0.6


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_resume_reproduces_state(tmp_path):
    straight = Trainer(digits_cfg())
    for _ in range(4):
        straight.step()
    first = Trainer(digits_cfg())
    for _ in range(2):
        first.step()
    first.save(tmp_path / "ck.safetensors")
    resumed = Trainer(digits_cfg())
    resumed.load(tmp_path / "ck.safetensors")
    assert resumed.step_i == 2
    for _ in range(2):
        resumed.step()
    torch.testing.assert_close(_params(resumed.model), _params(straight.model), rtol=0, atol=0)
    torch.testing.assert_close(_params(resumed.ema), _params(straight.ema), rtol=0, atol=0)
    assert resumed.losses == straight.losses


def test_train_writes_run_and_resumes(tmp_path):
    run = tmp_path / "run"
    s = train(digits_cfg(), run, command="test", progress=False)
    assert s["steps"] == 6 and (run / "final.safetensors").exists()
    s2 = train(digits_cfg(steps=8), run, command="test", progress=False)  # extends the run
    assert s2["steps"] == 8
    model, cfg = load_run_model(run)
    assert cfg.task == "digits" and not model.training
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_digits_loss_falls():
    cfg = digits_cfg(lr=3e-3, steps=30, batch_size=64)
    tr = Trainer(cfg)
    losses = [tr.step() for _ in range(30)]
    assert np.mean(losses[-6:]) < 0.6 * np.mean(losses[:4])


def _fake_text_encoder(d: Path):
    pytest.importorskip("onnx")
    from pydiff.tools.testing import make_tiny_package

    # A word-level tokenizer + embedding table: enough to drive the shapes data stream.
    pkg = make_tiny_package(d / "tiny", conditioning="text", hidden=12, max_length=16)
    return pkg / "text_encoder"


def test_shapes_sr_stream(tmp_path):
    te = _fake_text_encoder(tmp_path)
    model = dict(
        TINY,
        in_channels=3,
        conditioning="text",
        num_classes=None,
        text_dim=12,
        low_res=True,
        self_attention=False,
    )
    cfg = TrainConfig.for_task(
        "shapes-sr64", model=model, text_encoder=str(te), batch_size=4, steps=2, threads=1, cond_drop=0.5
    )
    tr = Trainer(cfg, tmp_path / "run")
    b = tr.task.batch(np.random.default_rng(0), 8)
    assert b["x0"].shape == (8, 3, 32, 32) and b["low_res"].shape == (8, 3, 32, 32)
    assert b["encoder_hidden_states"].shape == (8, 16, 12) and b["encoder_attention_mask"].shape == (8, 16)
    assert 0 <= float(b["noise_level"].min()) and float(b["noise_level"].max()) <= cfg.max_noise_level
    assert tr.task.captions[-1] == ""
    losses = [tr.step() for _ in range(2)]
    assert all(np.isfinite(losses))


def test_noise_aug_level_zero_is_the_upsampled_image(tmp_path):
    te = _fake_text_encoder(tmp_path)
    model = dict(
        TINY,
        in_channels=3,
        conditioning="text",
        num_classes=None,
        text_dim=12,
        low_res=True,
        self_attention=False,
    )
    cfg = TrainConfig.for_task(
        "shapes-sr64", model=model, text_encoder=str(te), max_noise_level=0, crop=None, threads=1
    )
    tr = Trainer(cfg, None)
    b = tr.task.batch(np.random.default_rng(0), 2)
    # level 0 of the cosine schedule: sqrt(abar_0) ~ 1 so low_res is the blurred image itself
    assert float((b["low_res"] - b["x0"]).abs().mean()) < 0.1


def test_export_takes_the_newest_checkpoint(tmp_path):
    # a finished run extended and stopped early: last.safetensors (7 steps) is newer than final (6)
    import shutil

    from pydiff.tools.training.trainer import CKPT, load_checkpoint

    run = tmp_path / "run"
    train(digits_cfg(), run, command="test", progress=False)
    other = tmp_path / "other"
    train(digits_cfg(steps=7), other, command="test", progress=False)
    shutil.copyfile(other / "final.safetensors", run / CKPT)
    model, _ = load_run_model(run)
    _, ema7, meta = load_checkpoint(run / CKPT)
    assert int(meta["step"]) == 7
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ema7.items())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_is_what_the_sampler_inverts(prediction_type):
    """The target the trainer regresses, fed back as the network output, gives the sampler's formulas
    (pydiff.reference.predict_x0_eps, the oracle of the native kernels) exactly the x0 and eps that
    made x_t: training and sampling agree on what the network predicts."""
    from pydiff.reference import EPSILON, V_PREDICTION, predict_x0_eps
    from pydiff.tools.training.trainer import training_target

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    for abar in (0.999, 0.5, 0.02, 1e-4):
        a = torch.tensor(abar, dtype=torch.float64)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        out = training_target(prediction_type, x0, eps, a)
        code = {"epsilon": EPSILON, "v_prediction": V_PREDICTION}[prediction_type]
        rx0, reps = predict_x0_eps(code, xt.numpy(), out.numpy(), np.sqrt(abar), np.sqrt(1 - abar))
        np.testing.assert_allclose(reps, eps.numpy(), atol=1e-5)
        # x0 from an eps-prediction divides by sqrt(abar): its error grows as abar -> 0
        np.testing.assert_allclose(
            rx0, x0.numpy(), atol=1e-5 if prediction_type == "v_prediction" else 1e-5 / np.sqrt(abar)
        )


def test_v_target_matches_diffusers_get_velocity():
    diffusers = pytest.importorskip("diffusers")
    from pydiff.tools.training.schedule import alphas_cumprod
    from pydiff.tools.training.trainer import training_target

    sch = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    abar = torch.from_numpy(alphas_cumprod(1000, "squaredcos_cap_v2")).float()[t][:, None, None, None]
    ours = training_target("v_prediction", x0, eps, abar)
    torch.testing.assert_close(ours, sch.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-6)


def test_v_prediction_run_trains_and_an_unknown_type_is_refused():
    tr = Trainer(digits_cfg(prediction_type="v_prediction"))
    b = tr.task.batch(np.random.default_rng(0), 8)
    g0 = tr.gen.get_state()
    loss = tr.loss_on(b)
    # the same draw of t and eps, by hand: the loss is the MSE of v, not of eps
    tr.gen.set_state(g0)
    t = torch.randint(0, 1000, (8,), generator=tr.gen)
    eps = torch.randn(b["x0"].shape, generator=tr.gen)
    a = tr.abar[t][:, None, None, None]
    xt = a.sqrt() * b["x0"] + (1 - a).sqrt() * eps
    pred = tr.model(xt, t.float(), class_labels=b["class_labels"])
    v = a.sqrt() * eps - (1 - a).sqrt() * b["x0"]
    torch.testing.assert_close(loss, torch.mean((pred - v) ** 2))
    assert not torch.allclose(loss, torch.mean((pred - eps) ** 2))
    with pytest.raises(ValueError, match="prediction_type 'x0'"):
        Trainer(digits_cfg(prediction_type="x0"))


def test_resume_refuses_another_task_or_prediction_type(tmp_path):
    run = tmp_path / "run"
    train(digits_cfg(steps=2), run, progress=False)
    with pytest.raises(ValueError, match=r"prediction_type 'epsilon', not 'v_prediction'.*new --out"):
        train(digits_cfg(steps=3, prediction_type="v_prediction"), run, progress=False)
    cfg = digits_cfg(steps=3)
    cfg.task = "shapes-base"
    with pytest.raises(ValueError, match=r"task 'digits', not 'shapes-base'"):
        train(cfg, run, progress=False)
    assert json.loads((run / "summary.json").read_text())["steps"] == 2  # nothing was trained
    assert train(digits_cfg(steps=3), run, progress=False)["steps"] == 3  # the same settings resume
