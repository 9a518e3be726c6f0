"""DiffPure on digits, evaluated against an attack that sees the defence.

The defended classifier is a small CNN on scikit-learn's real digits (trained here). The attack is
L-infinity PGD (Madry et al. 2018) in pixel space ([-1, 1], budgets quoted in that unit), its
gradient through the purifier by BPDA (Athalye et al. 2018: the purifier's Jacobian taken as the
identity, the classifier's gradient at the purified point) averaged over `eot` fresh purifications
(expectation over transformation). The evaluation purifies the adversarial inputs once more with
noise the attack never saw.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from pydiff.discriminative import Purifier
from pydiff.tools.data.digits import load_digits_images
from pydiff.tools.discriminative.plots import line_plot


class DigitsCNN(torch.nn.Module):
    """conv 32 - conv 64 - pool - linear 10 on [B, 1, 8, 8] in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(64 * 16, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


def digits_split(seed: int = 0, test: int = 500):
    """(x_train, y_train, x_test, y_test) of the real digits, a fixed random split."""
    x, y = load_digits_images()
    p = np.random.default_rng(seed).permutation(len(x))
    return x[p[test:]], y[p[test:]], x[p[:test]], y[p[:test]]


def train_classifier(x, y, epochs=15, seed=0) -> DigitsCNN:
    torch.manual_seed(seed)
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def loss_grad(net, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-example cross-entropy [B], its gradient w.r.t. x [B, ...]) of the classifier."""
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32)).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(net(xt), torch.from_numpy(y), reduction="none")
    loss.sum().backward()
    return loss.detach().numpy(), xt.grad.numpy()


def bpda_eot_grad(net, purifier: Purifier | None, x, y, t_star, eot, rng) -> np.ndarray:
    """BPDA + EOT: mean over `eot` fresh purifications of the classifier's loss gradient at the
    purified point (the purifier's backward pass taken as the identity); no purifier or t* = 0:
    the classifier's own gradient."""
    if purifier is None or t_star == 0:
        return loss_grad(net, x, y)[1]
    g = np.zeros_like(x)
    for _ in range(eot):
        g += loss_grad(net, purifier(x, t_star, rng), y)[1]
    return g / eot


def pgd(net, purifier, x, y, eps, *, t_star=0, steps=10, eot=4, rng=None, step_size=None) -> np.ndarray:
    """L-inf PGD with a random start: x_adv within eps of x and within [-1, 1]."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    adv = np.clip(x + rng.uniform(-eps, eps, x.shape).astype(np.float32), -1, 1)
    for _ in range(steps):
        g = bpda_eot_grad(net, purifier, adv, y, t_star, eot, rng)
        adv = np.clip(np.clip(adv + alpha * np.sign(g), x - eps, x + eps), -1, 1).astype(np.float32)
    return adv


def accuracy(net, x, y) -> float:
    with torch.no_grad():
        return float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def evaluate(t_stars=(0, 50, 100, 200, 300), budgets=(0.1, 0.2, 0.4), seeds=(0, 1, 2), n=200, steps=10, eot=4,
             purify_steps=5, log=print) -> dict:  # fmt: skip
    """Clean and robust accuracy of the purified classifier against t* (t* = 0: undefended), each
    seed a fresh attack start, fresh attack noise and fresh evaluation noise."""
    x_tr, y_tr, x_te, y_te = digits_split()
    net = train_classifier(x_tr, y_tr)
    for p in net.parameters():
        p.requires_grad_(False)
    x, y = x_te[:n], y_te[:n]
    purifier = Purifier("digits", steps=purify_steps)
    rows = []
    for t_star in t_stars:
        for seed in seeds:
            attack_rng = np.random.default_rng([seed, 1])
            eval_rng = np.random.default_rng([seed, 2])  # never shared with the attack
            t0 = time.perf_counter()
            row = {"t_star": t_star, "seed": seed, "clean": accuracy(net, purifier(x, t_star, eval_rng), y)}
            for eps in budgets:
                adv = pgd(net, purifier, x, y, eps, t_star=t_star, steps=steps, eot=eot, rng=attack_rng)
                row[f"robust@{eps}"] = accuracy(net, purifier(adv, t_star, eval_rng), y)
            row["seconds"] = time.perf_counter() - t0
            log(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            rows.append(row)
    keys = ["clean", *(f"robust@{e}" for e in budgets)]
    summary = []
    for t_star in t_stars:
        r = [row for row in rows if row["t_star"] == t_star]
        summary.append(
            {
                "t_star": t_star,
                **{
                    k: {"mean": float(np.mean([x[k] for x in r])), "std": float(np.std([x[k] for x in r]))}
                    for k in keys
                },
            }
        )
    return {"budgets_unit": "L-inf in [-1, 1] pixels (x2 the [0, 1] budget)", "budgets": list(budgets), "n": n,
            "pgd_steps": steps, "eot": eot, "purify_steps": purify_steps, "seeds": list(seeds),
            "classifier_test_accuracy": accuracy(net, x_te, y_te), "rows": rows, "summary": summary}  # fmt: skip


def benchmark(out_dir, log=print, **kw) -> dict:
    """Write purification.json and purification_robust.png to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate(log=log, **kw)
    (out / "purification.json").write_text(json.dumps(result, indent=1))
    s = result["summary"]
    ts = [r["t_star"] for r in s]
    keys = ["clean", *(f"robust@{e}" for e in result["budgets"])]
    series = {k: ([r[k]["mean"] for r in s], [r[k]["std"] for r in s]) for k in keys}
    xs = [max(t, 1) for t in ts]  # the log axis puts t* = 0 (undefended) at 1
    line_plot(
        out / "purification_robust.png",
        xs,
        series,
        title="digits: accuracy vs t* (PGD, BPDA+EOT)",
        ylabel="t* (1 = none)",
    )
    return result
