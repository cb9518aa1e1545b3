"""Text generation: tokenizers, corpora, the GPT's KV-cache against the uncached path, sampling, and the LM
recipes through the real CLI (train, generate, predict, eval) with their bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need_data, nnlab

import nnlab as nl
from nnlab import run as R
from nnlab.data import datasets
from nnlab.data.text import CharTokenizer, CorpusConfig, HFTokenizer, TokenData, _pieces, stdlib_files
from nnlab.errors import UserError
from nnlab.models.gpt import GPT, GPTConfig, KVCache, sample

TINY_LM = ["data.block_size=32", "data.eval_windows=64", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
           "train.max_steps=30", "train.eval_every_steps=15", "train.batch_size=8", "train.log_every=10",
           "train.threads=1", "train.tensorboard=false", "task.sample_tokens=20", "train.precision=fp32"]


def gpt(positions: str = "learned", block: int = 12, vocab: int = 11) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, positions=positions), vocab, block).eval()


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cached_forward_equals_the_full_forward(positions: str) -> None:
    """Prompt + one token at a time through the KV-cache gives the logits of one uncached pass."""
    model = gpt(positions)
    idx = torch.randint(0, 11, (3, 12))
    with torch.no_grad():
        full = model(idx)  # (3, 12, 11)
        cache = KVCache(2, (3, 2, 12, 8), idx.device, torch.float32)
        parts = [model(idx[:, :5], cache)] + [model(idx[:, t:t + 1], cache) for t in range(5, 12)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(idx[:, :1], cache)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cached_generation_equals_uncached_within_the_context(positions: str) -> None:
    model = gpt(positions)
    prompt = torch.randint(0, 11, (2, 4))
    cached = torch.stack(list(model.generate(prompt, 8, temperature=0)), 1)
    plain = torch.stack(list(model.generate(prompt, 8, temperature=0, use_cache=False)), 1)
    assert torch.equal(cached, plain)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = torch.stack(list(model.generate(prompt, 8, 1.0, 5, 0.9, g1)), 1)
    b = torch.stack(list(model.generate(prompt, 8, 1.0, 5, 0.9, g2, use_cache=False)), 1)
    assert torch.equal(a, b)  # the same draws: the same logits


def test_generation_beyond_the_context_slides() -> None:
    model = gpt(block=8)
    for use_cache in (True, False):
        out = list(model.generate(torch.randint(0, 11, (1, 20)), 30, temperature=0, use_cache=use_cache))
        assert len(out) == 30 and all(0 <= int(t) < 11 for t in out)
    # the cached path restarts from the last half of the window: its first token after the restart is what the
    # uncached model predicts from those same 4 tokens
    idx = torch.randint(0, 11, (1, 8))
    toks = [int(t) for t in model.generate(idx, 2, temperature=0)]  # token 2 is predicted after the restart
    seq = torch.cat([idx, torch.tensor([[toks[0]]])], 1)
    assert toks[1] == int(model(seq[:, -4:])[:, -1].argmax())


def test_sampling_filters() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    assert int(sample(logits, 0.0, 0, 1.0, g)) == 0  # temperature 0: greedy
    draws = {int(sample(logits, 1.0, 2, 1.0, g)) for _ in range(200)}
    assert draws == {0, 1}  # top-k 2
    assert len({int(sample(logits, 1.0, 200, 1.0, g)) for _ in range(400)}) == 4  # k beyond the vocabulary: all
    draws = {int(sample(logits, 1.0, 0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}  # nucleus: 0.5 + 0.3 reaches 0.7
    draws = {int(sample(logits, 1.0, 0, 0.4, g)) for _ in range(50)}
    assert draws == {0}  # the top token always stays
    assert len({int(sample(logits, 1.0, 0, 1.0, g)) for _ in range(400)}) == 4


def test_flops_per_sample_counts_matmuls() -> None:
    model = gpt()  # learned positions are lookups: not counted
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    assert model.flops_per_sample() == (6 * n + 12 * 2 * 16 * 12) * 12


def test_char_tokenizer_round_trip_and_unknown_characters() -> None:
    tok = CharTokenizer.fit("hello world\n")
    ids, unknown = tok.encode("hold\n")
    assert tok.decode(ids.tolist()) == "hold\n" and unknown == ""
    ids, unknown = tok.encode("héllo, wörld")
    assert unknown == ",éö" and tok.decode(ids.tolist()) == "hllo wrld"  # dropped, and named


def test_bpe_tokenizer_is_byte_level_and_pieces_do_not_change_tokens() -> None:
    text = "def f(x):\n    return x + 1\n\n" * 200 + "naïve 東京 ∑\n"
    tok = HFTokenizer.fit(text, 300)
    assert tok.vocab_size <= 300
    ids, unknown = tok.encode("unseen: ß → ok\n")
    assert unknown == "" and tok.decode(ids.tolist()) == "unseen: ß → ok\n"  # bytes: nothing is unknown
    whole = tok.tok.encode(text).ids
    assert [i for p in _pieces(text, 64) for i in tok.tok.encode(p).ids] == whole
    assert "".join(_pieces(text, 64)) == text


def test_pystdlib_corpus_is_deterministic_and_split_by_file() -> None:
    files = stdlib_files()
    assert len(files) > 100 and files == stdlib_files()
    assert not any({"test", "tests", "site-packages"} & set(f.parts) for f in files)
    cfg = CorpusConfig(name="pystdlib", block_size=16)
    data = datasets["pystdlib"].factory(cfg)
    assert data.splits == ["train", "val"] and data.spec.vocab_size > 60
    assert isinstance(data.tokens["train"], np.memmap)  # the second read comes from the cache, memory-mapped
    again = datasets["pystdlib"].factory(cfg)
    assert isinstance(again.tokens["val"], np.memmap) and np.array_equal(again.tokens["val"], data.tokens["val"])
    b = next(iter(data.loader("train", 4, train=True, seed=1).epoch(0)))
    assert b["x"].shape == (4, 16) and torch.equal(b["x"][:, 1:], b["y"][:, :-1])


def test_empty_or_one_line_corpus_is_refused() -> None:
    cfg = CorpusConfig(block_size=4)
    with pytest.raises(UserError, match="empty or a single line"):
        TokenData(cfg, "mine", {"train": "just one line with no break", "val": "a\nb\n"}, "test")
    with pytest.raises(UserError, match="empty or a single line"):
        TokenData(cfg, "mine", {"train": "a\nb\nc\n" * 10, "val": ""}, "test")
    with pytest.raises(UserError, match="data.tokenizer"):
        CorpusConfig(tokenizer="wordpiece")


def test_tinyshakespeare_matches_nanogpt_split() -> None:
    root = need_data("tinyshakespeare", "input.txt")
    data = datasets["tinyshakespeare"].factory(CorpusConfig(data_dir=str(root), block_size=64))
    assert data.spec.vocab_size == 65  # nanoGPT's shakespeare-char vocabulary
    assert (len(data.tokens["train"]), len(data.tokens["val"])) == (1_003_854, 111_540)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lm")
    res = nnlab("train", "gpt-pystdlib", *TINY_LM, "--out", str(out), "-q")
    assert res.returncode == 0, res.stderr
    return Path(res.stdout.strip().splitlines()[-1])


def test_lm_recipe_trains_samples_and_reports(lm_run: Path) -> None:
    run = nl.load_run(lm_run)
    s = run.summary
    assert s["status"] == "completed" and s["steps"] == 30 and set(run.final) == {"val/loss", "val/ppl", "val/bpc"}
    spec = nl.load_model(lm_run).spec
    assert run.final["val/ppl"] == pytest.approx(math.exp(run.final["val/loss"]))
    assert run.final["val/bpc"] == pytest.approx(run.final["val/loss"] / math.log(2) / spec.chars_per_token)
    assert run.final["val/loss"] < math.log(spec.vocab_size)  # it learned something in 30 steps
    assert 0 < s["mfu"] < 1 and any("perf/mfu" in r for r in run.metrics)
    samples = sorted((lm_run / "samples").glob("step-*.txt"))
    assert [f.name for f in samples] == ["step-000015.txt", "step-000030.txt"]
    assert samples[-1].read_text().startswith("--- sample 0 ---\ndef ")
    assert (lm_run / R.CHECKPOINTS / "best" / R.ASSETS / "tokenizer.json").is_file()
    report = (lm_run / R.REPORT).read_text()
    assert "## Language model" in report and "bits/character" in report and "tokens/s" in report


def test_generate_streams_and_is_seeded(lm_run: Path) -> None:
    args = ["generate", str(lm_run), "--prompt", "def ", "--max-new-tokens", "40", "--seed", "1"]
    a, b = nnlab(*args), nnlab(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("def ") and len(a.stdout) > 20
    assert "tokens/s]" in a.stderr
    res = nnlab(*args, "--json", "--no-cache")
    row = json.loads(res.stdout)
    assert row["prompt"] == "def " and "def " + row["text"] == a.stdout.rstrip("\n")  # cached == uncached
    res = nnlab("generate", str(lm_run), "--max-new-tokens", "500", "--temperature", "0", "--json")
    assert res.returncode == 0 and len(json.loads(res.stdout)["text"]) > 100  # empty prompt; beyond the context
    res = nnlab("generate", str(lm_run), "--prompt", "déf ☃", "--max-new-tokens", "5", "--seed", "0")
    assert res.returncode == 0 and "the vocabulary lacks" in res.stderr


@pytest.mark.parametrize("bad, message", [
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_generate_bad_sampling_settings(lm_run: Path, bad: list[str], message: str) -> None:
    res = nnlab("generate", str(lm_run), "--prompt", "x", *bad)
    assert res.returncode == 2 and message in res.stderr and res.stdout == ""


def test_generate_refuses_other_runs(lm_run: Path, tmp_path: Path, tiny_recipe: Path) -> None:
    res = nnlab("train", str(tiny_recipe), "--out", str(tmp_path), "-q")
    other = res.stdout.strip().splitlines()[-1]
    res = nnlab("generate", other, "--prompt", "x")
    assert res.returncode == 2 and "takes a run of task lm" in res.stderr and "task 'classification'" in res.stderr
    res = nnlab("generate", str(tmp_path / "nope"))
    assert res.returncode == 2


def test_predict_and_eval_an_lm_run(lm_run: Path) -> None:
    res = nnlab("predict", str(lm_run), "--text", "import ", "--json")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)
    assert row["input"] == "import " and len(row["text"]) > 5
    res = nnlab("eval", str(lm_run), "--split", "val", "--json")
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout)["metrics"]
    final = nl.load_run(lm_run).final
    assert metrics["loss"] == pytest.approx(final["val/loss"], rel=1e-6)


def test_one_line_corpus_through_the_cli(tmp_path: Path) -> None:
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("To be or not to be, that is the question." * 40)
    res = nnlab("train", "shakespeare-baby", f"--data-dir={tmp_path}", "--out", str(tmp_path / "runs"), "-q")
    assert res.returncode == 2 and "empty or a single line" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder left behind
