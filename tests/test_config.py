"""Recipes, overrides and every config error: one clear message naming the key and the fix."""

from __future__ import annotations

import pytest

from nnlab.cli import main
from nnlab.config import load_config, recipe_names
from nnlab.errors import UserError


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_resolves(name: str) -> None:
    cfg = load_config(name)
    assert cfg.name == name
    assert (cfg.train.steps if cfg.loop == "rl" else cfg.train.epochs) > 0


def test_shipped_recipes() -> None:
    assert {"digits-cnn", "digits-mlp", "mnist-mlp", "mnist-cnn", "cifar10-resnet", "cifar10-fast"} <= set(
        recipe_names())


def test_overrides_and_sections() -> None:
    cfg = load_config("mnist-cnn", ["train.epochs=3", "optim.lr=2e-3", "model.channels=[16,32]"])
    assert (cfg.train.epochs, cfg.optim.lr, cfg.model.channels) == (3, 2e-3, [16, 32])
    cfg = load_config("mnist-cnn", train={"epochs": 4}, data={"val_size": 0})
    assert (cfg.train.epochs, cfg.data.val_size, cfg.model.hidden) == (4, 0, 256)
    # switching the model family swaps the section's schema, with that family's defaults
    cfg = load_config("mnist-cnn", ["model.name=mlp"])
    assert cfg.model.hidden == [512, 256]
    # an optimizer with its own section: Muon's fields live with Muon
    cfg = load_config("mnist-cnn", ["optim.name=muon", "optim.muon_lr=0.05"])
    assert (cfg.optim.name, cfg.optim.muon_lr, cfg.optim.lr) == ("muon", 0.05, 0.1)
    assert load_config("mnist-cnn").optim.name == "adamw" and load_config("mnist-cnn").loop == "supervised"


@pytest.mark.parametrize("overrides, message", [
    (["train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'epochs'?)"),
    (["model.chanels=[8]"], "did you mean 'channels'?"),
    (["trian.epochs=3"], "unknown config key 'trian' (did you mean 'train'?)"),
    (["train.epochs=three"], "bad value for config key 'train.epochs'"),
    (["optim.lr=-1"], "bad value for config key 'optim.lr': must be a positive number"),
    (["optim.name=adam"], "unknown optimizer 'adam' (did you mean 'adamw'?)"),
    (["train.lr=0.1"], "unknown config key 'train.lr' (it is optim.lr)"),
    (["init.form=x"], "unknown config key 'init.form' (did you mean 'from'?)"),
    (["loop=supervisd"], "unknown loop 'supervisd' (did you mean 'supervised'?)"),
    (["train.batch_size=0"], "train.batch_size"),
    (["model.name=resnt18"], "unknown model 'resnt18' (did you mean 'resnet18'?)"),
    (["data.name=mnsit"], "unknown dataset 'mnsit' (did you mean 'mnist'?)"),
    (["data.flip=randm"], "did you mean 'random'?"),
    (["train.epochs"], "is not of the form key=value"),
])
def test_config_errors(overrides: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UserError) as e:
        load_config("mnist-cnn", overrides)
    assert message in str(e.value)
    assert main(["train", "mnist-cnn", *overrides, "--print-config"]) == 2  # the CLI: one line, exit 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unknown_recipe() -> None:
    with pytest.raises(UserError, match="unknown recipe 'mnist-cn' \\(did you mean 'mnist-cnn'\\?\\)"):
        load_config("mnist-cn")
    with pytest.raises(UserError, match="does not exist"):
        load_config("nowhere.yaml")


def test_bad_yaml_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))


def test_cli_config_error_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "mnist-cnn", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'epochs'" in err and "Traceback" not in err


def test_print_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "mnist-cnn", "train.epochs=3", "--print-config"]) == 0
    assert "epochs: 3" in capsys.readouterr().out
