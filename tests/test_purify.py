"""DiffPure and the BPDA+EOT PGD attack on small cases."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pydiff.cli import main  # noqa: E402
from pydiff.discriminative import Purifier  # noqa: E402
from pydiff.tools.discriminative.purification import (  # noqa: E402
    bpda_eot_grad,
    digits_split,
    loss_grad,
    pgd,
    train_classifier,
)


@pytest.fixture(scope="module")
def setup():
    x_tr, y_tr, x_te, y_te = digits_split()
    net = train_classifier(x_tr[:600], y_tr[:600], epochs=3)
    for p in net.parameters():
        p.requires_grad_(False)
    return net, Purifier("digits", steps=3), x_te[:16], y_te[:16]


def test_t_star_zero_is_the_identity(setup):
    _, pur, x, _ = setup
    np.testing.assert_array_equal(pur(x, 0, 1), x)


def test_purification_is_seeded_and_stays_near_digits(setup):
    _, pur, x, _ = setup
    a, b, c = pur(x, 200, 1), pur(x, 200, 1), pur(x, 200, 2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    assert a.shape == x.shape and np.abs(a).max() <= 1.0 + 1e-5
    assert np.abs(pur(x, 20, 1) - x).mean() < np.abs(pur(x, 400, 1) - x).mean()  # less noise, closer


def test_bad_t_star_and_shape_are_named(setup):
    _, pur, x, _ = setup
    with pytest.raises(ValueError, match="t_star"):
        pur(x, 1000)
    with pytest.raises(ValueError, match="x: expected"):
        pur(np.zeros((1, 3, 8, 8), np.float32), 10)


def test_pgd_raises_the_loss_within_the_budget(setup):
    net, _, x, y = setup
    eps = 0.2
    adv = pgd(net, None, x, y, eps, steps=5, rng=0)
    assert np.abs(adv - x).max() <= eps + 1e-6 and np.abs(adv).max() <= 1.0
    assert loss_grad(net, adv, y)[0].mean() > loss_grad(net, x, y)[0].mean() + 0.1


def test_bpda_gradient_is_the_classifiers_at_the_purified_point(setup):
    net, pur, x, y = setup
    g = bpda_eot_grad(net, pur, x, y, 100, 1, np.random.default_rng(5))
    want = loss_grad(net, pur(x, 100, np.random.default_rng(5)), y)[1]
    np.testing.assert_allclose(g, want, rtol=1e-6)
    rng = np.random.default_rng(6)
    two = [loss_grad(net, pur(x, 100, rng), y)[1] for _ in range(2)]
    np.testing.assert_allclose(
        bpda_eot_grad(net, pur, x, y, 100, 2, np.random.default_rng(6)), sum(two) / 2, rtol=1e-5, atol=1e-7
    )


def test_cli_purify_bad_t_star_exits_2(tmp_path, capsys):
    p = tmp_path / "x.npy"
    np.save(p, np.zeros((1, 1, 8, 8), np.float32))
    assert main(["purify", "run", str(p), "-o", str(tmp_path / "o.npy"), "--t-star", "5000"]) == 2
    assert (
        main(["purify", "run", str(p), "-o", str(tmp_path / "o.npy"), "--t-star", "10", "--seed", "1"]) == 0
    )
    assert np.load(tmp_path / "o.npy").shape == (1, 1, 8, 8)
