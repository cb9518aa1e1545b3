"""Text classification: the tokenizers (word, char, bpe, wordpiece), `TextSpec`, the sst2 / financial-phrasebank /
imdb readers (on generated files in their layouts, and the real ones when present), padding invariance of the rnn,
fasttext and Transformer encoder models (every position kind and pooling), the encoder's attention weights, the
recipes through the real CLI (train, then predict on text), and bad inputs to predict."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import re
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import need_data, nnlab

import nnlab as nl
from nnlab import run as R
from nnlab.cli import main
from nnlab.config import section_from_dict
from nnlab.data import datasets
from nnlab.data.sentences import FINPHRASE, TOKENIZERS, VOCAB, SentencesConfig, TextSpec, WordTokenizer, fit_tokenizer
from nnlab.data.text import TOKENIZER
from nnlab.errors import UserError
from nnlab.models import build, models
from nnlab.models.encoder import EncoderClassifier  # registers `encoder` (models/__init__.py imports it too)
from nnlab.models.fasttext import HASH_MUL

GOOD = ["good", "great", "fun", "lovely", "superb", "moving"]
BAD = ["bad", "dull", "awful", "boring", "poor", "tedious"]
FILLER = ["the", "film", "movie", "plot", "was", "is", "a", "very", "acting", "and", ",", "."]
TINY = ["data.max_len=16", "data.val_fraction=0.1", "model.embed=16", "model.hidden=16", "model.dropout=0",
        "train.epochs=4", "train.batch_size=16", "train.log_every=10", "train.threads=1", "train.tensorboard=false",
        "train.precision=fp32", "optim.lr=1e-2"]


def sentence(rng: random.Random, label: int) -> str:
    words = rng.choices(FILLER, k=rng.randint(2, 8)) + rng.choices(GOOD if label else BAD, k=rng.randint(1, 2))
    rng.shuffle(words)
    return " ".join(words)


def write_sst2(root: Path, n: int = 400, seed: int = 0) -> Path:
    """Generated sentences in GLUE SST-2's layout: a sentiment word or two among filler words."""
    rng = random.Random(seed)
    (root / "sst2" / "SST-2").mkdir(parents=True)
    for name, size in (("train", n), ("dev", 80)):
        rows = ["sentence\tlabel"] + [f"{sentence(rng, y)} \t{y}" for y in (rng.randint(0, 1) for _ in range(size))]
        (root / "sst2" / "SST-2" / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    return root


def write_phrasebank(root: Path, lines: list[str]) -> Path:
    path = root / "financial-phrasebank" / FINPHRASE
    path.parent.mkdir(parents=True)
    path.write_bytes("\n".join(lines).encode("iso-8859-1"))  # Latin-1, no final newline, like the real file
    return path


def spec_of(texts: list[str], **kw) -> TextSpec:
    tok = WordTokenizer.fit(texts)
    spec = TextSpec(vocab_size=tok.vocab_size, num_classes=2, classes=["negative", "positive"], **kw)
    spec.assets[VOCAB] = tok.to_json().encode()
    return spec


def test_word_tokenizer_round_trip_and_unknowns() -> None:
    tok = WordTokenizer.fit(["The film, the PLOT!", "the end", "film plot"], min_freq=2)
    assert tok.words == ["<pad>", "<unk>", "the", "film", "plot"]  # by frequency, then alphabetically
    assert tok.encode("The PLOT, the film") == [2, 4, 1, 2, 3]  # lower-cased; "," was seen only once
    assert tok.decode(tok.encode("the film the plot")) == "the film the plot"
    assert WordTokenizer.from_json(tok.to_json()).words == tok.words
    assert WordTokenizer.fit(["a b c d e f"], max_size=4).vocab_size == 4  # pad and unknown count


def test_vocabulary_is_fitted_on_the_training_split_only(tmp_path: Path) -> None:
    root = write_sst2(tmp_path)
    dev = root / "sst2" / "SST-2" / "dev.tsv"
    dev.write_text(dev.read_text() + "zyzzyva superb \t1\n")
    data = datasets["sst2"].factory(SentencesConfig(data_dir=str(root), val_fraction=0.1))
    assert data.splits == ["train", "val", "test"] and data.spec.classes == ["negative", "positive"]
    assert [len(data.texts[s][0]) for s in data.splits] == [360, 40, 81]
    assert "zyzzyva" not in data.spec.tok.index and data.ids["test"][-1].tolist()[0] == 1  # unknown
    for split in ("train", "val"):  # stratified: both labels in both parts, in about the same shares
        share = sum(data.texts[split][1]) / len(data.texts[split][1])
        assert 0.4 < share < 0.6
    batch = next(iter(data.loader("train", 32, train=True).epoch(0)))
    assert batch["x"].dtype == torch.int64 and batch["y"].shape == (32,)
    assert ((batch["x"] != 0).sum(1) >= 1).all()
    again = datasets["sst2"].factory(SentencesConfig(data_dir=str(root), val_fraction=0.1))
    assert again.texts["val"] == data.texts["val"]  # the held-out part never changes


def test_text_spec_encode_bad_inputs() -> None:
    spec = spec_of(["a good film", "a bad film"], max_len=5)
    batch, errors = spec.encode(["a good film", "", "   \t", "film " * 20, "😀 שלום עולם مرحبا 🎬!", "good"])
    assert errors == [None, "empty text", "empty text", None, None, None]
    x = batch["x"]
    assert x.shape == (4, 5) and x.dtype == torch.int64
    assert x[1].tolist() == [spec.tok.index["film"]] * 5  # cut to max_len
    assert (x[2] == 1).sum() >= 4  # unseen scripts and emoji are unknown words, not a crash
    assert x[3].tolist() == [spec.tok.index["good"], 0, 0, 0, 0]  # right-padded with 0
    assert batch["notes"] == [None, "cut to the model's limit of 5 tokens (the text has 20)",
                              "cut to the model's limit of 5 tokens (the text has 6)", None]
    ends = dataclasses.replace(spec, cut="ends")
    ends.assets = spec.assets
    words = "a good film bad a bad film".split()  # 7 tokens: the first quarter of 5 (1) and the last 4 are kept
    assert ends.encode([" ".join(words)])[0]["x"][0].tolist() == [ends.tok.index[w] for w in words[:1] + words[3:]]
    assert ends.encode([" ".join(words)])[0]["notes"] == [
        "cut to the model's limit of 5 tokens: its first 1 and last 4 (the text has 7)"]
    assert ends.ids(["a good"])[0].tolist() == spec.ids(["a good"])[0].tolist()  # a short text is whole either way
    assert spec.encode(["", " "]) == (None, ["empty text", "empty text"])
    b = spec.example(6)
    assert b["x"].shape[0] == 6 and b["y"].max() < 2 and (b["x"][:, 0] != 0).all()


def test_phrasebank_split_and_malformed_lines(tmp_path: Path) -> None:
    labels = ["negative"] * 20 + ["neutral"] * 50 + ["positive"] * 30
    lines = [f"Profit at Caf\xe9 {i} fell @ 5 % .@{lab}" for i, lab in enumerate(labels)]  # an @ in the text
    write_phrasebank(tmp_path, lines)
    data = datasets["financial-phrasebank"].factory(SentencesConfig(name="financial-phrasebank",
                                                                    data_dir=str(tmp_path)))
    assert data.spec.classes == ["negative", "neutral", "positive"]
    assert [len(data.texts[s][0]) for s in data.splits] == [80, 10, 10]
    assert sorted(data.texts["test"][1]) == [0, 0] + [1] * 5 + [2] * 3  # stratified per label
    assert data.texts["train"][0][0].startswith("Profit at Café")  # Latin-1
    for bad in ("no label at all", "Sales rose .@bullish"):
        root = tmp_path / bad.replace(" ", "_")
        path = write_phrasebank(root, lines[:4] + [bad] + lines[4:])
        with pytest.raises(UserError, match=rf"{path.name}:5: expected 'sentence@label'"):
            datasets["financial-phrasebank"].factory(SentencesConfig(name="financial-phrasebank", data_dir=str(root)))


def test_sst2_bad_rows_and_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NNLAB_DATA", raising=False)  # .ci/run points it at the real data, where imdb is found
    root = write_sst2(tmp_path)
    train = root / "sst2" / "SST-2" / "train.tsv"
    train.write_text(train.read_text() + "a sentence without a label\n")
    with pytest.raises(UserError, match=r"train.tsv:402: expected"):
        datasets["sst2"].factory(SentencesConfig(data_dir=str(root)))
    with pytest.raises(UserError, match="cannot find the imdb data files"):
        datasets["imdb"].factory(SentencesConfig(name="imdb", data_dir=str(tmp_path)))
    with pytest.raises(UserError, match="data.val_fraction"):
        SentencesConfig(val_fraction=1.0)


def test_imdb_reads_the_archive_once(tmp_path: Path) -> None:
    folder = tmp_path / "imdb"
    folder.mkdir()
    with tarfile.open(folder / "aclImdb_v1_labeled.tar.gz", "w:gz") as tar:
        for split in ("train", "test"):
            for label, words in (("pos", GOOD), ("neg", BAD)):
                for i in range(20):
                    body = f"A {words[i % 6]} film.<br /><br />Really {words[(i + 1) % 6]}.".encode()
                    info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_{8 if label == 'pos' else 2}.txt")
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
        info = tarfile.TarInfo("aclImdb/README")
        tar.addfile(info, io.BytesIO(b""))
    cfg = SentencesConfig(name="imdb", data_dir=str(tmp_path), val_fraction=0.1)
    data = datasets["imdb"].factory(cfg)
    assert [len(data.texts[s][0]) for s in data.splits] == [36, 4, 40]
    assert data.texts["test"][0][0] == "A bad film.  Really dull." and data.texts["test"][1][:1] == [0]
    assert sorted(data.texts["val"][1]) == [0, 0, 1, 1]
    again = datasets["imdb"].factory(cfg)  # from the cache
    assert again.texts == data.texts


def model(name: str, spec: TextSpec, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build(name, section_from_dict(models, {"name": name, **kw}), spec)
    for p in net.parameters():  # fasttext's head starts at zero: make every output depend on the input
        torch.nn.init.normal_(p, std=0.3)
    return net.eval()


@pytest.mark.parametrize("name", ["rnn", "fasttext"])
def test_text_models_forward_backward(name: str) -> None:
    spec = models[name].meta["example"]
    assert isinstance(spec, TextSpec)
    batch = spec.example(4)
    net = build(name, section_from_dict(models, {"name": name}), spec)
    out = net(batch["x"])
    assert out.shape == (4, spec.num_classes)
    torch.nn.functional.cross_entropy(out, batch["y"]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_classification_refuses_image_tta_on_text() -> None:
    from nnlab.tasks.classification import Classification, ClassificationConfig

    spec = models["rnn"].meta["example"]
    Classification(ClassificationConfig(), spec)
    with pytest.raises(UserError, match="task.tta"):
        Classification(ClassificationConfig(tta="flip"), spec)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("pooling, cell, layers", [("max", "lstm", 1), ("mean", "gru", 2), ("last", "lstm", 2),
                                                   ("last", "rnn", 1)])
def test_rnn_pools_over_real_positions_only(pooling: str, cell: str, layers: int, bidirectional: bool) -> None:
    spec = TextSpec(vocab_size=30, num_classes=3, classes=["a", "b", "c"], max_len=20)
    net = model("rnn", spec, cell=cell, n_layer=layers, bidirectional=bidirectional, pooling=pooling, hidden=8,
                embed=8)
    x = spec.example(6)["x"]
    more = torch.cat([x, torch.zeros(6, 9, dtype=torch.int64)], 1)  # the same texts, padded more
    with torch.no_grad():
        alone = torch.cat([net(x[i:i + 1, :int((x[i] != 0).sum())]) for i in range(3)])  # each without padding
        assert torch.allclose(net(x), net(more), atol=1e-5) and torch.allclose(net(x[:3]), alone, atol=1e-5)


def test_word_dropout_reads_words_as_unknown_in_training_only() -> None:
    spec = TextSpec(vocab_size=30, num_classes=3, classes=["a", "b", "c"], max_len=20)
    net = model("rnn", spec, word_dropout=0.5, hidden=8, embed=8)
    seen = []
    net.embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    x = spec.example(64)["x"]
    net.train()(x)
    net.eval()(x)
    dropped = (seen[0] != x) & (x != 0)
    assert (seen[0][dropped] == 1).all() and 0.4 < dropped.sum() / (x != 0).sum() < 0.6  # unknown, about half
    assert (seen[0][x == 0] == 0).all() and torch.equal(seen[1], x)  # padding stays; evaluation reads every word


def test_fasttext_padding_invariance_and_bigrams() -> None:
    spec = TextSpec(vocab_size=30, num_classes=2, classes=["a", "b"], max_len=20)
    net = model("fasttext", spec, dim=8, buckets=64)
    x = spec.example(6)["x"]
    more = torch.cat([x, torch.zeros(6, 5, dtype=torch.int64)], 1)
    with torch.no_grad():
        assert torch.allclose(net(x), net(more), atol=1e-6)
        words = torch.tensor([[3, 4, 5, 6]])
        assert not torch.allclose(net(words), net(words.flip(1)))  # bigrams see the order
        plain = model("fasttext", spec, dim=8, buckets=0)
        assert torch.allclose(plain(words), plain(words.flip(1)), atol=1e-6)  # a bag of words does not
        tri = model("fasttext", spec, dim=8, buckets=64, ngrams=3)
        assert torch.allclose(tri(x), tri(more), atol=1e-6)
        w = words[0].tolist()
        bi = [(a * HASH_MUL + b) % 64 for a, b in zip(w, w[1:], strict=False)]  # 3 bigrams' buckets
        tri_ = [(h * HASH_MUL + c) % 64 for h, c in zip(bi, w[2:], strict=False)]  # 2 trigrams'
        mean = torch.cat([tri.words(words[0]), tri.bigrams(torch.tensor(bi + tri_))]).mean(0)
        assert torch.allclose(tri(words)[0], tri.head(mean), atol=1e-6)


def test_sst2_recipe_trains_and_predicts_text(tmp_path: Path) -> None:
    root = write_sst2(tmp_path / "data")
    res = nnlab("train", "sst2-bilstm", *TINY, f"--data-dir={root}", "--out", str(tmp_path / "runs"), "-q")
    assert res.returncode == 0, res.stderr
    folder = Path(res.stdout.strip().splitlines()[-1])
    run = nl.load_run(folder)
    assert run.summary["status"] == "completed" and run.final["test/acc"] > 0.8  # the sentiment words are learnable
    report = (folder / R.REPORT).read_text()
    assert "## test: per-class report" in report and "| text | true | predicted |" in report
    mistakes = report.split("## The most confident mistakes")  # of the test texts, the surest first
    assert len(mistakes) == (2 if run.final["test/acc"] < 1 else 1)
    if len(mistakes) == 2:
        probs = [float(p) for p in re.findall(r"\((\d\.\d+)\) ✗ \|", mistakes[1].split("\n## ")[0])]
        assert probs and probs == sorted(probs, reverse=True)
    res = nnlab("predict", str(folder), "--text", "a very lovely and moving film", "--text", "dull , boring plot",
                "--text", "  ", "--json", "--top", "2")
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r.get("class") for r in rows] == ["positive", "negative", None], res.stderr
    assert all(0.5 < r["prob"] <= 1 and len(r["top"]) == 2 for r in rows[:2])
    assert rows[2]["error"] == "empty text" and res.returncode == 2  # one bad line: exit 2, the others answered


def test_real_sst2_and_phrasebank() -> None:
    root = need_data("sst2", "SST-2/train.tsv", "SST-2/dev.tsv")
    data = datasets["sst2"].factory(SentencesConfig(data_dir=str(root)))
    assert [len(data.texts[s][0]) for s in data.splits] == [63_982, 3_367, 872]  # 67,349 = train + val
    assert sum(data.texts["test"][1]) == 444
    root = need_data("financial-phrasebank", FINPHRASE)
    data = datasets["financial-phrasebank"].factory(SentencesConfig(name="financial-phrasebank", data_dir=str(root)))
    assert [len(data.texts[s][0]) for s in data.splits] == [1_811, 227, 226]  # 2,264 sentences


# --- tokenizer kinds -----------------------------------------------------------------------------------------
SCRIPTS = ["😀🎬 great!!", "هذا الفيلم رائع جدا", "זה סרט נהדר", "这部电影很好看", "映画は素晴らしい"]


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_tokenizer_kinds_round_trip_and_are_run_assets(kind: str, tmp_path: Path) -> None:
    rng = random.Random(0)
    texts = [sentence(rng, i % 2) for i in range(300)]
    tok = fit_tokenizer(SentencesConfig(tokenizer=kind, vocab_size=60), texts)
    text = "the film , a very good plot ."
    ids = tok.encode_lines([text])[0]
    assert ids and min(ids) >= 2  # 0 pads, 1 is unknown: every character here was seen in training
    assert tok.decode(ids) == text  # as the tokenizer reads it: lower-cased words and punctuation marks
    assert tok.decode([0, *ids, 0, 0]) == text  # padding is skipped
    for unseen in SCRIPTS[1:]:  # scripts never seen in training: unknown tokens, never an error or nothing
        assert set(tok.encode_lines([unseen.replace(" ", "")])[0]) == {1}
    if kind in ("bpe", "wordpiece"):
        assert tok.vocab_size <= 60 and len(tok.encode_lines(["tediousness"])[0]) > 1  # subwords of a new word
    if kind == "char":
        assert tok.encode_lines(["ab"])[0] == [tok.encode_lines(["a"])[0][0], tok.encode_lines(["b"])[0][0]]
    root = write_sst2(tmp_path)  # the dataset fits the same kind and stores it as the run asset
    data = datasets["sst2"].factory(SentencesConfig(data_dir=str(root), tokenizer=kind, vocab_size=60))
    spec = data.spec
    assert spec.tokenizer == kind and list(spec.assets) == [VOCAB if kind == "word" else TOKENIZER]
    again = TextSpec(vocab_size=spec.vocab_size, num_classes=2, classes=spec.classes, max_len=spec.max_len,
                     tokenizer=kind, assets=dict(spec.assets))  # as `load_model` rebuilds it
    lines = data.texts["test"][0][:20] + SCRIPTS
    assert again.tok.encode_lines(lines) == spec.tok.encode_lines(lines)
    assert all(t.max() < spec.vocab_size for t in data.ids["train"])


def test_tokenizer_config_errors() -> None:
    with pytest.raises(UserError, match="data.tokenizer"):
        SentencesConfig(tokenizer="sentencepiece")
    with pytest.raises(UserError, match="data.vocab_size"):
        SentencesConfig(vocab_size=2)


# --- the Transformer encoder classifier ---------------------------------------------------------------------
def encoder(spec: TextSpec, **kw) -> EncoderClassifier:
    net = model("encoder", spec, **{"n_layer": 2, "n_head": 2, "n_embd": 16, **kw})
    assert isinstance(net, EncoderClassifier)
    return net


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rotary"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_encoder_is_padding_invariant_and_reads_order(positions: str, pooling: str) -> None:
    spec = TextSpec(vocab_size=30, num_classes=3, classes=["a", "b", "c"], max_len=24)
    net = encoder(spec, positions=positions, pooling=pooling)
    x = spec.example(6)["x"]
    more = torch.cat([x, torch.zeros(6, 9, dtype=torch.int64)], 1)  # the same texts, padded more
    with torch.no_grad():
        alone = torch.cat([net(x[i:i + 1, :int((x[i] != 0).sum())]) for i in range(3)])  # each without padding
        assert torch.allclose(net(x), net(more), atol=1e-5) and torch.allclose(net(x[:3]), alone, atol=1e-5)
        words = torch.tensor([[3, 4, 5, 6, 7]])
        assert not torch.allclose(net(words), net(words.flip(1)), atol=1e-4)  # positions: not a bag of words


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_encoder_attention_weights_are_what_sdpa_applies(positions: str) -> None:
    spec = TextSpec(vocab_size=30, num_classes=2, classes=["a", "b"], max_len=20)
    net = encoder(spec, positions=positions, pooling="cls")
    layer = net.encoder.layers[1].attn
    seen = []
    layer.register_forward_hook(lambda m, args, out: seen.append((args, out)))
    w = net.attention(torch.tensor([[5, 6, 7, 8, 0, 0]]))  # (layers, heads, T + 1, T + 1): CLS first
    assert w.shape == (2, 2, 7, 7) and torch.allclose(w.sum(-1), torch.ones(2, 2, 7), atol=1e-6)
    assert (w[..., 5:] == 0).all() and (w[..., :5] > 0).all()  # padding is never attended to
    (h, k, v, mask, pos), out = seen[0]
    assert torch.allclose(layer.weights(h, k, mask, pos)[0], w[1], atol=1e-6)
    y = (w[1][None] @ v).transpose(1, 2).reshape(1, 7, 16)  # (1, T', C): the weights applied to the values
    assert torch.allclose(layer.proj(y), out, atol=1e-5)


def test_encoder_flops_and_config_errors() -> None:
    spec = TextSpec(vocab_size=30, num_classes=2, classes=["a", "b"], max_len=20)
    net = encoder(spec, pooling="cls")
    n = sum(p.numel() for p in net.encoder.layers.parameters() if p.ndim == 2)
    assert n == 2 * 12 * 16 * 16  # per layer: q, k, v and the output projection (4 C^2), feed-forward (8 C^2)
    assert net.flops_per_sample() == 21 * (6 * n + 12 * 2 * 16 * 21) + 6 * 16 * 2
    from nnlab.models.encoder import EncoderConfig

    for kw, key in (({"pooling": "sum"}, "model.pooling"), ({"positions": "alibi"}, "model.positions"),
                    ({"positions": "rotary", "n_embd": 12, "n_head": 4}, "model.n_embd")):
        with pytest.raises(UserError, match=key):
            EncoderConfig(**kw)


# --- recipes and predict through the CLI ---------------------------------------------------------------------
ENCODER_TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.dropout=0", "train.epochs=6",
                "train.batch_size=16", "train.log_every=10", "train.threads=1", "train.tensorboard=false",
                "train.precision=fp32", "train.compile=false", "optim.lr=3e-3", "train.warmup=0.0"]
NEUTRAL = ["reported", "announced", "quarter", "sales", "company", "said"]


def test_finphrase_transformer_recipe_reports_attention(tmp_path: Path, capsys) -> None:
    rng = random.Random(1)
    labels = ["negative", "neutral", "positive"]
    lines = []
    for i in range(300):
        y = i % 3
        words = rng.choices(NEUTRAL, k=rng.randint(3, 8)) + ([rng.choice(BAD)], [], [rng.choice(GOOD)])[y]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)} .@{labels[y]}")
    write_phrasebank(tmp_path / "data", lines)
    args = ["train", "finphrase-transformer", *ENCODER_TINY, "data.tokenizer=wordpiece", "data.vocab_size=100",
            f"--data-dir={tmp_path / 'data'}", "--out", str(tmp_path / "runs"), "-q"]
    assert main(args) == 0, capsys.readouterr().err
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    run = nl.load_run(folder)
    assert run.config["model"]["name"] == "encoder" and run.final["test/acc"] > 0.8
    assert (folder / R.PLOTS / "attention.png").is_file()
    assert "## Attention of one test text" in (folder / R.REPORT).read_text()
    texts = ["the company reported awful sales .", "a superb quarter ."]
    assert main(["predict", str(folder), *(f"--text={t}" for t in texts), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["class"] for r in rows] == ["negative", "positive"]


def test_predict_bad_inputs(tmp_path: Path, capsys) -> None:
    """Empty and blank texts are error rows (exit 2, the others answered); a text over the model's limit is cut
    and the row and stderr say so; emoji, right-to-left and CJK texts get a prediction; bytes of --text that are
    not UTF-8 are U+FFFD; a file that is not UTF-8 text (invalid bytes, an image) is refused with its name and
    line."""
    from PIL import Image

    root = write_sst2(tmp_path / "data")
    args = ["train", "sst2-bilstm", *ENCODER_TINY, "model.name=encoder", "data.tokenizer=bpe", "data.vocab_size=80",
            "data.max_len=16", f"--data-dir={root}", "--out", str(tmp_path / "runs"), "-q"]
    assert main(args) == 0, capsys.readouterr().err
    folder = str(capsys.readouterr().out.strip().splitlines()[-1])
    long = "a lovely film " * 40
    assert main(["predict", folder, "--json", "--text", "", "--text", " \t ", "--text", long,
                 *(f"--text={t}" for t in SCRIPTS)]) == 2
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r.get("error") for r in rows[:2]] == ["empty text", "empty text"]
    assert rows[2]["class"] == "positive" and "cut to the model's limit of 16 tokens" in rows[2]["note"]
    assert "nnlab predict: note:" in err and "2 of 8 inputs" in err
    assert [r["input"] for r in rows[3:]] == SCRIPTS and all(r["class"] in ("negative", "positive") for r in rows[3:])
    assert main(["predict", folder, "--json", "--text", "a lovely film \udcff\udcfe"]) == 0  # argv's non-UTF-8 bytes
    assert json.loads(capsys.readouterr().out)["input"] == "a lovely film \ufffd\ufffd"  # are replaced
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(["a dull film", "", *SCRIPTS, "   "]) + "\n", encoding="utf-8")
    assert main(["predict", folder, str(texts), "--json"]) == 0  # blank lines are skipped
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(SCRIPTS)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a good film\nun film très mauvais\n".encode("iso-8859-1"))
    assert main(["predict", folder, str(bad)]) == 2
    assert "latin1.txt:2: not UTF-8 text (byte 0xe8)" in capsys.readouterr().err
    img = tmp_path / "x.png"
    Image.fromarray((torch.rand(8, 8) * 255).byte().numpy()).save(img)
    assert main(["predict", folder, str(img)]) == 2
    assert "x.png:1: not UTF-8 text" in capsys.readouterr().err


def test_predict_text_on_an_image_run(tmp_path: Path, tiny_recipe: Path, capsys) -> None:
    assert main(["train", str(tiny_recipe), "--out", str(tmp_path / "runs"), "-q"]) == 0
    folder = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["predict", folder, "--text", "a lovely film"]) == 2
    assert "reads files, not --text" in capsys.readouterr().err
