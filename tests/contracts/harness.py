"""What every contract test does from outside nnlab: a plugin module written into a folder, the real CLI run
in a subprocess (or under torchrun) that imported it first, and a training killed with SIGKILL at a random
moment, to be resumed and compared with an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import REPO

from nnlab import run as R

VOLATILE = ("time", "train_time", "perf/samples_per_s", "perf/mfu")  # metrics.jsonl fields that differ between sittings
RUNNER = "import sys\n\nimport {module}  # noqa: F401\nfrom nnlab.cli import main\n\nsys.exit(main(sys.argv[1:]))\n"


def install(folder: Path, module: str, source: str) -> Path:
    """`folder/<module>.py` (the plugin) and `folder/runner.py` (the plugin, then the CLI); returns `folder`."""
    (folder / f"{module}.py").write_text(source)
    (folder / "runner.py").write_text(RUNNER.format(module=module))
    return folder


def env(folder: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{folder}", "OMP_NUM_THREADS": "1"}


def command(folder: Path, *args: str, procs: int = 1) -> list[str]:
    head = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={procs}"]
    return [*head, str(folder / "runner.py"), *args]


def cli(folder: Path, *args: str, procs: int = 1, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess:
    """The real `nnlab` command line with the plugin of `folder` imported, in 1 process or `procs` (torchrun)."""
    return subprocess.run(command(folder, *args, procs=procs), capture_output=True, text=True, env=env(folder),
                          timeout=timeout, **kw)


def run_dir(res: subprocess.CompletedProcess) -> Path:
    """The run folder a successful `nnlab train` printed last."""
    assert res.returncode == 0, res.stderr
    return Path(res.stdout.strip().splitlines()[-1])


def comparable(folder: Path, volatile: tuple[str, ...] = VOLATILE) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in volatile} for row in R.read_metrics(folder)]


def last_step(folder: Path) -> int:
    rows = R.read_metrics(folder)
    return rows[-1]["step"] if rows else 0


def kill_midway(folder: Path, recipe: Path, out: Path, kill_after: tuple[int, int], deadline: float = 120,
                **kw: Any) -> Path:
    """Train `recipe` into `out`, SIGKILL it once its last checkpoint exists and it logged a step in the range
    `kill_after` (a different moment on every run of the suite), check that every checkpoint file present is
    complete, and return the interrupted run folder."""
    proc = subprocess.Popen(command(folder, "train", str(recipe), "--out", str(out), "-q"), env=env(folder),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    at = random.Random().randint(*kill_after)
    end, run = time.time() + deadline, None
    while time.time() < end and proc.poll() is None:
        runs = list(out.glob("*-*"))
        if runs and (runs[0] / R.CHECKPOINTS / "last").exists() and last_step(runs[0]) >= at:
            run = runs[0]
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run is not None, "no checkpoint within the deadline"
    assert not (run / R.SUMMARY).exists()  # really interrupted
    for ckpt in (run / R.CHECKPOINTS).glob("*"):
        if ckpt.name.endswith(".tmp"):
            continue  # being written: never read
        if ckpt.name.endswith(".old") and ckpt.with_name(ckpt.name[:-4]).exists():
            continue  # the replaced copy, killed while being removed: nothing reads it, the next save removes it
        R.read_meta(ckpt)
        R.load_weights(ckpt)
    return run


def resume(folder: Path, run: Path, **kw: Any) -> None:
    """`nnlab train --resume run`: it succeeds and continues in the same folder."""
    res = cli(folder, "train", "--resume", str(run), "-q", **kw)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(run)


def plug(factory: Any, module: str, source: str) -> Any:
    """For a module-scoped fixture (`yield from plug(...)`): the plugin installed in a fresh folder and imported
    here too (its registry lines run in this process), the folder yielded, sys.path restored after."""
    import importlib

    folder = install(factory.mktemp(module), module, source)
    sys.path.insert(0, str(folder))
    importlib.import_module(module)
    yield folder
    sys.path.remove(str(folder))
