"""DiffPure (Nie et al. 2022): diffuse an input to t* and denoise it with the model's reverse process.

The forward step is exact, x_t* = sqrt(abar_t*) x + sqrt(1 - abar_t*) eps (DDPM eq. 4), with fresh
noise per call unless a seed is given; the reverse is deterministic DDIM (Song et al. 2021, eq. 12
with eta = 0) from t* to 0 in `steps` steps, the network unconditional (a class stage's "no class"
label, a text stage's empty prompt). t* = 0 returns the input unchanged.
"""

from __future__ import annotations

import numpy as np

from pydiff.backends.ort import create_session, resolve_providers
from pydiff.backends.text_encoder import load_text_encoder
from pydiff.errors import PackageError
from pydiff.package import Package, input_dtype, load_package
from pydiff.schedules import Schedule


class Purifier:
    """The purifier of one stage: `__call__(x [B, C, R, R] in [-1, 1], t_star, rng)` -> [B, C, R, R]."""

    def __init__(self, model="digits", *, stage=None, steps=5, providers="cpu"):
        self.package = model if isinstance(model, Package) else load_package(model)
        st = self.stage = self.package.stage(stage) if stage else self.package.stages[0]
        if st.prediction_type != "epsilon":
            raise PackageError(
                f"stage {st.name!r}: purification needs an epsilon-prediction stage, got {st.prediction_type!r}"
            )
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        self.steps = steps
        self.schedule = Schedule.from_config(dict(st.scheduler))
        self.abar = self.schedule.alphas_cumprod.astype(np.float64)
        self.session = create_session(st.onnx, resolve_providers(providers), required=())
        if st.conditioning == "class":
            if not st.unconditional_class:
                raise PackageError(
                    f"stage {st.name!r}: its network has no 'no class' label to run unconditionally"
                )
            self._cond = {"class_labels": np.array([st.num_classes], np.int64)}
        elif st.conditioning == "text":
            states, mask = load_text_encoder(self.package, resolve_providers("cpu")).encode([""])
            self._cond = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        elif st.conditioning == "none":
            self._cond = {}
        else:
            raise PackageError(
                f"stage {st.name!r}: purification of {st.conditioning!r} stages is not supported"
            )

    def check_t_star(self, t_star) -> int:
        t = int(t_star)
        if t != t_star or not 0 <= t < self.schedule.num_train_timesteps:
            raise ValueError(
                f"t_star: {t_star!r}; expected an int in [0, {self.schedule.num_train_timesteps - 1}]"
            )
        return t

    def eps(self, x: np.ndarray, t: int) -> np.ndarray:
        b = len(x)
        feed = {"sample": x.astype(np.float32), "timestep": np.full(b, t, np.float32)}
        feed.update({k: np.repeat(v, b, axis=0).astype(input_dtype(k)) for k, v in self._cond.items()})
        return np.asarray(self.session.run([self.stage.output], feed)[0], np.float32)

    def timesteps(self, t_star: int) -> list[int]:
        """t* down to 0 in at most `steps` DDIM steps (distinct ints, t* first)."""
        ts = np.unique(np.rint(np.linspace(0, t_star, self.steps + 1)).astype(int))[::-1]
        return [int(t) for t in ts]

    def __call__(self, x, t_star: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        st = self.stage
        x = np.asarray(x, np.float32)
        want = (st.channels, st.resolution, st.resolution)
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(f"x: expected [B, {want[0]}, {want[1]}, {want[2]}] in [-1, 1], got {x.shape}")
        t_star = self.check_t_star(t_star)
        if t_star == 0:
            return x.copy()
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        xt = self.schedule.add_noise(x, rng.standard_normal(x.shape, dtype=np.float32), t_star)
        ts = self.timesteps(t_star)
        for t, t_prev in zip(ts[:-1], ts[1:]):
            e = self.eps(xt, t)
            a, a_prev = self.abar[t], self.abar[t_prev] if t_prev > 0 else 1.0
            x0 = np.clip((xt - np.sqrt(1 - a) * e) / np.sqrt(a), -1, 1)
            xt = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e).astype(np.float32)
        return xt


def purify(
    x, t_star: int = 100, *, seed=None, model="digits", stage=None, steps=5, providers="cpu"
) -> np.ndarray:
    """DiffPure `x` (float32 [B, C, R, R] in [-1, 1]) at t_star with package `model` (default the
    bundled digits); `seed`: None draws fresh noise."""
    return Purifier(model, stage=stage, steps=steps, providers=providers)(x, t_star, seed)
