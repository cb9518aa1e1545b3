"""Generative vision (autoencoders and the VAE): every model forward/backward, the importance-weighted NLL against
closed-form and quadrature values, the fixed binarisation, the recipes through the real CLI (train, then `nnlab
sample`, `reconstruct`, `interpolate`, predict, eval) with their bad inputs, encoder transfer by `init.from`, and an
exact resume."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import nnlab
from PIL import Image

import nnlab as nl
from nnlab import run as R
from nnlab.cli import main
from nnlab.config import section_from_dict
from nnlab.data import Batch
from nnlab.data.image import ImageSpec
from nnlab.models import build, models
from nnlab.models.autoencoder import iw_log_likelihood, kl_to_prior
from nnlab.tasks import tasks
from nnlab.tasks.autoencoder import fixed_binarize
from nnlab.tasks.generative import Autoencoding, Generative, grid_size, save_grid

DIGITS = ImageSpec(input_shape=(1, 8, 8), num_classes=10, classes=[str(i) for i in range(10)], mean=(0.3,), std=(0.4,))
NAMES = ("ae-mlp", "ae-conv", "vae-mlp", "vae-conv")
FAST = ["train.threads=1", "train.tensorboard=false", "train.precision=fp32"]
VAE_FAST = [*FAST, "train.epochs=3", "train.eval_every=1", "train.log_every=5", "task.iw_samples=20",
            "task.kl_warmup=20", "task.grid=16"]


def task_for(name: str, spec: ImageSpec):
    return tasks["vae" if name.startswith("vae") else "ae"].factory(
        section_from_dict(tasks, {"name": "vae" if name.startswith("vae") else "ae"}), spec)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spec", [models["ae-mlp"].meta["example"], DIGITS], ids=["mnist", "digits"])
def test_models_forward_backward_through_their_task(name: str, spec: ImageSpec) -> None:
    torch.manual_seed(0)
    model = build(name, section_from_dict(models, {"name": name}), spec)
    task = task_for(name, spec)
    x = spec.example(4)["x"]
    out = task.step(model, Batch(x=x))
    out["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert isinstance(model, Autoencoding)
    model.eval()
    with torch.no_grad():
        assert model.encode(x).shape == (4, model.latent_dim)
        rec = model.reconstruct(x)
        assert rec.shape == (4, *spec.input_shape) and 0 <= rec.min() and rec.max() <= 1
        assert set(task.metrics(task.eval_stats(model, Batch(x=x)))) >= {"loss", "mse" if name[0] == "a" else "nll"}
    assert isinstance(model, Generative) == name.startswith("vae")


def test_gaussian_decoder_and_bad_model_options(tmp_path: Path) -> None:
    from nnlab.errors import UserError

    for change, why in ((["model.name=cnn"], "task 'vae' trains a variational autoencoder"),
                        (["task.name=ae", "model.name=mlp"], "returns a tensor (64, 10) for images (64, 1, 8, 8)")):
        with pytest.raises(UserError, match=re.escape(why)):
            nl.train("digits-vae", [*FAST, "train.max_steps=1", *change], out=tmp_path, progress=False)

    model = build("vae-mlp", section_from_dict(models, {"name": "vae-mlp", "likelihood": "gaussian"}), DIGITS)
    out = model(DIGITS.example(3)["x"])
    assert out.params.shape == (3, 2, 8, 8)  # a mean and a log-variance per pixel
    assert model.sample(5).shape == (5, 1, 8, 8)
    with pytest.raises(UserError, match="likelihood"):
        build("vae-mlp", section_from_dict(models, {"name": "vae-mlp", "likelihood": "poisson"}), DIGITS)
    with pytest.raises(UserError, match="fewer stages"):
        build("ae-conv", section_from_dict(models, {"name": "ae-conv", "channels": [8, 8, 8, 8]}), DIGITS)


class LinearGaussian(torch.nn.Module):
    """z ~ N(0, I), x|z ~ N(W z + b, s^2 I): log p(x) = log N(x; b, W W^T + s^2 I) in closed form. W has orthogonal
    columns, so the true posterior is a diagonal Gaussian; `shift`/`widen` make q(z|x) wrong on purpose."""

    def __init__(self, shift: float = 0.0, widen: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=torch.float64))
        self.W = q * torch.tensor([1.5, 0.7], dtype=torch.float64)  # (5, 2), orthogonal columns
        self.b, self.s = torch.randn(5, generator=g, dtype=torch.float64), 0.5
        self.shift, self.widen = shift, widen

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.s**2 * torch.eye(5, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def exact_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prec = torch.eye(2, dtype=torch.float64) + self.W.T @ self.W / self.s**2  # diagonal (orthogonal columns)
        var = 1 / prec.diagonal()
        return ((x - self.b) @ self.W / self.s**2) * var, var.log().expand(len(x), 2)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.exact_posterior(x)
        return mu + self.shift, logvar + 2 * math.log(self.widen)

    def log_px(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(z @ self.W.T + self.b, self.s).log_prob(target).sum(-1)

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """E_q[log p(x|z)] - KL(q || p), in closed form."""
        mu, logvar = self.posterior(x)
        resid = x - mu @ self.W.T - self.b
        trace = (self.W.square() * logvar.exp()[:, None, :]).sum((1, 2))  # tr(W diag(var) W^T)
        expected = -2.5 * math.log(2 * math.pi * self.s**2) - (resid.square().sum(1) + trace) / (2 * self.s**2)
        return expected - kl_to_prior(mu, logvar).double()


def test_iw_estimate_against_the_closed_form() -> None:
    x = torch.tensor([[0.3, -1.0, 0.8, 2.0, -0.4]], dtype=torch.float64)
    exact = LinearGaussian()
    gen = torch.Generator().manual_seed(1)
    truth = exact.log_marginal(x)
    # with the true posterior as q every importance weight is p(x): any k is exact, also summed in chunks of one
    assert torch.allclose(iw_log_likelihood(exact, x, x, 1, gen), truth, atol=1e-9)
    assert torch.allclose(iw_log_likelihood(exact, x, x, 300, gen, chunk=1), truth, atol=1e-9)
    wrong = LinearGaussian(shift=0.6, widen=1.8)
    many = x.expand(4000, 5)
    l1 = iw_log_likelihood(wrong, many, many, 1, gen)  # 4000 independent single-sample estimates
    elbo = wrong.elbo(x)
    assert abs(l1.mean() - elbo) < 4 * l1.std() / math.sqrt(len(l1))  # k = 1: the ELBO in expectation
    assert elbo < truth - 0.3  # the bound is loose for this q
    x50 = x.expand(50, 5)  # k = 5000 in chunks of 4 samples (a budget of 1000 numbers): the running log-sum-exp
    lk = {k: iw_log_likelihood(wrong, x50, x50, k, gen, chunk=1000).mean() for k in (10, 5000)}
    assert elbo < lk[10] < lk[5000] <= truth + 1e-3 and truth - lk[5000] < 0.01  # rises with k, towards log p(x)


def test_iw_estimate_of_a_bernoulli_vae_against_quadrature() -> None:
    """A vae-mlp with a 1-number code over 3 binary pixels: log p(x) = log int p(x|z) N(z) dz by the trapezoid rule."""
    torch.manual_seed(0)
    spec = ImageSpec(input_shape=(1, 1, 3), num_classes=1, classes=["x"])
    model = build("vae-mlp", section_from_dict(models, {"name": "vae-mlp", "hidden": [], "latent": 1}), spec)
    x = torch.tensor([[[[1.0, 0.0, 1.0]]]])
    z = torch.linspace(-12, 12, 48001)[:, None]
    with torch.no_grad():
        log_prior = -0.5 * (z[:, 0].double() ** 2 + math.log(2 * math.pi))
        log_joint = model.log_px(z, x.expand(len(z), 1, 1, 3)).double() + log_prior
    dz = float(z[1] - z[0])
    truth = torch.logsumexp(log_joint, 0) + math.log(dz)
    gen = torch.Generator().manual_seed(0)
    est = iw_log_likelihood(model, x.expand(20, 1, 1, 3), x.expand(20, 1, 1, 3), 5000, gen).mean()
    assert abs(est - truth) < 0.01, (est, truth)


def test_fixed_binarisation_is_per_image_and_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 28, 28, generator=g)
    whole, ids = fixed_binarize(x)
    parts = torch.cat([fixed_binarize(x[i:i + 1])[0] for i in range(16)])
    assert torch.equal(whole, parts) and set(whole.unique().tolist()) <= {0.0, 1.0}  # whatever the batch
    assert torch.equal(fixed_binarize(x.flip(0))[0], whole.flip(0)) and len(set(ids.tolist())) == 16
    flat = torch.full((8, 3, 32, 32), 0.3) + 0.01 * torch.rand(8, 3, 32, 32, generator=g)
    assert abs(fixed_binarize(flat)[0].mean().item() - 0.305) < 0.01  # P(1) = the pixel's value
    assert (fixed_binarize(flat)[0][0] != fixed_binarize(flat)[0][1]).any()  # other images, other draws


def test_save_grid_sizes_and_errors(tmp_path: Path) -> None:
    from nnlab.errors import UserError

    save_grid(tmp_path / "new" / "g.png", torch.rand(10, 3, 5, 7), nrow=4, scale=2)
    assert Image.open(tmp_path / "new" / "g.png").size == grid_size(10, 5, 7, 4, 2) == (4 * 16 + 2, 3 * 12 + 2)
    (tmp_path / "file").write_text("")
    for bad, why in ((tmp_path / "file" / "g.png", "is a file, not a folder"), (Path("/proc/x.png"), "cannot write"),
                     (tmp_path / "g.jpg", "ending in .png")):
        with pytest.raises(UserError, match=why):
            save_grid(bad, torch.rand(2, 1, 4, 4))


# --- through the command line ---------------------------------------------------------------------------------
def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """The real CLI in this process (the commands' argument parsing, dispatch and error handling)."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """digits-vae, an MLP autoencoder and a classifier on digits, each trained for a few steps."""
    out = tmp_path_factory.mktemp("gen")
    made = {}
    for key, recipe, extra in (("vae", "digits-vae", VAE_FAST),
                               ("ae", "digits-vae", [*FAST, "model.name=ae-conv", "model.channels=[16,16]",
                                                     "model.convs_per_stage=2", "model.hidden=32", "task.name=ae",
                                                     "train.epochs=2", "train.eval_every=1"]),
                               ("cls", "digits-mlp", [*FAST, "train.max_steps=2"])):
        made[key] = nl.train(recipe, extra, out=out / key, progress=False).path
    return made


def test_vae_recipe_trains_writes_grids_and_reports(runs: dict[str, Path]) -> None:
    folder = runs["vae"]
    final = json.loads((folder / R.SUMMARY).read_text())["final"]
    assert {"test/loss", "test/elbo", "test/rec", "test/kl", "test/nll", "test/active"} <= set(final)
    assert final["test/loss"] == pytest.approx(-final["test/elbo"]) and final["test/nll"] <= final["test/loss"] + 0.5
    assert final["test/loss"] == pytest.approx(final["test/rec"] + final["test/kl"])
    grids = sorted((folder / R.PLOTS).glob("samples-*.png"))
    assert len(grids) == 3 and Image.open(grids[0]).size == grid_size(16, 8, 8, 4, 3)  # 16 samples, 8x8 at 3x
    report = (folder / R.REPORT).read_text()
    assert "Prior samples" in report and "plots/curves.png" in report and "IW NLL" in report
    rows = R.read_metrics(folder)
    assert any("train/kl_weight" in r and r["train/kl_weight"] < 1 for r in rows)  # the warm-up shows in the logs
    assert [r["train/kl_weight"] for r in rows if "train/kl_weight" in r][-1] == 1.0


def test_family_commands_write_grids_of_the_right_size(runs: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    vae, ae = runs["vae"], runs["ae"]
    code, out, _ = cli(capsys, "sample", str(vae), "--n", "10", "--out", str(tmp_path / "s.png"), "--seed", "3")
    assert code == 0 and out.strip() == str(tmp_path / "s.png")
    assert Image.open(tmp_path / "s.png").size == grid_size(10, 8, 8, None, 3)
    first = (tmp_path / "s.png").read_bytes()
    cli(capsys, "sample", str(vae), "--n", "10", "--out", str(tmp_path / "s.png"), "--seed", "3")
    assert (tmp_path / "s.png").read_bytes() == first  # the seed fixes the draws
    for run in (vae, ae):
        code, out, err = cli(capsys, "reconstruct", str(run), "--n", "12")
        assert code == 0, err
        assert Path(out.strip()) == run / R.PLOTS / "reconstruct.png"
        assert Image.open(out.strip()).size == grid_size(4 * 8, 8, 8, 8, 3)  # 12 pairs: 2 rows of 8 over 2 rows of 8
        code, out, err = cli(capsys, "interpolate", str(run), "--steps", "5", "--rows", "3",
                             "--out", str(tmp_path / "i.png"))
        assert code == 0 and Image.open(tmp_path / "i.png").size == grid_size(15, 8, 8, 5, 3), err
    # the commands through a real subprocess, as a user types them
    res = nnlab("sample", str(vae), "--n", "4", "--out", str(tmp_path / "p.png"))
    assert res.returncode == 0 and (tmp_path / "p.png").exists(), res.stderr


def test_bad_inputs_of_the_commands(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "sample", str(runs["cls"]), "--out", str(tmp_path / "c.png"))
    assert code == 2 and "takes a run of task vae or gan" in err and "task 'classification'" in err
    code, _, err = cli(capsys, "sample", str(runs["ae"]))  # an autoencoder has no prior
    assert code == 2 and "task 'ae'" in err
    code, _, err = cli(capsys, "reconstruct", str(runs["cls"]))
    assert code == 2 and "task 'classification'" in err
    code, _, err = cli(capsys, "sample", str(runs["vae"]), "--n", "0", "--out", str(tmp_path / "one.png"))
    assert code == 0 and "--n 0 is outside 1..1024: using 1" in err
    assert Image.open(tmp_path / "one.png").size == grid_size(1, 8, 8, None, 3)
    code, _, err = cli(capsys, "sample", str(runs["vae"]), "--n", "99999", "--out", str(tmp_path / "many.png"))
    assert code == 0 and "using 1024" in err
    code, _, err = cli(capsys, "interpolate", str(runs["vae"]), "--steps", "0", "--rows", "1000",
                       "--out", str(tmp_path / "w.png"))
    assert code == 0 and "--steps 0 is outside 2..64" in err and "--rows 1000 is outside 1..64" in err
    (tmp_path / "afile").write_text("")
    for out, why in (("/proc/x.png", "cannot write /proc/x.png"), (str(tmp_path / "afile" / "x.png"), "is a file"),
                     (str(tmp_path / "x.gif"), "ending in .png")):
        code, _, err = cli(capsys, "sample", str(runs["vae"]), "--out", out)
        assert code == 2 and why in err and "Traceback" not in err


def test_predict_and_eval_score_images(runs: dict[str, Path], tmp_path: Path) -> None:
    img = tmp_path / "digit.png"
    Image.fromarray((torch.rand(8, 8) * 255).to(torch.uint8).numpy(), "L").save(img)
    rows = nl.load_run(runs["vae"]).predict([str(img), str(tmp_path / "missing.png")])
    assert set(rows[0]) >= {"input", "loss", "elbo", "rec", "kl", "nll"} and "error" in rows[1]
    assert rows[0]["nll"] <= rows[0]["loss"] + 1.0
    rows = nl.load_run(runs["ae"]).predict([str(img)])
    assert set(rows[0]) >= {"loss", "mse", "bce"} and 0 <= rows[0]["mse"] <= 1
    res = nl.load_run(runs["vae"]).evaluate("test", overrides=("task.iw_samples=50",))
    summary = json.loads((runs["vae"] / R.SUMMARY).read_text())["final"]
    assert res["metrics"]["loss"] == pytest.approx(summary["test/loss"], abs=1e-4)  # fixed binarisation and draws
    assert res["metrics"]["nll"] != summary["test/nll"]  # another k


def test_encoder_transfers_to_a_classifier(runs: dict[str, Path], tmp_path: Path) -> None:
    """The conv autoencoder's encoder is the cnn classifier's: init.from copies its stages and first head layer."""
    run = nl.train("digits-cnn", [*FAST, "train.max_steps=2", "model.channels=[16,16]", "model.hidden=32",
                                  f"init.from={runs['ae']}"], out=tmp_path, progress=False)
    table = json.loads((run.path / R.INIT).read_text())
    assert any(k.startswith("features.") for k in table["loaded"]) and "head.2.weight" in table["loaded"]
    assert any(k.startswith("head.5.weight") for k in table["new"])  # the class logits instead of the code
    assert any(k.startswith("decoder.") for k in table["skipped"])


def test_init_from_an_incompatible_run_names_the_layers(runs: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "train", "digits-cnn", *FAST, "train.max_steps=2", f"init.from={runs['vae']}",
                       "--out", str(tmp_path))
    assert code == 2 and "no tensor" in err and "features.0.weight" in err and not list(tmp_path.iterdir())


def test_resume_is_exact(tmp_path: Path) -> None:
    """Dynamic binarisation (the global RNG, restored), the warm-up clock (a buffer) and the fixed evaluation draws:
    a run interrupted at its second evaluation and resumed ends as an uninterrupted one."""
    over = [*FAST, "train.max_steps=60", "train.epochs=0", "train.eval_every_steps=20", "train.checkpoint_every=20",
            "train.eval_every=0", "task.kl_warmup=50", "task.iw_samples=10", "task.grid=0", "train.schedule=constant"]
    ref = nl.train("digits-vae", over, out=tmp_path / "ref", progress=False)

    class Stop(Exception):
        pass

    def stop(step: int, metrics: dict) -> None:
        if step == 40:
            raise Stop

    with pytest.raises(Stop):
        nl.train("digits-vae", over, out=tmp_path / "cut", progress=False, on_eval=stop)
    again = nl.resume(next((tmp_path / "cut").iterdir()), progress=False)
    assert again.final == ref.final and again.summary["steps"] == 60
