"""`pydiff segment WHAT`: label-efficient segmentation from diffusion features (docs/discriminative.md).

features: write a stage's feature graph; train: fit the pixel-MLP ensemble on N rendered shapes;
predict: label images (.npy [N, 3, 16, 16] in [-1, 1]) with a trained ensemble; benchmark: mIoU vs N
against the baselines, the plot and the uncertainty picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pydiff.cli.common import EXIT_OK
from pydiff.discriminative import FeatureExtractor, PixelEnsemble
from pydiff.errors import UsageError
from pydiff.tools.discriminative import segmentation
from pydiff.tools.discriminative.export_features import export_feature_graph


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment", help="segmentation from diffusion features (shapes)", description=__doc__
    )
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    f = sub.add_parser("features", help="write a stage's feature graph (its decoder blocks' activations)")
    f.add_argument("--model", default="shapes", help="package directory or bundled name")
    f.add_argument("--stage", default=None, help="stage name (default the first)")
    f.add_argument("-o", "--out", default=None, help="output .onnx (default: where pydiff.features looks)")
    f.set_defaults(func=_features)
    t = sub.add_parser("train", help="fit the pixel-MLP ensemble on N labelled rendered shapes")
    t.add_argument("-n", "--labelled", type=int, default=5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--members", type=int, default=5)
    t.add_argument("--max-pixels", type=int, default=20000, help="training memory bound, in pixels")
    t.add_argument("-o", "--out", required=True, help="output .safetensors")
    t.set_defaults(func=_train)
    q = sub.add_parser("predict", help="label images with a trained ensemble")
    q.add_argument("ensemble")
    q.add_argument("images", help=".npy float32 [N, 3, 16, 16] in [-1, 1]")
    q.add_argument("-o", "--out", required=True, help="output .npz (labels, disagreement)")
    q.set_defaults(func=_predict)
    b = sub.add_parser("benchmark", help="mIoU vs N against the baselines; plot and uncertainty picture")
    b.add_argument("out_dir", nargs="?", default="benchmarks/results/discriminative")
    b.add_argument("--ns", default="1,5,10,20")
    b.add_argument("--seeds", default="0,1")
    b.add_argument("--test", type=int, default=100)
    b.set_defaults(func=_benchmark)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated integers, got {text!r}") from None


def _features(args) -> int:
    print(export_feature_graph(args.model, args.stage, args.out))
    return EXIT_OK


def _train(args) -> int:
    if args.labelled < 1:
        raise UsageError(f"--labelled: expected a positive number of images, got {args.labelled}")
    if args.max_pixels < 1 or args.members < 1:
        raise UsageError("--max-pixels and --members must be positive")
    fx = FeatureExtractor("shapes", t=(50, 150), blocks=(2, 3, 4, 5))
    x, y = segmentation.shapes_segmentation(args.seed * 100 + args.labelled, args.labelled)
    ens, res = segmentation.fit_diffusion_ensemble(
        fx, x, y, max_pixels=args.max_pixels, seed=args.seed, members=args.members
    )
    ens.save(args.out)
    print(
        f"{args.out}: {len(ens.members)} MLPs on {min(res.seen, args.max_pixels)} of {res.seen} labelled pixels"
    )
    return EXIT_OK


def _load_images(path) -> np.ndarray:
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise UsageError(f"{path}: not a .npy array ({e})") from None
    if x.dtype.kind != "f":
        raise UsageError(f"{path}: expected float images in [-1, 1], got dtype {x.dtype}")
    return x.astype(np.float32)


def _predict(args) -> int:
    ens = PixelEnsemble.load(args.ensemble)
    meta = ens.meta
    fx = FeatureExtractor(
        meta.get("package", "shapes"),
        stage=meta.get("stage"),
        t=meta.get("t", (50, 150)),
        blocks=meta.get("blocks"),
    )
    x = _load_images(args.images)
    try:
        labels, unc = segmentation.predict_stream(ens, fx, x)
    except ValueError as e:
        raise UsageError(f"{args.images}: {e}") from None
    np.savez(args.out, labels=labels, disagreement=unc)
    return EXIT_OK


def _benchmark(args) -> int:
    segmentation.benchmark(
        args.out_dir, ns=_ints(args.ns, "--ns"), seeds=_ints(args.seeds, "--seeds"), test=args.test
    )
    return EXIT_OK
