"""Gymnasium environments for the RL loop: the `env` config section, making environments with clear errors
(an unknown id names the closest ones, a missing extra names the pip extra), the spaces an agent sees, and
`Envs`: `num_envs` copies stepped together through Gymnasium's vector API, where every episode starts from its
own seed and the actions since that start are kept, so a checkpoint can put every environment back exactly
(replaying those actions from that seed) without pickling the environments.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import check
from ..errors import UserError, did_you_mean

SPLIT_SEEDS = {"val": 1, "test": 2}  # evaluation episode k of a split is seeded with split * 10**6 + k


@dataclass
class EnvConfig:
    id: str = "CartPole-v1"  # a Gymnasium environment id (gymnasium.pprint_registry() lists them)
    num_envs: int = 1  # copies stepped together (Gymnasium's SyncVectorEnv); a step of all is num_envs env steps
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of gymnasium.make (is_slippery, ...)
    max_episode_steps: int = 0  # truncate episodes here (0: the environment's own limit)

    def __post_init__(self):
        check(self.num_envs >= 1, "env.num_envs", "must be >= 1")
        check(self.max_episode_steps >= 0, "env.max_episode_steps", "must be >= 0 (0: the environment's limit)")


def _extra(message: str) -> str:
    """The Gymnasium extra that brings a missing dependency, from its error message."""
    for extra, words in (("box2d", ("box2d", "Box2D")), ("mujoco", ("mujoco",)), ("atari", ("ale_py", "atari")),
                         ("classic-control", ("pygame",)), ("toy-text", ("pygame",))):
        if any(w in message for w in words):
            return extra
    return "all"


def make(cfg: EnvConfig, render_mode: str | None = None):
    """One Gymnasium environment, or a UserError naming the problem and the fix."""
    import gymnasium as gym

    ids = list(gym.envs.registration.registry)
    if cfg.id not in ids:
        close = [i for i in ids if i.split("-v")[0].lower() == cfg.id.split("-v")[0].lower()]
        hint = f" (did you mean '{close[-1]}'?)" if close else did_you_mean(cfg.id, ids)
        raise UserError(f"unknown Gymnasium environment '{cfg.id}'{hint}; `python -c \"import gymnasium; "
                        f"gymnasium.pprint_registry()\"` lists them")
    kw = dict(cfg.kwargs)
    if cfg.max_episode_steps:
        kw["max_episode_steps"] = cfg.max_episode_steps
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return gym.make(cfg.id, render_mode=render_mode, **kw)
    except gym.error.DependencyNotInstalled as e:
        extra = _extra(str(e))
        raise UserError(f"environment '{cfg.id}' needs a Gymnasium extra that is not installed: "
                        f"pip install \"gymnasium[{extra}]\" ({str(e).splitlines()[0]})") from None
    except TypeError as e:
        raise UserError(f"env.kwargs do not fit '{cfg.id}': {str(e).split(' was raised')[0]}; fix or drop them "
                        f"(a recipe's kwargs are for its own environment: `nnlab recipes NAME > my.yaml` to edit "
                        f"one)") from None
    except gym.error.Error as e:
        raise UserError(f"cannot make environment '{cfg.id}': {e}") from None


@dataclass
class EnvInfo:
    """What an agent needs to know of an environment's spaces."""

    id: str
    obs_shape: tuple[int, ...]  # () for a discrete observation (a state id)
    obs_n: int  # number of states of a discrete observation space (0 for a Box)
    act_n: int  # number of actions of a discrete action space (0 for a Box)
    act_shape: tuple[int, ...]  # () for discrete actions
    act_low: np.ndarray | None = None
    act_high: np.ndarray | None = None
    reward_threshold: float | None = None  # the environment's "solved" return, if it declares one
    max_episode_steps: int | None = None

    @property
    def obs_dim(self) -> int:
        """Length of the network input: one-hot for a discrete observation."""
        return self.obs_n or int(np.prod(self.obs_shape))

    def space(self, obs_or_act: str) -> str:
        if obs_or_act == "obs":
            return f"Discrete({self.obs_n})" if self.obs_n else f"Box{self.obs_shape}"
        return f"Discrete({self.act_n})" if self.act_n else f"Box{self.act_shape}"


def info_of(env, cfg: EnvConfig) -> EnvInfo:
    from gymnasium import spaces

    o, a = env.observation_space, env.action_space
    if not isinstance(o, (spaces.Discrete, spaces.Box)) or not isinstance(a, (spaces.Discrete, spaces.Box)):
        raise UserError(f"'{cfg.id}' has observation space {o} and action space {a}; nnlab's agents take "
                        f"Discrete or Box spaces")
    spec = env.spec
    return EnvInfo(cfg.id, () if isinstance(o, spaces.Discrete) else tuple(o.shape),
                   int(o.n) if isinstance(o, spaces.Discrete) else 0,
                   int(a.n) if isinstance(a, spaces.Discrete) else 0,
                   () if isinstance(a, spaces.Discrete) else tuple(a.shape),
                   None if isinstance(a, spaces.Discrete) else a.low.astype(np.float32),
                   None if isinstance(a, spaces.Discrete) else a.high.astype(np.float32),
                   spec.reward_threshold if spec else None, spec.max_episode_steps if spec else None)


def env_info(cfg: EnvConfig) -> EnvInfo:
    env = make(cfg)
    try:
        return info_of(env, cfg)
    finally:
        env.close()


def success(env_id: str, reward: float, terminated: bool, info: dict) -> float | None:
    """1/0 where the environment defines reaching its goal, else None: FrozenLake's goal pays 1, Taxi ends on a
    drop-off, MountainCar and Acrobot end on reaching the height, LunarLander pays +100 for coming to rest."""
    if "is_success" in info:
        return float(info["is_success"])
    name = env_id.split("-v")[0]
    if name == "FrozenLake" or name == "CliffWalking":
        return float(terminated and reward > 0)
    if name in ("Taxi", "MountainCar", "MountainCarContinuous", "Acrobot"):
        return float(terminated)
    if name == "LunarLander" or name == "LunarLanderContinuous":
        return float(terminated and reward >= 100)
    return None


def episode_seed(seed: int, env: int, episode: int) -> int:
    """The seed of a training episode: a function of the run's seed, the copy and the episode's number."""
    return int(np.random.SeedSequence([seed, env, episode]).generate_state(1)[0])


class Envs:
    """`n` copies of one environment, stepped together (Gymnasium's SyncVectorEnv, our own autoreset). After
    `step`, `obs` holds the next observations (a finished episode's copy already reset); `finished` collects
    (return, length, success) of the episodes that ended."""

    def __init__(self, cfg: EnvConfig, seed: int, n: int | None = None):
        from gymnasium.vector import AutoresetMode, SyncVectorEnv

        self.cfg, self.seed, self.n = cfg, seed, n or cfg.num_envs
        first = make(cfg)
        self.info = info_of(first, cfg)
        fns = [lambda: first] + [lambda: make(cfg)] * (self.n - 1)
        self.vec = SyncVectorEnv(fns, copy=False, autoreset_mode=AutoresetMode.DISABLED)
        self.steps = 0  # env steps taken, over all copies
        self.episode = np.zeros(self.n, dtype=np.int64)  # number of each copy's current episode
        self.ret = np.zeros(self.n)
        self.length = np.zeros(self.n, dtype=np.int64)
        self.actions: list[list[Any]] = [[] for _ in range(self.n)]  # since each copy's episode began
        self.finished: list[tuple[float, int, float | None]] = []
        self.obs = self._reset(np.ones(self.n, dtype=bool))

    def _reset(self, mask: np.ndarray) -> np.ndarray:
        seeds = [episode_seed(self.seed, i, int(self.episode[i])) if m else None for i, m in enumerate(mask)]
        obs, _ = self.vec.reset(seed=seeds, options={"reset_mask": mask})
        return obs.copy()  # the vector env writes its next observations into the same array

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(next_obs, rewards, terminated, truncated, final_obs): final_obs is the observation the step reached
        (for bootstrapping a truncated episode); next_obs replaces it by the reset one where an episode ended."""
        obs, rew, term, trunc, infos = self.vec.step(actions)
        obs = obs.copy()  # the vector env writes its next observations into the same array
        self.steps += self.n
        self.ret += rew
        self.length += 1
        for i in range(self.n):
            self.actions[i].append(actions[i])
        done = term | trunc
        final = obs
        if done.any():
            for i in np.flatnonzero(done):
                info = {k: v[i] for k, v in infos.items() if not k.startswith("_") and infos.get(f"_{k}", [1])[i]}
                self.finished.append((float(self.ret[i]), int(self.length[i]),
                                      success(self.cfg.id, float(rew[i]), bool(term[i]), info)))
                self.episode[i] += 1
                self.ret[i], self.length[i] = 0.0, 0
                self.actions[i] = []
            obs = obs.copy()
            obs[done] = self._reset(done)[done]
        self.obs = obs
        return obs, rew, term, trunc, final

    def drain(self) -> list[tuple[float, int, float | None]]:
        out, self.finished = self.finished, []
        return out

    def state_dict(self) -> dict[str, Any]:
        acts = [torch.as_tensor(np.asarray(a)) for a in self.actions]
        return {"steps": self.steps, "episode": torch.from_numpy(self.episode.copy()),
                "ret": torch.from_numpy(self.ret.copy()), "length": torch.from_numpy(self.length.copy()),
                "actions": acts, "finished": list(self.finished)}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """Put every copy back where it was: reset it with its episode's seed and replay its actions."""
        self.steps = int(st["steps"])
        self.episode, self.ret, self.length = st["episode"].numpy().copy(), st["ret"].numpy().copy(), \
            st["length"].numpy().copy()
        self.finished = [tuple(f) for f in st["finished"]]
        obs = self._reset(np.ones(self.n, dtype=bool))
        for i, acts in enumerate(st["actions"]):
            self.actions[i] = list(acts.numpy())
            env = self.vec.envs[i]
            for a in self.actions[i]:
                o, _, term, trunc, _ = env.step(a if self.info.act_shape else int(a))
                if term or trunc:
                    raise UserError(f"resume state does not replay in '{self.cfg.id}' (an episode ended early): "
                                    f"the environment is not deterministic under its seed")
                obs[i] = o
        self.obs = obs

    def close(self) -> None:
        self.vec.close()


def rollouts(envs_cfg: EnvConfig, policy, episodes: int, split: str, n: int = 16, render: bool = False,
             ) -> dict[str, Any]:
    """`episodes` episodes of `policy` (raw observations -> actions), seeded by `split`'s seeds, `n` at a time.
    Returns the returns, lengths, successes and, with `render`, the frames of each episode."""

    if split not in SPLIT_SEEDS:
        raise UserError(f"an RL run has no split '{split}'{did_you_mean(split, SPLIT_SEEDS)}; it has: "
                        f"{', '.join(SPLIT_SEEDS)} (episodes from different seeds)")
    if render:  # drawing into arrays needs no display: keep SDL from looking for one (and warning headless)
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    base = SPLIT_SEEDS[split] * 10**6
    envs = [make(envs_cfg, "rgb_array" if render else None) for _ in range(max(1, min(n, episodes)))]
    done: dict[int, tuple] = {}  # episode -> (return, length, success, frames)
    live: dict[int, dict[str, Any]] = {}  # slot -> the episode it plays

    def start(i: int, k: int) -> None:
        obs, _ = envs[i].reset(seed=base + k)
        live[i] = {"k": k, "obs": obs, "ret": 0.0, "len": 0, "frames": [envs[i].render()] if render else []}

    for i in range(len(envs)):
        start(i, i)
    nxt = len(envs)
    while live:
        slots = list(live)
        actions = np.asarray(policy(np.stack([np.asarray(live[i]["obs"]) for i in slots])))
        for i, a in zip(slots, actions, strict=True):
            ep = live[i]
            ep["obs"], r, term, trunc, info = envs[i].step(a if actions.ndim > 1 else int(a))
            ep["ret"] += float(r)
            ep["len"] += 1
            if render:
                ep["frames"].append(envs[i].render())
            if term or trunc:
                done[ep["k"]] = (ep["ret"], ep["len"], success(envs_cfg.id, float(r), bool(term), info), ep["frames"])
                del live[i]
                if nxt < episodes:
                    start(i, nxt)
                    nxt += 1
    for e in envs:
        e.close()
    eps = [done[k] for k in range(episodes)]
    return {"returns": [e[0] for e in eps], "lengths": [e[1] for e in eps], "success": [e[2] for e in eps],
            "frames": [e[3] for e in eps] if render else []}


def summarize(ro: dict[str, Any]) -> dict[str, float]:
    """Mean and std of the returns, mean length, and the success rate where the environment defines one."""
    r = np.asarray(ro["returns"], dtype=np.float64)
    out = {"return": float(r.mean()), "return_std": float(r.std()), "length": float(np.mean(ro["lengths"]))}
    if ro["success"] and ro["success"][0] is not None:
        out["success"] = float(np.mean(ro["success"]))
    return out
