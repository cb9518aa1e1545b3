"""Shared fixtures. Every test gets its own user cache (XDG_CACHE_HOME) so nothing touches ~/.cache;
tests that need the real datasets read $NNLAB_DATA (set by .ci/run) and skip when it is absent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NNLAB_DATA", REPO.parent / "shared" / "data"))

# A recipe small enough to train in about a second: an MLP on generated 8x8 images.
TINY = {
    "name": "tiny",
    "data": {"name": "synthetic", "n_train": 512, "val_size": 64, "n_test": 128},
    "model": {"name": "mlp", "hidden": [32], "dropout": 0.1},
    "task": {"name": "classification"},
    "optim": {"name": "adamw", "lr": 3e-3},
    "train": {"epochs": 2, "batch_size": 32, "log_every": 4, "tensorboard": False, "threads": 1},
}


def core_files() -> list[Path]:
    """The core: every module of the package but models/, data/ and the family folders (tasks/, later rl/)."""
    return sorted((REPO / "src" / "nnlab").glob("*.py"))


def print_core_size() -> None:
    core = core_files()
    n = sum(len(f.read_text().splitlines()) for f in core)
    print(f"\nnnlab core: {n} lines in {len(core)} files")


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ARG001
    print_core_size()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def need_data(name: str, *files: str) -> Path:
    folder = DATA / name
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        pytest.skip(f"{name} files not found in {folder} (set NNLAB_DATA to the shared data folder): {missing}")
    return DATA


def nnlab(*args: str, env: dict | None = None, timeout: float = 300, input: str | None = None
          ) -> subprocess.CompletedProcess:
    """Run the real `nnlab` command line in a subprocess (`input`: its standard input)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "nnlab", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, input=input)
