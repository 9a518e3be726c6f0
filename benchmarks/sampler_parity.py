"""The samplers' parity with diffusers (issue 21, part 1): the worst max |pydiff - diffusers| over the
sample's scale, whole loops, over the test grid (beta schedules x prediction types x spacings,
with and without guidance) and the sigma spacings.

    python benchmarks/sampler_parity.py

The grid and the loop are tests/test_samplers_parity.py's; the cases it skips (the cosine schedule
at t = 999, where diffusers' own float32 arithmetic loses up to 3e-3 of scale) are skipped here.
"""

import collections
import sys
import warnings
from pathlib import Path

warnings.simplefilter("ignore")  # diffusers deprecation notes
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_samplers_parity as T  # noqa: E402

res = collections.defaultdict(float)


def rec(name, cfg, steps, g):
    e, s = T.max_err(cfg, steps, g)
    res[name] = max(res[name], e / s)


for beta, pred, sp in T.GRID:
    cos999 = beta == "squaredcos_cap_v2" and sp != "leading"
    for cls, name in [
        ("EulerDiscreteScheduler", "euler"),
        ("EulerAncestralDiscreteScheduler", "euler_ancestral"),
        ("HeunDiscreteScheduler", "heun"),
    ]:
        if cos999 or (name == "euler_ancestral" and pred == "sample"):
            continue
        for g in [None, 3.0]:
            rec(name, T.base_config(cls, beta, pred, sp), 8, g)
    for ex, name in [
        (dict(algorithm_type="sde-dpmsolver++"), "dpmpp_2m_sde"),
        (dict(solver_order=3), "dpmpp_3m"),
    ]:
        for g in [None, 3.0]:
            rec(name, T.base_config("DPMSolverMultistepScheduler", beta, pred, sp, **ex), 16, g)
    if pred != "sample" and not (cos999 and pred == "v_prediction"):
        for g in [None, 3.0]:
            rec("pndm", T.base_config("PNDMScheduler", beta, pred, sp, skip_prk_steps=True), 10, g)
for beta in ["linear", "scaled_linear"]:
    for sp, name in [
        (dict(use_karras_sigmas=True), "karras"),
        (dict(use_exponential_sigmas=True), "exponential"),
        (dict(use_beta_sigmas=True), "beta"),
    ]:
        rec(
            "dpmpp_2m+" + name,
            T.base_config("DPMSolverMultistepScheduler", beta, "epsilon", "linspace", **sp),
            10,
            2.5,
        )
        rec(
            "euler+" + name,
            T.base_config("EulerDiscreteScheduler", beta, "epsilon", "linspace", **sp),
            10,
            2.5,
        )
for k, v in res.items():
    print(f"{k:24s} {v:.2e}")


# unipc and lcm: the parity tests' own parametrisations, their check() recording instead of asserting
def check(config, steps=T.STEPS, guidance=None):
    e, s = T.max_err(config, steps, guidance)
    name = {"UniPCMultistepScheduler": "unipc", "LCMScheduler": "lcm"}[config["_class_name"]]
    res[name] = max(res[name], e / s)


T.check = check
for extra in T.UNIPC:
    for beta, pred, spacing in T.GRID:
        T.test_unipc_matches_diffusers(extra, beta, pred, spacing)
for spaced in T.SPACED:
    for beta in ["linear", "scaled_linear"]:
        for extra in [
            {},
            dict(final_sigmas_type="sigma_min"),
            dict(solver_order=3),
            dict(solver_order=3, solver_type="bh1"),
        ]:
            T.test_unipc_sigma_spacings_match_diffusers(extra, beta, spaced)
for beta in T.BETAS:
    for pred in T.PREDICTIONS:
        for steps in [1, 2, 4, 8]:
            try:
                T.test_lcm_matches_diffusers(beta, pred, steps)
            except BaseException:  # noqa: BLE001 - the test's own skip (pytest.skip), with its reason there
                print(f"lcm {beta} {pred} {steps} steps: skipped by the test")
for k in ("unipc", "lcm"):
    print(f"{k:24s} {res[k]:.2e}")
