"""Named-entity recognition: the CRF (forward algorithm and Viterbi against brute-force enumeration), entity
extraction and the per-type counts against seqeval, the IOB1 -> BIO/BIOES conversion, the conll2003 reader on
generated files (document boundaries, malformed lines, an entity type unseen in train), `TagSpec.encode`, and
the conll-bilstm-crf recipe through the real CLI (train, eval, predict with character spans, bad inputs); the
real CoNLL-2003 files when present."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import need_data, nnlab
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import nnlab as nl
from nnlab import run as R
from nnlab.config import section_from_dict
from nnlab.data import datasets
from nnlab.data.conll import IGNORE, ConllConfig, TagSpec, read_conll, spans, to_scheme
from nnlab.errors import UserError
from nnlab.models import build, models
from nnlab.models.rnn import Recurrent
from nnlab.models.tagger import CRF, CharLSTM
from nnlab.tasks.tagging import Tagging, TaggingConfig, bracket, entities

TYPES = ["LOC", "MISC", "ORG", "PER"]
TINY = ["model.embed=16", "model.hidden=16", "model.char_embed=8", "model.char_hidden=8", "model.dropout=0",
        "train.epochs=8", "train.batch_size=16", "train.log_every=10", "train.threads=1", "train.tensorboard=false",
        "train.precision=fp32", "optim.lr=2e-2", "data.max_len=12", "train.eval_batch_size=64"]


# --------------------------------------------------------------------------------------------------- CRF
def brute(crf: CRF, em: torch.Tensor, n: int) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Every tag sequence of length n of one sentence's emissions (T, K): the scores and the sequences."""
    paths = list(itertools.product(range(em.shape[1]), repeat=n))
    scores = [crf.start[p[0]] + sum(em[t, p[t]] for t in range(n)) + sum(crf.trans[p[t], p[t + 1]]
              for t in range(n - 1)) + crf.end[p[-1]] for p in paths]
    return torch.stack(scores), paths


@pytest.mark.parametrize("seed", range(4))
def test_crf_against_brute_force(seed: int) -> None:
    torch.manual_seed(seed)
    K, T = 3 + seed % 2, 5
    crf = CRF(K)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    lengths = torch.tensor([5, 1, 3, 4, 2])
    mask = torch.arange(T)[None] < lengths[:, None]  # (B, T), right-padded
    em = torch.randn(len(lengths), T, K)
    with torch.no_grad():
        logz, best = crf.log_partition(em, mask), crf.decode(em, mask)
        y = torch.randint(0, K, mask.shape).masked_fill(~mask, IGNORE)
        nll = crf.nll(em, y, mask)
        noise = em.masked_fill(~mask[..., None], 0) + torch.randn_like(em).masked_fill(mask[..., None], 0) * 9
        assert torch.allclose(crf.log_partition(noise, mask), logz) and torch.equal(crf.decode(noise, mask)[mask],
                                                                                    best[mask])  # padding is not read
    for b, n in enumerate(lengths.tolist()):
        scores, paths = brute(crf, em[b], n)
        assert logz[b].item() == pytest.approx(torch.logsumexp(scores, 0).item(), abs=1e-5)
        assert tuple(best[b, :n].tolist()) == paths[int(scores.argmax())]
        assert (best[b, n:] == best[b, n - 1]).all()  # past the end: the last tag repeated
        gold = scores[paths.index(tuple(y[b, :n].tolist()))]
        assert nll[b].item() == pytest.approx((torch.logsumexp(scores, 0) - gold).item(), abs=1e-5)


def test_crf_nll_is_a_probability_and_trains() -> None:
    torch.manual_seed(0)
    crf, em = CRF(3), torch.randn(1, 3, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    total = sum(torch.exp(-crf.nll(em, torch.tensor([p]), mask)) for p in itertools.product(range(3), repeat=3))
    assert total.item() == pytest.approx(1.0, abs=1e-5)
    em.requires_grad_(True)
    crf.nll(em, torch.tensor([[0, 1, 2]]), mask).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (*crf.parameters(), em))


# ------------------------------------------------------------------------------------------- entities
def random_tags(rng: random.Random, prefixes: str, n: int) -> list[str]:
    """Tags of any prefix and type in any order: valid and broken sequences alike."""
    return [rng.choice(["O", "O", *(f"{p}-{k}" for p in prefixes for k in TYPES)]) for _ in range(n)]


@pytest.mark.parametrize("prefixes", ["BI", "BIES", "I"])
def test_entities_and_counts_equal_seqeval(prefixes: str) -> None:
    pytest.importorskip("seqeval", reason="seqeval (the dev extra) is the reference")
    from seqeval.metrics import classification_report, f1_score
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(len(prefixes))
    gold = [random_tags(rng, prefixes, rng.randint(1, 12)) for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else rng.choice(["O", f"{rng.choice(prefixes)}-PER"]) for t in g] for g in gold]
    for g in gold[:100] + pred[:100]:
        assert [(k, a, b + 1) for k, a, b in get_entities(g)] == entities(g)
    spec = TagSpec(vocab_size=5, char_vocab_size=5, num_tags=17, tags=["O", *(f"{p}-{k}" for k in TYPES
                                                                              for p in "BIES")])
    task = Tagging(TaggingConfig(), spec)
    counts = task.counts(gold, pred)
    m = task.metrics({"entities": counts, "loss_sum": torch.tensor(0.0), "tokens": torch.tensor(1),
                      "correct": torch.tensor(0)})
    assert m["f1"] == pytest.approx(f1_score(gold, pred), abs=1e-9)
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"), abs=1e-9)
    ref = classification_report(gold, pred, output_dict=True, zero_division=0)
    mine = task.table(counts)
    for k in TYPES:
        assert mine[k]["support"] == ref[k]["support"]
        for key, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert mine[k][key] == pytest.approx(ref[k][theirs], abs=1e-9)
    for avg in ("micro avg", "macro avg"):
        assert mine[avg]["f1"] == pytest.approx(ref[avg]["f1-score"], abs=1e-9)
    assert "| **micro avg** |" in task.describe({"entities": counts})


def test_iob1_conversion() -> None:
    iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG", "O", "B-MISC"]
    assert bracket(["EU", "rejects", "Peter", "Black"], [("ORG", 0, 1), ("PER", 2, 4)]) == \
        "[EU ORG] rejects [Peter Black PER]"
    assert spans(iob1) == [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6), ("ORG", 6, 7), ("MISC", 8, 9)]
    assert to_scheme(spans(iob1), 9, "bio") == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG", "O",
                                                "B-MISC"]
    assert to_scheme(spans(iob1), 9, "bioes") == ["B-PER", "E-PER", "O", "S-LOC", "B-LOC", "E-LOC", "S-ORG", "O",
                                                  "S-MISC"]
    rng = random.Random(0)
    for _ in range(200):  # IOB1 and IOB2 files alike: conlleval reads the same entities; no conversion changes them
        tags = random_tags(rng, "BI", rng.randint(1, 10))
        assert spans(tags) == entities(tags)
        for scheme in ("bio", "bioes"):
            assert entities(to_scheme(spans(tags), len(tags), scheme)) == spans(tags)


# -------------------------------------------------------------------------------------------- the data
PEOPLE = ["John Smith", "Mary Jones", "Peter Blackburn", "Anna Berg", "Tom Lee", "Ruth Klein"]
PLACES = ["Paris", "Berlin", "New York", "Tokyo", "Brussels", "Lima"]
ORGS = ["European Commission", "Acme Corp", "United Nations", "Reuters"]
MISCS = ["German", "British", "French"]
TEMPLATES = ["{PER} visited {LOC} on Monday .", "{ORG} said {PER} left {LOC} .", "the {MISC} team beat {ORG} 3-1 .",
             "{PER} of {ORG} spoke in {LOC} in 1996 .", "shares in {ORG} fell .", "{LOC} , {LOC} and {LOC} .",
             "{MISC} {MISC} fans cheered ."]


def sentence(rng: random.Random) -> list[tuple[str, str]]:
    """(word, IOB1 tag) pairs: entities are I-tagged, and B- where one follows another of the same type."""
    out: list[tuple[str, str]] = []
    for part in rng.choice(TEMPLATES).split():
        if part.startswith("{"):
            kind = part[1:-1]
            names = {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS, "MISC": MISCS}[kind]
            for i, w in enumerate(rng.choice(names).split()):
                follows = i == 0 and out and out[-1][1].endswith(kind)
                out.append((w, f"{'B' if follows else 'I'}-{kind}"))
        else:
            out.append((part, "O"))
    return out


def write_conll(root: Path, sizes: tuple[int, int, int] = (240, 40, 40), seed: int = 0) -> Path:
    """Generated sentences in CoNLL-2003's layout: eng.train / testa / testb, a -DOCSTART- every 8 sentences."""
    rng = random.Random(seed)
    (root / "conll2003").mkdir(parents=True)
    for name, n in zip(("eng.train", "eng.testa", "eng.testb"), sizes, strict=True):
        lines = []
        for i in range(n):
            if i % 8 == 0:
                lines += ["-DOCSTART- -X- O O", ""]
            lines += [f"{w} NN I-NP {t}" for w, t in sentence(rng)] + [""]
        (root / "conll2003" / name).write_text("\n".join(lines[:-1]))  # no final newline, like the real files
    return root


def test_reader_keeps_documents_and_converts_tags(tmp_path: Path) -> None:
    root = write_conll(tmp_path)
    train = read_conll(root / "conll2003" / "eng.train")
    assert len(train) == 240 and [s.doc for s in train[:10]] == [0] * 8 + [1] * 2 and train[-1].doc == 29
    assert train[0].line == 3  # after the -DOCSTART- line and its blank line
    data = datasets["conll2003"].factory(ConllConfig(data_dir=str(root)))
    assert data.splits == ["train", "val", "test"] and data.spec.types == TYPES
    assert data.spec.tags[:5] == ["O", "B-LOC", "I-LOC", "E-LOC", "S-LOC"] and data.spec.num_tags == 17
    assert data.spec.words.index["0000"] > 1 and "1996" not in data.spec.words.index  # digits read as 0
    assert data.spec.chars.index["P"] != data.spec.chars.index["p"]  # the characters keep the case
    batch = next(iter(data.loader("val", 8).epoch(0)))
    x, chars, y = batch["x"], batch["chars"], batch["y"]
    assert x.shape == y.shape and chars.shape[:2] == x.shape and ((x == 0) == (y == IGNORE)).all()
    assert ((chars[..., 0] != 0) == (x != 0)).all()  # every real word has characters, padding none
    bio = datasets["conll2003"].factory(ConllConfig(data_dir=str(root), scheme="bio"))
    assert bio.spec.num_tags == 9
    s = next(s for s in train if "B-MISC" in s.tags)  # IOB1: B- only where an entity follows one of its type
    i = s.tags.index("B-MISC")
    assert bio.spec.tags[bio.rows["train"][train.index(s)]["y"][i]] == "B-MISC"
    assert data.spec.tags[data.rows["train"][train.index(s)]["y"][i - 1]] == "S-MISC"


def test_singletons_are_read_as_unknown_in_training_only(tmp_path: Path) -> None:
    root = write_conll(tmp_path)
    path = root / "conll2003" / "eng.train"
    path.write_text(path.read_text() + "\n\nZyzzyva NN I-NP I-PER\nslept VB I-VP O")
    data = datasets["conll2003"].factory(ConllConfig(data_dir=str(root), singleton_unk=1.0, bucket=0))
    z = data.spec.words.index["zyzzyva"]
    assert data.singletons[z] and not data.singletons[data.spec.words.index["paris"]]
    seen = next(iter(data.loader("train", 241, train=True).epoch(0)))["x"]  # every sentence, Zyzzyva's too
    assert z not in seen.flatten().tolist() and data.spec.words.index["paris"] in seen.flatten().tolist()
    assert z in next(iter(data.loader("train", 241).epoch(0)))["x"].flatten().tolist()


def test_bad_conll_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NNLAB_DATA", raising=False)  # .ci/run points it at the real data, where conll2003 is found
    for i, (bad, match) in enumerate([("Paris NNP I-LOC", "eng.train:7: expected 'word POS chunk NER'"),
                                      ("Paris NNP I-NP X-LOC", "eng.train:7: expected"),
                                      (b"Caf\xe9 NN I-NP O", "eng.train:7: not UTF-8")]):
        root = write_conll(tmp_path / str(i))
        path = root / "conll2003" / "eng.train"
        lines = path.read_bytes().split(b"\n")
        lines.insert(6, bad if isinstance(bad, bytes) else bad.encode())
        path.write_bytes(b"\n".join(lines))
        with pytest.raises(UserError, match=match) as e:
            datasets["conll2003"].factory(ConllConfig(data_dir=str(root)))
        assert str(path) in str(e.value) and "delete" in str(e.value)  # fix_hint
    root = write_conll(tmp_path / "unseen")
    test = root / "conll2003" / "eng.testb"
    n = len(test.read_text().splitlines())
    test.write_text(test.read_text() + "\n\nthe DT I-NP O\nOlympics NNP I-NP I-EVENT")
    with pytest.raises(UserError, match=rf"eng.testb:{n + 3}: entity type 'EVENT' does not occur in the training"):
        datasets["conll2003"].factory(ConllConfig(data_dir=str(root)))
    with pytest.raises(UserError, match="cannot find the conll2003 data files"):
        datasets["conll2003"].factory(ConllConfig(data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="data.scheme"):
        ConllConfig(scheme="iob1")


def test_tag_spec_encode_spans_and_bad_text(tmp_path: Path) -> None:
    spec = datasets["conll2003"].factory(ConllConfig(data_dir=str(write_conll(tmp_path)), max_len=6)).spec
    lines = ["John Smith visited the U.S. in 1996-08-22, didn't he?", "", "  \t", "😀 שלום Paris 🎬 مرحبا!",
             "a b c d e f g h"]
    batch, errors = spec.encode(lines)
    assert errors == [None, "empty text", "empty text", None, None]
    words = [lines[0][a:b] for a, b in batch["spans"][0]]
    assert words == ["John", "Smith", "visited", "the", "U.S.", "in"]  # cut to max_len = 6
    assert batch["notes"] == ["cut to the model's limit of 6 words (the text has 12; the rest is not tagged)", None,
                              "cut to the model's limit of 6 words (the text has 8; the rest is not tagged)"]
    assert batch["x"].shape == (3, 6) and batch["chars"].shape[:2] == (3, 6)
    assert [lines[3][a:b] for a, b in batch["spans"][1]] == ["😀", "שלום", "Paris", "🎬", "مرحبا", "!"]
    assert batch["x"][1, 2] == spec.words.index["paris"] and batch["x"][1, 0] == 1  # unknown, not a crash
    assert spec.encode(["", " "]) == (None, ["empty text", "empty text"])


@pytest.mark.parametrize("char, crf", [("cnn", True), ("lstm", False), ("none", True)])
def test_tagger_reads_real_words_only(char: str, crf: bool) -> None:
    torch.manual_seed(0)
    spec = models["tagger"].meta["example"]
    net = build("tagger", section_from_dict(models, {"name": "tagger", "char": char, "crf": crf, "hidden": 8,
                                                     "embed": 8, "char_hidden": 4, "char_embed": 4}), spec).eval()
    b = spec.example(5)
    x, chars = b["x"], b["chars"]
    more = torch.cat([x, torch.zeros(5, 3, dtype=torch.int64)], 1)  # the same sentences, padded more
    more_chars = torch.cat([chars, torch.zeros(5, 3, chars.shape[2], dtype=torch.int64)], 1)
    with torch.no_grad():
        em = net(x, chars)
        assert em.shape == (*x.shape, spec.num_tags)
        assert torch.allclose(net(more, more_chars)[:, :x.shape[1]][x != 0], em[x != 0], atol=1e-5)
        nll = net(x, chars, b["y"])
        assert nll.shape == (5,) and (nll > 0).all()
        assert net.decode(em, x != 0).shape == x.shape


def test_encoder_tagger_without_lstm_reads_tokens_and_refuses_long_sentences() -> None:
    spec = TagSpec(vocab_size=40, char_vocab_size=20, num_tags=9, tags=["O"] * 9, max_len=6, token_vocab_size=30,
                   token_kind="word")
    cfg = section_from_dict(models, {"name": "tagger", "lstm": False, "encoder_layers": 1, "n_head": 2,
                                     "n_embd": 16, "embed": 8, "char_embed": 4, "char_hidden": 4})
    model = build("tagger", cfg, spec).eval()
    batch = spec.example(3)
    assert "tokens" in batch and model.lstm is None and model.out.in_features == 8 + 4 + 16
    em = model(batch["x"], batch["chars"], tokens=batch["tokens"])
    other = model(batch["x"], batch["chars"], tokens=batch["tokens"].clamp(max=3))
    assert em.shape == (3, batch["x"].shape[1], 9) and not torch.allclose(em, other)  # the encoder reads tokens
    long = torch.ones(1, 7, dtype=torch.int64)
    with pytest.raises(UserError, match="longer than the encoder's 6 learned positions"):
        model(long, torch.ones(1, 7, 2, dtype=torch.int64), tokens=long)
    with pytest.raises(UserError, match="model.lstm"):
        section_from_dict(models, {"name": "tagger", "lstm": False, "char": "none"})


def test_bilstm_equals_packed_lstm() -> None:
    torch.manual_seed(0)
    ref = torch.nn.LSTM(6, 5, num_layers=2, batch_first=True, bidirectional=True)
    mine = Recurrent(6, 5, 2, True, 0.0)
    with torch.no_grad():
        for i in range(2):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(mine.fwd[i], f"{name}_l0").copy_(getattr(ref, f"{name}_l{i}"))
                getattr(mine.bwd[i], f"{name}_l0").copy_(getattr(ref, f"{name}_l{i}_reverse"))
        lengths = torch.tensor([7, 3, 1, 5])
        x = torch.randn(4, 7, 6)
        real = torch.arange(7)[None] < lengths[:, None]
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        want = pad_packed_sequence(ref(packed)[0], batch_first=True, total_length=7)[0]
        assert torch.allclose(mine(x, lengths)[real], want[real], atol=1e-6)
        chars = CharLSTM(10, 6, 5)  # the final states of each direction, as a packed LSTM's h_n
        chars.lstm = mine.__class__(6, 5, 1, True, 0.0)
        chars.lstm.fwd, chars.lstm.bwd = mine.fwd[:1], mine.bwd[:1]
        ids = torch.randint(2, 10, (4, 7)).masked_fill(~real, 0)
        h = ref.__class__(6, 5, batch_first=True, bidirectional=True)
        h.load_state_dict({k: v for k, v in ref.state_dict().items() if "_l0" in k})
        h_n = h(pack_padded_sequence(chars.embed(ids), lengths, batch_first=True, enforce_sorted=False))[1][0]
        assert torch.allclose(chars(ids), h_n.transpose(0, 1).reshape(4, 10), atol=1e-6)


# ---------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def ner_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_conll(tmp_path_factory.mktemp("ner") / "data")
    res = nnlab("train", "conll-bilstm-crf", *TINY, f"--data-dir={root}", "--out", str(root.parent / "runs"), "-q")
    assert res.returncode == 0, res.stderr
    return Path(res.stdout.strip().splitlines()[-1])


def test_recipe_trains_and_reports(ner_run: Path) -> None:
    run = nl.load_run(ner_run)
    assert run.summary["status"] == "completed" and run.final["test/f1"] > 0.8, run.final  # names are learnable
    assert {"test/f1", "test/precision", "test/recall", "test/macro_f1", "test/acc", "test/loss"} <= set(run.final)
    report = run.summary["task"]["entities"]["test"]["report"]
    assert set(report) == {*TYPES, "micro avg", "macro avg"}
    assert report["micro avg"]["f1"] == pytest.approx(run.final["test/f1"])
    text = (ner_run / R.REPORT).read_text()
    assert "## test: entities" in text and "| **macro avg** |" in text
    assert (ner_run / R.PLOTS / "entity_f1.png").exists() and "| true | predicted |" in text


def test_eval_and_predict_entities(ner_run: Path) -> None:
    res = nnlab("eval", str(ner_run), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["metrics"]["f1"] == pytest.approx(nl.load_run(ner_run).final["test/f1"], abs=1e-9)
    assert "| PER |" in out["details"]
    text = "John Smith visited Paris on Monday ."
    res = nnlab("predict", str(ner_run), "--text", text, "--text", "😀 שלום Berlin 🎬 مرحبا!", "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert rows[0]["input"] == text and {"type": "PER", "text": "John Smith", "start": 0, "end": 10} in \
        rows[0]["entities"] and {"type": "LOC", "text": "Paris", "start": 19, "end": 24} in rows[0]["entities"]
    for row in rows:
        assert all(row["input"][e["start"]:e["end"]] == e["text"] for e in row["entities"])
    res = nnlab("predict", str(ner_run), "--text", text, "--text", " ", "--text", "Paris " * 20)
    lines = res.stdout.splitlines()
    assert res.returncode == 2 and "PER John Smith 0 10" in lines[0] and "empty text" in lines[1]
    assert "cut to the model's limit of 12 words (the text has 20;" in lines[2] and "Traceback" not in res.stderr


def test_python_api_without_crf_and_with_char_lstm(tmp_path: Path) -> None:
    root = write_conll(tmp_path / "data")
    run = nl.train("conll-bilstm-crf", TINY, out=tmp_path / "runs", quiet=True, progress=False,
                   data={"data_dir": str(root), "scheme": "bio"}, model={"char": "lstm", "crf": False})
    assert run.final["test/f1"] > 0.8, run.final
    rows = nl.load_run(run.path).predict([], texts=("Mary Jones of Acme Corp spoke in Tokyo .", ""))
    assert {"type": "ORG", "text": "Acme Corp", "start": 14, "end": 23} in rows[0]["entities"]
    assert rows[1] == {"input": "", "error": "empty text"}


# ------------------------------------------------------------------------------------ the real data
def test_real_conll2003() -> None:
    root = need_data("conll2003", "eng.train", "eng.testa", "eng.testb")
    data = datasets["conll2003"].factory(ConllConfig(data_dir=str(root)))
    assert [len(data.sentences[s]) for s in data.splits] == [14_041, 3_250, 3_453]
    assert [data.sentences[s][-1].doc + 1 for s in data.splits] == [946, 216, 231]
    assert sum(len(s.words) for s in data.sentences["train"]) == 203_621 and data.spec.types == TYPES


def test_real_conll2003_trains(tmp_path: Path) -> None:
    root = need_data("conll2003", "eng.train", "eng.testa", "eng.testb")
    res = nnlab("train", "conll-bilstm-crf", "train.max_steps=5", "train.eval_every=0", "train.final_splits=[val]",
                "train.threads=1", "train.tensorboard=false", f"--data-dir={root}", "--out", str(tmp_path), "-q")
    assert res.returncode == 0, res.stderr
    final = nl.load_run(Path(res.stdout.strip().splitlines()[-1])).final
    assert 0 <= final["val/f1"] <= 1 and final["val/loss"] > 0
