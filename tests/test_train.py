"""The training loop and the run folder contract, end to end on generated data (seconds each)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import TINY

import nnlab
from nnlab import run as R
from nnlab.cli import main
from nnlab.errors import Diverged, UserError


def tiny(tmp_path, optim=None, **train) -> nnlab.infer.Run:
    return nnlab.train(TINY, out=tmp_path / "runs", quiet=True, progress=False, train=train, optim=optim or {})


def test_run_folder_contract(tmp_path) -> None:
    folder = tiny(tmp_path, tensorboard=True)
    for name in (R.CONFIG, R.METRICS, R.SUMMARY, R.REPORT, R.TENSORBOARD, "plots/curves.png",
                 "plots/confusion_test.png", "plots/predictions.png"):
        assert (folder / name).exists(), name
    for which in ("best", "last"):
        for f in (R.WEIGHTS, R.MODEL_META, R.TRAIN_STATE):
            assert (folder / R.CHECKPOINTS / which / f).is_file()
    rows = R.read_metrics(folder)
    keys = set().union(*rows)
    assert {"step", "epoch", "time", "train/loss", "train/acc", "train/lr", "perf/samples_per_s",
            "val/loss", "val/acc", "test/acc", "test/macro_f1"} <= keys
    assert all("/" in k for k in keys - {"step", "epoch", "time", "train_time"})
    summary = json.loads((folder / R.SUMMARY).read_text())
    for key in ("final", "best", "wall_time_s", "params", "nnlab_version", "torch_version", "device", "seed", "task"):
        assert key in summary
    assert summary["final"]["test/acc"] > 0.5  # the generated classes are learnable
    assert summary["final"] == folder.final and summary["best"]["metric"] == "val/acc"  # the task's monitor
    assert len(summary["task"]["confusion"]["test"]) == 4
    cfg = yaml.safe_load((folder / R.CONFIG).read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["model"]["hidden"] == [32]  # fully resolved


def test_checkpoint_rebuilds_model_without_trainer(tmp_path) -> None:
    folder = tiny(tmp_path)
    loaded = nnlab.load_model(folder / R.CHECKPOINTS / "best")
    meta = json.loads((folder / R.CHECKPOINTS / "best" / R.MODEL_META).read_text())
    assert meta["config"]["model"]["name"] == "mlp" and meta["spec"]["num_classes"] == 4
    assert meta["spec"]["kind"] == "image" and meta["version"] == R.FORMAT_VERSION
    run = nnlab.load_run(folder)
    res = run.evaluate("test")
    assert res["metrics"]["acc"] == pytest.approx(run.summary["final"]["test/acc"])
    assert isinstance(loaded.model, torch.nn.Module)


def test_same_seed_same_result(tmp_path) -> None:
    a = json.loads((tiny(tmp_path) / R.SUMMARY).read_text())["final"]
    b = json.loads((tiny(tmp_path) / R.SUMMARY).read_text())["final"]
    assert a == b


def test_features_smoke(tmp_path) -> None:
    """Accumulation, clipping, EMA, onecycle, SGD, early stopping and step-wise evaluation together."""
    folder = tiny(tmp_path, {"name": "sgd", "lr": 0.05}, epochs=6, accumulate=2, grad_clip=1.0, ema=0.9,
                  schedule="onecycle", warmup=0.2, early_stopping=1, eval_every_steps=7, monitor="val/loss")
    summary = json.loads((folder / R.SUMMARY).read_text())
    assert summary["steps"] > 0 and math.isfinite(summary["final"]["test/loss"])
    times = [r["train_time"] for r in R.read_metrics(folder) if "val/loss" in r]  # mid-epoch ones too
    assert len(times) >= 3 and times[0] > 0 and all(a < b for a, b in zip(times, times[1:], strict=False))


def test_resume_of_a_finished_run_keeps_stop_best_and_log(tmp_path) -> None:
    """An early-stopped run resumed with a larger budget stays stopped; a best checkpoint caught between the
    two renames of its swap is put back; the final evaluation is logged once, not again on resume."""
    import os

    folder = tiny(tmp_path, {"lr": 1e-12}, epochs=6, early_stopping=1)  # no progress: stops after 2 evaluations
    steps = json.loads((folder / R.SUMMARY).read_text())["steps"]
    assert steps == 2 * (512 - 64) // 32
    before = [{k: v for k, v in r.items() if k != "time"} for r in R.read_metrics(folder)]
    best = folder / R.CHECKPOINTS / "best"
    os.replace(best, best.with_name("best.old"))  # as if killed in the middle of swapping it in
    nnlab.resume(folder, ("train.epochs=10",), quiet=True, progress=False)
    assert json.loads((folder / R.SUMMARY).read_text())["steps"] == steps
    assert (best / R.WEIGHTS).is_file() and not best.with_name("best.old").exists()
    assert [{k: v for k, v in r.items() if k != "time"} for r in R.read_metrics(folder)] == before


def test_cli_eval_predict_runs_report(tmp_path, tiny_recipe, capsys) -> None:
    from PIL import Image

    assert main(["train", str(tiny_recipe), "--out", str(tmp_path / "runs"), "-q"]) == 0
    folder = capsys.readouterr().out.strip().splitlines()[-1]  # the run folder is the last line
    assert main(["eval", folder, "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "val/acc" in out and "| **macro avg** |" in out
    img = tmp_path / "x.png"
    Image.fromarray((torch.rand(8, 8) * 255).byte().numpy()).save(img)
    (tmp_path / "bad.png").write_text("not an image")
    assert main(["predict", folder, str(img), str(tmp_path / "bad.png"), str(tmp_path / "missing.png")]) == 2
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(str(img)) and float(lines[0].split("\t")[2]) > 0
    assert "not a readable image" in lines[1] and "no such file" in lines[2]
    assert "2 of 3 inputs" in captured.err
    assert main(["predict", folder, str(img), "--top", "0"]) == 2
    assert "--top must be at least 1" in capsys.readouterr().err
    assert main(["predict", folder, str(img), "--top", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["input"] == str(img) and len(row["top"]) == 2 and row["top"][0] == [row["class"], row["prob"]]
    assert main(["eval", folder, "--json", "task.tta=flip"]) == 0  # the run's config, overridden for one eval
    flipped = json.loads(capsys.readouterr().out)["metrics"]
    assert main(["eval", folder, "--json"]) == 0
    assert flipped["loss"] != json.loads(capsys.readouterr().out)["metrics"]["loss"]
    assert main(["eval", folder, "task.tta=flop"]) == 2
    assert "task.tta" in capsys.readouterr().err
    assert main(["runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "tiny-" in out and "val/acc" in out  # each run by its monitored metric
    assert main(["report", folder]) == 0
    assert (tmp_path / "runs").exists()


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_recipe, capsys) -> None:
    out = str(tmp_path / "runs")
    assert main(["train", str(tiny_recipe), "--out", out, "-q", "optim.name=sgd", "optim.lr=0.01",
                 "train.epochs=1", "train.schedule=constant"]) == 0
    folder = capsys.readouterr().out.strip().splitlines()[-1]
    last = R.checkpoint_dir(folder, "last")
    before = (last / R.WEIGHTS).read_bytes()
    code = main(["train", "--resume", folder, "train.epochs=3", "optim.lr=1e30", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "loss is" in err and "at step" in err and "is intact" in err
    assert (last / R.WEIGHTS).read_bytes() == before
    nnlab.load_model(last)  # still loads


def test_bad_inputs_exit_2(tmp_path, tiny_recipe, capsys) -> None:
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not an nnlab run folder" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert main(["train", str(tiny_recipe), "--out", str(tmp_path / "r"), "-q", "train.batch_size=100000"]) == 2
    assert "larger than the training split" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    ("weights", "corrupt"),
    ("meta_foreign", "not an nnlab checkpoint"),
    ("meta_garbage", "corrupt"),
    ("shape", "do not fit"),
])
def test_corrupt_or_foreign_checkpoint(tmp_path, damage, message) -> None:
    folder = tiny(tmp_path)
    best = folder / R.CHECKPOINTS / "best"
    if damage == "weights":
        (best / R.WEIGHTS).write_bytes((best / R.WEIGHTS).read_bytes()[:100])
    elif damage == "meta_foreign":
        (best / R.MODEL_META).write_text(json.dumps({"model": "something else"}))
    elif damage == "meta_garbage":
        (best / R.MODEL_META).write_bytes(b"\x00\xff garbage")
    else:
        meta = json.loads((best / R.MODEL_META).read_text())
        meta["config"]["model"]["hidden"] = [64]
        (best / R.MODEL_META).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message):
        nnlab.load_model(folder)
    assert main(["eval", str(folder)]) == 2


def test_resume_state_is_never_unpickled_unrestricted(tmp_path) -> None:
    """A trainer.pt carrying code (a pickle that calls os.system) is refused, and the code never runs."""
    import os
    import pickle

    folder = tiny(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, folder / R.CHECKPOINTS / "last" / R.TRAIN_STATE, pickle_module=pickle)
    with pytest.raises(UserError, match="corrupt or unsafe"):
        nnlab.resume(folder, quiet=True, progress=False)
    assert not marker.exists()


def test_interrupted_folder_swap_is_recovered(tmp_path) -> None:
    """A kill between the two renames of a checkpoint swap leaves only `last.old`: it is put back."""
    folder = tiny(tmp_path)
    last = folder / R.CHECKPOINTS / "last"
    last.rename(last.with_name("last.old"))
    assert nnlab.load_model(folder, "last").model is not None
    assert last.is_dir()


def test_diverged_is_user_error() -> None:
    assert issubclass(Diverged, UserError)


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch, capsys) -> None:
    class Broken(torch.nn.Module):
        def forward(self, *a, **k):
            raise RuntimeError("no C++ compiler for inductor")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken())
    folder = nnlab.train(TINY, out=tmp_path / "runs", quiet=True, train={"compile": True})
    assert "torch.compile failed" in capsys.readouterr().err
    assert json.loads((folder / R.SUMMARY).read_text())["final"]["test/acc"] > 0.5


def test_task_can_take_over_the_update(tmp_path, capsys) -> None:
    """A task with its own optimizers and `update` (as a GAN's alternating players): the loop schedules, logs,
    checkpoints both optimizers, and a resumed run ends where an uninterrupted one does; accumulation is refused."""
    from dataclasses import dataclass

    from nnlab.optim import Optimizers
    from nnlab.tasks import tasks
    from nnlab.tasks.classification import Classification, ClassificationConfig

    @dataclass
    class TurnsConfig(ClassificationConfig):
        name: str = "turns"

    class Turns(Classification):
        def optimizers(self, model):  # player one: the first layer; player two: the rest
            params = list(model.parameters())
            return Optimizers([torch.optim.SGD(params[:2], lr=0.1, momentum=0.9),
                               torch.optim.SGD(params[2:], lr=0.1, momentum=0.9)])

        def update(self, model, batch, opt, stepper):
            out = {}
            for i in range(len(opt.opts)):  # each player's step on the loss as the other left it
                loss = self.step(model, batch)["loss"]
                stepper.backward(loss)
                stepper.step(i)
                out[f"loss{i}"] = loss
            return {"loss": out["loss1"], **out}

    if "turns" not in tasks:
        tasks.register("turns", config=TurnsConfig)(lambda cfg, spec: Turns(cfg, spec))
    sections = {"task": {"name": "turns"}, "train": {"schedule": "constant", "grad_clip": 5.0}}
    whole = nnlab.train(TINY, out=tmp_path / "a", quiet=True, progress=False, **sections)  # 2 epochs
    final = whole.final
    assert final["test/acc"] > 0.5
    assert {"train/loss0", "train/loss1"} <= set().union(*R.read_metrics(whole))
    state = R.load_train_state(whole / R.CHECKPOINTS / "last")
    assert len(state["optimizer"]) == 2 and all(s["state"] for s in state["optimizer"])  # momentum of both
    half = nnlab.train(TINY, ["train.epochs=1"], out=tmp_path / "b", quiet=True, progress=False, **sections)
    assert nnlab.resume(half, ("train.epochs=2",), quiet=True, progress=False).final == final
    with pytest.raises(UserError, match="accumulation does not apply"):
        nnlab.train(TINY, ["train.accumulate=2"], out=tmp_path / "c", quiet=True, progress=False, **sections)
    recipe = tmp_path / "turns.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, **{k: TINY.get(k, {}) | v for k, v in sections.items()}}))
    capsys.readouterr()
    assert main(["train", str(recipe), "train.accumulate=2", "--out", str(tmp_path / "c"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "accumulation does not apply" in err and "set train.accumulate=1" in err and "Traceback" not in err
    # train.grad_clip applies under `update` too: at 1e-6 no player's weights get far from where they started
    clipped = nnlab.train(TINY, ["train.grad_clip=1e-6"], out=tmp_path / "d", quiet=True, progress=False,
                          **sections)
    start = nnlab.train(TINY, ["train.max_steps=1", "train.grad_clip=1e-6"], out=tmp_path / "e", quiet=True,
                        progress=False, **sections)
    ends = [R.load_weights(run / R.CHECKPOINTS / "last") for run in (start, clipped, whole)]
    moved = [max((w[k] - ends[0][k]).abs().max().item() for k in ends[0]) for w in ends[1:]]
    assert moved[0] < 1e-3 < moved[1], moved


def test_foundation_run_is_refused_with_both_versions(tmp_path, capsys) -> None:
    """A run folder of format version 1 (no loop; optimizer fields in train) is refused with one message."""
    folder = tiny(tmp_path)
    cfg = yaml.safe_load((folder / R.CONFIG).read_text())
    del cfg["loop"]
    (folder / R.CONFIG).write_text(yaml.safe_dump(cfg))
    meta = json.loads((folder / R.CHECKPOINTS / "best" / R.MODEL_META).read_text())
    (folder / R.CHECKPOINTS / "best" / R.MODEL_META).write_text(json.dumps({**meta, "version": 1}))
    for args in (["eval", str(folder)], ["train", "--resume", str(folder)], ["report", str(folder)]):
        with pytest.raises(UserError, match="version 1; this nnlab reads version 2"):
            main(["--debug", *args])
        capsys.readouterr()
        assert main(args) == 2, args  # the CLI: one line naming both versions, exit 2
        err = capsys.readouterr().err
        assert "version 1; this nnlab reads version 2" in err and "Traceback" not in err, err
    with pytest.raises(UserError, match="format version 1; this nnlab reads version 2"):
        nnlab.load_model(folder / R.CHECKPOINTS / "best")
