"""Reinforcement learning: agents that act in Gymnasium environments, trained by their own loop (`loop: rl`,
rl/loop.py) into the same run folder as every family.

An agent is registered in `agents` with its config dataclass (`@agents.register("dqn", config=DQNConfig)`) on a
class built as `Agent(cfg, info, train, device)`, `info` being the environment's spaces (envs.EnvInfo). It has:
- `net`: an nn.Module with every tensor the policy needs (normalisation statistics included as buffers), saved
  as model.safetensors and rebuilt from the config and the spaces alone;
- `act(obs) -> actions`: the greedy / deterministic actions for a batch of raw observations (eval, play);
- `iterate(envs, progress) -> {metric: value}`: advance training by some environment steps (and updates);
  `progress` in [0, 1) is the fraction of `train.steps` done, for schedules;
- `values(obs) -> (B, A) or (B,)`: its value estimates (Q-values or V), for `predict` and the report;
- `state_dict()` / `load_state_dict()`: what an exact resume needs beyond `net`: optimizers, replay buffer,
  running statistics, counters.
"""

from __future__ import annotations

from ..registry import Registry

agents = Registry("agent", builtins=("nnlab.rl.tabular", "nnlab.rl.dqn", "nnlab.rl.ppo"))


from .loop import play  # noqa: E402  (nnlab.rl.play(run, "out.gif", episodes=3): `nnlab play` from Python)

__all__ = ["agents", "play"]
