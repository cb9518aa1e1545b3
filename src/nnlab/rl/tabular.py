"""Tabular control: Q-learning, SARSA and expected SARSA on a table of Q(s, a), with epsilon-greedy exploration
(Sutton & Barto 2018, sections 6.4-6.6). The three differ only in the target of the update:

    Q(s, a) += alpha * (r + gamma * G(s') - Q(s, a)),   G(s') = max_a' Q(s', a')            (Q-learning)
                                                              = Q(s', a'), a' the next action taken  (SARSA)
                                                              = sum_a' pi(a'|s') Q(s', a')         (expected SARSA)

with G = 0 after a terminal step (a truncated episode bootstraps). The table lives in numpy during training (a
step is a few array lookups) and in the agent's `net` buffer for the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import check
from ..errors import UserError
from . import agents


@dataclass
class TabularConfig:
    name: str = "qlearning"
    gamma: float = 0.99  # discount
    alpha: float = 0.1  # step size at the start ...
    alpha_final: float = 0.1  # ... decayed linearly to this at the end of training
    epsilon: float = 1.0  # exploration rate at the start ...
    epsilon_final: float = 0.05  # ... decayed linearly to this ...
    exploration_fraction: float = 0.5  # ... over this fraction of the training steps
    init: float = 0.0  # initial Q-values (optimistic values explore)
    steps_per_iteration: int = 1000  # env steps between log checks (a whole number of vector steps)

    def __post_init__(self):
        check(0 <= self.gamma <= 1, "agent.gamma", "must be in [0, 1]")
        check(0 < self.alpha <= 1 and 0 < self.alpha_final <= 1, "agent.alpha", "must be in (0, 1]")
        check(0 <= self.epsilon_final <= self.epsilon <= 1, "agent.epsilon",
              "need 0 <= epsilon_final <= epsilon <= 1")
        check(0 < self.exploration_fraction <= 1, "agent.exploration_fraction", "must be in (0, 1]")
        check(self.steps_per_iteration >= 1, "agent.steps_per_iteration", "must be >= 1")


class QTable(nn.Module):
    def __init__(self, states: int, actions: int, init: float = 0.0):
        super().__init__()
        self.register_buffer("q", torch.full((states, actions), float(init)))

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # (B,) state ids -> (B, A)
        return self.q[s]


def linear(start: float, end: float, fraction: float, progress: float) -> float:
    """A linear schedule from `start` to `end` over the first `fraction` of training, then `end`."""
    return end + (start - end) * max(0.0, 1.0 - progress / fraction)


class Tabular:
    """One table, three update rules (the registered name picks it)."""

    def __init__(self, cfg: TabularConfig, info, train, device):
        if not info.obs_n or not info.act_n:
            raise UserError(f"agent '{cfg.name}' is tabular: it needs Discrete observations and actions, and "
                            f"'{info.id}' has observations {info.space('obs')} and actions {info.space('act')}; "
                            f"use dqn or ppo")
        self.cfg, self.info = cfg, info
        self.net = QTable(info.obs_n, info.act_n, cfg.init)
        self.q = self.net.q.numpy()  # shares memory with the buffer
        self.next_action: np.ndarray | None = None  # SARSA's a', chosen one step ahead

    def act(self, obs: np.ndarray) -> np.ndarray:
        q = self.q[np.asarray(obs, dtype=np.int64)]
        return q.argmax(-1)

    def values(self, obs: np.ndarray) -> np.ndarray:
        return self.q[np.asarray(obs, dtype=np.int64)]

    def _explore(self, obs: np.ndarray, eps: float) -> np.ndarray:
        """Epsilon-greedy with torch's RNG (restored on resume), ties broken by the first maximum."""
        n = len(obs)
        greedy = self.q[obs].argmax(-1)
        rand = torch.randint(self.info.act_n, (n,)).numpy()
        return np.where(torch.rand(n).numpy() < eps, rand, greedy)

    def iterate(self, envs, progress: float) -> dict[str, float]:
        c = self.cfg
        eps = linear(c.epsilon, c.epsilon_final, c.exploration_fraction, progress)
        alpha = c.alpha + (c.alpha_final - c.alpha) * progress
        q, errors = self.q, []
        obs = envs.obs
        a = self.next_action if self.next_action is not None else self._explore(obs, eps)
        for _ in range(max(1, c.steps_per_iteration // envs.n)):
            nxt, r, term, trunc, final = envs.step(a)
            a2 = self._explore(nxt, eps)
            if c.name == "qlearning":
                g = q[final].max(-1)
            elif c.name == "sarsa":  # the action taken next; at an episode's end, the greedy one of the final state
                done = term | trunc
                g = np.where(done, q[final].max(-1), q[final, a2])
            else:  # expected SARSA under the epsilon-greedy policy
                qf = q[final]
                g = (1 - eps) * qf.max(-1) + eps * qf.mean(-1)
            target = r + c.gamma * np.where(term, 0.0, g)
            td = target - q[obs, a]
            np.add.at(q, (obs, a), alpha * td)
            errors.append(float(np.abs(td).mean()))
            obs, a = nxt, a2
        self.next_action = a
        return {"rl/epsilon": eps, "rl/alpha": alpha, "loss/td_abs": float(np.mean(errors)),
                "rl/q_values": float(q.max(-1).mean())}

    def state_dict(self) -> dict:
        return {"next_action": None if self.next_action is None else torch.from_numpy(self.next_action.copy())}

    def load_state_dict(self, st: dict) -> None:
        self.q = self.net.q.numpy()
        na = st.get("next_action")
        self.next_action = None if na is None else na.numpy().copy()


for _name, _doc in (("qlearning", "Tabular Q-learning (off-policy TD control), epsilon-greedy."),
                    ("sarsa", "Tabular SARSA (on-policy TD control), epsilon-greedy."),
                    ("expected_sarsa", "Tabular expected SARSA, epsilon-greedy.")):
    def _factory(cfg, info, train, device, _doc=_doc):
        return Tabular(cfg, info, train, device)

    _factory.__doc__ = _doc
    agents.register(_name, config=TabularConfig)(_factory)
