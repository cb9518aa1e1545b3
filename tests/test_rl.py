"""Reinforcement learning: GAE, n-step returns and the PPO loss against hand-computed values, the action
distributions against torch.distributions, the tabular rules converging on a corridor whose values are known, every
shipped RL recipe for a few steps, the CLI verbs (eval --episodes, predict, play, report, runs), the bad inputs the
issue names, and a DQN and a PPO run killed with SIGKILL and resumed to exactly the uninterrupted result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from contracts.harness import cli, comparable, install, kill_midway, resume, run_dir

import nnlab
import nnlab.rl
from nnlab import run as R
from nnlab.cli import main
from nnlab.config import load_config, recipe_names
from nnlab.rl.dqn import Replay, nstep_targets
from nnlab.rl.envs import EnvConfig, env_info
from nnlab.rl.ppo import ActorCritic, PPOConfig, gae, ppo_loss

RL_RECIPES = [n for n in recipe_names() if load_config(n).loop == "rl"]
FAST = ["train.log_every=64", "train.eval_episodes=2", "train.eval_envs=2", "train.tensorboard=false",
        "train.threads=1"]


# --- numerics against hand-computed values ---------------------------------------------------------------------
def test_gae_by_hand() -> None:
    """gamma 0.9, lambda 0.8; the episode ends after step 1, so step 2 starts a new one.
    t=2: delta = 2 + 0.9*2.0 - 1.5 = 2.3, A = 2.3;  t=1 (done): delta = 0 - 1.0, A = -1.0;
    t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4, A = 1.4 + 0.9*0.8*(-1.0) = 0.68."""
    r = torch.tensor([[1.0], [0.0], [2.0]])
    v = torch.tensor([[0.5], [1.0], [1.5]])
    d = torch.tensor([[0.0], [1.0], [0.0]])
    adv = gae(r, v, d, torch.tensor([2.0]), 0.9, 0.8)
    assert torch.allclose(adv[:, 0], torch.tensor([0.68, -1.0, 2.3]))
    # lambda = 1, no ends: the discounted return minus the value (Monte Carlo with a bootstrap)
    adv = gae(r, v, torch.zeros_like(d), torch.tensor([2.0]), 0.9, 1.0)
    assert adv[0, 0].item() == pytest.approx(1 + 0.9 * 0 + 0.81 * 2 + 0.729 * 2 - 0.5)


def test_nstep_returns_by_hand() -> None:
    assert nstep_targets(np.array([1.0, 2.0, 3.0]), False, 0.5) == (2.75, 0.125)  # 1 + .5*2 + .25*3, bootstrap .5^3
    assert nstep_targets(np.array([1.0, 2.0, 3.0]), True, 0.5) == (2.75, 0.0)
    # one copy, a 4-step episode (rewards 1..4) that terminates, n = 3: four transitions, the last three cut short
    rb = Replay(16, (1,), False, 3, 0.5)
    for t in range(4):
        obs, final = np.array([[float(t)]]), np.array([[float(t + 1)]])
        rb.add(obs, np.array([t % 2]), np.array([t + 1.0]), final, np.array([t == 3]), np.array([False]))
    assert len(rb) == 4
    got = [(rb.arrays["obs"][i, 0], rb.arrays["ret"][i], rb.arrays["next_obs"][i, 0], rb.arrays["discount"][i])
           for i in range(4)]
    assert got == [(0.0, 2.75, 3.0, 0.125), (1.0, 4.5, 4.0, 0.0), (2.0, 5.0, 4.0, 0.0), (3.0, 4.0, 4.0, 0.0)]
    # a time limit (truncation) bootstraps with gamma^(steps in the window) instead
    rb = Replay(16, (1,), False, 3, 0.5)
    for t in range(2):
        rb.add(np.array([[float(t)]]), np.array([0]), np.array([1.0]), np.array([[float(t + 1)]]),
               np.array([False]), np.array([t == 1]))
    assert rb.arrays["ret"][:2].tolist() == [1.5, 1.0] and rb.arrays["discount"][:2].tolist() == [0.25, 0.5]


def test_ppo_loss_by_hand() -> None:
    """ratios 1.5 and 0.5, advantages +1 and -1, clip 0.2: the surrogate terms are max(-1.5, -1.2) = -1.2 and
    max(0.5, 0.8) = 0.8, mean -0.2. Values 1, 2 against returns 0, 2 with old values 1.8, 2 and clip 0.5: the
    clipped value 1.3 errs more (1.69 > 1), so the value loss is 0.5 * (1.69 + 0) / 2 = 0.4225."""
    logp, old = torch.log(torch.tensor([1.5, 0.5])), torch.zeros(2)
    adv, ent = torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.7])
    value, old_v, ret = torch.tensor([1.0, 2.0]), torch.tensor([1.8, 2.0]), torch.tensor([0.0, 2.0])
    loss, s = ppo_loss(logp, old, adv, value, old_v, ret, ent, clip=0.2, clip_value=0.5, vf_coef=0.5,
                       ent_coef=0.01, norm_adv=False)
    assert s["policy"].item() == pytest.approx(-0.2)
    assert s["value"].item() == pytest.approx(0.4225)
    assert loss.item() == pytest.approx(-0.2 + 0.5 * 0.4225 - 0.01 * 0.6, abs=1e-6)
    assert s["clipfrac"].item() == 1.0
    assert s["approx_kl"].item() == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2)
    _, s = ppo_loss(logp, old, adv, value, old_v, ret, ent, clip=0.2, norm_adv=False)
    assert s["value"].item() == pytest.approx(0.25)  # unclipped: 0.5 * mean(1, 0)
    # normalised advantages (+1, -1) -> (0.7071, -0.7071): the same clipping pattern, scaled
    _, s = ppo_loss(logp, old, adv, value, old_v, ret, ent, clip=0.2)
    assert s["policy"].item() == pytest.approx(-0.2 / math.sqrt(2), rel=1e-4)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_action_distributions_match_torch(env_id: str) -> None:
    torch.manual_seed(0)
    info = env_info(EnvConfig(id=env_id))
    net = ActorCritic(info, PPOConfig(log_std_init=-0.3))
    x = torch.randn(5, info.obs_dim)
    actions, logp = net.sample(x)
    a, std = net.dist(x)
    ref = torch.distributions.Categorical(logits=a) if std is None else torch.distributions.Normal(a, std)
    ref_logp = ref.log_prob(actions) if std is None else ref.log_prob(actions).sum(-1)
    ref_ent = ref.entropy() if std is None else ref.entropy().sum(-1)
    lp, ent = net.logp_entropy(x, actions)
    assert torch.allclose(logp, ref_logp, atol=1e-6) and torch.allclose(lp, ref_logp, atol=1e-6)
    assert torch.allclose(ent, ref_ent, atol=1e-6)


def test_dueling_head_and_polyak_target(tmp_path: Path) -> None:
    from nnlab.rl.dqn import QNet

    torch.manual_seed(0)
    net = QNet(4, 0, 3, [8], dueling=True)
    x = torch.randn(5, 4)
    h = torch.relu(net.body[0](x))
    adv = net.head(h)
    assert torch.allclose(net(x), net.value(h) + adv - adv.mean(-1, keepdim=True), atol=1e-6)  # Q = V + A - mean A
    run = nnlab.train("cartpole-dqn", ["train.steps=600", "agent.learning_starts=100", "agent.train_freq=8",
                                       "agent.gradient_steps=2", "agent.dueling=true", "agent.tau=0.5", *FAST],
                      out=tmp_path, quiet=True, progress=False)
    w = R.load_weights(run / R.CHECKPOINTS / "last")
    assert "q.value.weight" in w and "target.value.weight" in w
    # Polyak: the target trails the online network (neither equal to it nor left at the initial copy)
    assert not torch.equal(w["q.head.weight"], w["target.head.weight"])


@pytest.mark.parametrize("method", ["qlearning", "sarsa", "expected_sarsa"])
def test_tabular_learns_a_corridor(tmp_path: Path, method: str) -> None:
    """Start, frozen, goal in a row (no slipping): Q(F, right) = 1 and Q(S, right) = gamma; greedy: right."""
    recipe = {"name": "corridor", "loop": "rl",
              "env": {"id": "FrozenLake-v1", "kwargs": {"desc": ["SFG"], "is_slippery": False}},
              "agent": {"name": method, "gamma": 0.9, "alpha": 0.5, "alpha_final": 0.5, "epsilon": 0.5,
                        "epsilon_final": 0.5, "steps_per_iteration": 100},
              "train": {"steps": 3000, "log_every": 500, "eval_episodes": 5, "tensorboard": False}}
    run = nnlab.train(recipe, out=tmp_path, quiet=True, progress=False)
    q = R.load_weights(run / R.CHECKPOINTS / "last")["q"]
    assert q[1, 2].item() == pytest.approx(1.0, abs=1e-3)  # action 2: right
    if method == "qlearning":  # off-policy: the greedy value; on-policy rules learn the exploring policy's
        assert q[0, 2].item() == pytest.approx(0.9, abs=1e-3)
    assert q[:2].argmax(1).tolist() == [2, 2]
    assert run.final["test/return"] == 1.0 and run.final["test/success"] == 1.0 and run.final["test/length"] == 2


# --- every shipped recipe, a few steps -------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RL_RECIPES)
def test_recipe_trains_a_few_steps(tmp_path: Path, recipe: str) -> None:
    cfg = load_config(recipe)
    a = cfg.agent
    steps = {"ppo": 2 * a.n_steps * cfg.env.num_envs if a.name == "ppo" else 0}.get(a.name) or 400
    over = [f"train.steps={steps}", f"train.eval_every={steps // 2}", *FAST]
    if a.name == "ppo":
        over += [f"agent.n_steps={min(a.n_steps, 16)}", "agent.batch_size=32", "agent.n_epochs=2"]
        over[0] = f"train.steps={2 * min(a.n_steps, 16) * cfg.env.num_envs}"
    if a.name == "dqn":
        over += ["agent.learning_starts=100", "agent.train_freq=8", "agent.gradient_steps=2"]
    run = nnlab.train(recipe, over, out=tmp_path, quiet=True, progress=False)
    s = run.summary
    assert s["loop"] == "rl" and s["status"] in ("completed", "stopped") and s["env"] == cfg.env.id
    assert {"test/return", "test/return_std", "test/length"} <= set(run.final)
    rows = run.metrics
    assert any("rl/episodic_return" in r or "perf/env_steps_per_s" in r for r in rows)
    assert any("val/return" in r for r in rows) and (run / R.CHECKPOINTS / "best").is_dir()
    assert (run / R.REPORT).read_text().count("plots/") >= 2


# --- the CLI ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cartpole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rl")
    run = nnlab.train("cartpole-dqn", ["train.steps=1200", "train.eval_every=600", "agent.learning_starts=200",
                                       "agent.train_freq=16", "agent.gradient_steps=4", *FAST],
                      out=out, quiet=True, progress=False)
    return run.path


def test_eval_predict_play_report_runs(cartpole: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(cartpole), "--episodes", "3", "--split", "val", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["episodes"] == 3 and out["split"] == "val" and set(out["metrics"]) == {"return", "return_std",
                                                                                     "length"}
    assert main(["eval", str(cartpole), "--episodes", "2"]) == 0
    printed = capsys.readouterr().out
    assert "test/return" in printed and " ± " in printed and "over 2 greedy episodes (test seeds)" in printed

    assert main(["predict", str(cartpole), "--text", "0.01 -0.02 0.03 0.0", "--text", "0,0,0,0", "--top", "2",
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    q = nnlab.load_run(cartpole)
    assert [r["action"] for r in rows] == [int(np.argmax([v for _, v in sorted(r["top"])])) for r in rows]
    assert all(r["q"] == r["top"][0][1] for r in rows) and q.loop.__name__ == "RL"

    gif = tmp_path / "play.gif"
    assert main(["play", str(cartpole), "--episodes", "2", "--out", str(gif)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == str(gif) and printed[0].startswith("episode 1: return")
    from PIL import Image

    with Image.open(gif) as im:
        frames = im.n_frames
    lengths = [int(line.split(", ")[1].split()[0]) for line in printed[:2]]
    assert max(lengths) < frames <= sum(lengths) + 2  # a frame per step and each start (repeats merged)

    res = nnlab.rl.play(nnlab.load_run(cartpole), tmp_path / "py.gif", episodes=1, split="val")
    assert (tmp_path / "py.gif").is_file() and len(res["returns"]) == 1 and res["lengths"][0] >= 8

    (cartpole / R.REPORT).unlink()
    assert main(["report", str(cartpole)]) == 0
    assert capsys.readouterr().out.strip() == str(cartpole / R.REPORT)
    report = (cartpole / R.REPORT).read_text()
    assert "## Episodic return" in report and "## Losses, exploration and value estimates" in report
    assert main(["runs", str(cartpole.parent), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["model"] == "dqn" and row["data"] == "CartPole-v1" and row["metric"] == "val/return"


def test_frozenlake_report_draws_the_policy(tmp_path: Path) -> None:
    run = nnlab.train("frozenlake-qlearning", ["train.steps=2000", "train.eval_every=1000", *FAST], out=tmp_path,
                      quiet=True, progress=False)
    assert (run / R.PLOTS / "values.png").is_file() and "## Learned values" in (run / R.REPORT).read_text()
    assert "test/success" in run.final
    assert main(["predict", str(run.path), "--text", "14", "--text", "16"]) == 2  # 16 is not a state of 4x4


# --- bad input -------------------------------------------------------------------------------------------------
def _fails(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(args) == 2, args
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_bad_inputs(cartpole: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = ["--out", str(tmp_path / "runs")]
    _fails(["train", "cartpole-dqn", "env.id=CartPoel-v1", *out], "did you mean 'CartPole-v1'?", capsys)
    _fails(["train", "cartpole-dqn", "env.id=cartpole", *out], "did you mean 'CartPole-v1'?", capsys)
    _fails(["train", "cartpole-dqn", "env.id=Pendulum-v1", *out],
           "agent 'dqn' chooses among discrete actions, and 'Pendulum-v1' has continuous actions Box(1,)", capsys)
    _fails(["train", "taxi-sarsa", "env.id=CartPole-v1", *out],
           "needs Discrete observations and actions, and 'CartPole-v1' has observations Box(4,)", capsys)
    _fails(["train", "cartpole-dqn", "agent.gama=0.9", *out], "did you mean 'gamma'?", capsys)
    _fails(["train", "frozenlake-qlearning", "env.kwargs.is_slipery=true", *out], "env.kwargs do not fit", capsys)
    assert not list((tmp_path / "runs").glob("*"))  # refused before it began: no run folder

    _fails(["eval", str(cartpole), "--episodes", "0"], "--episodes must be at least 1 (got 0)", capsys)
    _fails(["eval", str(cartpole), "--split", "tset"], "did you mean 'test'?", capsys)
    _fails(["play", str(cartpole), "--episodes", "-1"], "--episodes must be at least 1", capsys)
    _fails(["play", str(cartpole), "--out", str(tmp_path / "missing" / "a.gif")], "does not exist", capsys)
    _fails(["play", str(cartpole), "--out", str(tmp_path / "a.png")], "must name a .gif file", capsys)
    _fails(["predict", str(cartpole), "--text", "1 2"], "1 of 1 inputs could not be read", capsys)
    _fails(["generate", str(cartpole)], "is a run of loop 'rl'", capsys)


def test_rl_verbs_refuse_other_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from conftest import TINY

    run = nnlab.train(TINY, out=tmp_path, quiet=True, progress=False)
    _fails(["play", str(run.path)], "takes a run of loop rl; ", capsys)
    _fails(["eval", str(run.path), "--episodes", "5"], "--episodes is for runs that act in an environment", capsys)


def test_missing_extra_names_the_pip_extra(tmp_path: Path) -> None:
    """Box2D made unimportable in a fresh process, as on a machine without gymnasium[box2d]."""
    folder = install(tmp_path, "no_box2d", "import sys\n\nsys.modules['Box2D'] = None\n")
    res = cli(folder, "train", "lunarlander-ppo", "--out", str(tmp_path / "runs"))
    assert res.returncode == 2 and 'pip install "gymnasium[box2d]"' in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_nan_loss_stops_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _fails(["train", "cartpole-dqn", "train.steps=2000", "agent.learning_starts=64", "agent.train_freq=8",
            "agent.gradient_steps=4", "agent.lr=1e30", "agent.max_grad_norm=0", "--out", str(tmp_path), *FAST],
           "is not finite (NaN or inf) at env step", capsys)


# --- exact resume ----------------------------------------------------------------------------------------------
RESUMABLE = {
    "dqn": {"name": "dqn-resume", "loop": "rl", "env": {"id": "CartPole-v1", "num_envs": 2},
            "agent": {"name": "dqn", "hidden": [32], "learning_starts": 200, "train_freq": 4, "gradient_steps": 2,
                      "n_step": 3, "target_update": 200, "buffer_size": 3000, "save_buffer": 3000},
            "train": {"steps": 6000, "log_every": 100, "eval_every": 2000, "eval_episodes": 3,
                      "checkpoint_every": 300, "tensorboard": False, "threads": 1}},
    "ppo": {"name": "ppo-resume", "loop": "rl", "env": {"id": "Pendulum-v1", "num_envs": 2},
            "agent": {"name": "ppo", "hidden": [16], "n_steps": 50, "batch_size": 50, "n_epochs": 2,
                      "normalize_obs": True, "normalize_reward": True},
            "train": {"steps": 6000, "log_every": 100, "eval_every": 2000, "eval_episodes": 2,
                      "checkpoint_every": 300, "tensorboard": False, "threads": 1}},
}
VOLATILE = ("time", "train_time", "perf/env_steps_per_s")


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["dqn", "ppo"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path, agent: str) -> None:
    folder = install(tmp_path, "plain", "")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RESUMABLE[agent]))
    ref = run_dir(cli(folder, "train", str(recipe), "--out", str(tmp_path / "ref"), "-q"))
    run = kill_midway(folder, recipe, tmp_path / "k", (400, 4500), deadline=90)
    resume(folder, run)
    a, b = (json.loads((d / R.SUMMARY).read_text()) for d in (ref, run))
    for key in ("final", "steps", "episodes", "best", "solved", "status"):
        assert a[key] == b[key], key
    assert comparable(ref, VOLATILE) == comparable(run, VOLATILE)
    wa, wb = (R.load_weights(d / R.CHECKPOINTS / "last") for d in (ref, run))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
