"""RePaint inpainting in the core (`pydiff.repaint`, `pydiff.repaint_schedule`)."""

from __future__ import annotations

import numpy as np
import pytest

import pydiff
from pydiff import ops
from pydiff.tools.testing import gaussian_eps_model

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
needs_native = pytest.mark.skipif(not ops.native_available(), reason="native module not built")


def _schedule(**kw):
    return pydiff.Schedule(beta_schedule="linear", prediction_type="epsilon", clip_sample=False, **kw)


def _linear_model(x, t):
    return (0.3 * x + 0.001 * t[:, None, None, None]).astype(np.float32)


def _problem(B=2, C=3, H=8, seed=0):
    rng = np.random.default_rng(seed)
    x_T = rng.standard_normal((B, C, H, H), dtype=np.float32)
    image = rng.uniform(-1, 1, (1, C, H, H)).astype(np.float32)
    mask = np.zeros((1, 1, H, H), np.float32)
    mask[..., 2:6, 3:7] = 1.0
    return x_T, image, mask


# ----------------------------------------------------------------------------- the schedule


def _as_diffusers_sequence(plan, n):
    """The remaining-step indices diffusers' RePaintScheduler visits, from our plan: a step i is
    index n - 1 - i; a jump k -> j visits n - k + 1, ..., n - j one stride at a time."""
    seq = []
    for op in plan:
        if op[0] == "step":
            seq.append(n - 1 - op[1])
        else:
            _, k, j = op
            seq.extend(range(n - k + 1, n - j + 1))
    return seq


@pytest.mark.parametrize(
    "n,L,r",
    [
        (25, 10, 10),
        (20, 5, 3),
        (50, 10, 2),
        (7, 10, 1),
        (10, 10, 1),
        (11, 10, 3),
        (30, 1, 2),
        (250, 10, 10),
        (13, 4, 1),
    ],
)
def test_schedule_is_diffusers_repaint_schedule(n, L, r):
    diffusers = pytest.importorskip("diffusers")
    plan = pydiff.repaint_schedule(n, L, r)
    ref = diffusers.RePaintScheduler(num_train_timesteps=1000)
    ref.set_timesteps(n, jump_length=L, jump_n_sample=r)
    assert _as_diffusers_sequence(plan, n) == (ref.timesteps.numpy() // (1000 // n)).tolist()


def test_schedule_shape():
    n, L, r = 50, 10, 4
    plan = pydiff.repaint_schedule(n, L, r)
    done = 0
    for op in plan:  # steps run in order, jumps go back L from where x is
        if op[0] == "step":
            assert op[1] == done
            done += 1
        else:
            assert op[1] == done and op[2] == done - L
            done = op[2]
    assert done == n and plan[-1] == ("step", n - 1)
    jumps = [op for op in plan if op[0] == "jump"]
    assert len(jumps) == (r - 1) * len(range(0, n - L, L))
    assert sum(op[0] == "step" for op in plan) == n + len(jumps) * L
    assert pydiff.repaint_schedule(n, L, 1) == [("step", i) for i in range(n)]


@pytest.mark.parametrize(
    "bad",
    [
        dict(steps=0),
        dict(jump_length=0),
        dict(jump_n_sample=0),
        dict(steps=2.5),
        dict(jump_n_sample=True),
        dict(jump_length=10),
    ],
)
def test_schedule_refuses_bad_values(bad):
    kw = dict(steps=10, jump_length=2, jump_n_sample=2) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        pydiff.repaint_schedule(**kw)
    assert pydiff.repaint_schedule(10, 10, 1) == [("step", i) for i in range(10)]  # no passes: fine


# ------------------------------------------------------------------------------ the loop


@needs_native
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_one_pass_is_sample_with_a_replacing_callback(sampler):
    """jump_n_sample=1 is plain replacement: pydiff.sample whose callback pastes the kept region,
    noised to the level the step reached, from the documented noise stream."""
    x_T, image, mask = _problem()
    sched = _schedule()
    smp = pydiff.make_sampler(sampler, sched, 10)
    keep = 1.0 - mask

    def paste(i, t, x):
        c = smp.coefficients(i)
        if c.sigma_next > 0:
            z = ops.randn(x.shape, 7, 0x80000000 + i)
            kn = np.float32(c.alpha_next) * image + np.float32(c.sigma_next) * z
        else:
            kn = np.broadcast_to(image, x.shape)
        return (keep * kn + mask * x).astype(np.float32)

    want = pydiff.sample(
        _linear_model, x_T, schedule=sched, sampler=sampler, steps=10, seed=7, callback=paste
    )
    got = pydiff.repaint(
        _linear_model, x_T, image, mask, schedule=sched, sampler=sampler, steps=10, jump_n_sample=1, seed=7
    )
    np.testing.assert_array_equal(got, want)


@needs_native
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_jumps_replayed_by_hand(sampler):
    """The whole loop written out from the documented pieces: the plan, the step with noise key c,
    the paste with key 0x80000000 + c, the jump from the level x is at (alpha_next of the step
    before) to the level before step j with key 0xC0000000 + c - 1, and DPM-Solver++'s reset."""
    x_T, image, mask = _problem(B=1)
    sched = _schedule(timestep_spacing="linspace")  # DDIM's levels are not its timesteps here
    steps, L, R, seed = 11, 3, 3, 9
    smp = pydiff.make_sampler(sampler, sched, steps)
    keep = 1.0 - mask
    x, c = x_T.copy(), 0
    for op in pydiff.repaint_schedule(steps, L, R):
        if op[0] == "jump":
            _, k, j = op
            ratio = (smp.coefficients(j).alpha / smp.coefficients(k - 1).alpha_next) ** 2
            z = ops.randn(x.shape, seed, 0xC0000000 + c - 1)
            x = (np.float32(np.sqrt(ratio)) * x + np.float32(np.sqrt(1 - ratio)) * z).astype(np.float32)
            smp.reset()
            continue
        i = op[1]
        t = np.full(1, smp.timesteps[i], np.float32)
        x = smp.step(_linear_model(x, t), x, i, seed=seed, noise_step=c)
        co = smp.coefficients(i)
        if i + 1 < steps:
            kn = np.float32(co.alpha_next) * image + np.float32(co.sigma_next) * ops.randn(
                x.shape, seed, 0x80000000 + c
            )
        else:
            kn = image
        x = (keep * kn + mask * x).astype(np.float32)
        c += 1
    got = pydiff.repaint(
        _linear_model,
        x_T,
        image,
        mask,
        schedule=sched,
        sampler=sampler,
        steps=steps,
        jump_length=L,
        jump_n_sample=R,
        seed=seed,
    )
    np.testing.assert_array_equal(got, x)


@needs_native
def test_ddim_without_alpha_to_one_still_ends_on_the_image():
    # DDIM's last step lands on abar[0] < 1 with set_alpha_to_one=False; the paste is exact anyway
    x_T, image, mask = _problem()
    out = pydiff.repaint(
        _linear_model,
        x_T,
        image,
        mask,
        schedule=_schedule(set_alpha_to_one=False),
        sampler="ddim",
        steps=6,
        jump_length=2,
        jump_n_sample=2,
        seed=0,
    )
    keep = np.broadcast_to(mask == 0, out.shape)
    np.testing.assert_array_equal(out[keep], np.broadcast_to(image, out.shape)[keep])


@needs_native
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_kept_region_is_the_image_and_resampling_changes_the_rest(sampler):
    x_T, image, mask = _problem()
    kw = dict(schedule=_schedule(), sampler=sampler, steps=12, jump_length=3, seed=3)
    one = pydiff.repaint(_linear_model, x_T, image, mask, jump_n_sample=1, **kw)
    three = pydiff.repaint(_linear_model, x_T, image, mask, jump_n_sample=3, **kw)
    keep = np.broadcast_to(mask == 0, one.shape)
    for out in (one, three):
        np.testing.assert_array_equal(out[keep], np.broadcast_to(image, out.shape)[keep])
        assert np.all(np.isfinite(out))
    assert np.abs(one[~keep] - three[~keep]).max() > 1e-3
    again = pydiff.repaint(_linear_model, x_T, image, mask, jump_n_sample=3, **kw)
    np.testing.assert_array_equal(three, again)


@needs_native
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_reference_backend_agrees_with_jumps(sampler):
    x_T, image, mask = _problem(B=1)
    kw = dict(schedule=_schedule(), sampler=sampler, steps=9, jump_length=2, jump_n_sample=3, seed=5)
    nat = pydiff.repaint(_linear_model, x_T, image, mask, **kw)
    ref = pydiff.repaint(_linear_model, x_T, image, mask, backend="reference", **kw)
    np.testing.assert_allclose(nat, ref, rtol=0, atol=1e-5)


def test_callback_sees_every_step_and_progress_counts_them():
    x_T, image, mask = _problem(B=1)
    seen = []
    pydiff.repaint(
        _linear_model,
        x_T,
        image,
        mask,
        schedule=_schedule(),
        sampler="ddim",
        steps=8,
        jump_length=2,
        jump_n_sample=3,
        seed=0,
        callback=lambda i, t, x: seen.append(i),
        backend="native" if ops.native_available() else "reference",
    )
    assert seen == [op[1] for op in pydiff.repaint_schedule(8, 2, 3) if op[0] == "step"]


# ----------------------------------------------------------- the exact answer it converges to


RHO = 0.95


@needs_native
@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddim", 50), ("dpmpp_2m", 25)])
def test_resampling_converges_to_the_exact_conditional(sampler, steps):
    """Pixel a is kept at 2, pixel b generated: the exact conditional is N(2 rho, 1 - rho^2) =
    N(1.9, 0.312^2). Replacement alone lands far off (b ignores a at high noise); RePaint's
    resampling brings it close (DDPM 50 steps, L 5, R 10: mean 1.82, sd 0.30)."""
    sched = _schedule()
    model = gaussian_eps_model([[1.0, RHO], [RHO, 1.0]], sched)
    x_T = np.random.default_rng(0).standard_normal((4000, 2)).astype(np.float32)
    known = np.array([[2.0, 0.0]], np.float32)
    mask = np.array([[0.0, 1.0]], np.float32)
    err = {}
    for r in (1, 10):
        b = pydiff.repaint(
            model,
            x_T,
            known,
            mask,
            schedule=sched,
            sampler=sampler,
            steps=steps,
            jump_length=5,
            jump_n_sample=r,
            seed=1,
        )[:, 1]
        err[r] = abs(float(b.mean()) - 2 * RHO)
        sd = float(b.std())
    assert err[1] > 0.45  # replacement: 0.52 (DDPM) to 0.83 (DDIM)
    assert err[10] < 0.2 and err[10] < err[1] / 3
    assert abs(sd - np.sqrt(1 - RHO**2)) < 0.1


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "what,value,match",
    [
        ("mask", np.zeros((1, 2, 8, 8), np.float32), "mask must have shape"),
        ("mask", np.full((1, 1, 8, 8), 1.5, np.float32), r"mask values must be in \[0, 1\]"),
        ("mask", np.zeros((1, 1, 8, 8), np.int64), "mask must be floating point"),
        ("image", np.zeros((3, 3, 8, 8), np.float32), "image must have shape"),
        ("image", np.full((1, 3, 8, 8), np.nan, np.float32), "image contains NaN"),
        ("x_T", np.zeros(8, np.float32), r"x_T of shape \[B, C, ...\]"),
        ("noise", lambda i, shape: None, "does not take noise"),
        ("start_step", 2, "does not take start_step"),
    ],
)
def test_bad_image_or_mask_is_refused(what, value, match):
    x_T, image, mask = _problem()
    args = {"x_T": x_T, "image": image, "mask": mask}
    extra = {}
    if what in args:
        args[what] = value
    else:
        extra[what] = value
    with pytest.raises((ValueError, TypeError), match=match):
        pydiff.repaint(
            _linear_model,
            args["x_T"],
            args["image"],
            args["mask"],
            schedule=_schedule(),
            steps=4,
            jump_length=2,
            backend="reference",
            **extra,
        )


def test_a_bool_mask_is_taken_as_float():
    x_T, image, mask = _problem(B=1)
    kw = dict(schedule=_schedule(), sampler="ddim", steps=4, jump_length=2, seed=0, backend="reference")
    np.testing.assert_array_equal(
        pydiff.repaint(_linear_model, x_T, image, mask > 0.5, **kw),
        pydiff.repaint(_linear_model, x_T, image, mask, **kw),
    )
