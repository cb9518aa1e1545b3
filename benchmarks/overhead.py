"""Trainer overhead: training images/s of one CNN in nnlab, a hand-written PyTorch loop, Keras 3, Lightning.

Run from the repository root, alone on the machine (other load skews every number):

    NNLAB_DATA=../shared/data PYTHONPATH=src /tmp/benchvenv/bin/python benchmarks/overhead.py --steps 300
    NNLAB_DATA=../shared/data PYTHONPATH=src .venv/bin/python benchmarks/overhead.py --only nnlab torch

/tmp/benchvenv keeps Keras and Lightning out of the project venv (pin torch, or pip pulls a CUDA build):

    python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install torch==2.13.0 numpy omegaconf \
        safetensors tqdm matplotlib scikit-learn pillow tensorboard keras lightning

Each framework trains recipe mnist-cnn's model (nnlab's `cnn`; in Keras the same layers, widths, dropout and
BatchNorm, channels-first) on the 55,000 in-memory MNIST training images with the same batch, AdamW (lr,
betas, decay on >=2-D weights), label smoothing, precision and threads. Each crops uint8 batches with
nnlab.data.image.Augment (--crop-padding; default 0: none, as the issue asks), then ImageSpec.normalize.
One process per framework; they train in lockstep (benchmarks/lockstep.py), taking turns of `--every` steps, so
a slow spell of the machine falls on all alike. Throughput: images/s per turn after the warm-up turns (no data
decode or evaluation in it); a run's ratio is the median over turns of the rates in the same turn;
`--runs` runs of fresh processes (one process can be faster than an identical one all its life), their geometric
mean. CPU only.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"  # must precede any keras import

import argparse
import importlib.util
import json
import logging
import platform
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnlab.config import Config, load_config
from nnlab.data import datasets
from nnlab.data.image import Augment, ImageSpec
from nnlab.models import build

sys.path.insert(0, str(Path(__file__).parent))
from lockstep import Chunks, runs, train_paused  # noqa: E402

FRAMEWORKS = ("nnlab", "torch", "keras", "lightning")  # torch: the hand-written loop, the reference
LABELS = {"nnlab": "nnlab", "torch": "PyTorch loop", "keras": "Keras 3 (torch)", "lightning": "Lightning"}
NO_IDX = torch.empty(0, dtype=torch.long)  # Augment reads image indices only for flip='alternate'


@dataclass
class Setup:
    args: argparse.Namespace
    cfg: Config  # recipe mnist-cnn with the command line's crop padding and batch size
    spec: ImageSpec
    x: Tensor  # (N, 1, 28, 28) uint8 training images
    y: Tensor  # (N,) int64 labels

    def prep(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """uint8 batch -> cropped, standardised float32 batch: the same work in every framework."""
        return self.spec.normalize(Augment(self.args.crop_padding)(x, NO_IDX, 0, gen))

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return build("cnn", self.cfg.model, self.spec)

    def adamw(self, model: nn.Module) -> torch.optim.AdamW:
        t = self.cfg.optim  # weight decay on >=2-D weights only, as nnlab.optim.param_groups
        groups = [{"params": [p for p in model.parameters() if (p.ndim >= 2) == d],
                   "weight_decay": t.weight_decay if d else 0.0} for d in (True, False)]
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.task.label_smoothing)


def run_nnlab(s: Setup) -> None:
    """nnlab.train, waiting after each log of --every steps (off its clock)."""
    a = s.args
    train_paused("mnist-cnn", a.steps, a.every, [f"train.batch_size={a.batch_size}", f"train.precision={a.precision}",
                                                 "train.device=cpu", f"train.threads={a.threads}",
                                                 f"data.crop_padding={a.crop_padding}"])


def run_torch(s: Setup) -> None:
    """The reference: randperm batches of in-memory tensors, forward, cross-entropy, backward, step."""
    a, model, gen, clock = s.args, s.model(), torch.Generator().manual_seed(0), Chunks(s.args.every, s.args.batch_size)
    opt = s.adamw(model)  # a new module is in training mode
    while clock.n < a.steps:
        order = torch.randperm(len(s.x), generator=gen)
        for i in range(min(len(s.x) // a.batch_size, a.steps - clock.n)):
            idx = order[i * a.batch_size:(i + 1) * a.batch_size]
            x, y = s.prep(s.x[idx], gen), s.y[idx]
            with torch.autocast("cpu", torch.bfloat16) if a.precision == "bf16" else nullcontext():
                loss = s.loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            clock.tick()


def run_keras(s: Setup) -> None:
    """model.fit on numpy arrays (cut to whole batches); the uint8 -> float prep is the first layer."""
    import keras
    from keras import layers as kl

    a, m, t, cf = s.args, s.cfg.model, s.cfg.optim, "channels_first"
    keras.config.set_dtype_policy("mixed_bfloat16" if a.precision == "bf16" else "float32")
    keras.utils.set_random_seed(0)
    gen, clock = torch.Generator().manual_seed(0), Chunks(a.every, a.batch_size)

    class Prep(kl.Layer):  # only ever called in training here
        def call(self, x: Tensor) -> Tensor:
            return s.prep(x, gen)

        def compute_output_spec(self, x: Any) -> Any:
            return keras.KerasTensor(x.shape, dtype="float32")

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            clock.tick()
            self.model.stop_training = clock.n >= a.steps

    net: list[Any] = [keras.Input(s.spec.input_shape, batch_size=a.batch_size, dtype="uint8"), Prep()]
    for width in m.channels:
        for _ in range(m.convs_per_stage):
            net.append(kl.Conv2D(width, 3, padding="same", use_bias=not m.batch_norm, data_format=cf))
            net += [kl.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-5)] if m.batch_norm else []
            net.append(kl.ReLU())
        net.append(kl.MaxPooling2D(2, data_format=cf))
    net += [kl.Flatten(data_format=cf), kl.Dropout(m.dropout), kl.Dense(m.hidden, activation="relu"),
            kl.Dropout(m.dropout), kl.Dense(s.spec.num_classes)]
    model = keras.Sequential(net)
    opt = keras.optimizers.AdamW(t.lr, weight_decay=t.weight_decay, beta_1=t.betas[0], beta_2=t.betas[1])
    opt.exclude_from_weight_decay(var_list=[v for v in model.trainable_weights if len(v.shape) < 2])
    ce = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=s.cfg.task.label_smoothing)
    model.compile(optimizer=opt, loss=ce, jit_compile=False)
    n = (per_epoch := len(s.x) // a.batch_size) * a.batch_size
    y = F.one_hot(s.y[:n], s.spec.num_classes).float().numpy()  # the smoothed loss wants one-hot labels
    model.fit(s.x[:n].numpy(), y, batch_size=a.batch_size, epochs=a.steps // per_epoch + 1, shuffle=True,
              verbose=0, callbacks=[Clock()])


def run_lightning(s: Setup) -> None:
    """Trainer.fit of a LightningModule around the same nn.Module; DataLoader over a TensorDataset."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    a, gen, clock = s.args, torch.Generator().manual_seed(0), Chunks(s.args.every, s.args.batch_size)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = s.model()

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return s.loss(self.net(s.prep(batch[0], gen)), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return s.adamw(self.net)

    class Clock(L.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            clock.tick()

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available: False" lines
    warnings.filterwarnings("ignore", ".*(does not have many workers|LeafSpec).*")
    loader = DataLoader(TensorDataset(s.x, s.y), batch_size=a.batch_size, shuffle=True, drop_last=True,
                        num_workers=0, generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=a.steps, max_epochs=-1, logger=False,
                        precision="bf16-mixed" if a.precision == "bf16" else "32-true", callbacks=[Clock()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(Module(), loader)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per framework, warm-up included "
                   "(within one epoch: 429 at batch 128)")
    p.add_argument("--warmup", type=int, default=50, help="first steps left out of the timing (>= 1)")
    p.add_argument("--every", type=int, default=10, help="steps per turn (a multiple of it: --steps, --warmup)")
    p.add_argument("--runs", type=int, default=3, help="lockstep runs of fresh processes (geometric mean)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--crop-padding", type=int, default=0, help="random-crop augmentation (0: none)")
    p.add_argument("--only", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    p.add_argument("--out", type=Path, default=Path("benchmarks/_out/overhead.json"))
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)  # one framework's process
    a = p.parse_args()
    if not 1 <= a.warmup < a.steps or a.steps % a.every or a.warmup % a.every:
        p.error("need 1 <= --warmup < --steps, both multiples of --every")
    cfg = load_config("mnist-cnn", data={"crop_padding": a.crop_padding}, train={"batch_size": a.batch_size})
    if a.worker:
        data = datasets["mnist"].factory(cfg.data)  # decoded once (nnlab.train reads the same cache)
        s = Setup(a, cfg, data.spec, data.tensors["train"]["x"], data.tensors["train"]["y"])
        if a.steps > len(s.x) // a.batch_size:  # nnlab would log (and turn) at the epoch's end too
            sys.exit(f"--steps must be at most one epoch ({len(s.x) // a.batch_size} steps)")
        torch.set_num_threads(a.threads)
        {"nnlab": run_nnlab, "torch": run_torch, "keras": run_keras, "lightning": run_lightning}[a.worker](s)
        return
    frameworks = [fw for fw in a.only if fw in ("nnlab", "torch") or importlib.util.find_spec(fw)]
    for fw in sorted(set(a.only) - set(frameworks)):
        print(f"skipping {fw}: not installed; `pip install {fw} torch=={torch.__version__.split('+')[0]}` "
              "(pin torch, or pip may replace it)")
    workers = {fw: ([sys.executable, __file__, *sys.argv[1:], "--worker", fw], None) for fw in frameworks}
    ref = "torch" if "torch" in workers else frameworks[0]
    res = runs(workers, a.steps // a.every, a.warmup // a.every, a.runs, ref)
    print(f"\n{a.steps} steps ({a.warmup} warm-up) x batch {a.batch_size}, {a.precision}, {a.threads} threads, "
          f"crop_padding={a.crop_padding}, turns of {a.every} steps, {a.runs} runs\n\n"
          f"| framework | images/s (median of runs) | vs {LABELS[ref]} (paired, geometric mean of runs) |\n"
          "|---|---:|---:|")
    for fw in frameworks:
        print(f"| {LABELS[fw]} | {res['median'][fw]:,.0f} | {res['paired_ratio'][fw]:.3f}x |")
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
              "versions": {m: __import__(m).__version__ for m in ("nnlab", "torch", *frameworks)},
              "cpu": platform.processor() or platform.machine(), "reference": ref, **res}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
