"""nnlab's CartPole recipes against Stable-Baselines3 with the RL-Zoo hyperparameters, same machine, same protocol.

    .venv/bin/python benchmarks/rl_sb3.py --algo both --seeds 5 --out /tmp/rl-bench
    .venv/bin/python benchmarks/rl_sb3.py --algo dqn --quick        # smoke test: 3000 steps, 1 seed
    .venv/bin/python benchmarks/rl_sb3.py --same --seeds 1          # both sides with the zoo's settings, whole budget

For each algorithm and seed 0..N-1, one fresh process per run (the two sides alternate which goes first):
- nnlab: `nnlab.train("cartpole-<algo>", train={"seed": s})`, which evaluates every `train.eval_every` env steps
  and stops at the target; its summary gives solved (first evaluation with a mean return >= 475 on 100 greedy val
  episodes), steps and training time to it, env steps/s and the test return of its best checkpoint.
- SB3: DQN (5e4 steps) or PPO (8 envs, 1e5 steps, linear lr and clip to 0) as the zoo's `hyperparams/*.yml` give
  them for CartPole-v1, run for the whole budget as the zoo does. A callback evaluates with nnlab's own protocol
  (`rollouts` of 100 greedy episodes on the val seeds) every `train.eval_every` env steps of the recipe, at the start
  of a rollout (after the previous update, where nnlab evaluates too); the evaluation time is excluded from the
  training clock (learn() time minus evaluation time). At the end, the final model plays 100 test episodes.
Wall time is the whole worker process (imports, setup, training, evaluations). Results go to <out>/results.jsonl
one line per run as it finishes; a Markdown table per algorithm is printed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import line, measure  # noqa: E402

QUICK = {"steps": 3000, "eval_every": 1500, "episodes": 5}
# --same: nnlab with the zoo's own hyperparameters for the whole budget, for throughput at equal work
SAME = {"dqn": ["agent.hidden=[256,256]", "agent.n_step=1", "agent.train_freq=256", "agent.gradient_steps=128",
                "train.stop_at_target=false"],
        "ppo": ["agent.n_steps=32", "agent.n_epochs=20", "agent.lr=1e-3", "train.stop_at_target=false"]}
TARGET = 475.0


def run_nnlab(algo: str, seed: int, out: Path, quick: bool, same: bool = False) -> dict:
    import nnlab

    keys = ("steps", "eval_every", "eval_episodes")
    overrides = [f"train.{k}={v}" for k, v in zip(keys, QUICK.values(), strict=True)] if quick else []
    run = nnlab.train(f"cartpole-{algo}", overrides + (SAME[algo] if same else []), train={"seed": seed}, out=out,
                      quiet=True, progress=False)
    s, solved = run.summary, run.summary["solved"]
    return {"solved": solved is not None, "solved_step": solved and solved["step"],
            "solved_train_s": solved and solved["train_time_s"], "steps": s["steps"], "train_s": s["train_time_s"],
            "test_return": s["final"]["test/return"], "test_return_std": s["final"]["test/return_std"],
            "env_steps_per_s": s["env_steps_per_s"], "run": str(run.path)}


def run_sb3(algo: str, seed: int, quick: bool) -> dict:
    from stable_baselines3 import DQN, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    from nnlab.config import load_config
    from nnlab.rl.envs import EnvConfig, rollouts, summarize

    every = QUICK["eval_every"] if quick else load_config(f"cartpole-{algo}").train.eval_every
    episodes = QUICK["episodes"] if quick else 100
    env_cfg = EnvConfig(id="CartPole-v1")

    def evaluate(model, split: str) -> dict:
        policy = lambda obs: model.predict(obs, deterministic=True)[0]  # noqa: E731
        return summarize(rollouts(env_cfg, policy, episodes, split))

    class Eval(BaseCallback):
        """nnlab's protocol: greedy val episodes every `every` env steps, their time off the training clock."""

        def __init__(self):
            super().__init__()
            self.t0, self.eval_s, self.next_eval, self.solved = 0.0, 0.0, every, None

        def _maybe_eval(self) -> None:
            if self.num_timesteps < self.next_eval:
                return
            t = time.perf_counter()
            value = evaluate(self.model, "val")["return"]
            if self.solved is None and value >= TARGET:
                self.solved = {"step": self.num_timesteps, "train_time_s": t - self.t0 - self.eval_s}
            self.eval_s += time.perf_counter() - t
            self.next_eval = (self.num_timesteps // every + 1) * every

        def _on_rollout_start(self) -> None:
            self._maybe_eval()

        def _on_training_end(self) -> None:
            self._maybe_eval()

        def _on_step(self) -> bool:
            return True

    if algo == "dqn":
        total = 50_000
        model = DQN("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1, seed=seed), learning_rate=2.3e-3,
                    batch_size=64, buffer_size=100_000, learning_starts=1000, gamma=0.99, target_update_interval=10,
                    train_freq=256, gradient_steps=128, exploration_fraction=0.16, exploration_final_eps=0.04,
                    policy_kwargs={"net_arch": [256, 256]}, seed=seed, device="cpu", verbose=0)
    else:
        total = 100_000
        model = PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=8, seed=seed), n_steps=32, batch_size=256,
                    gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
                    learning_rate=lambda remaining: remaining * 1e-3, clip_range=lambda remaining: remaining * 0.2,
                    seed=seed, device="cpu", verbose=0)
    cb = Eval()
    cb.t0 = time.perf_counter()
    model.learn(total_timesteps=QUICK["steps"] if quick else total, callback=cb)
    train_s = time.perf_counter() - cb.t0 - cb.eval_s
    final = evaluate(model, "test")
    return {"solved": cb.solved is not None, "solved_step": cb.solved and cb.solved["step"],
            "solved_train_s": cb.solved and round(cb.solved["train_time_s"], 3), "steps": model.num_timesteps,
            "train_s": round(train_s, 3), "test_return": final["return"], "test_return_std": final["return_std"],
            "env_steps_per_s": round(model.num_timesteps / train_s, 1)}


def worker(side: str, algo: str, seed: int, out: Path, quick: bool, same: bool) -> None:
    t0 = time.perf_counter()
    res = run_nnlab(algo, seed, out, quick, same) if side == "nnlab" else run_sb3(algo, seed, quick)
    print(json.dumps({**res, "worker_s": round(time.perf_counter() - t0, 3)}))


def launch(side: str, algo: str, seed: int, out: Path, quick: bool, same: bool) -> dict:
    """One run in a fresh process; its result is the last line of its stdout."""
    cmd = [sys.executable, __file__, "--worker", side, "--algo", algo, "--seed", str(seed), "--out", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd + (["--quick"] if quick else []) + (["--same"] if same else []), capture_output=True,
                         text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"{side} {algo} seed {seed} failed:\n{res.stderr[-3000:]}")
    return {"algo": algo, "side": side, "seed": seed, **json.loads(res.stdout.strip().splitlines()[-1]),
            "wall_s": round(wall, 3)}


def median(values: list[float | None]) -> float:
    """Median with an unsolved run counted as never (inf): inf unless more than half solved."""
    return statistics.median([math.inf if v is None else v for v in values])


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "—" if v is None or v == math.inf else format(v, spec)


def table(algo: str, rows: list[dict]) -> None:
    side = {k: sorted((r for r in rows if r["side"] == k), key=lambda r: r["seed"]) for k in ("nnlab", "sb3")}
    print(f"\n### CartPole-v1 {algo.upper()}: nnlab `cartpole-{algo}` vs SB3 (RL-Zoo hyperparameters)\n")
    print("| seed | nnlab solved | steps | train s to solve | test return | "
          "SB3 solved | steps | train s to solve | test return |")
    print("|---:|:---:|---:|---:|---:|:---:|---:|---:|---:|")
    for a, b in zip(side["nnlab"], side["sb3"], strict=True):
        cells = [f"{'yes' if r['solved'] else 'no'} | {fmt(r['solved_step'], 'd')} | {fmt(r['solved_train_s'])} | "
                 f"{r['test_return']:.1f} ± {r['test_return_std']:.1f}" for r in (a, b)]
        print(f"| {a['seed']} | {cells[0]} | {cells[1]} |")
    med = {}
    for k, rs in side.items():
        med[k] = median([r["solved_train_s"] for r in rs])
        n = sum(r["solved"] for r in rs)
        med[k + "_cells"] = (f"{n}/{len(rs)} | {fmt(median([r['solved_step'] for r in rs]), '.0f')} | "
                             f"{fmt(med[k])} | {statistics.median(r['test_return'] for r in rs):.1f}")
    print(f"| median | {med['nnlab_cells']} | {med['sb3_cells']} |\n")
    sps = {k: statistics.median(r["env_steps_per_s"] for r in rs) for k, rs in side.items()}
    full = {k: statistics.median(r["train_s"] for r in rs) for k, rs in side.items()}
    if med["nnlab"] == math.inf:
        print("nnlab: median train time to solve not reached (half or fewer of the seeds solved)")
    elif med["sb3"] < math.inf:
        print(f"median train time to solve, nnlab / SB3: {med['nnlab']:.1f} s / {med['sb3']:.1f} s = "
              f"{med['nnlab'] / med['sb3']:.2f}x")
    else:
        print(f"SB3 did not solve in more than half of the seeds: compared with SB3's FULL training time instead, "
              f"nnlab median time to solve / SB3 median full training: {med['nnlab']:.1f} s / {full['sb3']:.1f} s = "
              f"{med['nnlab'] / full['sb3']:.2f}x")
    print(f"env steps/s (median, training clock): nnlab {sps['nnlab']:.0f}, SB3 {sps['sb3']:.0f}; "
          f"median wall s per run: nnlab {statistics.median(r['wall_s'] for r in side['nnlab']):.1f} (stops at "
          f"the target), SB3 {statistics.median(r['wall_s'] for r in side['sb3']):.1f} (full budget)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", choices=["dqn", "ppo", "both"], default="both")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per algorithm")
    p.add_argument("--out", default="/tmp/rl-bench", help="run folders and results.jsonl (overwritten)")
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK['steps']} steps, eval every "
                   f"{QUICK['eval_every']} on {QUICK['episodes']} episodes, 1 seed")
    p.add_argument("--same", action="store_true", help="nnlab with the zoo's hyperparameters for the whole budget "
                   "(throughput at equal work) instead of its recipe")
    p.add_argument("--worker", choices=["nnlab", "sb3"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    if args.worker:
        return worker(args.worker, args.algo, args.seed, out, args.quick, args.same)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {line(measure())}", flush=True)
    seeds = 1 if args.quick else args.seeds
    algos = ["dqn", "ppo"] if args.algo == "both" else [args.algo]
    results: dict[str, list[dict]] = {a: [] for a in algos}
    with open(out / "results.jsonl", "w") as f:
        for algo in algos:
            for seed in range(seeds):
                for side in ("nnlab", "sb3") if seed % 2 == 0 else ("sb3", "nnlab"):
                    r = launch(side, algo, seed, out, args.quick, args.same)
                    results[algo].append(r)
                    f.write(json.dumps(r) + "\n")
                    f.flush()
                    print(f"{algo} seed {seed} {side}: solved {r['solved']!s:5s} at step {fmt(r['solved_step'], 'd')}, "
                          f"{fmt(r['solved_train_s'])} s train; {r['steps']} steps, {r['train_s']:.1f} s train, "
                          f"{r['wall_s']:.1f} s wall, {r['env_steps_per_s']:.0f} env steps/s, test return "
                          f"{r['test_return']:.1f} ± {r['test_return_std']:.1f}", flush=True)
    for algo in algos:
        table(algo, results[algo])
    print(f"\nresults in {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
