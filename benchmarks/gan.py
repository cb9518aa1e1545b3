"""The MNIST GANs' domain FID and IS analogue at the end of their recipes, beside the scale of those numbers.

1. The FID classifier: `--classifier RUN`, or trained here (`mnist-fid-classifier`, about a minute).
2. The scale, with the same features (docs/gan.md): the FID of the MNIST test set against the whole training set
   (60,000), and against 5,000 random training images (what a perfect generator would score with the recipes'
   5,000 fixed draws: the floor of the GANs' test/fid), and the IS analogue of the test set (real digits).
3. Each GAN recipe (default mnist-dcgan, mnist-wgan-gp) trained through the Python API with that classifier: its
   final test/fid and test/is (best checkpoint, 5,000 fixed draws against the 10,000 test images), the training
   throughput (real images/s through the discriminator) and the sampling throughput (images/s, batch 256).
4. With `--vae RUN`: the FID/IS of 5,000 samples of a VAE run (seed 0) against the test set, same features.

    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/gan.py                         # everything (~35 min)
    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/gan.py --classifier runs/mnist-fid-classifier-... \\
        --vae runs/mnist-vae-... --docs docs/images -- train.epochs=1      # overrides go to the GAN recipes
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import line, measure  # noqa: E402

import nnlab as nl  # noqa: E402
from nnlab import run as R  # noqa: E402
from nnlab.config import section_from_dict  # noqa: E402
from nnlab.data import datasets  # noqa: E402
from nnlab.infer import load_model  # noqa: E402
from nnlab.tasks.fid import Classifier, add, fid_is, inception_score, load_classifier, set_stats  # noqa: E402
from nnlab.tasks.generative import to_unit  # noqa: E402

N_SAMPLES = 5000  # generated images per score, as the recipes' fid_samples


def real_images(split: str, val_size: int = 0):
    """Batches of MNIST images of a split in [0, 1] (val_size 0: the whole official training set; `val` is the
    recipes' 5,000 training images held out by a fixed random permutation)."""
    data = datasets["mnist"].factory(section_from_dict(datasets, {"name": "mnist", "val_size": val_size}))
    for b in data.loader(split, 1000).epoch(0):
        yield to_unit(b["x"], data.spec)


def scale(clf: Classifier) -> tuple[dict, list[dict]]:
    """The test set's statistics, and the rows of the scale table."""
    test = set_stats(clf, real_images("test"), "test")
    rows = []
    for name, images in (("MNIST train (60,000)", real_images("train")),
                         ("5,000 random training images (the recipes' val split)", real_images("val", N_SAMPLES))):
        stats = add(set_stats(clf, images, "x"), test)
        rows.append({"images": name, **fid_is(stats, "test", "x")})
        print(json.dumps(rows[-1]), file=sys.stderr)
    rows.append({"images": "MNIST test (10,000) itself", "fid": 0.0,
                 "is": inception_score(test["test_p_sum"], test["test_plogp"], test["test_f_n"])})
    return test, rows


@torch.no_grad()
def sampled(model: torch.nn.Module, clf: Classifier, test: dict, seed: int = 0) -> tuple[dict, float]:
    """FID/IS of N_SAMPLES draws of a generative model against the test set, and its sampling images/s."""
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    images = [model.sample(256, gen) for _ in range(-(-N_SAMPLES // 256))]
    per_s = 256 * len(images) / (time.perf_counter() - t0)
    stats = add(set_stats(clf, (x for x in torch.cat(images)[:N_SAMPLES].split(1000)), "x"), test)
    return fid_is(stats, "test", "x"), per_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="*", default=["mnist-dcgan", "mnist-wgan-gp"])
    p.add_argument("--classifier", default=None, help="an mnist-fid-classifier run (default: train one here)")
    p.add_argument("--vae", default=None, help="a VAE run whose samples to score with the same features")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--docs", default=None, help="copy each GAN's last sample grid here as <recipe>-samples.png")
    args, overrides = p.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    print(line(measure()), file=sys.stderr)
    out = Path(args.out or tempfile.mkdtemp(prefix="nnlab-gan-"))
    if args.classifier is None:
        t0 = time.perf_counter()
        run = nl.train("mnist-fid-classifier", [f"train.seed={args.seed}"], out=out, quiet=True)
        args.classifier = str(run.path)
        print(f"classifier {run.path}: test acc {run.final['test/acc']:.4f} in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    clf = load_classifier(args.classifier, (1, 28, 28))
    test, scale_rows = scale(clf)
    rows = []
    for recipe in args.recipes:
        t0 = time.perf_counter()
        run = nl.train(recipe, [f"train.seed={args.seed}", f"task.fid_classifier={args.classifier}", *overrides],
                       out=out, quiet=True)
        wall = time.perf_counter() - t0
        _, per_s = sampled(load_model(run.path).model, clf, test)
        s = run.summary
        rows.append({"model": recipe, "fid": run.final["test/fid"], "is": run.final["test/is"],
                     "best_step": s["best"]["step"], "steps": s["steps"], "wall_s": wall,
                     "train_s": s["train_time_s"], "train_images_per_s": s["samples_per_s"],
                     "sample_images_per_s": per_s, "run": str(run.path)})
        print(json.dumps(rows[-1]), file=sys.stderr)
        grids = sorted((run.path / R.PLOTS).glob("samples-*.png"))
        if args.docs and grids:
            Path(args.docs).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grids[-1], Path(args.docs) / f"{recipe}-samples.png")
    if args.vae:
        got, per_s = sampled(load_model(args.vae).model, clf, test)
        rows.append({"model": f"VAE {Path(args.vae).name}", **got, "sample_images_per_s": per_s})
        print(json.dumps(rows[-1]), file=sys.stderr)

    print(f"\nFeatures: {clf.source}\n")
    print("| against the MNIST test set (10,000) | FID | IS analogue |\n|---|---:|---:|")
    for r in scale_rows:
        print(f"| {r['images']} | {r['fid']:.3f} | {r['is']:.3f} |")
    print("\n| model (5,000 samples vs test) | FID | IS analogue | steps (best) | wall s | train s | train images/s "
          "| sample images/s |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        extra = (f"{r['steps']} ({r['best_step']}) | {r['wall_s']:.0f} | {r['train_s']:.0f} | "
                 f"{r['train_images_per_s']:.0f}" if "steps" in r else "– | – | – | –")
        print(f"| {r['model']} | {r['fid']:.3f} | {r['is']:.3f} | {extra} | {r['sample_images_per_s']:.0f} |")
    print(f"\nruns in {out}")


if __name__ == "__main__":
    main()
