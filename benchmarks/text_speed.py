"""Inference throughput of trained text runs (classifiers and taggers): sentences/s of the model's forward pass at
batch 1 and batch 64, on the first test texts of the run's own dataset as `predict` reads them (tokenising not
counted), after a warm-up, in the precision and on the device the model loads to. A tagger's CRF decoding is not
counted (its emissions are).

    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/text_speed.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import line, measure  # noqa: E402

import nnlab as nl  # noqa: E402
from nnlab.config import section_from_dict  # noqa: E402
from nnlab.data import datasets  # noqa: E402
from nnlab.infer import load_model  # noqa: E402


def test_texts(folder: Path, n: int = 256) -> list[str]:
    """`n` test texts of the run's dataset, spread over the split: sentences' texts, or a tagger's words joined."""
    cfg = section_from_dict(datasets, nl.load_run(folder).config["data"])
    data = datasets[cfg.name].factory(cfg)
    texts = (data.texts["test"][0] if hasattr(data, "texts")
             else [" ".join(s.words) for s in data.sentences["test"]])
    return texts[::max(1, len(texts) // n)][:n]


def forward(model: torch.nn.Module, batch) -> torch.Tensor:
    """The model's forward pass on an encoded batch: a tagger takes characters (and pretrained ids) too."""
    if "chars" in batch:
        return model(batch["x"], batch["chars"], tokens=batch["tokens"] if "tokens" in batch else None)
    return model(batch["x"])


@torch.inference_mode()
def throughput(folder: Path, texts: list[str], batch: int, seconds: float = 3.0) -> float:
    """Texts/s of the model's forward pass on `texts` at `batch` (encoding not counted), after a warm-up."""
    loaded = load_model(folder, "best")
    model, spec = loaded.model.eval(), loaded.spec
    batches = [spec.encode(texts[i:i + batch])[0] for i in range(0, len(texts), batch)]
    forward(model, batches[0])
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in batches:
            forward(model, b)
            done += len(b)
            if time.perf_counter() - t0 > seconds:
                break
    return done / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args()
    print(line(measure()), file=sys.stderr)
    print("| run | texts/s batch 1 | texts/s batch 64 |\n|---|---:|---:|")
    for folder in args.runs:
        texts = test_texts(folder)
        row = {"run": str(folder), "b1": throughput(folder, texts, 1), "b64": throughput(folder, texts, 64)}
        print(json.dumps(row), file=sys.stderr)
        print(f"| {folder.name} | {row['b1']:.0f} | {row['b64']:.0f} |")


if __name__ == "__main__":
    main()
