"""GANs: the DCGAN players, the domain FID against scipy's sqrtm formula and hand-computed cases, the IS analogue
on hand-made softmax outputs, `digits-gan` through the real CLI (sample grids, FID/IS with a digits classifier,
`nnlab sample`, eval, report; predict refused), a run killed with SIGKILL and resumed to the metrics and weights of an
uninterrupted one, and the bad inputs (a classifier that is not a run, of another task or image size, a wrong
loss name, BatchNorm in a WGAN-GP critic, a model without players)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, TINY, nnlab
from PIL import Image

import nnlab as nl
from nnlab import run as R
from nnlab.config import load_config
from nnlab.data.image import ImageSpec
from nnlab.errors import Diverged, UserError
from nnlab.models import build
from nnlab.models.gan import GANConfig
from nnlab.tasks.fid import frechet_distance, inception_score, load_classifier, mean_cov, moments
from nnlab.tasks.generative import Generative

FAST = ["train.threads=1", "train.tensorboard=false", "task.fid_samples=200", "train.log_every=5",
        "train.precision=fp32"]
VOLATILE = ("time", "train_time", "perf/samples_per_s")


def run_dir(res: subprocess.CompletedProcess) -> Path:
    assert res.returncode == 0, res.stderr
    return Path(res.stdout.strip().splitlines()[-1])


def train(recipe: str | Path, out: Path, *overrides: str) -> Path:
    """A run trained in this process (cheaper than a CLI subprocess); its folder."""
    return nl.train(str(recipe), list(overrides), out=out, quiet=True, progress=False).path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits classifier run: the FID/IS features of the digits GANs (8x8)."""
    return train("digits-cnn", tmp_path_factory.mktemp("clf"), "train.epochs=4", "train.threads=1",
                 "train.tensorboard=false", "data.crop_padding=0")


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory: pytest.TempPathFactory, classifier: Path) -> Path:
    out = tmp_path_factory.mktemp("gan")
    return run_dir(nnlab("train", "digits-gan", "--out", str(out), "-q", *FAST, "train.max_steps=150",
                         "train.eval_every_steps=75", "train.eval_every=0", f"task.fid_classifier={classifier}"))


# --- models ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "norm"), [((1, 28, 28), "batch"), ((1, 8, 8), "layer"), ((3, 8, 8), "none")])
def test_players_forward_backward(shape: tuple[int, int, int], norm: str) -> None:
    torch.manual_seed(0)
    spec = ImageSpec(input_shape=shape, num_classes=10, classes=[str(i) for i in range(10)])
    model = build("dcgan", GANConfig(latent_dim=16, g_width=8, d_width=8, d_norm=norm), spec)
    assert isinstance(model, Generative) and model.latent_dim == 16
    fake = model.generator(torch.randn(5, 16))  # (5, C, H, W) in [-1, 1]
    assert fake.shape == (5, *shape) and fake.abs().max() <= 1
    score = model.discriminator(fake)
    assert score.shape == (5, 1)
    score.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.discriminator.modules())
    assert has_bn == (norm == "batch")
    model.eval()
    images = model.sample(4, torch.Generator().manual_seed(3))
    assert images.shape == (4, *shape) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, model.sample(4, torch.Generator().manual_seed(3)))  # the seed decides the draws
    with pytest.raises(UserError, match="divisible by 4"):
        build("dcgan", GANConfig(), ImageSpec(input_shape=(1, 30, 30), num_classes=2, classes=["a", "b"]))


# --- FID and IS against references ---------------------------------------------------------------------------
def scipy_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The formula as pytorch-fid computes it: scipy's sqrtm of the product."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_frechet_distance_equals_scipy_sqrtm(dim: int) -> None:
    rng = np.random.default_rng(dim)
    for _ in range(3):
        a = rng.normal(size=(4 * dim, dim)) @ rng.normal(size=(dim, dim))  # correlated features
        b = rng.normal(size=(4 * dim, dim)) * rng.uniform(0.5, 2, dim) + rng.normal(size=dim)
        mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
        ours = frechet_distance(*(torch.from_numpy(t) for t in (mu1, s1, mu2, s2)))
        assert ours == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-7, abs=1e-8)


def test_frechet_distance_by_hand() -> None:
    t = torch.tensor
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(t([1.0]), t([[4.0]]), t([-0.5]), t([[0.25]])) == pytest.approx(1.5**2 + 1.5**2)
    # independent dimensions add up
    v1, v2 = t([1.0, 9.0, 0.0]), t([4.0, 1.0, 2.25])
    want = 1.0 + ((v1.sqrt() - v2.sqrt()) ** 2).sum().item()
    assert frechet_distance(t([0.0, 1, 0]), v1.diag(), t([0.0, 0, 0]), v2.diag()) == pytest.approx(want)
    # a set against itself is at distance 0, also with singular covariances (fewer samples than features)
    x = torch.randn(5, 12, dtype=torch.float64)
    mu, cov = mean_cov(moments("x", x), "x")
    assert torch.linalg.matrix_rank(cov) < 12
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6)


def test_moments_add_up_to_the_covariance() -> None:
    x = torch.randn(100, 7, dtype=torch.float64)
    halves = [moments("x", part) for part in x.split([37, 63])]
    stats = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    mu, cov = mean_cov(stats, "x")
    torch.testing.assert_close(mu, x.mean(0))
    torch.testing.assert_close(cov, torch.cov(x.T))


def test_inception_score_on_hand_made_softmax() -> None:
    def score(p: torch.Tensor) -> float:
        p = p.double()
        return inception_score(p.sum(0), torch.xlogy(p, p).sum(), len(p))

    assert score(torch.full((50, 10), 0.1)) == pytest.approx(1.0)  # the same uncertain answer for every image
    assert score(torch.eye(10).repeat(7, 1)) == pytest.approx(10.0)  # confident, balanced over 10 classes
    assert score(torch.eye(10)[torch.zeros(30, dtype=torch.long)]) == pytest.approx(1.0)  # collapsed to one class
    assert score(torch.eye(10)[torch.tensor([0, 1] * 5)]) == pytest.approx(2.0)
    p = torch.randn(40, 10).softmax(-1).double()  # the definition, computed directly
    kl = (p * (p.log() - p.mean(0, keepdim=True).log())).sum(1)
    assert score(p) == pytest.approx(kl.mean().exp().item())


def test_evaluation_is_exact_over_processes(classifier: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What DDP does to the statistics (tensors summed, lists concatenated, one task per process): two processes,
    each with its shard of every batch and every other generated image, give the metrics of one process."""
    import nnlab.tasks.gan as gan_task
    from nnlab.config import section_from_dict
    from nnlab.data import datasets
    from nnlab.tasks import build as build_task
    from nnlab.tasks import tasks
    from nnlab.tasks.fid import add

    data = datasets["digits"].factory(section_from_dict(datasets, {"name": "digits"}))
    cfg = section_from_dict(tasks, {"name": "gan", "fid_classifier": str(classifier), "fid_samples": 300})
    torch.manual_seed(0)
    model = build("dcgan", GANConfig(latent_dim=8, g_width=8, d_width=8, d_norm="layer"), data.spec).eval()
    batches = list(data.loader("val", 60).epoch(0))  # 3 batches of 60
    one = build_task(cfg, data.spec)
    stats: dict = {}
    for b in batches:
        add(stats, one.eval_stats(model, b))
    alone = one.metrics(stats)
    stats = {}
    for rank in (0, 1):
        monkeypatch.setattr(gan_task, "shard", lambda r=rank: (r, 2))
        task = build_task(cfg, data.spec)  # each process has its own
        for b in batches:
            add(stats, task.eval_stats(model, b.split(2)[rank]))
    together = one.metrics(stats)
    assert set(alone) == set(together) and {"fid", "is", "fd_pixel", "d_acc_real"} <= set(alone)
    for k, v in alone.items():
        assert together[k] == pytest.approx(v, rel=1e-9, abs=1e-9), k


# --- through the CLI ---------------------------------------------------------------------------------------------
def test_classifier_features_are_its_penultimate_activations(classifier: Path) -> None:
    clf = load_classifier(str(classifier), (1, 8, 8))
    x = torch.rand(6, 1, 8, 8)
    f, p = clf.features(x)
    assert f.shape == (6, 128) and p.shape == (6, 10)  # digits-cnn's hidden layer; class probabilities
    torch.testing.assert_close(p.sum(1), torch.ones(6))
    net = clf.net
    q = (x * 255).round() / 255
    with torch.no_grad():
        hidden = net.head[:-1](net.features((q - clf.mean) / clf.std))  # everything but the last layer
    torch.testing.assert_close(f, hidden)


def test_digits_gan_trains_samples_and_reports(gan_run: Path, classifier: Path, tmp_path: Path) -> None:
    rows = R.read_metrics(gan_run)
    logged = [r for r in rows if "train/loss_d" in r]
    assert {"train/loss_g", "train/d_acc_real", "train/d_acc_fake", "train/diversity"} <= set(logged[-1])
    evals = [r for r in rows if "val/fid" in r]
    assert [r["step"] for r in evals] == [75, 150]
    assert {"val/is", "val/fd_pixel", "val/feature_diversity", "val/d_acc_real"} <= set(evals[-1])
    assert 1 <= evals[-1]["val/is"] <= 10 and evals[-1]["val/fid"] > 0
    for step in (75, 150):  # a sample grid after every evaluation: 64 draws of 8x8, enlarged 3x
        with Image.open(gan_run / R.PLOTS / f"samples-{step:06d}.png") as im:
            assert im.size == (8 * 26 + 2, 8 * 26 + 2)
    s = json.loads((gan_run / R.SUMMARY).read_text())
    assert s["best"]["metric"] == "val/fid" and s["best"]["higher_is_better"] is False
    report = (gan_run / R.REPORT).read_text()
    assert "## GAN" in report and "plots/gan.png" in report and "plots/samples-000150.png" in report
    assert (gan_run / R.PLOTS / "gan.png").exists()

    # the fixed z makes an evaluation repeatable: evaluating the best checkpoint again gives the final test FID
    got = nl.load_run(gan_run).evaluate("test")["metrics"]
    assert got["fid"] == pytest.approx(s["final"]["test/fid"], rel=1e-9)
    assert got["is"] == pytest.approx(s["final"]["test/is"], rel=1e-9)

    # FID falls: the trained generator scores far better than an untrained one on the same fixed draws
    fresh = train("digits-gan", tmp_path, *FAST, "train.max_steps=1", "train.eval_every_steps=1",
                  "train.final_splits=[]", f"task.fid_classifier={classifier}", "task.lr_g=1e-12", "task.lr_d=1e-12")
    untrained = next(r["val/fid"] for r in R.read_metrics(fresh) if "val/fid" in r)
    assert evals[-1]["val/fid"] < 0.5 * untrained

    out = tmp_path / "drawn.png"
    one = nnlab("sample", str(gan_run), "--n", "16", "--out", str(out), "--seed", "1")
    assert one.returncode == 0, one.stderr
    with Image.open(out) as im:
        assert im.size == (4 * 26 + 2, 4 * 26 + 2)

    Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(tmp_path / "digit.png")
    with pytest.raises(UserError, match="nnlab sample RUN"):  # a GAN predicts nothing from an image
        nl.load_run(gan_run).predict([str(tmp_path / "digit.png")])


def test_killed_gan_resumes_to_the_uninterrupted_run(classifier: Path, tmp_path: Path) -> None:
    """SIGKILL at a random step, `--resume`: the same metrics (FID included) and weights as one sitting."""
    args = [*FAST, "train.max_steps=60", "train.checkpoint_every=5", "train.eval_every_steps=20",
            f"task.fid_classifier={classifier}", "task.grid=16"]
    ref = train("digits-gan", tmp_path / "ref", *args)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "nnlab", "train", "digits-gan", "--out", str(tmp_path / "k"), "-q",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    kill_at, end, folder = random.Random().randint(8, 45), time.time() + 120, None
    while time.time() < end and proc.poll() is None:
        runs = list((tmp_path / "k").glob("digits-gan-*"))
        rows = R.read_metrics(runs[0]) if runs else []
        if rows and (runs[0] / R.CHECKPOINTS / "last").exists() and rows[-1]["step"] >= kill_at:
            folder = runs[0]
            break
        time.sleep(0.002)
    assert proc.poll() is None and folder is not None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    nl.resume(folder, quiet=True, progress=False)
    a, b = (json.loads((d / R.SUMMARY).read_text()) for d in (ref, folder))
    assert a["final"] == b["final"] and a["best"] == b["best"] and "test/fid" in a["final"]
    strip = [[{k: v for k, v in r.items() if k not in VOLATILE} for r in R.read_metrics(d)] for d in (ref, folder)]
    assert strip[0] == strip[1]
    w1, w2 = (R.load_weights(d / R.CHECKPOINTS / "last") for d in (ref, folder))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    opt = R.load_train_state(folder / R.CHECKPOINTS / "last")["optimizer"]
    assert len(opt) == 2 and all(o["state"] for o in opt)  # both players' Adam moments are in the resume state


# --- bad inputs --------------------------------------------------------------------------------------------------
def test_bad_inputs(classifier: Path, gan_run: Path, tmp_path: Path) -> None:
    res = nnlab("train", "digits-gan", "--out", str(tmp_path / "o"), "-q", *FAST, f"task.fid_classifier={tmp_path}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"task.fid_classifier={tmp_path}" in res.stderr and "not an nnlab run folder" in res.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # refused: no run folder left

    def refused(*overrides: str) -> str:
        with pytest.raises(UserError) as e:
            nl.train("digits-gan", [*FAST, "train.max_steps=2", *overrides], out=tmp_path / "x", quiet=True,
                     progress=False)
        return str(e.value)

    assert "run of task 'gan'" in refused(f"task.fid_classifier={gan_run}")
    tiny = dict(TINY, data={**TINY["data"], "image_size": 12})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    other = train(tmp_path / "tiny.yaml", tmp_path / "t")
    assert "shape (1, 12, 12), but these images are (1, 8, 8)" in refused(f"task.fid_classifier={other}")
    assert "set model.d_norm=layer" in refused("task.loss=wgan-gp")
    msg = refused(f"init.from={classifier}")  # a classifier's weights fit none of a GAN's layers
    assert "no tensor" in msg and "generator.project.0.weight" in msg
    assert "generator" in refused("model.name=mlp")
    assert not list((tmp_path / "x").glob("*"))  # none of them left a run folder
    with pytest.raises(UserError, match="did you mean 'wgan-gp'"):
        load_config("digits-gan", ["task.loss=wgan_gp"])
    with pytest.raises(UserError, match="task.n_critic"):
        load_config("digits-gan", ["task.n_critic=0"])


def test_a_diverging_gan_stops_on_nan(tmp_path: Path) -> None:
    """NaN detection as for every task: a non-finite loss of either player stops the run, naming the step."""
    with pytest.raises(Diverged, match="not finite"):
        train("digits-gan", tmp_path, *FAST, "train.max_steps=4", "task.lr_g=1e30", "task.lr_d=1e30")


def test_empty_classifier_falls_back_to_pixels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = train("digits-gan", tmp_path, *FAST, "train.max_steps=6", "train.eval_every_steps=6", "task.loss=hinge",
                   "task.grid=0")
    assert "task.fid_classifier is empty" in capsys.readouterr().err
    s = json.loads((folder / R.SUMMARY).read_text())
    assert s["best"]["metric"] == "val/fd_pixel" and "test/fid" not in s["final"] and "test/fd_pixel" in s["final"]
    assert not list((folder / R.PLOTS).glob("samples-*"))
