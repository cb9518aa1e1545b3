"""DQN (Mnih et al. 2015) with the usual improvements, each a config switch: Double DQN (van Hasselt et al. 2016),
a dueling head (Wang et al. 2016), n-step returns (Sutton 1988; Hessel et al. 2018), a hard or Polyak target
network, the Huber loss and gradient clipping, and a linear epsilon schedule.

One iteration is `train_freq` vector steps of epsilon-greedy acting, each transition going to a replay buffer of
preallocated tensors (n-step: the buffer stores (s_t, a_t, sum_k gamma^k r_{t+k}, s_{t+n}, gamma^n or 0)), then
`gradient_steps` updates on uniform minibatches:

    y = R + discount * Q_target(s', argmax_a' Q(s', a'))   (Double DQN; plain DQN: max_a' Q_target(s', a'))
    loss = Huber(Q(s, a) - y)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..errors import UserError
from . import agents
from .tabular import linear


@dataclass
class DQNConfig:
    name: str = "dqn"
    hidden: list[int] = field(default_factory=lambda: [256, 256])  # widths of the Q-network's hidden layers
    dueling: bool = False  # value + advantage streams (Wang et al. 2016)
    double: bool = True  # Double DQN targets
    lr: float = 1e-3  # Adam learning rate
    gamma: float = 0.99  # discount
    n_step: int = 1  # n-step returns
    buffer_size: int = 100_000  # replay capacity (transitions)
    batch_size: int = 64
    learning_starts: int = 1000  # env steps of acting before the first update
    train_freq: int = 4  # vector steps between rounds of updates
    gradient_steps: int = 1  # updates per round
    target_update: int = 500  # env steps between hard target updates (with tau = 1)
    tau: float = 1.0  # Polyak factor: 1 = hard copy every target_update steps, < 1 = soft update after each update
    epsilon: float = 1.0  # exploration rate at the start ...
    epsilon_final: float = 0.05  # ... decayed linearly to this ...
    exploration_fraction: float = 0.1  # ... over this fraction of training
    huber: bool = True  # Huber (smooth L1) loss, else squared error
    max_grad_norm: float = 10.0  # gradient clipping (0: off)
    save_buffer: int = 100_000  # transitions of the buffer kept in the checkpoint (for an exact resume; 0: none)

    def __post_init__(self):
        check(all(h >= 1 for h in self.hidden), "agent.hidden", "widths must be >= 1")
        check(self.lr > 0 and 0 <= self.gamma <= 1, "agent.lr", "need lr > 0 and 0 <= gamma <= 1")
        check(self.n_step >= 1 and self.batch_size >= 1 and self.buffer_size >= self.batch_size, "agent.n_step",
              "need n_step >= 1, batch_size >= 1 and buffer_size >= batch_size")
        check(self.train_freq >= 1 and self.gradient_steps >= 0, "agent.train_freq",
              "need train_freq >= 1 and gradient_steps >= 0")
        check(0 < self.tau <= 1 and self.target_update >= 1, "agent.tau", "need 0 < tau <= 1, target_update >= 1")
        check(0 <= self.epsilon_final <= self.epsilon <= 1, "agent.epsilon", "need 0 <= epsilon_final <= epsilon <= 1")
        check(0 < self.exploration_fraction <= 1, "agent.exploration_fraction", "must be in (0, 1]")
        check(self.save_buffer >= 0 and self.max_grad_norm >= 0, "agent.save_buffer", "must be >= 0")


def features(obs: Tensor, obs_n: int) -> Tensor:
    """Network input: a discrete observation one-hot, a Box observation flattened to float32."""
    if obs_n:
        return F.one_hot(obs.long(), obs_n).float()
    return obs.float().flatten(1)


class QNet(nn.Module):
    """An MLP from the observation to one Q-value per action; optionally dueling: Q = V + A - mean(A)."""

    def __init__(self, obs_dim: int, obs_n: int, actions: int, hidden: list[int], dueling: bool):
        super().__init__()
        self.obs_n = obs_n
        sizes = [obs_dim, *hidden]
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.head = nn.Linear(sizes[-1], actions)
        self.value = nn.Linear(sizes[-1], 1) if dueling else None

    def forward(self, obs: Tensor) -> Tensor:  # (B, *obs) -> (B, A)
        h = features(obs, self.obs_n)
        for layer in self.body:  # F.linear rather than layer(h): acting calls this once per env step
            h = F.relu(F.linear(h, layer.weight, layer.bias))
        q = F.linear(h, self.head.weight, self.head.bias)
        if self.value is not None:
            q = F.linear(h, self.value.weight, self.value.bias) + q - q.mean(-1, keepdim=True)
        return q


class QPair(nn.Module):
    """The online network and its target (both saved: the target is part of the resume state)."""

    def __init__(self, q: QNet, target: QNet):
        super().__init__()
        self.q, self.target = q, target


def nstep_targets(rewards: np.ndarray, terminated: bool, gamma: float) -> tuple[float, float]:
    """(sum_k gamma^k r_k, discount of the bootstrap): gamma^n, or 0 when the window ends in a terminal step."""
    ret = 0.0
    for k, r in enumerate(rewards):
        ret += gamma**k * float(r)
    return ret, 0.0 if terminated else gamma ** len(rewards)


class Replay:
    """Transitions in preallocated arrays, a ring of `capacity` (numpy for the one-row writes while acting, with
    torch views of the same memory for sampling); n-step windows are assembled per copy of the environment before
    they enter it."""

    FIELDS = ("obs", "action", "ret", "next_obs", "discount")  # the order `sample` returns them in

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], discrete_obs: bool, n: int, gamma: float):
        self.capacity, self.n, self.gamma = capacity, n, gamma
        dtype = np.int64 if discrete_obs else np.float32
        self.arrays = {"obs": np.zeros((capacity, *obs_shape), dtype), "next_obs": np.zeros((capacity, *obs_shape),
                       dtype), "action": np.zeros(capacity, np.int64), "ret": np.zeros(capacity, np.float32),
                       "discount": np.zeros(capacity, np.float32)}
        self.tensors = {k: torch.from_numpy(v) for k, v in self.arrays.items()}
        self.pos, self.full = 0, False
        self.windows: list[list[tuple]] = []  # (obs, action, reward) pending, per copy (n-step)

    def __len__(self) -> int:
        return self.capacity if self.full else self.pos

    def _put(self, obs, action, ret: float, next_obs, discount: float) -> None:
        a, i = self.arrays, self.pos
        a["obs"][i], a["action"][i], a["ret"][i], a["next_obs"][i], a["discount"][i] = (obs, action, ret, next_obs,
                                                                                         discount)
        self.pos = (i + 1) % self.capacity
        self.full = self.full or self.pos == 0

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, final: np.ndarray,
            term: np.ndarray, trunc: np.ndarray) -> None:
        if len(self.windows) != len(obs):
            self.windows = [[] for _ in range(len(obs))]
        for i in range(len(obs)):
            if self.n == 1:
                self._put(obs[i], actions[i], rewards[i], final[i], 0.0 if term[i] else self.gamma)
                continue
            w = self.windows[i]  # n-step: a window enters when it is n long, or its episode ended
            w.append((obs[i].copy(), int(actions[i]), float(rewards[i])))
            done = bool(term[i] or trunc[i])
            while w and (done or len(w) == self.n):
                ret, discount = nstep_targets(np.array([x[2] for x in w]), bool(term[i]), self.gamma)
                self._put(w[0][0], w[0][1], ret, final[i], discount)
                w.pop(0)

    def sample(self, batch: int) -> tuple[Tensor, ...]:
        idx = torch.randint(len(self), (batch,))
        return tuple(self.tensors[k][idx] for k in self.FIELDS)

    def state_dict(self, keep: int) -> dict:
        """The newest `keep` transitions (oldest first) and the pending n-step windows."""
        k = min(keep, len(self))
        idx = (torch.arange(-k, 0) + self.pos) % self.capacity
        return {**{name: self.tensors[name][idx].clone() for name in self.FIELDS}, "kept": k, "size": len(self),
                "pos": self.pos, "windows": [[(torch.as_tensor(o), a, r) for o, a, r in w] for w in self.windows]}

    def load_state_dict(self, st: dict) -> None:
        """Back as saved when the whole buffer was kept; else the kept part is the buffer, as its newest entries."""
        k = st["kept"]
        whole = k == st["size"]
        self.pos = st["pos"] if whole else k % self.capacity
        self.full = st["size"] == self.capacity if whole else k == self.capacity
        idx = (torch.arange(-k, 0) + self.pos) % self.capacity
        for name in self.FIELDS:
            self.tensors[name][idx] = st[name]
        self.windows = [[(o.numpy(), a, r) for o, a, r in w] for w in st["windows"]]


class DQN:
    def __init__(self, cfg: DQNConfig, info, train, device):
        if not info.act_n:
            raise UserError(f"agent 'dqn' chooses among discrete actions, and '{info.id}' has continuous actions "
                            f"{info.space('act')}; use ppo (Gaussian actions) for it")
        self.cfg, self.info, self.train, self.device = cfg, info, train, device
        q = QNet(info.obs_dim, info.obs_n, info.act_n, cfg.hidden, cfg.dueling)
        target = QNet(info.obs_dim, info.obs_n, info.act_n, cfg.hidden, cfg.dueling)
        target.load_state_dict(q.state_dict())
        self.net = QPair(q, target).to(device)
        self.opt = torch.optim.Adam(self.net.q.parameters(), lr=cfg.lr, fused=True)
        self.replay = Replay(min(cfg.buffer_size, train.steps), info.obs_shape, bool(info.obs_n), cfg.n_step,
                             cfg.gamma)
        self.updates, self.last_target = 0, 0

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.net.q(torch.as_tensor(obs, device=self.device)).argmax(-1).cpu().numpy()

    @torch.no_grad()
    def values(self, obs: np.ndarray) -> np.ndarray:
        return self.net.q(torch.as_tensor(obs, device=self.device)).cpu().numpy()

    def iterate(self, envs, progress: float) -> dict[str, float]:
        c = self.cfg
        eps = linear(c.epsilon, c.epsilon_final, c.exploration_fraction, progress)
        for _ in range(c.train_freq):
            obs = envs.obs
            u = torch.rand(2, len(obs)).numpy()  # explore?, and the random action, from torch's RNG (resumable)
            actions = (u[1] * self.info.act_n).astype(np.int64)
            if not (u[0] < eps).all():
                actions = np.where(u[0] < eps, actions, self.act(obs))
            _, r, term, trunc, final = envs.step(actions)
            self.replay.add(obs, actions, r, final, term, trunc)
        out = {"rl/epsilon": eps}
        if envs.steps < c.learning_starts or len(self.replay) < c.batch_size:
            return out
        losses, qs = [], []
        for _ in range(c.gradient_steps):
            loss, q = self.update()
            losses.append(loss)
            qs.append(q)
        if c.tau == 1.0 and envs.steps - self.last_target >= c.target_update:
            self.net.target.load_state_dict(self.net.q.state_dict())
            self.last_target = envs.steps
        if losses:
            out.update({"loss/td": torch.stack(losses).mean().item(), "rl/q_values": torch.stack(qs).mean().item()})
        return out

    def update(self) -> tuple[Tensor, Tensor]:
        c, net = self.cfg, self.net
        obs, a, ret, nxt, disc = (x.to(self.device) for x in self.replay.sample(c.batch_size))
        with torch.no_grad():
            tq = net.target(nxt)
            if c.double:
                best = net.q(nxt).argmax(-1, keepdim=True)
                nq = tq.gather(1, best).squeeze(1)
            else:
                nq = tq.max(-1).values
            y = ret + disc * nq
        q = net.q(obs).gather(1, a[:, None]).squeeze(1)
        loss = F.smooth_l1_loss(q, y) if c.huber else F.mse_loss(q, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if c.max_grad_norm:
            nn.utils.clip_grad_norm_(net.q.parameters(), c.max_grad_norm)
        self.opt.step()
        self.updates += 1
        if c.tau < 1.0:
            with torch.no_grad():
                for p, tp in zip(net.q.parameters(), net.target.parameters(), strict=True):
                    tp.lerp_(p, c.tau)
        return loss.detach(), q.detach().mean()

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "updates": self.updates, "last_target": self.last_target,
                "replay": self.replay.state_dict(self.cfg.save_buffer) if self.cfg.save_buffer else None}

    def load_state_dict(self, st: dict) -> None:
        self.opt.load_state_dict(st["optimizer"])
        self.updates, self.last_target = st["updates"], st["last_target"]
        if st.get("replay") is not None:
            self.replay.load_state_dict(st["replay"])


@agents.register("dqn", config=DQNConfig)
def dqn(cfg: DQNConfig, info, train, device) -> DQN:
    """DQN with Double-DQN targets, optional dueling head and n-step returns; discrete actions."""
    return DQN(cfg, info, train, device)
