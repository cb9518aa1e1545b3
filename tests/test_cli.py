"""The command line as a person uses it: help for every verb, the default recipe, real-data recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA, need_data, nnlab

from nnlab.cli import main

VERBS = ["recipes", "train", "eval", "predict", "runs", "report", "generate"]


def test_help_is_fast_and_lists_verbs() -> None:
    res = nnlab("--help")
    assert res.returncode == 0 and all(v in res.stdout for v in VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0 and "usage: nnlab " + verb in capsys.readouterr().out


def test_recipes_lists_and_prints(capsys) -> None:
    assert main(["recipes"]) == 0
    assert "digits-cnn" in capsys.readouterr().out
    assert main(["recipes", "mnist-cnn"]) == 0
    assert "name: mnist-cnn" in capsys.readouterr().out
    assert main(["recipes", "mnist-cn"]) == 2
    assert "did you mean 'mnist-cnn'" in capsys.readouterr().err
    assert main(["train", "mnist-cn"]) == 2
    assert "unknown recipe 'mnist-cn' (did you mean 'mnist-cnn'?)" in capsys.readouterr().err


def test_default_recipe_trains_on_bundled_digits(tmp_path: Path) -> None:
    res = nnlab("train", "train.epochs=3", "--out", str(tmp_path), "-q")
    assert res.returncode == 0, res.stderr
    folder = Path(res.stdout.strip().splitlines()[-1])
    assert folder.name.startswith("digits-cnn-")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["final"]["test/acc"] > 0.8


def trains(tmp_path: Path, recipe: str, *overrides: str) -> dict:
    args = ["train", recipe, "--out", str(tmp_path), "--data-dir", str(DATA), "-q", "train.tensorboard=false"]
    assert main([*args, *overrides]) == 0
    folder = next(tmp_path.glob(f"{recipe}-*"))
    return json.loads((folder / "summary.json").read_text())


def test_mnist_recipes_smoke(tmp_path: Path) -> None:
    need_data("mnist", "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    s = trains(tmp_path, "mnist-cnn", "train.max_steps=30", "data.subset=4000", "train.eval_batch_size=2000")
    assert s["final"]["test/acc"] > 0.5
    s = trains(tmp_path, "mnist-mlp", "train.max_steps=30", "data.subset=4000")
    assert s["final"]["test/acc"] > 0.5


def test_cifar10_recipes_smoke(tmp_path: Path) -> None:
    need_data("cifar10", "cifar-10-python.tar.gz")
    # the 10,000 test images take minutes through this net on a CPU: no evaluation in a smoke test
    s = trains(tmp_path, "cifar10-fast", "train.max_steps=2", "train.batch_size=100", "data.subset=1000",
               "train.eval_every=0", "train.final_splits=[]")
    assert s["steps"] == 2 and s["final"] == {}
    s = trains(tmp_path, "cifar10-resnet", "train.max_steps=1", "train.batch_size=16", "model.width=8",
               "data.val_size=0", "train.final_splits=[]")
    assert s["steps"] == 1


def test_missing_data_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("NNLAB_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no decoded copy from another test either
    assert main(["train", "mnist-cnn", "data.download=false", "--out", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and str(tmp_path / "empty") in err


def test_corrupt_data_file_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"\x1f\x8b truncated")
    code = main(["train", "mnist-cnn", "--data-dir", str(tmp_path / "data"), "data.download=false", "-q",
                 "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "train-images-idx3-ubyte.gz" in err and "Traceback" not in err
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # no partial decoded cache


def test_a_closed_pipe_ends_quietly() -> None:
    """`nnlab recipes | head -1`: the reader is gone before nnlab writes; exit 0 without a message."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run([sys.executable, "-m", "nnlab", "recipes"], stdout=w, stderr=subprocess.PIPE,
                             text=True, timeout=60)
    finally:
        os.close(w)
    assert res.returncode == 0 and res.stderr == "", res.stderr
