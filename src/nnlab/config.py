"""The typed config tree: YAML recipes + dotted overrides, validated against dataclasses.

A config has `name` (the run's name), `loop` (a registered loop; default `supervised`) and the sections that
loop declares. A section is either chosen from a registry by its `name` field (`data`, `model`, `task`,
`optim`), the chosen entry's own dataclass being the section's schema, so every option is declared next to
the code it configures; or a fixed dataclass (`train`, `init`). OmegaConf does the loading, merging and
type checking; this file turns its errors into one clear message with the closest valid key.
"""

from __future__ import annotations

import dataclasses
import keyword
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from .errors import UserError, did_you_mean
from .registry import Registry, loops

DEFAULT_LOOP = "supervised"


@dataclass
class Config:
    """A fully resolved run configuration; each section is its entry's dataclass instance (`cfg.train`)."""

    name: str
    loop: str
    sections: dict[str, Any]

    def __getattr__(self, section: str) -> Any:
        try:
            return self.__dict__["sections"][section]
        except KeyError:
            raise AttributeError(f"the config has no section '{section}'") from None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "loop": self.loop,
                **{s: _keywords(dataclasses.asdict(v), out=True) for s, v in self.sections.items()}}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _keywords(d: dict, out: bool = False) -> dict:
    """A config key that is a Python keyword (`init.from`) is its dataclass field with a trailing '_'."""
    if out:
        return {k[:-1] if k.endswith("_") and keyword.iskeyword(k[:-1]) else k: v for k, v in d.items()}
    return {f"{k}_" if keyword.iskeyword(str(k)) else k: v for k, v in d.items()}


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
        raise UserError(f"{where} must be a YAML mapping of sections (data, model, task, train, ...)")
    return data


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise UserError(f"override '{o}' is not of the form key=value (e.g. train.epochs=3)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise UserError(f"cannot parse overrides {overrides}: {e}") from None


def _schema(user: DictConfig, loop: Any) -> DictConfig:
    sections: dict[str, Any] = {"name": "run", "loop": DEFAULT_LOOP}
    for section, kind in loop.sections.items():
        if not isinstance(kind, Registry):
            sections[section] = OmegaConf.structured(kind)
            continue
        node = user.get(section)
        name = node.get("name") if isinstance(node, DictConfig) else None
        name = name if name is not None else loop.defaults.get(section)
        if name is None:
            raise UserError(f"the config has no {section}.name; set one of: {', '.join(kind.names())}")
        sections[section] = OmegaConf.merge(OmegaConf.structured(kind[str(name)].config), {"name": name})
    schema = OmegaConf.create(sections)
    OmegaConf.set_struct(schema, True)
    for node in schema.values():  # a field typed dict[str, Any] (env.kwargs) is a free-form map: any keys
        for value in node.values() if isinstance(node, DictConfig) else ():
            if isinstance(value, DictConfig) and value._metadata.object_type is dict:
                OmegaConf.set_struct(value, False)
    return schema


def _explain(e: OmegaConfBaseException, schema: DictConfig) -> str:
    key = str(getattr(e, "full_key", "") or "").replace("_.", ".").rstrip("_")
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = [str(k).rstrip("_") for k in node.keys()] if isinstance(node, DictConfig) else []
        where = f"in section '{parent}'" if parent else "at the top level"
        elsewhere = [f"{s}.{leaf}" for s, node in schema.items() if isinstance(node, DictConfig) and leaf in node]
        hint = f" (it is {elsewhere[0]})" if elsewhere else did_you_mean(leaf, valid)
        return f"unknown config key '{key}'{hint}; valid keys {where}: {', '.join(valid)}"
    msg = str(e).splitlines()[0]
    return f"bad value for config key '{key}': {msg}" if key else f"invalid config: {msg}"


def load_config(recipe: str | Path | dict = "digits-cnn", overrides: list[str] | tuple[str, ...] = (),
                **sections: dict[str, Any]) -> Config:
    """Resolve a recipe (name, path or dict), dotted `key=value` overrides and keyword sections
    (e.g. `train={"epochs": 3}`) into a validated `Config`."""
    user = OmegaConf.create(_read_recipe(recipe))
    for change in (OmegaConf.create(sections), _parse_overrides(list(overrides))):
        for s in change.keys():  # a new entry for a section: the recipe's options for the old one no longer apply
            new, old = OmegaConf.select(change, f"{s}.name"), OmegaConf.select(user, f"{s}.name")
            if new is not None and old is not None and new != old:
                user[s] = {}
        user = OmegaConf.merge(user, change)
    loop = loops[str(user.get("loop", DEFAULT_LOOP))].factory
    valid = ["name", "loop", *loop.sections]
    for key in user.keys():
        if key not in valid:
            raise UserError(f"unknown config key '{key}'{did_you_mean(str(key), valid)}; "
                            f"valid top-level keys: {', '.join(valid)}")
    user = OmegaConf.create({k: _keywords(v) if isinstance(v, dict) else v
                             for k, v in OmegaConf.to_container(user).items()})
    schema = _schema(user, loop)
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(schema, user))  # builds the dataclasses: __post_init__ checks
    except OmegaConfBaseException as e:
        raise UserError(_explain(e, schema)) from None
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid config: {e}") from None
    return Config(obj.pop("name"), obj.pop("loop"), obj)


def section_from_dict(registry: Registry, d: dict[str, Any]) -> Any:
    """Rebuild one section's dataclass from a saved dict (checkpoint or config.yaml), validating it."""
    entry = registry[str(d.get("name"))]
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(entry.config), _keywords(d)))
    except OmegaConfBaseException as e:
        raise UserError(f"saved {registry.kind} config does not match this nnlab version: {e}") from None


def check(cond: bool, key: str, msg: str) -> None:
    """Range check for a config field, used in `__post_init__`: fails with the key's name."""
    if not cond:
        raise UserError(f"bad value for config key '{key}': {msg}")
