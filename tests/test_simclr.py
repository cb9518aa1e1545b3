"""SimCLR: NT-Xent against a hand-computed case and a naive loop, the batched augmentations (deterministic, no
per-image Python, identities where they must be), the kNN vote, the frozen encoder of the linear probe, and a tiny
pretraining -> linear probe (init.from) -> fine-tuning chain through the real CLI on the embedded digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import need_data

from nnlab import run as R
from nnlab.cli import main
from nnlab.config import load_config, section_from_dict
from nnlab.data import Batch, Spec
from nnlab.data.image import ImageSpec
from nnlab.errors import UserError
from nnlab.models import build, models
from nnlab.optim import build_optimizer, optimizers
from nnlab.tasks.contrastive import (
    SimCLR,
    SimCLRTaskConfig,
    colour_jitter,
    grayscale,
    hue_rotate,
    knn_predict,
    nt_xent,
    resized_crops,
)

RGB = ImageSpec(
    input_shape=(3, 16, 16),
    num_classes=10,
    classes=[str(i) for i in range(10)],
    mean=(0.49, 0.48, 0.45),
    std=(0.25, 0.24, 0.26),
)
QUICK = ["train.threads=1", "train.tensorboard=false", "train.precision=fp32"]


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR's loss as written in the paper: l(i, j) = -log(exp(s_ij / t) / sum_{k != i} exp(s_ik / t))."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2]).double()]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / (2 * n)


def test_nt_xent_hand_computed() -> None:
    """Two images, orthogonal, each view equal to its partner: every view sees similarities 1 (partner) and 0, 0
    (the others), so the loss is -log(e / (e + 2)) = log(1 + 2/e) at temperature 1, log(1 + 2e^-2) at 0.5."""
    z = torch.eye(2)
    loss, hits = nt_xent(z, z.clone(), 1.0)
    assert loss.item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6) and int(hits) == 4
    assert nt_xent(z, z.clone(), 0.5)[0].item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), abs=1e-6)
    # partners swapped: view 0's partner (image 0's second view) is now orthogonal to it, its double is a negative
    loss, hits = nt_xent(z, z.flip(0), 1.0)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.e + 1)), abs=1e-6) and int(hits) == 0


def test_nt_xent_equals_the_naive_loop_and_ignores_scale() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (0.1, 0.5, 2.0):
        assert nt_xent(z1, z2, t)[0].item() == pytest.approx(naive_nt_xent(z1, z2, t), rel=1e-5)
    assert nt_xent(3 * z1, 0.5 * z2, 0.5)[0].item() == pytest.approx(nt_xent(z1, z2, 0.5)[0].item(), rel=1e-5)
    z1.requires_grad_(True)
    nt_xent(z1, z2, 0.5)[0].backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def task(**kw) -> SimCLR:
    return SimCLR(SimCLRTaskConfig(**kw), RGB)


def images(n: int, spec: ImageSpec = RGB, seed: int = 0) -> torch.Tensor:
    """Normalised random images (n, C, H, W), as the loader hands them to a task."""
    u8 = torch.randint(0, 256, (n, *spec.input_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return spec.normalize(u8)


def test_views_shapes_ranges_determinism_and_difference() -> None:
    t, x = task(crop_size=12), images(8)
    v = t.views(x, torch.Generator().manual_seed(1))
    assert v.shape == (16, 3, 12, 12) and v.dtype == torch.float32
    pixels = v * t.std + t.mean  # back to [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.equal(v, t.views(x, torch.Generator().manual_seed(1)))  # the same seed, the same views
    assert not torch.allclose(v, t.views(x, torch.Generator().manual_seed(2)))
    assert all(not torch.allclose(v[i], v[8 + i]) for i in range(8))  # an image's two views differ
    cl = t.views(x.contiguous(memory_format=torch.channels_last), torch.Generator().manual_seed(1))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, v, atol=1e-6)


def test_views_are_batched_not_looped_per_image() -> None:
    """The number of tensor operations does not grow with the batch: no per-image Python (a loop over images would
    add at least one operation per image; a few may differ with the threads torch's kernels split into)."""
    t = task()

    def ops(n: int) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t.views(images(n), torch.Generator().manual_seed(0))
        return len(prof.events())

    assert abs(ops(64) - ops(4)) < 60 and abs(ops(256) - ops(4)) < 60


def test_geometry_and_colour_identities() -> None:
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    whole = resized_crops(x, 16, [1.0, 1.0], [1.0, 1.0], 0.0, g)  # the whole image, unflipped
    assert torch.allclose(whole, x, atol=1e-5)
    assert torch.allclose(resized_crops(x, 16, [1.0, 1.0], [1.0, 1.0], 1.0, g), x.flip(-1), atol=1e-5)
    ramp = (torch.arange(16) + 0.5) / 16  # pixel centres' x in [0, 1]
    ramps = torch.stack([ramp.expand(16, 16), ramp[:, None].expand(16, 16), ramp.expand(16, 16)])[None]
    quarter = resized_crops(ramps.expand(5, 3, 16, 16), 8, [0.25, 0.25], [1.0, 1.0], 0.0, g)  # half of each side
    span = 0.5 * (1 - 1 / 8)  # the crop's 8 pixel centres span 7/8 of its width, half the image's
    assert torch.allclose(quarter[:, 0, :, -1] - quarter[:, 0, :, 0], torch.full((5, 8), span), atol=1e-5)
    assert torch.allclose(quarter[:, 1, -1, :] - quarter[:, 1, 0, :], torch.full((5, 8), span), atol=1e-5)
    assert quarter[:, 0, :, 0].std() > 0.01  # (different crops at different places)
    assert torch.allclose(colour_jitter(x, 0.0, 1.0, g), x, atol=1e-6)  # strength 0: unchanged
    assert torch.equal(colour_jitter(x, 1.0, 0.0, g), x)  # never applied: unchanged
    assert torch.allclose(hue_rotate(x, torch.ones(5)), x, atol=1e-5)  # a whole turn
    grey = x.mean(1, keepdim=True).expand_as(x)  # grays have no chroma: any hue shift keeps them
    assert torch.allclose(hue_rotate(grey, torch.full((5,), 0.3)), grey, atol=1e-5)
    shifted = hue_rotate(x, torch.full((5,), 0.3))
    assert not torch.allclose(shifted, x, atol=1e-2)
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((shifted * w).sum(1), (x * w).sum(1), atol=1e-5)  # the luma is kept
    gray = grayscale(x, 1.0, g)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    jittered = colour_jitter(x, 0.5, 1.0, g)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, x)


def test_training_views_follow_the_global_rng() -> None:
    """Training views are drawn from a generator seeded by torch's global RNG, which the loop seeds and every
    checkpoint saves: the same RNG state gives the same loss (a resume), the next step other views."""
    torch.manual_seed(0)
    model = build("simclr", section_from_dict(models, {"name": "simclr", "widths": [8, 16]}), RGB)
    t, batch = task(), Batch(x=images(8), y=torch.zeros(8, dtype=torch.long))
    state = torch.get_rng_state()
    first = t.step(model, batch)["loss"].item()
    second = t.step(model, batch)["loss"].item()
    torch.set_rng_state(state)
    assert t.step(model, batch)["loss"].item() == first != second


def test_knn_votes_hand_made() -> None:
    """One neighbour of class 0 very close, two of class 1 farther: the majority says 1, sharp weights say 0."""
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.44], [0.8, 0.6], [-1.0, 0.0]]), dim=1)
    y = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[1.0, 0.0], [-0.9, 0.1]])
    assert knn_predict(F.normalize(q, dim=1), bank, y, 3, 0.0, 3).tolist() == [1, 1]  # majority (2nd: 1 of 1, 2)
    assert knn_predict(F.normalize(q, dim=1), bank, y, 3, 0.01, 3).tolist() == [0, 2]  # exp(sim / 0.01)
    assert knn_predict(F.normalize(q, dim=1), bank, y, 1, 0.1, 3).tolist() == [0, 2]  # k = 1: the nearest
    assert knn_predict(F.normalize(q, dim=1), bank, y, 50, 0.0, 3).tolist() == [1, 1]  # k > bank: all of it


def test_knn_monitor_embeds_the_bank_once_per_weights() -> None:
    data = {
        "name": "synthetic",
        "num_classes": 3,
        "image_size": 8,
        "n_train": 96,
        "n_test": 30,
        "val_size": 0,
        "noise": 0.2,
    }
    spec = ImageSpec(input_shape=(1, 8, 8), num_classes=3, classes=["a", "b", "c"])
    t = SimCLR(SimCLRTaskConfig(knn_data=data, knn_k=1, knn_bank=40, crop_scale=[0.8, 1.0]), spec)
    torch.manual_seed(0)
    model = build("simclr", section_from_dict(models, {"name": "simclr", "widths": [32]}), spec).eval()
    model.init_from_data(Batch(x=spec.normalize(t.bank()[0])))
    x = spec.normalize(t.bank()[0][:10])
    stats = t.eval_stats(model, Batch(x=x, y=t.bank()[1][:10]))
    assert len(t.bank()[0]) == 40 and int(stats["n"]) == 10
    assert int(stats["knn_hits"]) == 10  # each image's nearest in the bank is itself
    embedded = t._embedded
    t.eval_stats(model, Batch(x=x, y=t.bank()[1][:10]))
    assert t._embedded is embedded  # the same weights: the bank is not embedded again
    with torch.no_grad():
        model.groups[0].conv1.weight.mul_(1.5)
    t.eval_stats(model, Batch(x=x, y=t.bank()[1][:10]))
    assert t._embedded is not embedded
    metrics = t.metrics(stats)
    assert metrics["knn_acc"] == 1.0 and 0 <= metrics["pair_acc"] <= 1 and metrics["loss"] > 0


def test_task_and_config_errors() -> None:
    with pytest.raises(UserError, match="task.temperature"):
        load_config("cifar10-simclr", ["task.temperature=0"])
    with pytest.raises(UserError, match="task.crop_scale"):
        load_config("cifar10-simclr", ["task.crop_scale=[0.5,0.2]"])
    with pytest.raises(UserError, match="needs image data"):
        SimCLR(SimCLRTaskConfig(), Spec())
    with pytest.raises(UserError, match=r"holds images \(1, 8, 8\) in 10 classes, this run's data \(3, 16, 16\)"):
        task(knn_data={"name": "digits"}).bank()
    assert task(knn_data={"name": "digits"}).monitor == "knn_acc"
    assert task(knn_data={"name": "digits"}, knn_k=0).monitor == task().monitor == "loss"  # no kNN monitor
    cfg = load_config("cifar10-simclr", ["data.subset=100"])
    assert cfg.task.knn_data["subset"] == 100 and cfg.task.knn_data["name"] == "cifar10"  # the bank is ${data}


def test_encoder_names_are_fastnets() -> None:
    """The SimCLR net and the probe hold FastNet's tensors under FastNet's names and shapes, so init.from moves
    the encoder between them and cifar10-fast; only the projector and the heads differ."""
    spec = models["fastnet"].meta["example"]
    fast = build("fastnet", section_from_dict(models, {"name": "fastnet"}), spec).state_dict()
    pre = build("simclr", section_from_dict(models, {"name": "simclr"}), spec).state_dict()
    probe = build("simclr-probe", section_from_dict(models, {"name": "simclr-probe"}), spec).state_dict()
    encoder = {k: v.shape for k, v in fast.items() if not k.startswith("head.")}
    assert {k: v.shape for k, v in pre.items() if not k.startswith("projector.")} == encoder
    assert {k: v.shape for k, v in probe.items() if not k.startswith(("head.", "norm."))} == encoder
    x = torch.randn(4, *spec.input_shape)
    out = build("simclr", section_from_dict(models, {"name": "simclr"}), spec)(x)
    assert out.shape == (4, 128)
    out.square().mean().backward()


@pytest.mark.parametrize("optim", ["adamw", "sgd", "muon"])
def test_frozen_encoder_stays_out_of_the_optimizer(optim: str) -> None:
    spec = models["simclr-probe"].meta["example"]
    model = build("simclr-probe", section_from_dict(models, {"name": "simclr-probe"}), spec)
    opt = build_optimizer(model, section_from_dict(optimizers, {"name": optim, "weight_decay": 0.01}))
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(model.head.weight), id(model.head.bias)}
    assert model.head.training and not model.groups.training  # frozen BN from the start (no train() call yet)
    model.eval().train()
    assert model.head.training and not model.groups.training and not model.whiten.training  # frozen BN
    before = [t.clone() for t in model.groups.state_dict().values()]
    loss = F.cross_entropy(model(torch.randn(8, *spec.input_shape)), torch.arange(8))
    loss.backward()
    opt.opts[0].step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.groups.state_dict().values(), strict=True))


def run_folder(capsys) -> Path:
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def test_pretrain_probe_and_finetune_through_the_cli(tmp_path: Path, capsys) -> None:
    out = ["--out", str(tmp_path / "runs"), "-q"]
    assert main(["train", "digits-simclr", "train.epochs=3", *QUICK, *out]) == 0, capsys.readouterr().err
    pre = run_folder(capsys)
    summary = json.loads((pre / R.SUMMARY).read_text())
    assert summary["status"] == "completed" and summary["best"]["metric"] == "val/knn_acc"
    assert summary["final"]["test/knn_acc"] > 0.5  # 10 classes: chance is 0.1
    rows = [r for r in R.read_metrics(pre) if "perf/samples_per_s" in r]
    assert rows and all(r["perf/samples_per_s"] > 0 for r in rows)
    assert "## SimCLR" in (pre / R.REPORT).read_text() and (pre / R.PLOTS / "views.png").exists()

    probe_args = [
        "cifar10-linear-probe",
        "data.name=digits",
        "model.widths=[32,64]",
        "train.epochs=2",
        "train.batch_size=64",
        "train.channels_last=false",
        *QUICK,
        *out,
    ]
    assert main(["train", *probe_args, f"init.from={pre}"]) == 0, capsys.readouterr().err
    probe = run_folder(capsys)
    table = json.loads((probe / R.INIT).read_text())
    assert sorted(table["new"]) == [
        "head.bias",
        "head.weight",
        "norm.num_batches_tracked",
        "norm.running_mean",
        "norm.running_var",
    ]
    assert all(k.startswith(("whiten.", "groups.")) for k in table["loaded"]) and len(table["loaded"]) == 26
    assert table["skipped"] and all(k.startswith("projector.") for k in table["skipped"])
    theirs, mine = R.load_weights(R.checkpoint_dir(pre)), R.load_weights(R.checkpoint_dir(probe, "last"))
    assert all(torch.equal(theirs[k], mine[k]) for k in table["loaded"])  # the frozen encoder, BN statistics too
    assert json.loads((probe / R.SUMMARY).read_text())["final"]["test/acc"] > 0.5

    # a random encoder, for reference; and a fine-tuning of the whole classifier from the pretrained encoder
    assert main(["train", *probe_args]) == 0, capsys.readouterr().err
    assert not (run_folder(capsys) / R.INIT).exists()
    fine = [
        "cifar10-fast",
        "data.name=digits",
        "model.widths=[32,64]",
        "optim.lr=3.4",
        "model.head_lr=43",
        "train.epochs=1",
        "train.batch_size=64",
        "task.tta=none",
        "train.channels_last=false",
        *QUICK,
        *out,
    ]
    assert main(["train", *fine, f"init.from={pre}"]) == 0, capsys.readouterr().err
    table = json.loads((run_folder(capsys) / R.INIT).read_text())
    assert table["new"] == ["head.weight"] and len(table["loaded"]) == 26

    # a FastNet of other widths: the whitening fits, the mismatching layers are named with their shapes
    assert main(["train", *probe_args, "model.widths=[16,32]", f"init.from={pre}"]) == 0
    table = json.loads((run_folder(capsys) / R.INIT).read_text())
    assert [k for k in table["loaded"] if not k.endswith("num_batches_tracked")] == ["whiten.weight", "whiten.bias"]
    assert "groups.0.conv1.weight (32, 8, 3, 3)->(16, 8, 3, 3)" in table["new"]
    # an incompatible checkpoint: one clear message naming the mismatching tensors, exit 2, no folder left
    assert main(["train", "digits-cnn", "train.epochs=1", *QUICK, *out]) == 0
    cnn = run_folder(capsys)
    before = set((tmp_path / "runs").iterdir())
    assert main(["train", *probe_args, f"init.from={cnn}"]) == 2
    err = capsys.readouterr().err
    assert "no tensor of" in err and "whiten.weight" in err and "groups.0.conv1.weight" in err
    assert set((tmp_path / "runs").iterdir()) == before


class Interrupted(Exception):
    pass


def test_resume_draws_the_views_of_an_uninterrupted_run(tmp_path: Path) -> None:
    """Views come from the global RNG, which checkpoints save and a resume restores: a run interrupted after two
    epochs (its last checkpoint: the first epoch's end) and resumed ends with the metrics of one never interrupted;
    `evaluate` on the finished run (a new process would do the same) rebuilds the kNN bank and agrees."""
    import nnlab

    args = ["train.epochs=3", *QUICK]

    def stop(step: int, metrics: dict) -> None:
        if step == 18:  # the evaluation after the second epoch (9 steps each), before that epoch's checkpoint
            raise Interrupted

    with pytest.raises(Interrupted):
        nnlab.train("digits-simclr", args, out=tmp_path / "cut", quiet=True, progress=False, on_eval=stop)
    (folder,) = (tmp_path / "cut").glob("digits-simclr-*")
    run = nnlab.resume(folder, quiet=True, progress=False)
    ref = nnlab.train("digits-simclr", args, out=tmp_path / "ref", quiet=True, progress=False)
    assert run.summary["status"] == "completed" and run.final == ref.final
    assert run.summary["best"] == ref.summary["best"]
    assert run.evaluate("test")["metrics"] == {k.split("/")[1]: v for k, v in ref.final.items()}


def test_cifar10_recipes_end_to_end(tmp_path: Path, capsys) -> None:
    """The shipped CIFAR-10 recipes as they are (16x16 views, channels-last, precision auto), a few steps each."""
    data = need_data("cifar10", "cifar-10-python.tar.gz")
    out = ["--out", str(tmp_path), "--data-dir", str(data), "-q", "train.threads=1", "train.tensorboard=false"]
    small = [
        "train.max_steps=3",
        "train.batch_size=128",
        "data.val_size=1000",
        "train.eval_every=0",
        "train.eval_every_steps=3",
        "train.final_splits=[]",
    ]
    assert main(["train", "cifar10-simclr", *small, "task.knn_bank=1000", *out]) == 0, capsys.readouterr().err
    pre = run_folder(capsys)
    row = [r for r in R.read_metrics(pre) if "val/knn_acc" in r][-1]
    # the monitor's plumbing on real data (a random encoder is above chance too)
    assert row["val/knn_acc"] > 0.15 and row["step"] == 3
    assert main(["train", "cifar10-linear-probe", *small, f"init.from={pre}", *out]) == 0, capsys.readouterr().err
    assert len(json.loads((run_folder(capsys) / R.INIT).read_text())["loaded"]) == 38
