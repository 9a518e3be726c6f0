"""The training loop: L_simple (Ho et al. 2020, Algorithm 1), condition dropout for
classifier-free guidance (Ho & Salimans 2022), EMA weights, safetensors checkpoints, resume."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pydiff.files import atomic_write_bytes
from pydiff.package import load_package
from pydiff.tools.models import PRESETS, build_model
from pydiff.tools.training.from_package import torch_module
from pydiff.tools.training.schedule import alphas_cumprod
from pydiff.tools.training.tasks import make_task

CKPT = "last.safetensors"


@dataclass
class TrainConfig:
    task: str = "digits"  # digits | shapes-base | shapes-sr64 | shapes-base-inpaint | shapes-sr64-inpaint
    model: dict | None = None  # UNetConfig as a dict; None = the task's preset
    steps: int = 3000
    batch_size: int = 64
    lr: float = 5e-4
    lr_min_ratio: float = 0.1  # cosine decay to lr * lr_min_ratio at `steps`
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_drop: float = 0.1
    seed: int = 0
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    # what the network predicts: "epsilon" (Ho et al. 2020) or "v_prediction", v = alpha eps - sigma x0
    # (Salimans & Ho 2022), which Imagen Video uses against the colour shifts of eps-prediction
    prediction_type: str = "epsilon"
    resolution: int = 8
    # shapes
    text_encoder: str | None = None  # folder with model.onnx + tokenizer.json
    max_length: int = 16
    # super-resolution
    low_res_resolution: int | None = None
    max_noise_level: int = 250
    crop: int | None = None
    # inpainting (GLIDE): `mask` and `masked_image` as extra input channels
    inpaint: bool = False
    # fine-tuning: an exported stage file (.onnx with pydiff's network metadata) whose weights start
    # the run; input channels the file lacks (an inpainting stage's) start at zero
    init_from: str | None = None
    # the first convolution's learning rate over the rest's: a fine-tune's new input channels start
    # at zero, and at the fine-tune's low rate they stay near it (the first inpainting fine-tune,
    # 2000 steps at 2e-4, left them at 4% of the old channels' size and ignored the mask)
    conv_in_lr_mult: float = 1.0
    # bookkeeping
    ckpt_every_s: float = 300.0
    log_every: int = 50
    threads: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_task(cls, task: str, **kw) -> "TrainConfig":
        defaults = {
            "digits": dict(resolution=8, batch_size=128, lr=1e-3, steps=3000),
            "shapes-base": dict(resolution=16, batch_size=64, lr=5e-4, steps=5000),
            "shapes-sr64": dict(
                resolution=64,
                low_res_resolution=16,
                crop=32,
                batch_size=32,
                lr=5e-4,
                steps=5000,
                max_noise_level=250,
            ),
        }
        defaults["shapes-colorize"] = dict(
            resolution=64, crop=32, batch_size=32, lr=5e-4, steps=2500, cond_drop=0.5
        )
        defaults["shapes-base-inpaint"] = dict(
            defaults["shapes-base"], inpaint=True, steps=2000, lr=2e-4, conv_in_lr_mult=20.0
        )
        defaults["shapes-sr64-inpaint"] = dict(
            defaults["shapes-sr64"], inpaint=True, steps=1000, lr=2e-4, conv_in_lr_mult=20.0
        )
        defaults = defaults[task]
        defaults.update({k: v for k, v in kw.items() if v is not None})
        cfg = cls(task=task, **defaults)
        if cfg.model is None:
            cfg.model = PRESETS[task.removesuffix("-inpaint")].to_dict()
        if cfg.inpaint:
            cfg.model = dict(cfg.model, inpaint=True)
        return cfg


def _check_source_prediction(cfg: TrainConfig) -> None:
    """A fine-tune keeps what its source predicts: where the stage file sits in a package, the
    manifest says, and another `prediction_type` is refused (its weights would start wrong)."""
    src = Path(cfg.init_from).resolve()
    if not (src.parent / "manifest.json").is_file():
        return
    for st in load_package(src.parent).stages:
        if st.onnx.resolve() == src and st.prediction_type != cfg.prediction_type:
            raise ValueError(
                f"{cfg.init_from} predicts {st.prediction_type!r} (its package's manifest) but this run "
                f"trains {cfg.prediction_type!r}: pass --prediction-type {st.prediction_type}"
            )


def init_weights(model: torch.nn.Module, stage_file: str | Path) -> None:
    """Start `model` from an exported stage's weights (`init_from`). Every tensor must match but the
    first convolution's input channels: the file's go first, the ones it lacks (an inpainting
    stage's mask and masked image, concatenated after them) start at zero, so the fine-tuned
    network begins as the network it came from."""
    src = torch_module(stage_file).state_dict()
    want = model.state_dict()
    if set(src) != set(want):
        raise ValueError(
            f"{stage_file}: its network differs from this run's (weights only in one of them: "
            f"{sorted(set(src) ^ set(want))[:4]})"
        )
    state = {}
    for k, v in want.items():
        w = src[k]
        if k == "conv_in.weight" and w.shape[1] < v.shape[1] and w.shape[2:] == v.shape[2:]:
            w = torch.cat([w, torch.zeros(v.shape[0], v.shape[1] - w.shape[1], *v.shape[2:])], dim=1)
        if w.shape != v.shape:
            raise ValueError(f"{stage_file}: {k} is {tuple(w.shape)}, this run's is {tuple(v.shape)}")
        state[k] = w
    model.load_state_dict(state)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


TRAINABLE_PREDICTION_TYPES = ("epsilon", "v_prediction")  # of pydiff.step_params.PREDICTION_TYPES


def training_target(
    prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor
) -> torch.Tensor:
    """The regression target of L_simple for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0
    raise ValueError(f"prediction_type {prediction_type!r}: expected one of {TRAINABLE_PREDICTION_TYPES}")


def _net_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "x0"}


class Trainer:
    """Holds model, EMA, optimiser and RNG state; `step()` runs one step of Algorithm 1."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path | None = None):

        if cfg.prediction_type not in TRAINABLE_PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {cfg.prediction_type!r}: expected one of {TRAINABLE_PREDICTION_TYPES}"
            )
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model)
        if cfg.init_from:
            _check_source_prediction(cfg)
            init_weights(self.model, cfg.init_from)
        self.ema = copy.deepcopy(self.model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        if (
            cfg.conv_in_lr_mult == 1.0
        ):  # one group: the checkpoints of runs before the option load as they are
            groups = [{"params": list(self.model.parameters()), "lr_mult": 1.0}]
        else:
            first = list(self.model.conv_in.parameters())
            rest = [p for p in self.model.parameters() if all(p is not q for q in first)]
            groups = [{"params": first, "lr_mult": cfg.conv_in_lr_mult}, {"params": rest, "lr_mult": 1.0}]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.abar = torch.from_numpy(alphas_cumprod(cfg.num_train_timesteps, cfg.beta_schedule)).float()
        self.rng = np.random.default_rng(cfg.seed)  # data, captions, dropout, crops
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # t and eps of Algorithm 1
        self.task = make_task(cfg, self.run_dir)
        self.step_i = 0
        self.wall_s = 0.0
        self.losses: list[float] = []

    def loss_on(self, batch: dict) -> torch.Tensor:
        x0 = batch["x0"]
        n = x0.shape[0]
        t = torch.randint(0, self.cfg.num_train_timesteps, (n,), generator=self.gen)
        eps = torch.randn(x0.shape, generator=self.gen)
        a = self.abar[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = self.model(xt, t.float(), **_net_inputs(batch))
        return torch.mean((pred - training_target(self.cfg.prediction_type, x0, eps, a)) ** 2)

    def step(self) -> float:
        cfg = self.cfg
        self.model.train()
        for g in self.opt.param_groups:
            g["lr"] = _lr_at(cfg, self.step_i) * g.get("lr_mult", 1.0)
        batch = self.task.batch(self.rng, cfg.batch_size)
        loss = self.loss_on(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.step_i += 1
        d = min(cfg.ema_decay, (1 + self.step_i) / (10 + self.step_i))
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
            for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(bm)
        v = float(loss.detach())
        self.losses.append(v)
        return v

    # -- checkpoints ---------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict, dict]:
        t = {f"model.{k}": v.detach().contiguous() for k, v in self.model.state_dict().items()}
        t.update({f"ema.{k}": v.detach().contiguous() for k, v in self.ema.state_dict().items()})
        sd = self.opt.state_dict()
        for i, st in sd["state"].items():
            for k, v in st.items():
                t[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
        t["rng.torch"] = self.gen.get_state()
        meta = {
            "step": str(self.step_i),
            "wall_s": repr(self.wall_s),
            "config": json.dumps(self.cfg.to_dict()),
            "numpy_rng": json.dumps(self.rng.bit_generator.state),
            "param_groups": json.dumps(sd["param_groups"]),
            "recent_losses": json.dumps(self.losses[-500:]),
        }
        return t, meta

    def save(self, path: str | Path):
        from safetensors.torch import save  # lazily: as the module's other safetensors imports

        t, meta = self.state_tensors()
        atomic_write_bytes(path, save(t, metadata=meta))

    def load(self, path: str | Path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        t = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        self.model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
        state: dict = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        self.opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        self.gen.set_state(t["rng.torch"])
        self.rng.bit_generator.state = json.loads(meta["numpy_rng"])
        self.step_i = int(meta["step"])
        self.wall_s = float(meta["wall_s"])
        self.losses = json.loads(meta["recent_losses"])


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict]:
    """Return (config dict, EMA state dict, metadata) of a checkpoint, without building a task."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    ema = {k[4:]: v for k, v in t.items() if k.startswith("ema.")}
    return json.loads(meta["config"]), ema, meta


def load_run_model(run_dir: str | Path, ema: bool = True):
    """Build the network of a run and load its (EMA) weights; returns (model, TrainConfig)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    # the checkpoint with the most steps: an extension of a finished run that was stopped leaves a
    # newer last.safetensors beside the older final one
    found = [(load_checkpoint(p), p) for p in (run_dir / "final.safetensors", run_dir / CKPT) if p.exists()]
    if not found:
        raise FileNotFoundError(f"{run_dir}: no final.safetensors or {CKPT}")
    (cfg_d, ema_sd, _), path = max(found, key=lambda f: int(f[0][2]["step"]))
    cfg = TrainConfig(**cfg_d)
    model = build_model(cfg.model)
    if ema:
        model.load_state_dict(ema_sd)
    else:
        t = load_file(str(path))
        model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    return model.eval(), cfg


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: TrainConfig, run_dir: str | Path, command: str | None = None, progress: bool = True) -> dict:
    """Train (or resume) a run in run_dir; returns the summary written to run_dir/summary.json."""
    from tqdm import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    cfg_path = run_dir / "config.json"
    if (run_dir / CKPT).exists():
        saved = TrainConfig(**json.loads(cfg_path.read_text()))
        # a resumed run keeps its saved config; asking for another task or parameterisation of the
        # network is a different run, refused rather than silently trained as the saved one
        for key in ("task", "prediction_type"):
            if getattr(cfg, key) != getattr(saved, key):
                raise ValueError(
                    f"{run_dir} holds a run with {key} {getattr(saved, key)!r}, not "
                    f"{getattr(cfg, key)!r}: resume it with the same setting, or use a "
                    f"new --out"
                )
        saved.steps, saved.ckpt_every_s = cfg.steps, cfg.ckpt_every_s  # may extend a run
        cfg = saved
    else:
        cfg_path.write_text(json.dumps(cfg.to_dict(), indent=1))
    tr = Trainer(cfg, run_dir)
    if (run_dir / CKPT).exists():
        tr.load(run_dir / CKPT)
        print(f"resumed at step {tr.step_i}", flush=True)
    if command:
        with open(run_dir / "commands.txt", "a") as f:
            f.write(command + "\n")
    n_params = sum(p.numel() for p in tr.model.parameters())
    print(f"task {cfg.task}: {n_params} parameters, {cfg.steps} steps, batch {cfg.batch_size}", flush=True)
    last_ckpt = time.time()
    t_seg = time.time()
    bar = tqdm(
        total=cfg.steps,
        initial=tr.step_i,
        disable=not progress,
        mininterval=5.0,
        file=sys.stderr,
        dynamic_ncols=False,
        ncols=100,
    )
    t_log = time.time()
    k = 0
    import signal

    stop = {"flag": False}

    def _request_stop(signum, frame):  # SIGTERM / first Ctrl-C: finish the step, checkpoint, exit
        if stop["flag"] and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint of this step
        stop["flag"] = True

    prev = signal.signal(signal.SIGTERM, _request_stop) if _main_thread() else None
    prev_int = signal.signal(signal.SIGINT, _request_stop) if _main_thread() else None
    torn = False  # interrupted inside a step: its state may be half-applied, so it is not saved
    try:
        while tr.step_i < cfg.steps and not stop["flag"]:
            tr.step()
            bar.update(1)
            if tr.step_i % cfg.log_every == 0 or tr.step_i == cfg.steps:
                now = time.time()
                k = (tr.step_i - 1) % cfg.log_every + 1  # steps since the last line
                recent = float(np.mean(tr.losses[-k:]))
                bar.set_postfix(loss=f"{recent:.4f}")
                print(
                    f"step {tr.step_i} loss {recent:.5f} lr {tr.opt.param_groups[-1]['lr']:.2e} "
                    f"s/step {(now - t_log) / k:.3f}",
                    flush=True,
                )
                t_log = now
            if time.time() - last_ckpt > cfg.ckpt_every_s:
                tr.wall_s += time.time() - t_seg
                t_seg = time.time()
                tr.save(run_dir / CKPT)
                last_ckpt = time.time()
    except KeyboardInterrupt:
        stop["flag"] = torn = True
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
        if prev_int is not None:
            signal.signal(signal.SIGINT, prev_int)
    bar.close()
    if torn:
        print(
            f"interrupted inside step {tr.step_i + 1}; the last checkpoint stands (rerun the same "
            f"command to resume from it)",
            flush=True,
        )
        return {"task": cfg.task, "steps": tr.step_i, "stopped": True}
    tr.wall_s += time.time() - t_seg
    tr.save(run_dir / CKPT)
    if stop["flag"] and tr.step_i < cfg.steps:
        print(f"stopped at step {tr.step_i}; checkpoint saved, rerun the same command to resume", flush=True)
        return {"task": cfg.task, "steps": tr.step_i, "stopped": True}
    final_loss = float(np.mean(tr.losses[-200:])) if tr.losses else float("nan")
    summary = {
        "task": cfg.task,
        "steps": tr.step_i,
        "seed": cfg.seed,
        "wall_s": round(tr.wall_s, 1),
        "final_loss_last200": final_loss,
        "parameters": n_params,
        "commands": (run_dir / "commands.txt").read_text().splitlines() if command else [],
    }
    os.replace(run_dir / CKPT, run_dir / "final.safetensors") if tr.step_i >= cfg.steps else None
    # keep last.safetensors too so an extended run can resume
    if (run_dir / "final.safetensors").exists() and not (run_dir / CKPT).exists():
        import shutil

        shutil.copyfile(run_dir / "final.safetensors", run_dir / CKPT)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    return summary


def load_torch_modules(runs: dict[str, str]) -> dict:
    """{stage: training run folder} -> {stage: the run's EMA network in eval mode}, its weights
    rounded to float16 as the exported package stores them (for `pydiff.load(..., backend="torch",
    modules=...)`)."""
    import torch

    mods = {}
    for name, run in runs.items():
        model, _ = load_run_model(run)
        # The package stores the weights rounded to float16 (pydiff.tools.export): run the same ones.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
        mods[name] = model.eval()
    return mods
