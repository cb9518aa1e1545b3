"""Contract: a loop that is not the supervised one plugs in through `nnlab.registry.loops`. The plugin's loop
`test-bandit` trains an epsilon-greedy Q-table (an nn.Module, stepped by SGD with momentum) on a hand-written
contextual k-armed bandit whose states and rewards are draws from torch's RNG, with its own config sections
(`env`, `agent`, `train` extending `LoopConfig`). Proven: it writes the same run folder as every loop (config.yaml
naming the loop and its sections, metrics.jsonl, summary.json, report.md, checkpoints/last), its config is
validated with did-you-mean errors (exit 2 through the CLI), `nnlab eval/predict/report/runs` and the Python API
reach the loop's verbs, and a run killed with SIGKILL at a random moment, then `nnlab train --resume`d, ends
with exactly the summary and the metrics.jsonl rows (time fields aside) of an uninterrupted run: the Session
restores the RNG, the tracker's rows and the clock, the loop its own state.

The plugin is a module written into a temporary folder, so the real CLI in subprocesses imports it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from harness import cli, comparable, install, kill_midway, last_step, resume, run_dir

import nnlab
from nnlab import run as R
from nnlab.cli import main

PLUGIN = '''
"""A contextual k-armed bandit and an epsilon-greedy Q-table, as a loop of their own: `loop: test-bandit`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nnlab import run as R
from nnlab.config import check, load_config
from nnlab.errors import UserError, did_you_mean
from nnlab.infer import Run
from nnlab.registry import loops
from nnlab.report import write_report
from nnlab.session import LoopConfig

SPLITS = {"val": 1, "test": 2}  # the seed of each split's greedy episodes


@dataclass
class EnvConfig:
    states: int = 4  # contexts shown, one per step, uniformly at random
    arms: int = 5  # actions
    noise: float = 1.0  # std of a reward around its arm's mean
    episode_len: int = 20  # steps per episode (its return is the sum of their rewards)
    seed: int = 0  # draws the arms' means

    def __post_init__(self):
        check(self.states >= 1 and self.arms >= 2, "env.arms", "need states >= 1 and arms >= 2")
        check(self.episode_len >= 1, "env.episode_len", "must be >= 1")


@dataclass
class AgentConfig:
    lr: float = 0.1  # SGD step size on the squared error of Q(s, a) against the reward
    momentum: float = 0.5
    init: float = 0.0  # initial Q-values (optimism explores)


@dataclass
class BanditTrain(LoopConfig):
    steps: int = 1000  # environment steps
    checkpoint_every: int = 100  # steps between checkpoints (and at the end)
    log_every: int = 50  # steps between rl/* log events
    epsilon: float = 0.5  # exploration rate at the start, decayed linearly ...
    epsilon_final: float = 0.05  # ... to this at the end
    eval_episodes: int = 20  # greedy episodes of the final evaluation and `nnlab eval`

    def __post_init__(self):
        check(self.steps >= 1, "train.steps", "must be >= 1")
        check(self.checkpoint_every >= 1 and self.log_every >= 1, "train.log_every", "must be >= 1")
        check(0 <= self.epsilon_final <= self.epsilon <= 1, "train.epsilon", "need 0 <= epsilon_final <= epsilon <= 1")
        check(self.eval_episodes >= 1, "train.eval_episodes", "must be >= 1")


class Bandit:
    """State s (uniform) each step; arm a pays means[s, a] + noise * N(0, 1). Draws come from `gen`, or from
    torch's global RNG when it is None (training: an exact resume needs the RNG restored)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.means = torch.randn(cfg.states, cfg.arms, generator=torch.Generator().manual_seed(cfg.seed))

    def observe(self, gen=None):
        return int(torch.randint(self.cfg.states, (), generator=gen))

    def reward(self, state, action, gen=None):
        return float(self.means[state, action] + self.cfg.noise * torch.randn((), generator=gen))


class QTable(nn.Module):
    def __init__(self, states, arms, init=0.0):
        super().__init__()
        self.q = nn.Parameter(torch.full((states, arms), float(init)))

    def forward(self, state):
        return self.q[state]

    def act(self, state, epsilon):
        if float(torch.rand(())) < epsilon:
            return int(torch.randint(self.q.shape[1], ()))
        return int(self.q[state].argmax())


def epsilon_at(t, step):
    return t.epsilon + (t.epsilon_final - t.epsilon) * step / max(t.steps - 1, 1)


def agent_of(cfg, run=None, which="last"):
    agent = QTable(cfg.env.states, cfg.env.arms, cfg.agent.init)
    if run is not None:
        agent.load_state_dict(R.load_weights(R.checkpoint_dir(run, which)))
    return agent


@torch.no_grad()
def greedy(env, agent, episodes, split):
    if split not in SPLITS:
        raise UserError(f"the bandit has no split '{split}'{did_you_mean(split, SPLITS)}; it has: val, test")
    gen = torch.Generator().manual_seed(SPLITS[split])
    returns, optimal, n = [], 0, 0
    for _ in range(episodes):
        total = 0.0
        for _ in range(env.cfg.episode_len):
            s = env.observe(gen)
            a = int(agent.q[s].argmax())
            total += env.reward(s, a, gen)
            optimal += a == int(env.means[s].argmax())
            n += 1
        returns.append(total)
    best = float(env.means.max(1).values.mean()) * env.cfg.episode_len
    mean = sum(returns) / len(returns)
    return {"episodic_return": mean, "optimal_rate": optimal / n, "regret": best - mean}


@loops.register("test-bandit")
class BanditLoop:
    """Epsilon-greedy Q-learning on a contextual bandit."""

    sections = {"env": EnvConfig, "agent": AgentConfig, "train": BanditTrain}
    defaults = {}

    @staticmethod
    def train(cfg, session):
        t = cfg.train
        torch.manual_seed(t.seed)
        env, agent = Bandit(cfg.env), agent_of(cfg)
        opt = torch.optim.SGD(agent.parameters(), lr=cfg.agent.lr, momentum=cfg.agent.momentum)
        counts = torch.zeros(cfg.env.states, cfg.env.arms, dtype=torch.long)
        loop = {"episode_return": 0.0, "episode_step": 0, "episodes": 0, "pending": []}
        step = 0
        if session.resumed:
            weights, st = session.load("last")  # restores the RNG too
            agent.load_state_dict(weights)
            opt.load_state_dict(st["optimizer"])
            step, counts, loop = st["step"], st["counts"], st["loop"]
            tracker = session.track(step, st["rows"], st["wall_time"])
            session.progress.write(f"resumed {session.folder} at step {step}")
        else:
            tracker = session.track()
            session.progress.write(f"run {session.folder}: bandit {cfg.env.states}x{cfg.env.arms}")

        def save():
            session.save("last", agent, {"step": step, "counts": counts, "optimizer": opt.state_dict(),
                                         "loop": dict(loop)}, step=step)

        saved = step
        while step < t.steps:
            eps = epsilon_at(t, step)
            s = env.observe()
            a = agent.act(s, eps)
            r = env.reward(s, a)
            loss = 0.5 * (agent(s)[a] - r) ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            counts[s, a] += 1
            loop["episode_return"] += r
            loop["episode_step"] += 1
            if loop["episode_step"] == cfg.env.episode_len:
                loop["pending"].append(loop["episode_return"])
                loop["episodes"] += 1
                loop["episode_return"], loop["episode_step"] = 0.0, 0
            step += 1
            if step % t.log_every == 0:
                metrics = {"rl/epsilon": eps, "rl/td_loss": loss.item()}
                if loop["pending"]:
                    metrics["rl/episodic_return"] = sum(loop["pending"]) / len(loop["pending"])
                    loop["pending"] = []
                tracker.log(step, metrics, episodes=loop["episodes"])
            if step % t.checkpoint_every == 0:
                save()
                saved = step
        if saved != step:
            save()
        final = {f"test/{k}": v for k, v in greedy(env, agent, t.eval_episodes, "test").items()}
        tracker.log(step, final, episodes=loop["episodes"])
        session.write_summary({"status": "completed", "steps": step, "episodes": loop["episodes"], "final": final,
                               "counts": counts.tolist()})
        if session.env.main:
            BanditLoop.report(Run(session.folder), agent)
        return final

    @staticmethod
    def evaluate(run, split="test", which="best", overrides=()):
        cfg = load_config(run.config, overrides)
        metrics = greedy(Bandit(cfg.env), agent_of(cfg, run.path, which), cfg.train.eval_episodes, split)
        return {"run": str(run.path), "split": split, "checkpoint": which, "metrics": metrics}

    @staticmethod
    def predict(run, inputs, which="best", top=1, texts=()):
        if top < 1:
            raise UserError(f"--top must be at least 1 (got {top})")
        run = run if isinstance(run, Run) else Run(run)
        cfg = load_config(run.config)
        q = agent_of(cfg, run.path, which).q.detach()
        items = [*texts, *inputs]
        if not items:
            raise UserError("nothing to predict: pass state ids")
        rows = []
        for item in items:
            try:
                s = int(item)
                if not 0 <= s < cfg.env.states:
                    raise ValueError
            except ValueError:
                rows.append({"input": item, "error": f"not a state id in 0..{cfg.env.states - 1}: {item!r}"})
                continue
            values, arms = q[s].topk(min(top, cfg.env.arms))
            row = {"input": item, "action": int(arms[0]), "q": float(values[0])}
            if top > 1:
                row["top"] = [[int(a), float(v)] for a, v in zip(arms, values, strict=True)]
            rows.append(row)
        return rows

    @staticmethod
    def report(run, model=None, task=None, data=None, overrides=()):
        cfg = load_config(run.config, overrides)
        agent = model if model is not None else agent_of(cfg, run.path)
        env = Bandit(cfg.env)
        lines = ["", "## Greedy policy", "", "| state | action | best arm | Q |", "|---:|---:|---:|---:|"]
        q = agent.q.detach()
        for s in range(cfg.env.states):
            a = int(q[s].argmax())
            lines.append(f"| {s} | {a} | {int(env.means[s].argmax())} | {float(q[s, a]):.3f} |")
        return write_report(Path(run.path), lines, ["episodic_return"])
'''

RECIPE = {
    "name": "bandit",
    "loop": "test-bandit",
    "env": {"states": 4, "arms": 5, "noise": 1.0, "episode_len": 20},
    "agent": {"lr": 0.1, "momentum": 0.5},
    "train": {"steps": 600, "checkpoint_every": 100, "log_every": 50, "epsilon": 0.5, "seed": 3, "threads": 1,
              "device": "cpu", "tensorboard": False},
}
# a few thousand cheap steps, checkpointed often (and not in step with the logging), to be killed mid-way
LONG = {**RECIPE, "train": {**RECIPE["train"], "steps": 6000, "checkpoint_every": 30, "log_every": 20}}
VOLATILE = ("time",)


def plugin(tmp_path: Path) -> Path:
    return install(tmp_path, "plug_bandit", PLUGIN)


def recipe_file(tmp_path: Path, recipe: dict, name: str = "bandit.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the plugin's loop in this process too (once per session: the module is cached)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("plug_bandit")


def test_bandit_loop_writes_a_run_folder_the_verbs_read(tmp_path: Path) -> None:
    plugin(tmp_path)
    res = cli(tmp_path, "train", str(recipe_file(tmp_path, RECIPE)), "--out", str(tmp_path / "runs"), "-q")
    assert res.returncode == 0, res.stderr
    folder = Path(res.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path / "runs" and folder.name.startswith("bandit-")

    cfg = yaml.safe_load((folder / R.CONFIG).read_text())
    assert cfg["loop"] == "test-bandit" and cfg["name"] == "bandit"
    assert set(cfg) == {"name", "loop", "env", "agent", "train"}
    assert cfg["env"] == {"states": 4, "arms": 5, "noise": 1.0, "episode_len": 20, "seed": 0}  # defaults filled in
    assert cfg["agent"]["lr"] == 0.1 and cfg["train"]["steps"] == 600 and cfg["train"]["deterministic"] is False

    rows = R.read_metrics(folder)
    train_rows = [r for r in rows if "rl/epsilon" in r]
    assert [r["step"] for r in train_rows] == list(range(50, 601, 50))
    eps = [r["rl/epsilon"] for r in train_rows]
    assert eps == sorted(eps, reverse=True) and eps[0] < 0.5 and eps[-1] == pytest.approx(0.05, abs=1e-3)
    assert all("rl/episodic_return" in r for r in train_rows[1:])  # an episode is 20 steps, a log event 50
    assert train_rows[-1]["episodes"] == 30

    summary = json.loads((folder / R.SUMMARY).read_text())
    assert summary["loop"] == "test-bandit" and summary["status"] == "completed" and summary["steps"] == 600
    assert summary["world_size"] == 1 and summary["seed"] == 3 and summary["wall_time_s"] > 0
    final = summary["final"]
    assert set(final) == {"test/episodic_return", "test/optimal_rate", "test/regret"}
    assert rows[-1] == {"step": 600, "episodes": 30, "time": rows[-1]["time"], **final}
    assert final["test/optimal_rate"] > 0.5  # it learned: a random policy picks the best of 5 arms 20% of the time
    assert sum(map(sum, summary["counts"])) == 600

    last = folder / R.CHECKPOINTS / "last"
    assert set(R.load_weights(last)) == {"q"}
    assert R.read_meta(last)["step"] == 600 and R.read_meta(last)["config"]["loop"] == "test-bandit"
    state = R.load_train_state(last)
    assert state["step"] == 600 and int(state["counts"].sum()) == 600 and state["optimizer"]["state"]
    assert state["rows"] == len(rows) - 1  # saved before the final evaluation's row
    assert not (folder / R.CHECKPOINTS / "best").exists()

    report = (folder / R.REPORT).read_text()
    assert "## Greedy policy" in report and "test/episodic_return" in report and "loop: test-bandit" in report
    assert (folder / R.PLOTS / "curves.png").is_file()

    # eval: greedy episodes from the checkpoint ('best' falls back to 'last'), as the final evaluation
    ev = cli(tmp_path, "eval", str(folder), "--json")
    assert ev.returncode == 0, ev.stderr
    out = json.loads(ev.stdout)
    assert out["split"] == "test" and out["checkpoint"] == "best"
    assert {f"test/{k}": v for k, v in out["metrics"].items()} == final
    ev = cli(tmp_path, "eval", str(folder), "--split", "val", "--json", "env.noise=0.0", "train.eval_episodes=3")
    assert ev.returncode == 0, ev.stderr
    val = json.loads(ev.stdout)["metrics"]
    assert val["episodic_return"] != final["test/episodic_return"] and 0 <= val["optimal_rate"] <= 1
    bad = cli(tmp_path, "eval", str(folder), "--split", "tset")
    assert bad.returncode == 2 and "did you mean 'test'" in bad.stderr and "Traceback" not in bad.stderr

    # predict: the greedy action of each state id
    q = R.load_weights(last)["q"]
    pr = cli(tmp_path, "predict", str(folder), "0", "3", "--text", "1", "--top", "2", "--json")
    assert pr.returncode == 0, pr.stderr
    got = [json.loads(line) for line in pr.stdout.splitlines()]
    assert [r["input"] for r in got] == ["1", "0", "3"]
    for r in got:
        s = int(r["input"])
        assert r["action"] == int(q[s].argmax()) and r["q"] == pytest.approx(float(q[s].max()))
        assert len(r["top"]) == 2 and r["top"][0][0] == r["action"] and r["top"][1][1] <= r["top"][0][1]
    pr = cli(tmp_path, "predict", str(folder), "2", "9")
    assert pr.returncode == 2 and "1 of 2 inputs could not be read" in pr.stderr
    assert pr.stdout.splitlines()[0].split("\t") == ["2", str(int(q[2].argmax())), f"{float(q[2].max()):.4f}"]

    # report: re-rendered from the run folder alone
    (folder / R.REPORT).unlink()
    rep = cli(tmp_path, "report", str(folder))
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout.strip() == str(folder / R.REPORT) and "## Greedy policy" in (folder / R.REPORT).read_text()


def test_bandit_config_errors_and_python_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    in_process(plugin(tmp_path), monkeypatch)
    out = str(tmp_path / "runs")
    typo = recipe_file(tmp_path, {**RECIPE, "env": {**RECIPE["env"], "arm": 3}}, "typo.yaml")
    cases = [
        (["train", str(typo), "--out", out], "unknown config key 'env.arm' (did you mean 'arms'?)"),
        (["train", str(recipe_file(tmp_path, RECIPE)), "--out", out, "env.episode_lenght=5"],
         "unknown config key 'env.episode_lenght' (did you mean 'episode_len'?)"),
        (["train", str(recipe_file(tmp_path, RECIPE)), "--out", out, "agent.steps=5"],
         "unknown config key 'agent.steps' (it is train.steps)"),
        (["train", str(recipe_file(tmp_path, RECIPE)), "--out", out, "train.epsilon=2"],
         "bad value for config key 'train.epsilon'"),
        (["train", str(recipe_file(tmp_path, {**RECIPE, "envv": {}}, "top.yaml")), "--out", out],
         "unknown config key 'envv' (did you mean 'env'?)"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()  # nothing was started

    # the Python API runs the same loop and reads its folder
    run = nnlab.train(RECIPE, ["train.steps=120", "train.checkpoint_every=50"], out=out, quiet=True,
                      progress=False)
    assert run.summary["loop"] == "test-bandit" and run.summary["steps"] == 120
    assert R.read_meta(run / R.CHECKPOINTS / "last")["step"] == 120  # the end is checkpointed too
    assert {f"test/{k}": v for k, v in run.evaluate("test", "last")["metrics"].items()} == run.final
    q = R.load_weights(run / R.CHECKPOINTS / "last")["q"]
    assert run.predict(["1"], "last") == [{"input": "1", "action": int(q[1].argmax()), "q": float(q[1].max())}]
    assert main(["runs", out, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["loop"], r["status"], r["steps"]) for r in listed] == [("test-bandit", "completed", 120)]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    plugin(tmp_path)
    recipe = recipe_file(tmp_path, LONG, "long.yaml")
    ref_dir = run_dir(cli(tmp_path, "train", str(recipe), "--out", str(tmp_path / "ref"), "-q"))
    folder = kill_midway(tmp_path, recipe, tmp_path / "k", (40, 4000), deadline=60)
    killed_at = last_step(folder)
    assert 0 < killed_at < LONG["train"]["steps"]
    resume(tmp_path, folder)
    a = json.loads((ref_dir / R.SUMMARY).read_text())
    b = json.loads((folder / R.SUMMARY).read_text())
    for key in ("final", "steps", "episodes", "counts", "status"):
        assert a[key] == b[key], key
    assert comparable(ref_dir, VOLATILE) == comparable(folder, VOLATILE)
    assert torch.equal(R.load_weights(ref_dir / R.CHECKPOINTS / "last")["q"],
                       R.load_weights(folder / R.CHECKPOINTS / "last")["q"])
    times = [row["time"] for row in R.read_metrics(folder)]  # the run's clock goes on across the sittings
    assert times == sorted(times) and b["wall_time_s"] >= times[-1]
