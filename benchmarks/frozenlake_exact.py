"""The exact success probability of FrozenLake policies, beside the sampled success rate.

A success rate over 1000 episodes has a standard error of about 0.014 at 0.74, so two runs of the same policy on
different seeds can differ by 0.03. This computes, from Gymnasium's own transition table (`env.unwrapped.P`), the
probability that a policy reaches the goal within the time limit (dynamic programming over the remaining steps),
for the greedy policy of each run's best checkpoint and for the optimal policy.

    .venv/bin/python benchmarks/frozenlake_exact.py runs/frozenlake-qlearning-*     # (and --episodes 10000)
"""

from __future__ import annotations

import argparse

import numpy as np


def success(P: dict, states: int, actions: int, horizon: int, policy: np.ndarray | None = None
            ) -> tuple[float, np.ndarray]:
    """(P(goal within `horizon` steps from the start state), the greedy policy of the last backup) for `policy`,
    or for the optimal policy when it is None. V_h(s) = max_a sum_s' p(s'|s,a) (r + V_{h-1}(s') if not done)."""
    v = np.zeros(states)
    q = np.zeros((states, actions))
    for _ in range(horizon):
        q = np.zeros((states, actions))
        for s in range(states):
            for a in range(actions):
                for p, s2, r, done in P[s][a]:
                    q[s, a] += p * (r + (0.0 if done else v[s2]))
        v = q.max(1) if policy is None else q[np.arange(states), policy]
    return float(v[0]), q.argmax(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders of a FrozenLake recipe")
    p.add_argument("--episodes", type=int, default=0, help="also sample this many test episodes per run")
    args = p.parse_args()
    import nnlab
    from nnlab.rl.envs import make
    from nnlab.rl.loop import load_agent

    first = nnlab.load_run(args.runs[0])
    cfg, _ = load_agent(first)
    env = make(cfg.env)
    P, states, actions = env.unwrapped.P, env.observation_space.n, env.action_space.n
    horizon = env.spec.max_episode_steps
    best, _ = success(P, states, actions, horizon)
    print(f"{cfg.env.id} {cfg.env.kwargs}: optimal success within {horizon} steps = {best:.4f}")
    print("\n| run | greedy policy, exact | test split, 1000 episodes | val split, 1000 episodes |"
          + (f" test, {args.episodes} episodes |" if args.episodes else ""))
    print("|---|---:|---:|---:|" + ("---:|" if args.episodes else ""))
    for path in args.runs:
        run = nnlab.load_run(path)
        _, agent = load_agent(run)
        exact, _ = success(P, states, actions, horizon, agent.q.argmax(1))
        cells = [f"{exact:.4f}", f"{run.final['test/success']:.3f}"]
        cells.append(f"{run.evaluate('val', overrides=('train.eval_episodes=1000',))['metrics']['success']:.3f}")
        if args.episodes:
            m = run.evaluate("test", overrides=(f"train.eval_episodes={args.episodes}",))["metrics"]
            cells.append(f"{m['success']:.4f}")
        print(f"| {run.path.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
