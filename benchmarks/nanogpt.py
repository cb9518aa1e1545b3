"""nnlab against nanoGPT's CPU "baby GPT" on shakespeare-char, in one run, on the same machine.

    .venv/bin/pip install requests            # nanoGPT's data/shakespeare_char/prepare.py imports it
    NNLAB_DATA=../shared/data .venv/bin/python benchmarks/nanogpt.py --nanogpt PATH_TO_NANOGPT_CHECKOUT

nanoGPT is not vendored: PATH is a checkout (or a bare git directory) of karpathy/nanoGPT, exported into a
temporary folder that is deleted afterwards. Its README's CPU command is run as published (4 layers, 4 heads,
128 wide, context 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4, 100 warm-up steps, dropout 0), with
`--dtype=float32` (what its CPU path computes in anyway) and its own eval every 250 iterations.

Then, in the same run:
- nnlab trains the same model (the `shakespeare-baby` recipe: another optimizer, batch, learning rate and step
  count are allowed, the architecture is not) from `nnlab train` to its exit;
- a plain PyTorch loop of the same model (nnlab's GPT module, AdamW, no evaluation) gives the tokens/s a hand
  loop reaches at nanoGPT's batch.

Both final models are scored the same way, by nnlab's evaluation over the whole val split (111,540 characters),
nanoGPT's best checkpoint loaded into nnlab's GPT (the layouts match tensor for tensor); nanoGPT's own estimate
(20 random batches) is printed too. Wall times are whole processes, start to exit. MFU is FLOPs per token
(models/gpt.py, the PaLM/nanoGPT formula) x tokens/s over this machine's measured matmul peak at the
precision the row ran (fp32, or bf16 where nnlab's `precision=auto` picked it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import line, measure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NANO_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
             "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
             "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0", "--dtype=float32"]
FILES = ["train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
         "data/shakespeare_char/prepare.py"]


def export_nanogpt(src: Path, dest: Path) -> None:
    """nanoGPT's files into `dest`, from a work tree or a bare git directory (HEAD)."""
    for f in FILES:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        if (src / f).is_file():
            shutil.copy(src / f, dest / f)
        else:
            text = subprocess.run(["git", f"--git-dir={src}", "show", f"HEAD:{f}"], capture_output=True, text=True,
                                  check=True).stdout
            (dest / f).write_text(text)


def run_nanogpt(folder: Path, data: Path) -> dict:
    shutil.copy(data / "tinyshakespeare" / "input.txt", folder / "data/shakespeare_char/input.txt")
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=folder, check=True,
                   capture_output=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "train.py", *NANO_ARGS, f"--out_dir={folder / 'out'}"], cwd=folder,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"nanoGPT failed:\n{res.stderr[-3000:]}")
    evals = [(int(m[1]), float(m[2])) for m in re.finditer(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)",
                                                            res.stdout)]
    iters = [float(m[1]) for m in re.finditer(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", res.stdout)]
    ms = statistics.median(iters[10:])  # steady state (the first iterations warm up)
    return {"wall_s": wall, "evals": evals, "own_best_val": min(v for _, v in evals), "tokens_per_s": 768 / ms * 1e3,
            "ckpt": folder / "out" / "ckpt.pt"}


def nano_into_nnlab(ckpt: Path):
    """nanoGPT's checkpoint as nnlab's GPT (same layout: c_attn -> qkv, c_proj -> proj, mlp.c_fc -> mlp.0, ...)."""
    from nnlab.models.gpt import GPT, GPTConfig

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    ren = [("_orig_mod.", ""), ("transformer.", ""), ("h.", "blocks."), ("ln_1", "ln1"), ("ln_2", "ln2"),
           ("c_attn", "qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.0"), ("mlp.c_proj", "mlp.2")]
    mine = {}
    for k, v in state.items():
        if k == "lm_head.weight":  # tied to wte
            continue
        for a, b in ren:
            k = k.replace(a, b)
        mine[k] = v
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128), 65, 64)
    model.load_state_dict(mine)
    return model


def val_loss(model, data_dir: Path) -> float:
    from nnlab import dist
    from nnlab.data import datasets
    from nnlab.evaluate import evaluate
    from nnlab.tasks.lm import LanguageModel, LMConfig

    data = datasets["tinyshakespeare"].factory(datasets["tinyshakespeare"].config(data_dir=str(data_dir),
                                                                                block_size=64))
    metrics, _ = evaluate(model, LanguageModel(LMConfig(), data.spec), data.loader("val", 512),
                          dist.Env(torch.device("cpu")))
    return metrics["loss"]


def run_nnlab(out: Path, overrides: list[str], data: Path) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "nnlab", "train", "shakespeare-baby", "--out", str(out), "-q",
                          f"--data-dir={data}", *overrides], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"nnlab failed:\n{res.stderr[-3000:]}")
    folder = Path(res.stdout.strip().splitlines()[-1])
    s = json.loads((folder / "summary.json").read_text())
    import nnlab

    block = 64
    val = val_loss(nnlab.load_model(folder, "last").model, data)  # scored as nanoGPT's: the whole val split
    return {"wall_s": wall, "val": val, "own_val": s["final"]["val/loss"], "steps": s["steps"],
            "train_s": s["train_time_s"],
            "tokens_per_s": s["samples_per_s"] * block, "mfu": s["mfu"], "precision": s["precision"],
            "folder": str(folder)}


def plain_loop(steps: int = 300, batch: int = 12) -> float:
    """Tokens/s of a hand-written loop over nnlab's GPT at nanoGPT's batch (random windows of the real text)."""
    from nnlab.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128), 65, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)
    x = torch.randint(0, 65, (steps, batch, 65))
    for i in range(steps):
        if i == 20:
            t0 = time.perf_counter()
        logits = model(x[i, :, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[i, :, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - 20) * batch * 64 / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", required=True, type=Path, help="a nanoGPT checkout or bare git directory")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("NNLAB_DATA", REPO.parent / "shared/data")))
    p.add_argument("overrides", nargs="*", help="overrides of the shakespeare-baby recipe (same model only)")
    args = p.parse_args()
    from nnlab.models.gpt import GPT, GPTConfig

    flops_per_token = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128), 65, 64).flops_per_sample() / 64
    m = measure()
    print(line(m), flush=True)
    peaks = {"fp32": m["fp32_gflops"] * 1e9, "bf16": m["bf16_gflops"] * 1e9}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_nanogpt(args.nanogpt, tmp / "nanogpt")
        nano = run_nanogpt(tmp / "nanogpt", args.data_dir)
        print(f"nanoGPT: {nano['wall_s']:.1f} s, own val estimates {nano['evals']}", flush=True)
        nano_val = val_loss(nano_into_nnlab(nano["ckpt"]), args.data_dir)
        mine = run_nnlab(tmp / "runs", args.overrides, args.data_dir)
        plain = plain_loop()
    ratio = mine["wall_s"] / nano["wall_s"]
    rows = [("nanoGPT (fp32)", nano["wall_s"], nano_val, nano["tokens_per_s"], "fp32"),
            (f"nnlab ({mine['steps']} steps, {mine['precision']})", mine["wall_s"], mine["val"], mine["tokens_per_s"],
             mine["precision"]),
            ("plain PyTorch loop (batch 12, fp32)", None, None, plain, "fp32")]
    print(f"\n{'':36s} {'wall s':>7s} {'val loss':>9s} {'tokens/s':>9s} {'MFU (vs the peak of its precision)':>35s}")
    for name, wall, val, tps, prec in rows:
        print(f"{name:36s} {wall or 0:7.1f} {val or 0:9.4f} {tps:9.0f} {tps * flops_per_token / peaks[prec]:35.1%}")
    print(f"\nnanoGPT's own val estimate (20 batches) at its evals: {nano['evals']}")
    print(f"nnlab wall / nanoGPT wall = {ratio:.3f} (target <= 0.333); val loss difference "
          f"{mine['val'] - nano_val:+.4f} (target within +-0.03); nnlab training time {mine['train_s']:.1f} s")
    print(json.dumps({"machine": m, "nanogpt": {k: v for k, v in nano.items() if k != "ckpt"} | {"val": nano_val},
                      "nnlab": mine, "plain_tokens_per_s": plain, "ratio": ratio}))


if __name__ == "__main__":
    main()
