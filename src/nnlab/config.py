"""The typed config tree: YAML recipes + dotted overrides, validated against dataclasses.

A config has five parts: `name` (the run's name), and the sections `data`, `model`, `task` and
`train`. `data`, `model` and `task` each pick a registered entry by their `name` field, and that
entry's own dataclass is the section's schema, so every option is declared next to the code it
configures. OmegaConf does the loading, merging and type checking; this file turns its errors into
one clear message with the closest valid key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from .errors import UserError, did_you_mean

SECTIONS = ("data", "model", "task", "train")


@dataclass
class Config:
    """A fully resolved run configuration; each section is its entry's dataclass instance."""

    name: str
    data: Any
    model: Any
    task: Any
    train: Any

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("nnlab.recipes").iterdir() if p.name.endswith(".yaml"))


def recipe_text(name: str) -> str:
    return (resources.files("nnlab.recipes") / f"{name}.yaml").read_text()


def _read_recipe(recipe: str | Path | dict) -> dict:
    if isinstance(recipe, dict):
        return recipe
    path = Path(recipe)
    if str(recipe).endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UserError(f"recipe file '{recipe}' does not exist")
        text, where = path.read_text(), str(path)
    elif str(recipe) in recipe_names():
        text, where = recipe_text(str(recipe)), f"recipe '{recipe}'"
    else:
        raise UserError(f"unknown recipe '{recipe}'{did_you_mean(str(recipe), recipe_names())}; "
                        f"see `nnlab recipes`, or pass a path to a .yaml file")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a YAML mapping of sections (data, model, task, train)")
    return data


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise UserError(f"override '{o}' is not of the form key=value (e.g. train.epochs=3)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise UserError(f"cannot parse overrides {overrides}: {e}") from None


def _schema(user: DictConfig) -> DictConfig:
    from .data import datasets
    from .models import models
    from .tasks import tasks
    from .trainer import TrainConfig

    sections: dict[str, Any] = {"name": "run", "train": OmegaConf.structured(TrainConfig)}
    for section, registry in (("data", datasets), ("model", models), ("task", tasks)):
        node = user.get(section)
        name = node.get("name") if isinstance(node, DictConfig) else None
        if name is None:
            raise UserError(f"the config has no {section}.name; set one of: {', '.join(registry.names())}")
        entry = registry[str(name)]
        sections[section] = OmegaConf.structured(entry.config)
    schema = OmegaConf.create(sections)
    OmegaConf.set_struct(schema, True)
    return schema


def _explain(e: OmegaConfBaseException, schema: DictConfig) -> str:
    key = str(getattr(e, "full_key", "") or "")
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = list(node.keys()) if isinstance(node, DictConfig) else []
        where = f"in section '{parent}'" if parent else "at the top level"
        return (f"unknown config key '{key}'{did_you_mean(leaf, valid)}; valid keys {where}: "
                f"{', '.join(map(str, valid))}")
    msg = str(e).splitlines()[0]
    return f"bad value for config key '{key}': {msg}" if key else f"invalid config: {msg}"


def load_config(recipe: str | Path | dict = "digits-cnn", overrides: list[str] | tuple[str, ...] = (),
                **sections: dict[str, Any]) -> Config:
    """Resolve a recipe (name, path or dict), dotted `key=value` overrides and keyword sections
    (e.g. `train={"epochs": 3}`) into a validated `Config`."""
    user = OmegaConf.create(_read_recipe(recipe))
    for change in (OmegaConf.create(sections), _parse_overrides(list(overrides))):
        for s in SECTIONS:  # a new family for a section: the recipe's options for the old one no longer apply
            new, old = OmegaConf.select(change, f"{s}.name"), OmegaConf.select(user, f"{s}.name")
            if new is not None and old is not None and new != old:
                user[s] = {}
        user = OmegaConf.merge(user, change)
    for key in user.keys():
        if key != "name" and key not in SECTIONS:
            raise UserError(f"unknown config key '{key}'{did_you_mean(str(key), ['name', *SECTIONS])}; "
                            f"valid top-level keys: name, {', '.join(SECTIONS)}")
    schema = _schema(user)
    try:
        merged = OmegaConf.merge(schema, user)
        obj = OmegaConf.to_object(merged)  # builds the dataclasses: their __post_init__ checks ranges
    except OmegaConfBaseException as e:
        raise UserError(_explain(e, schema)) from None
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid config: {e}") from None
    return Config(**obj)


def section_from_dict(registry: Any, d: dict[str, Any]) -> Any:
    """Rebuild one section's dataclass from a saved dict (checkpoint or config.yaml), validating it."""
    entry = registry[str(d.get("name"))]
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(entry.config), d))
    except OmegaConfBaseException as e:
        raise UserError(f"saved {registry.kind} config does not match this nnlab version: {e}") from None


def check(cond: bool, key: str, msg: str) -> None:
    """Range check for a config field, used in `__post_init__`: fails with the key's name."""
    if not cond:
        raise UserError(f"bad value for config key '{key}': {msg}")
