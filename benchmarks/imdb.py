"""IMDB sentiment side by side, in one run: nnlab's recipes beside what a user would pick instead.

The peers are scikit-learn pipelines on the same reviews (nnlab's own reader of `aclImdb_v1_labeled.tar.gz`,
`<br />` tags as spaces):
- `tfidf-lr`: TF-IDF of word uni- and bigrams (sublinear tf, min_df 2) with logistic regression (liblinear, C 10);
- `nb-lr`: Wang & Manning's (2012) NB features with logistic regression: binary 1-3-gram counts scaled by the
  log-count ratio r = log((p / |p|_1) / (q / |q|_1)) (alpha 1), then logistic regression (liblinear, C 1).
Each peer trains on all 25,000 labelled training reviews; its time counts vectorising, fitting and predicting
the test set (not reading the archive, which the cache makes ~1 s). nnlab's recipes are trained by the real
command line in a fresh process (reading, training on 95% of train with 5% held out as val, the final test
evaluation and the report all in the wall time). Everything is scored on the 25,000 test reviews.

Then the inference throughput of each trained nnlab model (texts/s at batch 1 and 64, test reviews as the
recipe reads them, forward pass only, precision as trained).

    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/imdb.py                        # peers + imdb recipes
    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/imdb.py --recipes imdb-fasttext -- train.epochs=3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import line, measure  # noqa: E402
from recipes import train  # noqa: E402
from text_speed import throughput  # noqa: E402

import nnlab as nl  # noqa: E402
from nnlab.data.files import find_files  # noqa: E402
from nnlab.data.sentences import read_imdb  # noqa: E402


def peers(reviews: dict) -> list[dict]:
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    (xtr, ytr), (xte, yte) = reviews["train"], reviews["test"]
    ytr, yte = np.asarray(ytr), np.asarray(yte)
    rows = []

    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(C=10, solver="liblinear").fit(vec.fit_transform(xtr), ytr)
    acc = float((clf.predict(vec.transform(xte)) == yte).mean())
    rows.append({"model": "tfidf-lr (1-2-grams)", "test_acc": acc, "wall_s": time.perf_counter() - t0})
    print(json.dumps(rows[-1]), file=sys.stderr)

    t0 = time.perf_counter()
    vec = CountVectorizer(ngram_range=(1, 3), min_df=1, binary=True)
    x = vec.fit_transform(xtr)
    p = np.asarray(x[ytr == 1].sum(0)).ravel() + 1.0  # alpha = 1
    q = np.asarray(x[ytr == 0].sum(0)).ravel() + 1.0
    r = np.log((p / p.sum()) / (q / q.sum()))  # the log-count ratio per n-gram
    clf = LogisticRegression(C=1, solver="liblinear", dual=True, max_iter=1000).fit(x.multiply(r).tocsr(), ytr)
    acc = float((clf.predict(vec.transform(xte).multiply(r).tocsr()) == yte).mean())
    rows.append({"model": "nb-lr (1-3-grams)", "test_acc": acc, "wall_s": time.perf_counter() - t0})
    print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="*", default=["imdb-fasttext", "imdb-bilstm", "imdb-transformer"])
    p.add_argument("--no-peers", action="store_true", help="only nnlab's recipes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args, overrides = p.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    print(line(measure()), file=sys.stderr)
    reviews = read_imdb(find_files("imdb", ["aclImdb_v1_labeled.tar.gz"], None) / "aclImdb_v1_labeled.tar.gz")
    rows = [] if args.no_peers else peers(reviews)
    out = Path(args.out or tempfile.mkdtemp(prefix="nnlab-imdb-"))
    sample = reviews["test"][0][::97][:256]  # 256 test reviews spread over both classes
    for recipe in args.recipes:
        folder, wall = train(recipe, args.seed, out, overrides)
        run = nl.load_run(folder)
        rows.append({"model": f"nnlab {recipe}", "test_acc": run.final["test/acc"], "wall_s": wall,
                     "train_s": run.summary["train_time_s"], "texts_per_s_b1": throughput(folder, sample, 1),
                     "texts_per_s_b64": throughput(folder, sample, 64), "run": str(folder)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print("\n| model | test acc | wall s | train s | texts/s batch 1 | texts/s batch 64 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        extra = (f"{r['train_s']:.1f} | {r['texts_per_s_b1']:.0f} | {r['texts_per_s_b64']:.0f}" if "train_s" in r
                 else "– | – | –")
        print(f"| {r['model']} | {r['test_acc']:.4f} | {r['wall_s']:.1f} | {extra} |")
    print(f"\nruns in {out}")


if __name__ == "__main__":
    main()
