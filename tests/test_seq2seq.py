"""Translation: the multi30k reader, the pair spec, and the seq2seq recipe through the real CLI (train,
translate, eval with BLEU/chrF) on a generated corpus in multi30k's file layout, plus the bad inputs."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from conftest import need_data, nnlab

import nnlab as nl
from nnlab import run as R
from nnlab.data import datasets
from nnlab.data.text import MULTI30K_SPLITS, PairsConfig
from nnlab.errors import UserError

WORDS = {"hund": "dog", "katze": "cat", "mann": "man", "frau": "woman", "läuft": "runs", "springt": "jumps",
         "schläft": "sleeps", "rot": "red", "groß": "big", "klein": "small", "ball": "ball", "haus": "house"}
TINY = ["data.vocab_size=300", "data.max_len=24", "model.n_layer=1", "model.n_head=2", "model.n_embd=64",
        "model.dropout=0", "train.epochs=10", "train.batch_size=32", "train.log_every=5", "train.threads=1",
        "train.tensorboard=false", "train.precision=fp32", "task.beam=2", "task.samples=2", "optim.lr=3e-3"]


def write_corpus(root: Path, n: int = 640, seed: int = 0) -> Path:
    """Word-for-word German->English pairs in multi30k's layout (gzip'd, line-aligned)."""
    rng = random.Random(seed)
    folder = root / "multi30k"
    folder.mkdir(parents=True)
    for split, f in MULTI30K_SPLITS.items():
        pairs = []
        for _ in range(n if split == "train" else 40):
            words = rng.choices(list(WORDS), k=rng.randint(2, 6))
            pairs.append((" ".join(words).capitalize() + ".", " ".join(WORDS[w] for w in words).capitalize() + "."))
        for lang, side in (("de", 0), ("en", 1)):
            with gzip.open(folder / f"{f}.{lang}.gz", "wt", encoding="utf-8") as fh:
                fh.write("\n".join(p[side] for p in pairs) + "\n")
    return root


def test_pair_spec_round_trip_and_cutting(tmp_path: Path) -> None:
    root = write_corpus(tmp_path)
    data = datasets["multi30k"].factory(PairsConfig(data_dir=str(root), vocab_size=300, max_len=48))
    spec = data.spec
    assert data.splits == ["train", "val", "test"] and spec.shared and spec.src_vocab_size == spec.tgt_vocab_size
    src, tgt = data.texts["val"]
    for i in range(5):
        ids = data.ids["val"][1][i]
        assert ids[0] == spec.bos_id and ids[-1] == spec.eos_id
        assert spec.text(ids[1:-1].tolist()) == tgt[i]  # byte-level BPE: the exact text back
    b = next(iter(data.loader("train", 16, train=True).epoch(0)))
    assert b["src"].shape == b["src_mask"].shape and (b["src"][~b["src_mask"]] == spec.pad_id).all()
    batch, errors = spec.encode(["Hund läuft.", "  ", "ein " * 50])
    assert errors == [None, "empty text: nothing to translate", None] and batch["src"].shape == (2, 48)
    assert batch["src"][1, -1] == spec.eos_id  # cut to max_len, still ending in EOS


def test_multi30k_bad_files(tmp_path: Path) -> None:
    root = write_corpus(tmp_path)
    (root / "multi30k" / "val.en.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(UserError, match="val.en.gz: not readable gzip"):
        datasets["multi30k"].factory(PairsConfig(data_dir=str(root), vocab_size=300))
    with gzip.open(root / "multi30k" / "val.en.gz", "wt") as f:
        f.write("one line\n")
    with pytest.raises(UserError, match="not aligned"):
        datasets["multi30k"].factory(PairsConfig(data_dir=str(root), vocab_size=300))
    with pytest.raises(UserError, match="data.tgt"):
        PairsConfig(src="en", tgt="en")


def test_multi30k_real_files() -> None:
    root = need_data("multi30k", "train.de.gz", "test_2016_flickr.en.gz")
    data = datasets["multi30k"].factory(PairsConfig(data_dir=str(root), vocab_size=2000, subset=2000))
    assert [len(data.texts[s][0]) for s in data.splits] == [2000, 1014, 1000]
    assert data.texts["test"][1][0] == "A man in an orange hat starring at something."


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = write_corpus(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("mt")
    res = nnlab("train", "multi30k-transformer", *TINY, f"--data-dir={root}", "--out", str(out), "-q")
    assert res.returncode == 0, res.stderr
    return Path(res.stdout.strip().splitlines()[-1]), root


def test_translation_recipe_trains_translates_and_scores(mt_run: tuple[Path, Path]) -> None:
    folder, root = mt_run
    run = nl.load_run(folder)
    assert run.summary["status"] == "completed"
    assert {"test/bleu", "test/chrf", "test/loss", "test/acc"} <= set(run.final)  # the recipe decodes test only
    assert run.final["test/acc"] > 0.5 and run.final["test/bleu"] > 5  # the word-for-word mapping is learnable
    assert sorted(p.name for p in (folder / "samples").iterdir())[-1].startswith("step-")
    text = sorted((folder / "samples").iterdir())[-1].read_text()
    assert text.startswith("src: ") and "\nref: " in text and "\nhyp: " in text
    report = (folder / R.REPORT).read_text()
    assert "## Translation" in report and "BLEU" in report and (folder / R.PLOTS / "attention.png").is_file()

    res = nnlab("translate", str(folder), "Hund läuft.", "Katze schläft.", "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["input"] for r in rows] == ["Hund läuft.", "Katze schläft."] and all(r["translation"] for r in rows)
    greedy = nnlab("translate", str(folder), "Hund läuft.", "--beam", "1")
    assert greedy.returncode == 0 and greedy.stdout.strip()
    res = nnlab("translate", str(folder), "-", input="Mann springt.\n\nFrau schläft.\n")
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 2
    long = nnlab("translate", str(folder), "hund " * 60)
    assert long.returncode == 0 and "cut to the model's limit of 24 tokens" in long.stderr

    res = nnlab("eval", str(folder), f"data.data_dir={root}", "--json")
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout)["metrics"]
    assert metrics["bleu"] == pytest.approx(run.final["test/bleu"], abs=1e-6)
    res = nnlab("eval", str(folder), f"data.data_dir={root}", "--split", "val", "--json")
    assert res.returncode == 0 and {"bleu", "chrf"} <= set(json.loads(res.stdout)["metrics"])


@pytest.mark.parametrize("args, message", [
    ([], "nothing to translate"),
    (["x", "--beam", "0"], "--beam must be at least 1"),
    (["  "], "1 of 1 inputs could not be read"),
])
def test_translate_bad_input(mt_run: tuple[Path, Path], args: list[str], message: str) -> None:
    res = nnlab("translate", str(mt_run[0]), *args)
    assert res.returncode == 2 and message in res.stderr


def test_translate_refuses_a_language_model_run(mt_run: tuple[Path, Path]) -> None:
    res = nnlab("generate", str(mt_run[0]), "--prompt", "x")
    assert res.returncode == 2 and "takes a run of task lm" in res.stderr and "'seq2seq'" in res.stderr
