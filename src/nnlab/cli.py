"""The `nnlab` command line: one subcommand per verb. Imports are lazy so `nnlab --help` is instant.

Exit codes: 0 success, 2 usage/config/input error (one clear message), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = "Run `nnlab COMMAND --help` for a command's options. Docs: README.md, docs/."


def _parser(family: bool = False) -> argparse.ArgumentParser:
    """The core verbs; with `family`, also the commands the families register (importing them needs torch,
    so they are added only when asked for: `nnlab generate ...`, or the top-level help)."""
    p = argparse.ArgumentParser(prog="nnlab", description="Deep-learning workbench: train, evaluate, predict, "
                                "compare and report, from recipes.", epilog=EPILOG)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("recipes", help="list the shipped recipes (or print one)")
    s.add_argument("name", nargs="?", help="print this recipe's YAML")

    s = sub.add_parser("train", help="train a recipe; prints the run folder last",
                       description="Train a recipe. Override any config field with key=value, e.g. "
                       "`nnlab train mnist-cnn train.epochs=3 optim.lr=2e-3`.")
    s.add_argument("recipe", nargs="?", default=None, help="recipe name or YAML path (default: digits-cnn)")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=3")
    s.add_argument("--out", default="runs", help="folder for run folders (default: ./runs)")
    s.add_argument("--resume", metavar="RUN", help="continue this interrupted run from its last checkpoint")
    s.add_argument("--data-dir", help="folder holding the dataset folders (else $NNLAB_DATA, then ~/.cache/nnlab)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar: one line per epoch (logs, CI)")
    s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    s = sub.add_parser("eval", help="evaluate a run's checkpoint on a split",
                       description="Evaluate a run's checkpoint. key=value overrides change the run's config for "
                       "this evaluation, e.g. `task.tta=flip_translate` or `train.eval_batch_size=500`.")
    s.add_argument("run", help="run folder")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run's config")
    s.add_argument("--split", default="test", help="split to evaluate (default: test)")
    s.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (default: best)")
    s.add_argument("--data-dir", help="folder holding the dataset folders")
    s.add_argument("--episodes", type=int, help="episodes to play (runs that act in an environment)")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("predict", help="run a trained model on raw inputs (image files, text lines)")
    s.add_argument("run", help="run folder")
    s.add_argument("inputs", nargs="*", help="input files: images, or for text models files of one text per line "
                   "('-': standard input)")
    s.add_argument("--text", action="append", default=[], help="a text to predict (text models; repeatable)")
    s.add_argument("--checkpoint", default="best", choices=["best", "last"])
    s.add_argument("--top", type=int, default=1, help="show the top K outputs")
    s.add_argument("--json", action="store_true", help="print JSON lines")

    s = sub.add_parser("runs", help="compare runs in a table")
    s.add_argument("root", nargs="?", default="runs", help="folder of run folders (default: ./runs)")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("report", help="(re)render a run's plots and report.md")
    s.add_argument("run", help="run folder")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run's config")
    s.add_argument("--data-dir", help="folder holding the dataset folders (for the predictions grid)")
    if family:
        from .registry import commands

        for name in commands.names():
            entry = commands[name]
            takes = f"task {', '.join(entry.meta['tasks'])}" if "tasks" in entry.meta else \
                f"loop {', '.join(entry.meta['loops'])}"
            s = sub.add_parser(name, help=f"{entry.help[:1].lower()}{entry.help[1:].rstrip('.')} (runs of {takes})",
                               description=entry.help)
            s.add_argument("run", help="run folder")
            s.add_argument("--checkpoint", default="best", choices=["best", "last"])
            s.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps | auto (default: cpu)")
            entry.meta["arguments"](s)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(family=first not in COMMANDS if first else bool({"-h", "--help"} & set(argv)))
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "eval", "report"):  # overrides may follow options: `nnlab train x -q train.epochs=3`
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if "=" not in e or e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not args.command:
        _parser().print_help()
        return 2
    if getattr(args, "data_dir", None):  # every dataset config has data_dir, searched before $NNLAB_DATA
        args.data_override = [f"data.data_dir={Path(args.data_dir).resolve()}"]
    else:
        args.data_override = []
    from .errors import UserError

    try:
        code = COMMANDS.get(args.command, cmd_family)(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at interpreter exit
        return code
    except UserError as e:
        if args.debug:
            raise
        print(f"nnlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nnlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nnlab runs | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a runtime failure: one line unless --debug
        if args.debug:
            raise
        print(f"nnlab {args.command}: failed: {e.__class__.__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def cmd_recipes(args) -> int:
    from .config import recipe_names, recipe_text
    from .errors import UserError, did_you_mean

    names = recipe_names()
    if args.name:
        if args.name not in names:
            raise UserError(f"unknown recipe '{args.name}'{did_you_mean(args.name, names)}")
        print(recipe_text(args.name), end="")
        return 0
    import yaml

    for n in names:
        text = recipe_text(n)
        doc = yaml.safe_load(text) or {}
        m = (doc.get("model") or doc.get("agent") or {}).get("name", "?")
        d = (doc.get("data") or {}).get("name") or (doc.get("env") or {}).get("id", "?")
        first = text.splitlines()[0].lstrip("# ") if text.startswith("#") else ""
        print(f"{n:22s} {m:10s} {d:14s} {first}")
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .errors import UserError

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe and "=" in recipe:  # `nnlab train train.epochs=1`: the default recipe with an override
        overrides.insert(0, recipe)
        recipe = None
    if args.resume:
        if recipe:
            raise UserError("--resume takes the run folder; do not also name a recipe")
        from .session import resume

        run = resume(args.resume, tuple(args.data_override + overrides), quiet=args.quiet)
    else:
        cfg = load_config(recipe or "digits-cnn", tuple(args.data_override + overrides))
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        from .session import fit

        run = fit(cfg, out=args.out, quiet=args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(run.path)
    return 0


def cmd_eval(args) -> int:
    from .errors import UserError
    from .infer import load_run

    run, overrides = load_run(args.run), args.data_override + args.overrides
    if args.episodes is not None:
        if "eval_episodes" not in (run.config.get("train") or {}):
            raise UserError(f"--episodes is for runs that act in an environment; {run} is a run of loop "
                            f"'{run.config.get('loop')}'")
        if args.episodes <= 0:
            raise UserError(f"--episodes must be at least 1 (got {args.episodes})")
        overrides.append(f"train.eval_episodes={args.episodes}")
    res = run.evaluate(args.split, args.checkpoint, tuple(overrides))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['run']}  split={res['split']}  checkpoint={res['checkpoint']}")
    for k, v in res["metrics"].items():
        print(f"  {args.split}/{k:16s} {v:.4f}")
    if res.get("details"):
        print("\n" + res["details"])
    return 0


def cmd_predict(args) -> int:
    from .infer import load_run

    texts = tuple(t.encode(errors="surrogateescape").decode(errors="replace") for t in args.text)  # bad bytes: U+FFFD
    rows = load_run(args.run).predict(args.inputs, args.checkpoint, args.top, texts)
    for r in rows:
        print(json.dumps(r) if args.json else "\t".join(_show(v) for v in r.values()))
        if "note" in r:
            print(f"nnlab predict: note: {r['input'][:50]!r}: {r['note']}", file=sys.stderr)
    bad = sum("error" in r for r in rows)
    if bad:
        print(f"nnlab predict: error: {bad} of {len(rows)} inputs could not be read", file=sys.stderr)
        return 2
    return 0


def _show(v) -> str:
    """A predict field for the terminal: numbers to 4 places, a list of lists or dicts as 'a 0.912, b 0.051'."""
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return ", ".join(" ".join(_show(x) for x in (item.values() if isinstance(item, dict) else item))
                         if isinstance(item, (list, dict)) else _show(item) for item in v)
    return str(v)


def cmd_runs(args) -> int:
    from . import run as R
    from .errors import UserError

    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"no runs folder '{root}'; train something first (`nnlab train`) or name the folder")
    rows = []
    for path in R.list_runs(root):
        cfg = R.read_config(path)
        s = R.read_json(path / R.SUMMARY) if (path / R.SUMMARY).exists() else {}
        final = s.get("final", {})
        best = s.get("best") or {}
        metric = best.get("metric") or next(iter(final), "")
        test = f"test/{metric.split('/', 1)[-1]}" if metric else ""
        rows.append({"run": path.name, "loop": cfg.get("loop"),
                     "model": (cfg.get("model") or cfg.get("agent") or {}).get("name"),
                     "data": (cfg.get("data") or {}).get("name") or (cfg.get("env") or {}).get("id"),
                     "status": s.get("status", "incomplete"), "steps": s.get("steps"), "metric": metric or None,
                     "best": best.get("value"), "test": final.get(test), "time_s": s.get("wall_time_s"),
                     "samples/s": s.get("samples_per_s") or s.get("env_steps_per_s"), "final": final})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs in {root}")
        return 0
    head = ["run", "model", "data", "status", "steps", "metric", "best", "test", "time_s", "samples/s"]
    table = [[_cell(r[h], 4 if h in ("best", "test") else 1) for h in head] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)))
    return 0


def _cell(v, digits: int) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def cmd_report(args) -> int:
    from .infer import load_run

    print(load_run(args.run).report(tuple(args.data_override + args.overrides)))
    return 0


def cmd_family(args) -> int:
    """A family's command on a run of one of its tasks (registry.commands)."""
    from .dist import pick_device
    from .errors import UserError
    from .infer import load_model
    from .registry import commands

    entry = commands[args.command]
    if "loops" in entry.meta:
        from .infer import load_run

        run = load_run(args.run)
        if run.config.get("loop") not in entry.meta["loops"]:
            raise UserError(f"`nnlab {args.command}` takes a run of loop {' or '.join(entry.meta['loops'])}; "
                            f"{args.run} is a run of loop '{run.config.get('loop')}'")
        return entry.factory(run, args)
    from .run import check_run, read_config

    config = read_config(check_run(args.run))
    if "task" not in config:
        raise UserError(f"`nnlab {args.command}` takes a run of task {' or '.join(entry.meta['tasks'])}; "
                        f"{args.run} is a run of loop '{config.get('loop')}'")
    loaded = load_model(args.run, args.checkpoint, str(pick_device(args.device)))
    task = loaded.meta["config"]["task"]["name"]
    if task not in entry.meta["tasks"]:
        raise UserError(f"`nnlab {args.command}` takes a run of task {' or '.join(entry.meta['tasks'])}; "
                        f"{args.run} is a run of task '{task}'")
    return entry.factory(loaded, args)


COMMANDS = {"recipes": cmd_recipes, "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict,
            "runs": cmd_runs, "report": cmd_report}
