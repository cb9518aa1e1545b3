"""The data contracts every family uses: `Batch`, `Spec`, `Loader`, and the `datasets`/`specs` registries.

A dataset factory (registered in `datasets`) takes its config dataclass and returns a `Data`: a `Spec` (what
a model, a task and `predict` need to know; saved with every checkpoint, fitted artifacts as files in
`assets/`), the names of its splits, and `loader(split, ...)`, which yields opaque `Batch`es. The loops
only move, split and count batches; the dataset owns its preprocessing and collation, the task reads the
fields. Two loaders cover the ways of sampling:

- `Loader`: by epoch. An epoch's order is a function of (seed, epoch), each batch's random draws of
  (seed, epoch, batch), so a run resumed at any batch sees the data an uninterrupted one would. Each global
  batch is made whole (padding, augmentation) and cut into one shard per process. Optional length bucketing.
- `Windows`: by step, random windows of a token stream (a memory-mapped file read lazily), a function of
  (seed, step); `len() == 0` tells the loop that the stream has no epochs (it then needs `train.max_steps`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ..registry import Registry

datasets = Registry("dataset")
specs = Registry("data spec kind")


class Batch:
    """Named fields of one batch: tensors whose first dimension is the batch, or lists with one item per
    example (e.g. detection targets: a list of dicts of tensors). `batch["x"]` reads a field."""

    def __init__(self, **fields: Any):
        self.fields = fields
        sizes = {len(v) for v in fields.values()}
        if len(sizes) > 1:
            raise ValueError(f"batch fields differ in length: { {k: len(v) for k, v in fields.items()} }")
        self.size = sizes.pop() if sizes else 0

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def __len__(self) -> int:
        return self.size

    def to(self, device: torch.device | str, channels_last: bool = False) -> Batch:
        """On `device` (tensors nested in lists of dicts too); 4-D float tensors channels-last if asked."""
        def move(v: Any) -> Any:
            if isinstance(v, Tensor):
                v = v.to(device, non_blocking=True)
                if channels_last and v.ndim == 4 and v.is_floating_point():
                    v = v.contiguous(memory_format=torch.channels_last)
                return v
            if isinstance(v, dict):
                return {k: move(u) for k, u in v.items()}
            if isinstance(v, list):
                return [move(u) for u in v]
            return v

        return Batch(**{k: move(v) for k, v in self.fields.items()})

    def split(self, n: int) -> list[Batch]:
        """`n` consecutive parts of (nearly) equal size, for accumulation and process shards."""
        bounds = [round(i * self.size / n) for i in range(n + 1)]
        return [Batch(**{k: v[a:b] for k, v in self.fields.items()}) for a, b in zip(bounds, bounds[1:], strict=False)]


@dataclass(kw_only=True)
class Spec:
    """What a model, a task and `nnlab predict` need to know about the data. A domain subclasses it with a
    `kind` name (registered in `specs`); its fields go to the checkpoint's model.json, `assets` (fitted
    artifacts: a tokenizer, a vocabulary, normalisation statistics) to files in the checkpoint's assets/."""

    kind: str = "spec"
    assets: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    inputs: ClassVar[str] = "files"  # what `predict` takes: "files" (paths) or "text" (lines)

    def encode(self, inputs: Sequence[str]) -> tuple[Batch | None, list[str | None]]:
        """Raw inputs (file paths or text lines) as one batch of those that could be read, and an error
        message (or None) per input."""
        raise UserError(f"data of kind '{self.kind}' cannot be read from raw inputs")

    def example(self, n: int) -> Batch:
        """A batch of `n` random inputs of the right shape (registry tests)."""
        raise NotImplementedError


class Data(Protocol):
    """What a dataset factory returns."""

    spec: Spec
    splits: Sequence[str]

    def loader(self, split: str, batch_size: int, *, train: bool = False, seed: int = 0, rank: int = 0,
               world: int = 1, device: torch.device | str = "cpu") -> Loader | Windows: ...


class Loader:
    """Batches of example indices by epoch. `make(idx, epoch, gen)` builds the global batch of the examples
    `idx` (gathering, padding, augmenting with the generator `gen`); rank r takes its shard.

    `lengths` + `bucket`: sort each run of `bucket` batches' worth of shuffled examples by length before
    cutting batches (little padding), then shuffle the batch order."""

    def __init__(self, size: int, batch_size: int, make: Callable[[Tensor, int, torch.Generator], Batch], *,
                 shuffle: bool = False, drop_last: bool = False, seed: int = 0, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu", lengths: Tensor | None = None, bucket: int = 0):
        if drop_last and size < batch_size:
            raise UserError(f"a batch of {batch_size} is larger than the training split ({size} examples): "
                            f"lower train.batch_size")
        self.size, self.batch_size, self.make = size, batch_size, make
        self.shuffle, self.drop_last, self.seed, self.rank, self.world = shuffle, drop_last, seed, rank, world
        self.device, self.lengths, self.bucket = torch.device(device), lengths, bucket

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def order(self, epoch: int) -> list[Tensor]:
        """The index batches of `epoch`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        b = self.batch_size
        if self.lengths is not None and self.bucket:
            chunk = b * self.bucket
            order = torch.cat([c[self.lengths[c].argsort(stable=True)] for c in order.split(chunk)])
        batches = [order[i * b:(i + 1) * b] for i in range(len(self))]
        if self.lengths is not None and self.bucket and self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g)]
        return batches

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` (this process's shards), beginning at batch `start`."""
        for i, idx in enumerate(self.order(epoch)[start:], start=start):
            g = torch.Generator(device=self.device)
            g.manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + i)
            batch = self.make(idx.to(self.device), epoch, g)
            yield batch.split(self.world)[self.rank] if self.world > 1 else batch


class TensorData:
    """Splits of equal-length tensors held in memory (moved to the device once). Batches gather rows;
    `transform(batch, idx, epoch, gen, train, seed)` then augments and normalises them."""

    def __init__(self, spec: Spec, splits: dict[str, dict[str, Tensor]],
                 transform: Callable[[Batch, Tensor, int, torch.Generator, bool, int], Batch] | None = None):
        self.spec, self.tensors, self.transform = spec, splits, transform
        self.splits = list(splits)
        self._on: dict[tuple[str, str], dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return len(next(iter(self.tensors["train"].values())))

    def fields(self, split: str, device: torch.device) -> dict[str, Tensor]:
        if split not in self.tensors:
            raise UserError(f"there is no '{split}' split (the data has: {', '.join(self.splits)})")
        key = (split, str(device))
        if key not in self._on:
            self._on[key] = {k: v.to(device) for k, v in self.tensors[split].items()}
        return self._on[key]

    def loader(self, split: str, batch_size: int, *, train: bool = False, seed: int = 0, rank: int = 0,
               world: int = 1, device: torch.device | str = "cpu") -> Loader:
        device = torch.device(device)
        fields = self.fields(split, device)

        def make(idx: Tensor, epoch: int, gen: torch.Generator) -> Batch:
            batch = Batch(**{k: v.index_select(0, idx) for k, v in fields.items()})
            return self.transform(batch, idx, epoch, gen, train, seed) if self.transform else batch

        n = len(next(iter(fields.values())))
        return Loader(n, batch_size, make, shuffle=train, drop_last=train, seed=seed, rank=rank, world=world,
                      device=device)


def pad(seqs: Sequence[Tensor], value: int = 0) -> tuple[Tensor, Tensor]:
    """Variable-length 1-D sequences as (B, T) padded with `value` and a (B, T) bool mask of real tokens."""
    ids = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=value)
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, torch.arange(ids.shape[1])[None, :] < lengths[:, None]


class Windows:
    """Random windows of `block + 1` tokens from a 1-D token array (a `np.memmap` is read lazily: only the
    windows drawn are touched), sampled by step: batch i is a function of (seed, i) alone. Yields
    `Batch(x=(B, block), y=(B, block))`, y shifted by one. For evaluation (`train=False`), every
    non-overlapping window of the stream, or `eval_windows` of them spread evenly over it (a text's start is
    not representative of the whole: the first 64k characters of shakespeare's val split score 0.08 nats
    lower than all of it)."""

    def __init__(self, tokens: np.ndarray, block: int, batch_size: int, *, train: bool = True, seed: int = 0,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu", eval_windows: int = 0):
        if len(tokens) < block + 2:
            raise UserError(f"the token stream has {len(tokens)} tokens, fewer than a window of {block + 1}")
        self.tokens, self.block, self.batch_size, self.train = tokens, block, batch_size, train
        self.seed, self.rank, self.world, self.device = seed, rank, world, torch.device(device)
        self.windows = (len(tokens) - 1) // block
        self.starts = np.arange(self.windows) * block  # evaluation windows: all, or evenly spread
        if eval_windows and eval_windows < self.windows:
            self.windows = eval_windows
            self.starts = np.linspace(0, len(tokens) - block - 1, eval_windows).astype(np.int64)

    def __len__(self) -> int:
        return 0 if self.train else -(-self.windows // self.batch_size)

    def _batch(self, starts: np.ndarray) -> Batch:
        rows = np.stack([np.asarray(self.tokens[s:s + self.block + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(rows)  # (B, block + 1)
        return Batch(x=t[:, :-1], y=t[:, 1:]).to(self.device)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        if not self.train:
            for i in range(start, len(self)):
                starts = self.starts[i * self.batch_size:(i + 1) * self.batch_size]
                yield self._batch(starts).split(self.world)[self.rank]
            return
        i = start
        while True:
            rng = np.random.default_rng([self.seed, i])
            starts = rng.integers(0, len(self.tokens) - self.block - 1, self.batch_size)
            yield self._batch(starts).split(self.world)[self.rank]
            i += 1


from . import conll, corpus, image, sentences, text, vision  # noqa: E402,F401  (registers the specs and datasets)
