"""Export: ONNX round trip vs PyTorch, package writing, diffusers import, bundled packages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

BUNDLED = Path(__file__).resolve().parent.parent / "pydiff" / "bundled"


def _perturbed(cfg, seed=0):
    import torch

    from pydiff.tools.models import UNet

    torch.manual_seed(seed)
    m = UNet(cfg).eval()
    with torch.no_grad():  # zero-initialised output layers would make the check trivial
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("kind", ["class", "text", "sr", "inpaint"])
@pytest.mark.parametrize("fp16", [False, True])
def test_onnx_round_trip(kind, fp16, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import onnxruntime as ort
    from test_models_unet import KINDS

    from pydiff.tools.export.onnx_export import example_inputs, export_stage_onnx

    torch.set_num_threads(1)
    cfg = KINDS[kind]
    m = _perturbed(cfg)
    names = cfg.input_names()
    rep = export_stage_onnx(
        m,
        names,
        tmp_path / "net.onnx",
        channels=cfg.in_channels,
        resolution=8,
        max_length=5,
        text_dim=cfg.text_dim or 12,
        num_classes=cfg.num_classes or 3,
        fp16_weights=fp16,
    )
    assert rep["max_abs_err"] <= 1e-4
    # only the batch is dynamic: the traced shape arithmetic is folded away (static_shapes.py)
    assert rep["static_shapes"]["frozen"] and rep["static_shapes"]["shape_ops_before"] > 0
    import onnx

    from pydiff.tools.export.static_shapes import count_shape_ops

    assert count_shape_ops(onnx.load(rep["tmp_path"])) == 0
    sess = ort.InferenceSession(rep["tmp_path"], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == names
    assert [o.name for o in sess.get_outputs()] == ["out"]
    x = example_inputs(
        names,
        5,
        cfg.in_channels,
        8,
        max_length=5,
        text_dim=cfg.text_dim or 12,
        num_classes=cfg.num_classes or 3,
        seed=7,
    )
    (got,) = sess.run(None, x)
    with torch.no_grad():
        ref = m(**{k: torch.from_numpy(v) for k, v in x.items()}).numpy()
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4


def test_export_refuses_a_mismatch(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from pydiff.tools.export.onnx_export import export_stage_onnx

    class Flaky(torch.nn.Module):  # traced with one behaviour, checked with another
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, sample, timestep):
            self.calls += 1
            k = 1.0 if self.calls == 1 else 2.0
            return sample * k + 1e-3 * timestep[:, None, None, None]

    with pytest.raises(RuntimeError, match="disagrees"):
        export_stage_onnx(Flaky(), ["sample", "timestep"], tmp_path / "x.onnx", channels=1, resolution=4)
    assert not list(tmp_path.iterdir())


def test_export_digits_package(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("sklearn")
    from test_training_loop import digits_cfg

    from pydiff.package import load_package
    from pydiff.pipeline import load
    from pydiff.tools.export.from_runs import export_digits
    from pydiff.tools.training.trainer import load_torch_modules, train

    train(digits_cfg(steps=2), tmp_path / "run", command="pytest", progress=False)
    rep = export_digits(tmp_path / "run", tmp_path / "pkg")
    assert rep["model"]["max_abs_err"] <= 1e-4
    pkg = load_package(tmp_path / "pkg")
    assert pkg.stages[0].inputs == ("sample", "timestep", "class_labels")
    assert "pytest" in (tmp_path / "pkg" / "TRAINING.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    imgs = load(tmp_path / "pkg").generate(
        class_label=[1, 2], steps=2, output_type="numpy", progress=False, seed=3
    )
    assert imgs.shape == (2, 8, 8, 1)
    # The torch backend runs the training checkpoint itself and gives the same images (1e-3 documented).
    same = load(
        tmp_path / "pkg", backend="torch", modules=load_torch_modules({"base": tmp_path / "run"})
    ).generate(class_label=[1, 2], steps=2, output_type="numpy", progress=False, seed=3)
    np.testing.assert_allclose(same, imgs, atol=1e-3)
    with pytest.raises(ValueError, match="unknown stage"):
        load(tmp_path / "pkg", backend="torch", modules=load_torch_modules({"sr": tmp_path / "run"}))


def test_export_writes_the_runs_prediction_type(tmp_path):
    """A v-prediction run becomes a v_prediction stage, and the package's images are the ones the
    training checkpoint gives through the torch backend."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("sklearn")
    from test_training_loop import digits_cfg

    from pydiff.package import load_package
    from pydiff.pipeline import load
    from pydiff.tools.export.from_runs import export_digits
    from pydiff.tools.training.trainer import load_torch_modules, train

    train(digits_cfg(steps=2, prediction_type="v_prediction"), tmp_path / "run", progress=False)
    export_digits(tmp_path / "run", tmp_path / "pkg")
    st = load_package(tmp_path / "pkg").stages[0]
    assert st.prediction_type == "v_prediction" and st.scheduler["prediction_type"] == "v_prediction"
    assert "prediction: `v_prediction`" in (tmp_path / "pkg" / "TRAINING.md").read_text()
    kw = dict(class_label=[3], steps=3, output_type="numpy", progress=False, seed=5)
    imgs = load(tmp_path / "pkg").generate(**kw)
    same = load(
        tmp_path / "pkg", backend="torch", modules=load_torch_modules({"base": tmp_path / "run"})
    ).generate(**kw)
    np.testing.assert_allclose(same, imgs, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_text_encoder(tmp_path_factory):
    pytest.importorskip("onnx")
    from pydiff.tools.testing import make_tiny_package

    return make_tiny_package(tmp_path_factory.mktemp("te") / "tiny", hidden=32, max_length=6) / "text_encoder"


def test_import_diffusers_unet2d_class(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from pydiff.package import load_package
    from pydiff.tools.export.diffusers_import import import_diffusers

    torch.manual_seed(0)
    m = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=5,
    )
    m.save_pretrained(tmp_path / "unet")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMScheduler",
                "num_train_timesteps": 1000,
                "beta_schedule": "linear",
                "prediction_type": "v_prediction",
            }
        )
    )
    rep = import_diffusers(tmp_path / "unet", tmp_path / "pkg")
    assert rep["max_abs_err"] <= 1e-4
    import onnx

    from pydiff.tools.export.static_shapes import count_shape_ops

    assert count_shape_ops(onnx.load(str(tmp_path / "pkg" / "unet.onnx"))) == 0  # only batch dynamic
    st = load_package(tmp_path / "pkg").stages[0]
    # diffusers trains no "no class" label: all 5 are real classes, and there is no CFG
    assert st.conditioning == "class" and st.num_classes == 5 and st.prediction_type == "v_prediction"
    assert st.unconditional_class is False and st.recommended["guidance_scale"] == 1.0
    assert st.scheduler["beta_schedule"] == "linear"
    assert st.recommended["thresholding"] == "static"  # DDPMScheduler's clip_sample default
    from pydiff.pipeline import load

    pipe = load(tmp_path / "pkg")
    with pytest.raises(ValueError, match="no unconditional class.*give class_label"):
        pipe.plan()
    with pytest.raises(ValueError, match="no classifier-free guidance: use guidance_scale=1.0"):
        pipe.plan(class_label=4, guidance_scale=3.0)
    img = pipe.generate(class_label=[4, 0], steps=2, output_type="numpy", progress=False)
    assert img.shape == (2, 8, 8, 3) and np.isfinite(img).all()
    # a model trained with a null class (condition dropout) at the last index: opt in
    import_diffusers(tmp_path / "unet", tmp_path / "pkg_null", null_class=True)
    st = load_package(tmp_path / "pkg_null").stages[0]
    assert st.num_classes == 4 and st.unconditional_class is True and st.recommended["guidance_scale"] == 3.0


def test_import_diffusers_condition_from_config(tmp_path, tiny_text_encoder):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from pydiff.package import load_package
    from pydiff.pipeline import load
    from pydiff.tools.export.diffusers_import import import_diffusers

    cfg = dict(
        diffusers.UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
            attention_head_dim=8,
        ).config
    )
    cfg["_class_name"] = "UNet2DConditionModel"
    (tmp_path / "config.json").write_text(json.dumps(cfg, default=list))
    with pytest.warns(UserWarning, match="in_channels 4: .*latent model"):
        rep = import_diffusers(
            tmp_path / "config.json", tmp_path / "pkg", text_encoder=tiny_text_encoder, max_length=6
        )
    assert rep["max_abs_err"] <= 1e-4 and rep["conditioning"] == "text"
    pkg = load_package(tmp_path / "pkg")
    assert pkg.text_encoder.hidden_size == 32
    # diffusers' SD / IF pipelines never pass the mask: nor does the package, unless asked
    assert pkg.stages[0].inputs == ("sample", "timestep", "encoder_hidden_states")
    with pytest.warns(UserWarning):
        import_diffusers(
            tmp_path / "config.json",
            tmp_path / "pkg_mask",
            text_encoder=tiny_text_encoder,
            max_length=6,
            attention_mask=True,
        )
    assert "encoder_attention_mask" in load_package(tmp_path / "pkg_mask").stages[0].inputs
    # 4-channel samples without a VAE: latents, unclipped (images of them are refused, not clipped)
    lat = load(tmp_path / "pkg").generate("a red circle", steps=2, output_type="latent", progress=False)
    assert lat.shape == (1, 4, 8, 8) and np.isfinite(lat).all()
    with pytest.raises(ValueError, match="no VAE"):
        load(tmp_path / "pkg").generate("a red circle", steps=2, output_type="numpy", progress=False)


# -- the bundled packages ----------------------------------------------------------------------


def _bundled():
    return sorted(p for p in BUNDLED.iterdir() if (p / "manifest.json").is_file()) if BUNDLED.is_dir() else []


def test_bundled_size_budget():
    # the house rule: all bundled models together at most 100 MB in the wheel (one text encoder file,
    # shared by the packages that use it)
    total = sum(f.stat().st_size for f in BUNDLED.rglob("*") if f.is_file()) if BUNDLED.is_dir() else 0
    assert total <= 100 * 10**6
    encoders = sorted(f for f in BUNDLED.rglob("*.onnx") if f.parent.name == "text_encoder")
    assert [f.parent.parent.name for f in encoders] == ["shapes"]


@pytest.mark.parametrize("name", ["shapes", "digits", "shapes-colorize"])
def test_bundled_manifest_matches_onnx(name):
    import onnxruntime as ort

    from pydiff.package import check_stage_io, check_text_encoder_io, load_package

    root = BUNDLED / name
    if not (root / "manifest.json").is_file():
        pytest.skip(f"no bundled {name} package in this checkout")
    pkg = load_package(root)
    for st in pkg.stages:
        sess = ort.InferenceSession(str(st.onnx), providers=["CPUExecutionProvider"])
        check_stage_io(pkg, st, sess)
        assert [i.name for i in sess.get_inputs()] == list(st.inputs)
        assert [o.name for o in sess.get_outputs()] == [st.output]
    if pkg.text_encoder is not None:
        check_text_encoder_io(
            pkg, ort.InferenceSession(str(pkg.text_encoder.onnx), providers=["CPUExecutionProvider"])
        )
    assert (root / "TRAINING.md").is_file()
    text = (root / "TRAINING.md").read_text()
    assert "pydiff train" in text and "final loss" in text


def test_import_refuses_what_pydiff_cannot_run(tmp_path):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from pydiff.tools.export.diffusers_import import import_diffusers

    base = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    for i, (change, msg) in enumerate(
        [
            (dict(time_embedding_type="fourier"), "time_embedding_type 'fourier'"),
            (dict(class_embed_type="timestep"), "class_embed_type 'timestep'"),
            (dict(sample_size=(8, 16)), "square images"),
        ]
    ):
        m = diffusers.UNet2DModel(**{**base, **change})
        folder = tmp_path / f"m{i}"
        m.save_pretrained(folder)
        with pytest.raises(ValueError, match=msg):
            import_diffusers(folder, tmp_path / f"p{i}")
    # a folder whose weights are missing is not a randomly initialised model
    m = diffusers.UNet2DModel(**base)
    m.save_pretrained(tmp_path / "w")
    (tmp_path / "w" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no diffusion_pytorch_model.*safetensors weights"):
        import_diffusers(tmp_path / "w", tmp_path / "pw")
    # sharded and fp16-variant weights are found
    m.save_pretrained(tmp_path / "sh", max_shard_size="20KB")
    assert list((tmp_path / "sh").glob("*.index.json"))
    import_diffusers(tmp_path / "sh", tmp_path / "psh")
    m.save_pretrained(tmp_path / "v", variant="fp16")
    import_diffusers(tmp_path / "v", tmp_path / "pv")
    assert not list(tmp_path.glob("p[0-9]"))  # nothing half-written for the refused ones


def test_a_scheduler_pydiff_cannot_sample_is_refused_at_import(tmp_path):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from pydiff.schedules import ScheduleError
    from pydiff.tools.export.diffusers_import import import_diffusers

    m = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    m.save_pretrained(tmp_path / "unet")
    (tmp_path / "scheduler").mkdir()
    diffusers.DDIMScheduler(rescale_betas_zero_snr=True).save_config(tmp_path / "scheduler")
    with pytest.raises(ScheduleError, match="rescale_betas_zero_snr=True is not implemented"):
        import_diffusers(tmp_path / "unet", tmp_path / "pkg")
    diffusers.DPMSolverMultistepScheduler().save_config(tmp_path / "scheduler")
    import_diffusers(tmp_path / "unet", tmp_path / "pkg")
    from pydiff.package import load_package

    st = load_package(tmp_path / "pkg").stages[0]
    # DPM-Solver's defaults, not DDPM's: linspace spacing, no clipping
    assert st.scheduler["timestep_spacing"] == "linspace" and st.recommended["thresholding"] == "none"
