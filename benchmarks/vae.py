"""The VAE benchmark: mnist-vae on dynamically binarised MNIST, test NLL (importance-weighted, k >= 500) against
training time. Target: <= 90 nats within 15 reference-machine minutes (Burda et al. 2016 report 86.76 for a VAE and
84.78 for an IWAE, k = 5000, after 3,280 epochs).

The recipe is trained through the Python API (`nnlab.train`) with the test split evaluated at every evaluation as
well as val, and `task.iw_eval` (default k = 100) so each evaluation logs the test IW-NLL as training goes; the
final evaluation (best checkpoint by val -ELBO) uses `task.iw_samples` (default k = 1000). Training time excludes
the evaluations (the run's own clock); reference-machine minutes scale it by this machine's matmul rate at the
run's precision over the reference's (benchmarks/machine.py, measured at the start: run it on an otherwise idle
machine, or both the scale and the times are off). Prints the machine line, a Markdown table of the curve and the
final figures, and writes the curve as a PNG.

    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/vae.py                       # the recipe as shipped
    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/vae.py --k 5000 --png vae.png -- train.threads=2
    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/vae.py -- train.epochs=2     # a quick check

Extra arguments after `--` are overrides of the recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import line, measure  # noqa: E402

import nnlab as nl  # noqa: E402
from nnlab.report import pyplot, save_figure  # noqa: E402

TARGET = 90.0  # nats, the bar
BURDA = {"VAE (Burda et al. 2016)": 86.76, "IWAE k=50 (Burda et al. 2016)": 84.78}


def plot(rows: list[dict], final: dict, scale: float, path: Path, k_curve: int, k: int) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    minutes = [r["train_time"] * scale / 60 for r in rows]
    ax.plot(minutes, [r["val/loss"] for r in rows], marker="o", ms=3, label="val -ELBO")
    if all("test/nll" in r for r in rows):
        ax.plot(minutes, [r["test/nll"] for r in rows], marker="o", ms=3, label=f"test IW-NLL, k={k_curve}")
    ax.plot([final["train_time_s"] * scale / 60], [final["test/nll"]], marker="*", ms=12, ls="",
            label=f"final test IW-NLL, k={k}: {final['test/nll']:.2f}")
    ax.axhline(TARGET, color="red", lw=1, ls="--", label=f"target {TARGET:.0f} nats")
    for name, v in BURDA.items():
        ax.axhline(v, color="grey", lw=0.8, ls=":")
        ax.text(0, v, f" {name}: {v}", fontsize=7, va="bottom", color="grey")
    ax.axvline(15, color="red", lw=0.8, ls=":")
    ax.set_ylim(min(BURDA.values()) - 1, min(max(r["val/loss"] for r in rows), 120) + 1)
    ax.set_xlabel("training time, reference-machine minutes")
    ax.set_ylabel("nats per image")
    ax.set_title("mnist-vae: NLL against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="mnist-vae")
    p.add_argument("--k", type=int, default=1000, help="importance samples of the final test NLL (>= 500)")
    p.add_argument("--k-curve", type=int, default=100, help="importance samples of the test NLL at each evaluation "
                   "(0: only the val -ELBO)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--png", default="vae_nll_curve.png", help="where to write the curve")
    args, overrides = p.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    m = measure()
    print(line(m), file=sys.stderr)
    out = Path(args.out or tempfile.mkdtemp(prefix="nnlab-vae-"))
    extra = [f"train.seed={args.seed}", f"task.iw_samples={args.k}", f"task.iw_eval={args.k_curve}"]
    if args.k_curve:
        extra.append("train.eval_splits=[val,test]")
    t0 = time.perf_counter()
    run = nl.train(args.recipe, [*extra, *overrides], out=out, quiet=True)
    wall = time.perf_counter() - t0
    s = run.summary
    scale = m["scale_bf16"] if s["precision"] == "bf16" else m["scale_fp32"]
    rows = [r for r in run.metrics if "val/loss" in r]
    final = {**run.final, "train_time_s": s["train_time_s"]}

    print(f"\n{args.recipe}: {s['steps']} steps, {s['epochs']} epochs, precision {s['precision']}, "
          f"{s['samples_per_s']:,.0f} images/s; run {run.path}\n")
    curve = f" test IW-NLL k={args.k_curve} |" if args.k_curve else ""
    print(f"| step | epoch | train s | ref. min | val -ELBO | val KL |{curve}")
    print("|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.k_curve else ""))
    for r in rows:
        nll = f" {r['test/nll']:.2f} |" if "test/nll" in r else ""
        print(f"| {r['step']} | {r['epoch']:.0f} | {r['train_time']:.0f} | {r['train_time'] * scale / 60:.1f} | "
              f"{r['val/loss']:.2f} | {r['val/kl']:.2f} |{nll}")
    ref_min = s["train_time_s"] * scale / 60
    ok = final["test/nll"] <= TARGET and ref_min <= 15
    print(f"\nfinal (best checkpoint, step {s['best']['step']}): test IW-NLL k={args.k} = {final['test/nll']:.2f} "
          f"nats, test -ELBO {final['test/loss']:.2f} (KL {final['test/kl']:.2f}), {final['test/active']:.0f} active "
          f"units; training {s['train_time_s']:.0f} s here = {ref_min:.1f} reference minutes; wall {wall:.0f} s "
          f"-> {'meets' if ok else 'misses'} <= {TARGET:.0f} nats within 15 reference minutes")
    plot(rows, final, scale, Path(args.png), args.k_curve, args.k)
    print(f"curve: {args.png}")
    print(json.dumps({"machine": m, "recipe": args.recipe, "overrides": overrides, "k": args.k,
                      "final": final, "train_time_s": s["train_time_s"], "reference_minutes": round(ref_min, 2),
                      "images_per_s": s["samples_per_s"], "precision": s["precision"], "wall_s": round(wall, 1),
                      "curve": [{k: r[k] for k in ("step", "train_time", "val/loss", "test/nll") if k in r}
                                for r in rows]}))


if __name__ == "__main__":
    main()
