"""THE loop of reinforcement learning (`loop: rl`): an agent (rl/tabular.py, dqn.py, ppo.py) acts in a Gymnasium
environment and learns, in the same run folder, tracking, checkpoints, progress bar and report as every family.

    env steps ──> agent.iterate(envs) ──> log (returns of the episodes that ended, losses, env steps/s)
                  every eval_every steps: greedy episodes on the val seeds -> val/return, best checkpoint, solved?
                  every checkpoint_every steps: checkpoints/last (net, optimizer, replay buffer, RNG, envs)
    end: the best (else last) policy on the test seeds -> test/return, summary.json, report.md

A resumed run continues exactly where its last checkpoint was: the environments are put back by replaying each
episode's actions from its seed (envs.Envs), the rest is restored from trainer.pt.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import run as R
from ..config import check, load_config
from ..errors import Diverged, UserError
from ..registry import commands, loops
from ..session import LoopConfig
from . import agents
from .envs import EnvConfig, Envs, env_info, rollouts, summarize


@dataclass
class RLTrain(LoopConfig):
    steps: int = 100_000  # environment steps of training (over all copies)
    log_every: int = 2000  # env steps between log events
    eval_every: int = 0  # env steps between evaluations on the val seeds (0: none during training)
    eval_episodes: int = 100  # greedy episodes per evaluation, and of the final test and `nnlab eval`
    eval_envs: int = 16  # environments stepped together in an evaluation
    target_return: float | None = None  # "solved" at this mean val return (None: the environment's own threshold)
    stop_at_target: bool = False  # stop training at the first evaluation that reaches target_return
    checkpoint_every: int = 50_000  # env steps between checkpoints (and at every evaluation and the end)

    def __post_init__(self):
        check(self.steps >= 1 and self.log_every >= 1, "train.steps", "steps and log_every must be >= 1")
        check(self.eval_every >= 0 and self.checkpoint_every >= 1, "train.eval_every",
              "eval_every >= 0 and checkpoint_every >= 1")
        check(self.eval_episodes >= 1, "train.eval_episodes", "must be >= 1")
        check(self.eval_envs >= 1, "train.eval_envs", "must be >= 1")


def build(cfg: Any, info=None, device: str | torch.device = "cpu") -> Any:
    """The agent of a config, for the environment's spaces."""
    info = info or env_info(cfg.env)
    return agents[cfg.agent.name].factory(cfg.agent, info, cfg.train, torch.device(device))


def load_agent(run: Any, which: str = "best", overrides: tuple[str, ...] = (), device: str = "cpu"
               ) -> tuple[Any, Any]:
    """(config, agent) of a run's checkpoint (`best` falls back to `last`), rebuilt from its config alone."""
    from ..dist import pick_device

    cfg = load_config(run.config, overrides)
    agent = build(cfg, device=pick_device(device))
    folder = R.checkpoint_dir(run.path, which)
    try:
        agent.net.load_state_dict(R.load_weights(folder))
    except RuntimeError as e:
        raise UserError(f"weights in {folder} do not fit the agent of its config ({str(e).splitlines()[0]})") from None
    agent.net.eval()
    return cfg, agent


def evaluate_policy(cfg: Any, agent: Any, split: str, episodes: int | None = None) -> dict[str, float]:
    ro = rollouts(cfg.env, agent.act, episodes or cfg.train.eval_episodes, split, cfg.train.eval_envs)
    return summarize(ro)


class Trainer:
    """One training run: the agent, its environments and the loop's counters (all in the checkpoint)."""

    def __init__(self, cfg: Any, session: Any):
        t = self.t = cfg.train
        if session.env.world > 1:
            raise UserError("an RL run is one process (its environments are the parallelism): run it without "
                            "torchrun and raise env.num_envs instead")
        self.cfg, self.session = cfg, session
        torch.manual_seed(t.seed)
        self.envs = Envs(cfg.env, t.seed)
        self.agent = build(cfg, self.envs.info, session.env.device)
        self.target = t.target_return if t.target_return is not None else self.envs.info.reward_threshold
        self.state: dict[str, Any] = {"train_time": 0.0, "episodes": 0, "best": None, "best_step": None,
                                      "solved": None, "stopped": None, "sums": {}, "next_log": t.log_every,
                                      "next_eval": t.eval_every or math.inf, "next_ckpt": t.checkpoint_every,
                                      "saved": -1, "log_steps": 0, "log_time": 0.0}
        if session.resumed:
            weights, st = session.load("last")
            self.agent.net.load_state_dict(weights)
            self.agent.load_state_dict(st["agent"])
            self.envs.load_state_dict(st["envs"])
            self.state = st["loop"]
            self.tracker = session.track(self.envs.steps, st["rows"], st["wall_time"])
            session.progress.write(f"resumed {session.folder} at env step {self.envs.steps}")
        else:
            self.tracker = session.track()
            info = self.envs.info
            session.progress.write(f"run {session.folder}: {cfg.agent.name} on {info.id} (observations "
                                   f"{info.space('obs')}, actions {info.space('act')}), {t.steps} env steps")

    def save(self, name: str, metrics: dict[str, float] | None = None) -> None:
        st = {"agent": self.agent.state_dict(), "envs": self.envs.state_dict(), "loop": dict(self.state)}
        self.session.save(name, self.agent.net, st, metrics=metrics, step=self.envs.steps)
        if name == "last":
            self.state["saved"] = self.envs.steps

    def clock(self) -> None:
        """Add the time since `t0` to the training clock (which leaves out the evaluations) and restart it."""
        now = time.perf_counter()
        self.state["train_time"] += now - self.t0
        self.t0 = now

    def log(self) -> None:
        s, envs = self.state, self.envs
        eps = envs.drain()
        s["episodes"] += len(eps)
        row = {k: total / n for k, (total, n) in s["sums"].items()}
        if eps:
            row["rl/episodic_return"] = float(np.mean([e[0] for e in eps]))
            row["rl/episode_length"] = float(np.mean([e[1] for e in eps]))
            if eps[0][2] is not None:
                row["rl/success"] = float(np.mean([e[2] for e in eps]))
        if s["log_time"] > 0:
            row["perf/env_steps_per_s"] = s["log_steps"] / s["log_time"]
        self.tracker.log(envs.steps, row, episodes=s["episodes"], train_time=round(s["train_time"], 3))
        self.session.progress.update(0, {k: v for k, v in row.items() if k in ("rl/episodic_return", "loss/td",
                                                                                "loss/value")})
        s["sums"], s["log_steps"], s["log_time"] = {}, 0, 0.0

    def evaluate(self) -> bool:
        """val episodes, the best checkpoint, solved? Returns True to stop."""
        s, steps = self.state, self.envs.steps
        metrics = {f"val/{k}": v for k, v in evaluate_policy(self.cfg, self.agent, "val").items()}
        self.tracker.log(steps, metrics, episodes=s["episodes"], train_time=round(s["train_time"], 3))
        value = metrics["val/return"]
        if self.session.progress.quiet:  # -q: one line per evaluation instead of the bar
            self.session.progress.write(f"env step {steps}: val/return {value:.2f} ± {metrics['val/return_std']:.2f}")
        if s["best"] is None or value > s["best"]:
            s["best"], s["best_step"] = value, steps
            self.save("best", metrics)
        if self.target is not None and s["solved"] is None and value >= self.target:
            s["solved"] = {"step": steps, "train_time_s": round(s["train_time"], 3),
                           "time_s": round(self.tracker.elapsed(), 3), "episodes": s["episodes"]}
            self.session.progress.write(f"solved at env step {steps}: val/return {value:.2f} >= {self.target}")
            if self.t.stop_at_target:
                s["stopped"] = f"val/return {value:.2f} reached the target {self.target}"
        if self.session.evaluated(steps, metrics):
            s["stopped"] = "the evaluation callback asked to stop"
        return s["stopped"] is not None

    def run(self) -> dict[str, float]:
        t, s, envs, agent = self.t, self.state, self.envs, self.agent
        progress = self.session.progress
        progress.start(0, 1, t.steps, envs.steps, "env steps")
        while envs.steps < t.steps and s["stopped"] is None:
            before, self.t0 = envs.steps, time.perf_counter()
            logs = agent.iterate(envs, envs.steps / t.steps)
            s["log_time"] += time.perf_counter() - self.t0
            s["log_steps"] += envs.steps - before
            for k, v in logs.items():
                if k.startswith("loss/") and not math.isfinite(v):
                    raise Diverged(f"{k} is not finite (NaN or inf) at env step {envs.steps}: training stopped; "
                                   f"checkpoints/last is from env step {max(s['saved'], 0)}. Lower agent.lr or "
                                   f"set agent.max_grad_norm")
                total, n = s["sums"].get(k, (0.0, 0))
                s["sums"][k] = (total + v, n + 1)
            progress.update(envs.steps - before, {})
            if envs.steps >= s["next_log"]:
                self.clock()
                self.log()
                s["next_log"] = (envs.steps // t.log_every + 1) * t.log_every
            evaluated = envs.steps >= s["next_eval"] or bool(t.eval_every and envs.steps >= t.steps)
            if evaluated:  # every eval_every steps, and at the end
                self.clock()
                self.evaluate()
                self.t0 = time.perf_counter()  # the training clock leaves the evaluation out (not its checkpoint)
                s["next_eval"] = (envs.steps // t.eval_every + 1) * t.eval_every
            if envs.steps >= s["next_ckpt"] or evaluated:
                s["next_ckpt"] = (envs.steps // t.checkpoint_every + 1) * t.checkpoint_every
                self.save("last")
            self.clock()
        if s["sums"] or envs.finished:
            self.log()
        if s["saved"] != envs.steps:
            self.save("last")
        progress.end(0, 1, {"env_steps": envs.steps, **({"best": s["best"]} if s["best"] is not None else {})},
                     "trained:")
        return self.finish()

    def finish(self) -> dict[str, float]:
        s, session, envs = self.state, self.session, self.envs
        best = session.folder / R.CHECKPOINTS / "best"
        if best.exists():
            self.agent.net.load_state_dict(R.load_weights(best))
        final = {f"test/{k}": v for k, v in evaluate_policy(self.cfg, self.agent, "test").items()}
        self.tracker.log(envs.steps, final, episodes=s["episodes"], train_time=round(s["train_time"], 3))
        train_time = s["train_time"]
        session.write_summary({
            "status": "stopped" if s["stopped"] else "completed", **({"reason": s["stopped"]} if s["stopped"] else {}),
            "steps": envs.steps, "episodes": s["episodes"], "final": final,
            "best": {"metric": "val/return", "value": s["best"], "step": s["best_step"]} if s["best"] is not None
            else None,
            "target_return": self.target, "solved": s["solved"], "train_time_s": round(train_time, 3),
            "env_steps_per_s": round(envs.steps / train_time, 1) if train_time > 0 else None,
            "params": sum(p.numel() for p in self.agent.net.parameters()) + sum(
                b.numel() for b in self.agent.net.buffers()),
            "env": envs.info.id, "agent": self.cfg.agent.name})
        envs.close()
        if session.env.main:
            from .report import report

            report(session.folder, self.cfg, self.agent)
        return final


def parse_observation(text: str, info) -> np.ndarray:
    """A state id (discrete observations) or numbers separated by spaces or commas (a Box)."""
    parts = text.replace(",", " ").split()
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"not numbers: {text!r}") from None
    if info.obs_n:
        if len(values) != 1 or not values[0].is_integer() or not 0 <= values[0] < info.obs_n:
            raise ValueError(f"not a state id in 0..{info.obs_n - 1}: {text!r}")
        return np.array(int(values[0]))
    size = int(np.prod(info.obs_shape))
    if len(values) != size:
        raise ValueError(f"{info.id} observations have {size} numbers, got {len(values)}: {text!r}")
    return np.array(values, dtype=np.float32).reshape(info.obs_shape)


@loops.register("rl")
class RL:
    """Reinforcement learning in Gymnasium environments: tabular, DQN and PPO agents."""

    sections = {"env": EnvConfig, "agent": agents, "train": RLTrain}
    defaults: dict[str, str] = {}

    @staticmethod
    def train(cfg: Any, session: Any) -> dict[str, float]:
        return Trainer(cfg, session).run()

    @staticmethod
    def evaluate(run: Any, split: str = "test", which: str = "best", overrides: tuple[str, ...] = ()
                 ) -> dict[str, Any]:
        cfg, agent = load_agent(run, which, overrides)
        m = evaluate_policy(cfg, agent, split)
        n = cfg.train.eval_episodes
        details = f"return {m['return']:.2f} ± {m['return_std']:.2f} over {n} greedy episodes ({split} seeds)"
        if "success" in m:
            details += f"; success rate {m['success']:.3f}"
        return {"run": str(run.path), "split": split, "checkpoint": which, "episodes": n, "metrics": m,
                "details": details}

    @staticmethod
    def predict(run: Any, inputs: list[str], which: str = "best", top: int = 1, texts: tuple[str, ...] = ()
                ) -> list[dict[str, Any]]:
        """The greedy action (and value estimates) for observations given as text: a state id, or numbers."""
        if top < 1:
            raise UserError(f"--top must be at least 1 (got {top})")
        items = [*texts, *inputs]
        if not items:
            raise UserError("nothing to predict: pass observations with --text (a state id, or the numbers of "
                            "an observation separated by spaces)")
        cfg, agent = load_agent(run, which)
        info = env_info(cfg.env)
        rows = []
        for item in items:
            try:
                obs = parse_observation(item, info)
            except ValueError as e:
                rows.append({"input": item, "error": str(e)})
                continue
            action = agent.act(obs[None])[0]
            row: dict[str, Any] = {"input": item, "action": action.tolist()}
            values = np.asarray(agent.values(obs[None])[0], dtype=np.float64)
            if values.ndim == 1 and values.size == info.act_n:  # Q-values
                order = np.argsort(-values, kind="stable")[:top]
                row["q"] = float(values[int(action)])
                if top > 1:
                    row["top"] = [[int(a), float(values[a])] for a in order]
            else:
                row["value"] = float(values)
            rows.append(row)
        return rows

    @staticmethod
    def report(run: Any, model: Any = None, task: Any = None, data: Any = None, overrides: tuple[str, ...] = ()
               ) -> Path:
        from .report import report

        try:
            cfg, agent = load_agent(run, "best", overrides)
        except UserError:
            cfg, agent = load_config(run.config, overrides), None
        return report(Path(run.path), cfg, agent)


def play(run: Any, out: str | Path = "play.gif", episodes: int = 3, split: str = "test", fps: int = 30,
         which: str = "best", device: str = "cpu") -> dict[str, Any]:
    """Render `episodes` episodes of a run's greedy policy into the GIF `out`; returns their returns and lengths.

        nnlab.rl.play(nnlab.load_run("runs/cartpole-ppo-..."), "cartpole.gif", episodes=2)
    """
    from .report import write_gif

    if episodes <= 0:
        raise UserError(f"--episodes must be at least 1 (got {episodes})")
    out = Path(out)
    if out.suffix.lower() != ".gif":
        raise UserError(f"--out must name a .gif file (got {out})")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
    cfg, agent = load_agent(run, which, device=device)
    ro = rollouts(cfg.env, agent.act, episodes, split, 1, render=True)
    write_gif(out, ro["frames"], fps)
    return {"out": str(out), "returns": ro["returns"], "lengths": ro["lengths"]}


def play_command(run: Any, args: Any) -> int:
    """Render episodes of a run's greedy policy into a GIF."""
    res = play(run, args.out, args.episodes, args.split, args.fps, args.checkpoint, args.device)
    for k, (ret, n) in enumerate(zip(res["returns"], res["lengths"], strict=True)):
        print(f"episode {k + 1}: return {ret:.2f}, {n} steps")
    print(res["out"])
    return 0


def _play_options(p: Any) -> None:
    p.add_argument("--episodes", type=int, default=3, help="episodes to play (default: 3)")
    p.add_argument("--out", default="play.gif", help="GIF file to write (default: play.gif)")
    p.add_argument("--split", default="test", help="the seeds of the episodes: val or test (default: test)")
    p.add_argument("--fps", type=int, default=30, help="frames per second of the GIF (default: 30)")


commands.register("play", arguments=_play_options, loops=("rl",))(play_command)
