"""PPO (Schulman et al. 2017) with the details that make it work (Huang et al. 2022, "The 37 implementation
details of PPO"): an actor-critic for discrete (categorical) or continuous (diagonal Gaussian, state-independent
log-std) actions, GAE(lambda) (Schulman et al. 2016), the clipped surrogate objective, optional value clipping,
an entropy bonus, per-minibatch advantage normalisation, minibatch epochs, linear learning-rate (and clip)
annealing, orthogonal initialisation, and observation / reward normalisation.

The observation statistics are buffers of the network, so model.safetensors alone carries the policy as it was
trained (Stable-Baselines3 keeps them in a separate VecNormalize file, easily lost); the reward statistics are
only for training and go to the resume state. A truncated episode (a time limit) bootstraps: its last reward
gets gamma * V(final observation), as Stable-Baselines3 does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from . import agents
from .dqn import features


@dataclass
class PPOConfig:
    name: str = "ppo"
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # hidden widths of the actor and of the critic
    activation: str = "tanh"  # tanh | relu
    lr: float = 3e-4  # Adam learning rate ...
    anneal_lr: bool = True  # ... decayed linearly to 0 over training
    n_steps: int = 128  # vector steps per rollout (a rollout is n_steps * env.num_envs transitions)
    n_epochs: int = 4  # passes over each rollout
    batch_size: int = 64  # minibatch size (transitions)
    gamma: float = 0.99  # discount
    gae_lambda: float = 0.95  # GAE's lambda
    clip: float = 0.2  # clip range of the probability ratio ...
    anneal_clip: bool = False  # ... decayed linearly to 0 over training
    clip_value: float = 0.0  # clip range of the value update around the old values (0: off)
    ent_coef: float = 0.0  # entropy bonus
    vf_coef: float = 0.5  # value loss weight
    max_grad_norm: float = 0.5  # gradient clipping (0: off)
    norm_adv: bool = True  # normalise advantages per minibatch
    target_kl: float = 0.0  # stop a rollout's epochs early past this approximate KL (0: never)
    normalize_obs: bool = False  # running mean/std of observations (buffers of the network), clipped to +-10
    normalize_reward: bool = False  # divide rewards by the running std of the discounted return, clipped to +-10
    log_std_init: float = 0.0  # initial log standard deviation of Gaussian actions

    def __post_init__(self):
        check(all(h >= 1 for h in self.hidden), "agent.hidden", "widths must be >= 1")
        check(self.activation in ("tanh", "relu"), "agent.activation", "must be tanh or relu")
        check(self.lr > 0 and self.n_steps >= 1 and self.n_epochs >= 1 and self.batch_size >= 1, "agent.lr",
              "need lr > 0, n_steps, n_epochs and batch_size >= 1")
        check(0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1, "agent.gamma", "gamma, gae_lambda in [0, 1]")
        check(self.clip > 0 and self.clip_value >= 0, "agent.clip", "need clip > 0 and clip_value >= 0")
        check(min(self.ent_coef, self.vf_coef, self.max_grad_norm, self.target_kl) >= 0, "agent.ent_coef",
              "ent_coef, vf_coef, max_grad_norm and target_kl must be >= 0")


def gae(rewards: Tensor, values: Tensor, dones: Tensor, last_value: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimates (T, N) of a rollout (T, N); `dones[t]`: the episode ended at step t, so
    step t+1 belongs to the next one; `last_value` (N,): V of the observation after the rollout.

    delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t;  A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}
    """
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(last_value)
    for t in reversed(range(len(rewards))):
        nonterminal = 1.0 - dones[t]
        next_value = last_value if t == len(rewards) - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv


def ppo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, value: Tensor, old_value: Tensor, returns: Tensor,
             entropy: Tensor, clip: float, clip_value: float = 0.0, vf_coef: float = 0.5, ent_coef: float = 0.0,
             norm_adv: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO loss of a minibatch: clipped surrogate + vf_coef * value loss - ent_coef * entropy.

    ratio = exp(logp - old_logp);  L_pi = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
    L_v = 0.5 * mean((V - R)^2), or with clip_value the max of that and the clipped V's error (PPO2's).
    """
    if norm_adv and len(adv) > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
    if clip_value:
        clipped = old_value + (value - old_value).clamp(-clip_value, clip_value)
        v = 0.5 * torch.max((value - returns) ** 2, (clipped - returns) ** 2).mean()
    else:
        v = 0.5 * ((value - returns) ** 2).mean()
    ent = entropy.mean()
    with torch.no_grad():
        stats = {"approx_kl": ((ratio - 1) - log_ratio).mean(), "clipfrac": ((ratio - 1).abs() > clip).float().mean()}
    return pg + vf_coef * v - ent_coef * ent, {"policy": pg.detach(), "value": v.detach(), "entropy": ent.detach(),
                                                **stats}


def _layer(a: int, b: int, gain: float) -> nn.Linear:
    layer = nn.Linear(a, b)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _net(sizes: list[int], act: type[nn.Module], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        last = i == len(sizes) - 2
        layers.append(_layer(a, b, out_gain if last else math.sqrt(2)))
        if not last:
            layers.append(act())
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs over the (normalised) observation."""

    def __init__(self, info, cfg: PPOConfig):
        super().__init__()
        act = nn.Tanh if cfg.activation == "tanh" else nn.ReLU
        d, self.obs_n, self.discrete = info.obs_dim, info.obs_n, bool(info.act_n)
        out = info.act_n or int(np.prod(info.act_shape))
        self.actor = _net([d, *cfg.hidden, out], act, 0.01)
        self.critic = _net([d, *cfg.hidden, 1], act, 1.0)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((out,), float(cfg.log_std_init)))
            self.register_buffer("low", torch.as_tensor(info.act_low).flatten())
            self.register_buffer("high", torch.as_tensor(info.act_high).flatten())
        self.normalize = cfg.normalize_obs and not info.obs_n
        if self.normalize:  # running statistics (Chan et al.'s parallel update), part of the policy
            self.register_buffer("obs_mean", torch.zeros(d, dtype=torch.float64))
            self.register_buffer("obs_var", torch.ones(d, dtype=torch.float64))
            self.register_buffer("obs_count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update_stats(self, x: Tensor) -> None:
        x = x.double()
        n, mean, var = x.shape[0], x.mean(0), x.var(0, unbiased=False)
        total = self.obs_count + n
        delta = mean - self.obs_mean
        self.obs_var.copy_((self.obs_var * self.obs_count + var * n + delta**2 * self.obs_count * n / total) / total)
        self.obs_mean.add_(delta * n / total)
        self.obs_count.copy_(total)

    def inputs(self, obs: Tensor) -> Tensor:
        x = features(obs, self.obs_n)
        if self.normalize:
            x = ((x - self.obs_mean) / (self.obs_var + 1e-8).sqrt()).clamp(-10, 10).float()
        return x

    def dist(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(logits, None) for discrete actions, (mean, std) for Gaussian ones."""
        out = self.actor(x)
        return (out, None) if self.discrete else (out, self.log_std.exp().expand_as(out))

    def logp_entropy(self, x: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        a, std = self.dist(x)
        if std is None:
            logp = F.log_softmax(a, -1)
            return logp.gather(1, actions.long()[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)
        logp = -((actions - a) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
        return logp.sum(-1), (0.5 + 0.5 * math.log(2 * math.pi) + std.log()).sum(-1)

    def sample(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(actions, log-probabilities); the Gumbel-max trick for categorical draws."""
        a, std = self.dist(x)
        if std is None:
            actions = (a - torch.empty_like(a).exponential_().log()).argmax(-1)
        else:
            actions = a + std * torch.randn_like(a)
        return actions, self.logp_entropy(x, actions)[0]

    def greedy(self, x: Tensor) -> Tensor:
        a, std = self.dist(x)
        return a.argmax(-1) if std is None else torch.max(torch.min(a, self.high), self.low)

    def forward(self, obs: Tensor) -> Tensor:  # raw observations (B, ...) -> greedy actions
        return self.greedy(self.inputs(obs))


class PPO:
    def __init__(self, cfg: PPOConfig, info, train, device):
        self.cfg, self.info, self.train, self.device = cfg, info, train, device
        self.net = ActorCritic(info, cfg).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, eps=1e-5, fused=True)
        self.ret_acc: Tensor | None = None  # running discounted return per copy (reward normalisation)
        self.ret_stats = torch.tensor([0.0, 1.0, 1e-4], dtype=torch.float64)  # mean, var, count

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.net(torch.as_tensor(obs, device=self.device)).cpu().numpy()

    @torch.no_grad()
    def values(self, obs: np.ndarray) -> np.ndarray:
        return self.net.critic(self.net.inputs(torch.as_tensor(obs, device=self.device))).squeeze(-1).cpu().numpy()

    def _scale_rewards(self, r: Tensor, done: Tensor) -> Tensor:
        """Divide by the running std of the discounted return (Stable-Baselines3's VecNormalize)."""
        if not self.cfg.normalize_reward:
            return r
        if self.ret_acc is None:
            self.ret_acc = torch.zeros_like(r, dtype=torch.float64)
        self.ret_acc = self.ret_acc * self.cfg.gamma + r.double()
        m, v, n = self.ret_stats.tolist()
        bm, bv, k = self.ret_acc.mean().item(), self.ret_acc.var(unbiased=False).item(), len(r)
        total, delta = n + k, bm - m
        self.ret_stats = torch.tensor([m + delta * k / total, (v * n + bv * k + delta**2 * n * k / total) / total,
                                       total], dtype=torch.float64)
        self.ret_acc[done] = 0.0
        return (r / math.sqrt(self.ret_stats[1].item() + 1e-8)).clamp(-10, 10)

    def iterate(self, envs, progress: float) -> dict[str, float]:
        c, net, dev = self.cfg, self.net, self.device
        frac = 1.0 - progress
        if c.anneal_lr:
            for g in self.opt.param_groups:
                g["lr"] = c.lr * frac
        clip = c.clip * frac if c.anneal_clip else c.clip
        T, N = c.n_steps, envs.n
        xs, acts, logps, vals, rews, dones = [], [], [], [], [], []
        obs = envs.obs
        with torch.no_grad():
            for _ in range(T):
                o = torch.as_tensor(obs, device=dev)
                if net.normalize:
                    net.update_stats(features(o, net.obs_n))
                x = net.inputs(o)
                a, logp = net.sample(x)
                v = net.critic(x).squeeze(-1)
                a_env = a.cpu().numpy() if net.discrete else torch.max(torch.min(a, net.high), net.low).cpu().numpy()
                obs, r, term, trunc, final = envs.step(a_env)
                r = torch.as_tensor(r, dtype=torch.float32, device=dev)
                done = torch.as_tensor(term | trunc, device=dev)
                r = self._scale_rewards(r, done).float()
                if trunc.any():  # a time limit is not a terminal state: bootstrap from the final observation
                    idx = np.flatnonzero(trunc & ~term)
                    if len(idx):
                        fv = net.critic(net.inputs(torch.as_tensor(final[idx], device=dev))).squeeze(-1)
                        r[torch.as_tensor(idx, device=dev)] += c.gamma * fv
                xs.append(x), acts.append(a), logps.append(logp), vals.append(v), rews.append(r)
                dones.append(done.float())
            last = net.critic(net.inputs(torch.as_tensor(obs, device=dev))).squeeze(-1)
            values = torch.stack(vals)
            adv = gae(torch.stack(rews), values, torch.stack(dones), last, c.gamma, c.gae_lambda)
            returns = adv + values
        x, a = torch.stack(xs).flatten(0, 1), torch.stack(acts).flatten(0, 1)
        old_logp, adv, returns, old_v = torch.stack(logps).flatten(), adv.flatten(), returns.flatten(), values.flatten()
        B = T * N
        mb = min(c.batch_size, B)
        stats: list[dict[str, Tensor]] = []
        for _ in range(c.n_epochs):
            perm = torch.randperm(B, device=dev)
            kls = []
            for start in range(0, B - mb + 1, mb):
                i = perm[start:start + mb]
                logp, ent = net.logp_entropy(x[i], a[i])
                v = net.critic(x[i]).squeeze(-1)
                loss, s = ppo_loss(logp, old_logp[i], adv[i], v, old_v[i], returns[i], ent, clip, c.clip_value,
                                   c.vf_coef, c.ent_coef, c.norm_adv)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if c.max_grad_norm:
                    nn.utils.clip_grad_norm_(net.parameters(), c.max_grad_norm)
                self.opt.step()
                stats.append(s)
                kls.append(s["approx_kl"])
            if c.target_kl and torch.stack(kls).mean().item() > c.target_kl:
                break
        mean = {k: torch.stack([s[k] for s in stats]).mean().item() for k in stats[0]}
        var_y = returns.var()
        out = {"loss/policy": mean["policy"], "loss/value": mean["value"], "rl/entropy": mean["entropy"],
               "rl/approx_kl": mean["approx_kl"], "rl/clipfrac": mean["clipfrac"], "rl/value": old_v.mean().item(),
               "rl/explained_variance": (1 - (returns - old_v).var() / var_y).item() if var_y > 0 else 0.0,
               "rl/lr": self.opt.param_groups[0]["lr"]}
        if not net.discrete:
            out["rl/action_std"] = net.log_std.exp().mean().item()
        return out

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "ret_acc": self.ret_acc, "ret_stats": self.ret_stats}

    def load_state_dict(self, st: dict) -> None:
        self.opt.load_state_dict(st["optimizer"])
        self.ret_acc, self.ret_stats = st["ret_acc"], st["ret_stats"]


@agents.register("ppo", config=PPOConfig)
def ppo(cfg: PPOConfig, info, train, device) -> PPO:
    """PPO with GAE, clipping, entropy bonus and normalisation; discrete or Gaussian actions."""
    return PPO(cfg, info, train, device)
