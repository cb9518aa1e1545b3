"""Masked-LM pretraining: the 80/10/10 masking (proportions, never padding, deterministic evaluation), the loss on
the masked positions alone, the `unlabelled` corpus (training text only: sentinels of every test and val split stay
out), `data.vocab_from`, and a pretraining run through the CLI whose encoder and vocabulary a classifier then starts
from (`init.from` + `data.vocab_from`)."""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch
from test_textcls import BAD, FILLER, GOOD, write_phrasebank

import nnlab.data.corpus  # noqa: F401  (registers `unlabelled`; the package imports it too once wired in)
import nnlab.tasks.mlm  # noqa: F401  (registers the task `mlm`)
from nnlab import run as R
from nnlab.cli import main
from nnlab.config import load_config, section_from_dict
from nnlab.data import Batch, datasets
from nnlab.data.conll import TagSpec
from nnlab.data.corpus import MASK, MASK_ID, MaskedTextSpec, UnlabelledConfig
from nnlab.data.sentences import SentencesConfig, TextSpec
from nnlab.errors import UserError
from nnlab.models import build, models
from nnlab.tasks.mlm import MaskedLM, MLMConfig, mask_tokens

SMALL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.dropout=0", "data.max_len=24",
         "data.min_freq=1", "train.epochs=1", "train.batch_size=8", "train.eval_every_steps=0", "train.log_every=2",
         "train.threads=1", "train.tensorboard=false", "train.precision=fp32", "train.compile=false"]


def padded(lengths: list[int], vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    return x.masked_fill(torch.arange(x.shape[1])[None] >= torch.tensor(lengths)[:, None], 0)  # (B, T)


def test_masking_proportions_and_never_padding() -> None:
    spec = MaskedTextSpec(vocab_size=5000, max_len=512)
    lengths = [random.Random(i).randint(150, 400) for i in range(200)]
    x = padded(lengths, spec.vocab_size)
    inputs, chosen = mask_tokens(x, MLMConfig(), spec, torch.Generator().manual_seed(1))
    n = torch.tensor(lengths)
    assert chosen.sum(1).tolist() == (n * 0.15).round().long().tolist()  # 15% of each text's real tokens
    assert not chosen[x == 0].any() and (inputs[x == 0] == 0).all()  # padding is never chosen nor changed
    assert (inputs[~chosen] == x[~chosen]).all()  # nothing else changes
    c = chosen.sum().item()
    masked = (inputs[chosen] == MASK_ID).sum().item() / c
    kept = (inputs[chosen] == x[chosen]).sum().item() / c
    swapped = inputs[chosen][(inputs[chosen] != MASK_ID) & (inputs[chosen] != x[chosen])]
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(len(swapped) / c - 0.1) < 0.01  # 11,000
    assert swapped.min() >= spec.specials  # a random replacement is never pad, unknown or mask
    short = mask_tokens(padded([1, 2, 3], 50), MLMConfig(), spec)[1]
    assert short.sum(1).tolist() == [1, 1, 1]  # at least one token of every text
    again = mask_tokens(x, MLMConfig(), spec, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], chosen)


def mlm_model(spec: MaskedTextSpec, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = section_from_dict(models, {"name": "encoder-mlm", "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0,
                                     **kw})
    return build("encoder-mlm", cfg, spec)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_loss_is_on_the_masked_positions_only(pooling: str) -> None:
    spec = MaskedTextSpec(vocab_size=40, max_len=20)
    net, task = mlm_model(spec, pooling=pooling), MaskedLM(MLMConfig(), spec)
    x = padded([20, 7, 12, 3], spec.vocab_size)
    torch.manual_seed(5)
    out = task.step(net, Batch(x=x))
    torch.manual_seed(5)  # the same draws from torch's generator
    inputs, chosen = mask_tokens(x, MLMConfig(), spec)
    full = net(inputs)  # (B, T, V) at every position
    assert full.shape == (4, 20, 40) and torch.allclose(net(inputs, chosen), full[chosen], atol=1e-5)
    expected = torch.nn.functional.cross_entropy(full[chosen], x[chosen])
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    grad = torch.autograd.grad(torch.nn.functional.cross_entropy(full[chosen], x[chosen]), full)[0]
    assert (grad[~chosen] == 0).all()  # the unmasked positions (and padding) contribute nothing
    assert net.encoder.tok.weight.data_ptr() != net.bias.data_ptr() and "mlm.0.weight" in net.state_dict()


def test_evaluation_masks_deterministically() -> None:
    spec = MaskedTextSpec(vocab_size=40, max_len=20)
    net, task = mlm_model(spec).eval(), MaskedLM(MLMConfig(), spec)
    x = padded([20, 7, 12, 3] * 8, spec.vocab_size)
    state = torch.get_rng_state()
    with torch.no_grad():
        a, b = task.eval_stats(net, Batch(x=x)), task.eval_stats(net, Batch(x=x))
        other = task.eval_stats(net, Batch(x=padded([20, 7, 12, 3] * 8, spec.vocab_size, seed=1)))
    assert torch.equal(torch.get_rng_state(), state)  # training's random stream is untouched
    assert all(torch.equal(a[k], b[k]) for k in a) and a["tokens"] == (0.15 * torch.tensor([20, 7, 12, 3])).round(
        ).clamp(min=1).sum() * 8
    assert a["loss_sum"] != other["loss_sum"]  # another batch, another mask
    m = task.metrics(a)
    assert m["ppl"] == pytest.approx(torch.tensor(m["loss"]).exp().item(), rel=1e-6) and 0 <= m["acc"] <= 1


def test_task_and_config_errors() -> None:
    with pytest.raises(UserError, match="data.name=unlabelled"):  # labelled text has no <mask> token
        MaskedLM(MLMConfig(), TextSpec(vocab_size=40, num_classes=2, classes=["a", "b"]))
    with pytest.raises(UserError, match="task.mask_prob"):
        MLMConfig(mask_prob=0)
    with pytest.raises(UserError, match="task.replace_mask"):
        MLMConfig(replace_mask=0.8, replace_random=0.3)


# --- the corpus: generated files of every source, with sentinel words in their test and val splits ------------
def review(rng: random.Random, marker: str) -> str:
    return " ".join(rng.choices(FILLER + GOOD + BAD, k=rng.randint(20, 50)) + [marker])


def write_sources(root: Path) -> None:
    rng = random.Random(0)
    (root / "sst2" / "SST-2").mkdir(parents=True)
    for name, marker in (("train", "sstrainword"), ("dev", "sstdevsentinel"), ("test", "ssttestsentinel")):
        rows = ["sentence\tlabel"] + [f"{review(rng, marker)} \t{i % 2}" for i in range(60 if name == "train" else 10)]
        (root / "sst2" / "SST-2" / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    labels = ["negative", "neutral", "positive"]
    write_phrasebank(root, [f"{review(rng, 'finword')} .@{labels[i % 3]}" for i in range(60)])
    (root / "conll2003").mkdir()
    for name, marker in (("eng.train", "Conlltrainword"), ("eng.testa", "Conllvalsentinel"),
                         ("eng.testb", "Conlltestsentinel")):
        docs = [f"-DOCSTART- -X- O O\n\n{w} NNP B-NP B-PER\nsaid VBD B-VP O\n{marker} NN I-NP O\n" for w in GOOD]
        (root / "conll2003" / name).write_text("\n".join(docs))
    (root / "multi30k").mkdir()
    for split in ("train", "val", "test_2016_flickr"):
        for lang in ("en", "de"):
            with gzip.open(root / "multi30k" / f"{split}.{lang}.gz", "wt") as f:
                f.write("\n".join(f"a dog runs {split}{lang}multiword {i}" for i in range(20)) + "\n")
    (root / "imdb").mkdir()
    with tarfile.open(root / "imdb" / "aclImdb_v1_labeled.tar.gz", "w:gz") as tar:
        for split in ("train", "test"):
            for label in ("pos", "neg"):
                for i in range(40):
                    body = f"{review(rng, f'imdb{split}word')}<br />{rng.choice(GOOD if label == 'pos' else BAD)}."
                    info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_{8 if label == 'pos' else 2}.txt")
                    info.size = len(body.encode())
                    tar.addfile(info, io.BytesIO(body.encode()))


def test_corpus_holds_training_text_only(tmp_path: Path) -> None:
    write_sources(tmp_path)
    sources = ["imdb", "sst2", "financial-phrasebank", "conll2003", "multi30k"]
    data = datasets["unlabelled"].factory(UnlabelledConfig(data_dir=str(tmp_path), sources=sources, max_len=16))
    text = " ".join(data.texts["train"] + data.texts["val"])
    for word in ("imdbtrainword", "sstrainword", "finword", "Conlltrainword", "trainenmultiword"):
        assert word in text
    for word in ("imdbtestword", "sstdevsentinel", "ssttestsentinel", "Conllvalsentinel", "Conlltestsentinel",
                 "valenmultiword", "test_2016_flickrenmultiword", "trainde"):
        assert word not in text
    for name in ("sst2", "imdb", "financial-phrasebank"):  # nor a classifier's own val and test texts
        cls = datasets[name].factory(SentencesConfig(name=name, data_dir=str(tmp_path)))
        assert not set(data.texts["train"] + data.texts["val"]) & set(cls.texts["val"][0] + cls.texts["test"][0])
    n = len(data.texts["train"]) + len(data.texts["val"])
    assert not set(data.texts["train"]) & set(data.texts["val"]) and len(data.texts["val"]) == round(0.02 * n)
    assert data.spec.tok.words[:3] == ["<pad>", "<unk>", MASK] and data.spec.mask_id == MASK_ID
    assert all(len(t) <= 16 for t in data.ids["train"]) and len(data.ids["train"]) > len(data.texts["train"])
    batch = next(iter(data.loader("train", 8, train=True).epoch(0)))
    assert list(batch.fields) == ["x"] and batch["x"].shape[0] == 8
    again = datasets["unlabelled"].factory(UnlabelledConfig(data_dir=str(tmp_path), sources=sources, max_len=16))
    assert again.texts == data.texts  # a fixed val part


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
def test_every_tokenizer_kind_has_the_mask_token(tmp_path: Path, kind: str) -> None:
    write_sources(tmp_path)
    data = datasets["unlabelled"].factory(UnlabelledConfig(data_dir=str(tmp_path), sources=["sst2"],
                                                           tokenizer=kind, vocab_size=100))
    assert data.spec.tokenizer == kind and nnlab.data.corpus.mask_id(data.spec.tok) == MASK_ID
    assert min(min(t) for t in data.ids["train"]) >= 1  # the mask id never comes from the text


def test_corpus_config_and_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NNLAB_DATA", raising=False)
    with pytest.raises(UserError, match="data.sources"):
        UnlabelledConfig(sources=["wikipedia"])
    with pytest.raises(UserError, match="data.sources"):
        UnlabelledConfig(sources=[])
    with pytest.raises(UserError, match="cannot find the conll2003 data files"):
        datasets["unlabelled"].factory(UnlabelledConfig(data_dir=str(tmp_path), sources=["conll2003"]))


# --- pretraining, then fine-tuning from it ------------------------------------------------------------------
def test_recipe_sizes_let_imdb_transformer_start_from_imdb_mlm() -> None:
    mlm, cls = load_config("imdb-mlm"), load_config("imdb-transformer")
    assert mlm.data.max_len == cls.data.max_len
    theirs = build("encoder-mlm", mlm.model, MaskedTextSpec(vocab_size=50, max_len=mlm.data.max_len)).state_dict()
    spec = TextSpec(vocab_size=50, num_classes=2, classes=["negative", "positive"], max_len=cls.data.max_len)
    mine = build("encoder", cls.model, spec).state_dict()
    loaded = [k for k, v in mine.items() if k in theirs and theirs[k].shape == v.shape]
    assert sorted(set(mine) - set(loaded)) == ["head.bias", "head.weight"]


def test_pretrain_then_finetune_through_the_cli(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    write_sources(tmp_path / "data")
    out = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), "-q"]
    assert main(["train", "imdb-mlm", *SMALL, *out]) == 0, capsys.readouterr().err
    mlm = Path(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((mlm / R.SUMMARY).read_text())
    assert summary["status"] == "completed" and summary["steps"] > 0 and "val/ppl" in summary["final"]
    assert "## Masked language model" in (mlm / R.REPORT).read_text()
    assert main(["predict", str(mlm), "--text", "a <mask> film , really <mask>", "--text", "no mark", "--json",
                 "--top", "3"]) == 2  # one error row: exit 2, the other answered
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows[0]["fill"]) == 2 and [len(t) for t in rows[0]["top"]] == [3, 3]
    assert rows[0]["text"].startswith("a ") and MASK not in rows[0]["text"] and "<mask>" in rows[1]["error"]
    args = ["train", "imdb-transformer", *SMALL, "data.val_fraction=0.1", f"init.from={mlm}",
            f"data.vocab_from={mlm}", *out]
    assert main(args) == 0, capsys.readouterr().err
    ft = Path(capsys.readouterr().out.strip().splitlines()[-1])
    table = json.loads((ft / R.INIT).read_text())
    encoder = [k for k in table["loaded"] if k.startswith("encoder.")]
    assert encoder == table["loaded"] and len(encoder) == len(build(
        "encoder-mlm", section_from_dict(models, {"name": "encoder-mlm", "n_layer": 1, "n_head": 2, "n_embd": 16}),
        MaskedTextSpec(vocab_size=50, max_len=24)).encoder.state_dict())
    assert table["new"] == ["head.weight", "head.bias"]  # only the classifier's head starts new
    assert all(k.startswith(("mlm.", "bias")) for k in table["skipped"])  # the masked-LM head is left behind
    best = R.checkpoint_dir(ft)
    assert R.load_assets(best) == R.load_assets(R.checkpoint_dir(mlm))  # the pretraining run's vocabulary
    assert R.read_meta(best)["spec"]["kind"] == "text" and R.read_meta(best)["config"]["data"]["vocab_from"] == str(mlm)
    again = datasets["unlabelled"].factory(UnlabelledConfig(data_dir=str(tmp_path / "data"), vocab_from=str(ft)))
    assert again.spec.assets == R.load_assets(best)  # pretraining goes on with the vocabulary (its <mask> included)


def test_vocab_from_refuses_a_run_without_a_text_tokenizer(tmp_path: Path, tiny_recipe: Path, capsys) -> None:
    assert main(["train", str(tiny_recipe), "--out", str(tmp_path / "runs"), "-q"]) == 0
    image_run = capsys.readouterr().out.strip().splitlines()[-1]
    write_sources(tmp_path / "data")
    with pytest.raises(UserError, match="holds no text tokenizer"):
        datasets["sst2"].factory(SentencesConfig(data_dir=str(tmp_path / "data"), vocab_from=image_run))
    with pytest.raises(UserError, match=r"data.vocab_from=.*nowhere"):
        datasets["sst2"].factory(SentencesConfig(data_dir=str(tmp_path / "data"), vocab_from=str(tmp_path / "nowhere")))


def test_recipe_sizes_let_conll_best_start_from_conll_mlm() -> None:
    mlm, best = load_config("conll-mlm"), load_config("conll-best")
    assert mlm.data.max_len == best.data.max_len and best.model.encoder_layers == mlm.model.n_layer
    theirs = build("encoder-mlm", mlm.model, MaskedTextSpec(vocab_size=50, max_len=mlm.data.max_len)).state_dict()
    spec = TagSpec(vocab_size=40, char_vocab_size=20, num_tags=9, tags=["O"] * 9, max_len=best.data.max_len,
                   token_vocab_size=50, token_kind="word")
    mine = build("tagger", best.model, spec).state_dict()
    loaded = [k for k, v in mine.items() if k in theirs and theirs[k].shape == v.shape]
    assert loaded == [k for k in mine if k.startswith("encoder.")] and len(loaded) == len(
        [k for k in theirs if k.startswith("encoder.")])


def test_tagger_starts_from_a_masked_lm_through_the_cli(tmp_path: Path, capsys) -> None:
    """conll-best's path: a tagger reads each word's id under the pretraining run's tokenizer (`tokens`) and copies
    its encoder; the same model without init.from starts it anew."""
    write_sources(tmp_path / "data")
    out = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), "-q"]
    assert main(["train", "conll-mlm", *SMALL, *out]) == 0, capsys.readouterr().err
    mlm = Path(capsys.readouterr().out.strip().splitlines()[-1])
    tagger = ["model.encoder_layers=1", "model.n_head=2", "model.n_embd=16", "model.embed=8", "model.hidden=8",
              "model.char_embed=4", "model.char_hidden=4", "data.max_len=24", "train.epochs=2", "train.batch_size=4",
              "train.threads=1", "train.tensorboard=false", "train.log_every=2"]
    assert main(["train", "conll-best", *tagger, f"init.from={mlm}", f"data.vocab_from={mlm}", *out]) == 0, \
        capsys.readouterr().err
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    table = json.loads((run / R.INIT).read_text())
    assert table["loaded"] == [k for k in table["loaded"] if k.startswith("encoder.")] and table["loaded"]
    assert not [k for k in table["new"] if k.startswith("encoder.")]
    spec = R.read_meta(R.checkpoint_dir(run))["spec"]
    assert spec["token_vocab_size"] == R.read_meta(R.checkpoint_dir(mlm))["spec"]["vocab_size"]
    assert (R.checkpoint_dir(run) / R.ASSETS / "tokens.json").exists()
    assert main(["predict", str(run), "--text", "Conlltrainword said hello", "--json"]) == 0
    assert "entities" in json.loads(capsys.readouterr().out.splitlines()[0])
