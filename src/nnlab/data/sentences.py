"""Labelled texts for classification (sentence and document sentiment): a tokenizer fitted on the training
split (a run asset), `TextSpec`, and the datasets `sst2`, `financial-phrasebank` and `imdb`.

Tokenizers (`data.tokenizer`; every kind has id 0 for padding and 1 for anything unknown):
- `word` (the default): lower-cased words and punctuation marks, the `min_freq`/`max_size` vocabulary
  (asset `vocab.json`);
- `char`: the characters of the training split (case kept), `min_freq`/`max_size` as for words;
- `bpe` / `wordpiece`: subwords of lower-cased words, `data.vocab_size` of them, trained with Hugging Face
  `tokenizers` (`HFTokenizer.fit_words` in data/text.py).
The last three are the asset `tokenizer.json`. `max_len` counts tokens of the chosen kind (characters for char).
`data.vocab_from=RUN` uses the tokenizer of another run's checkpoint instead (whatever its kind): fine-tuning an
encoder pretrained with masked-LM (data/corpus.py, `init.from=RUN`) needs the vocabulary it was pretrained with.

Batches are `Batch(x=(B, T) int64 token ids, right-padded with 0, y=(B,) labels)`; a model finds the real
positions as `x != 0`. Batches are cut from length-bucketed runs of examples, so padding stays small.

Splits (held-out parts are stratified by label and drawn with the fixed seed `SPLIT_SEED`, so they never change
between runs):
- `sst2`: GLUE SST-2. train = GLUE's train.tsv minus `val_fraction` of it (val); **test = GLUE's dev.tsv**
  (GLUE's own test.tsv has no labels). 67,349 / 872 sentences, negative / positive.
- `financial-phrasebank`: Malo et al.'s `Sentences_AllAgree.txt` (2,264 sentences on which every annotator
  agreed; negative / neutral / positive). It has no official split: a fixed 80/10/10 train/val/test split per
  label (`val_fraction` does not apply).
- `imdb`: Maas et al.'s movie reviews, read from `aclImdb_v1_labeled.tar.gz` without extracting it. train
  (25,000) minus `val_fraction` (val), test (25,000); negative / positive. The `<br />` tags are replaced by
  spaces. The archive is parsed once and the texts cached under `<user cache>/decoded/`.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .. import run as R
from ..config import check
from ..errors import UserError
from . import Batch, Loader, Spec, datasets, pad, specs
from .files import CORRUPT, DECODED, atomic_write, cache_root, find_files, fix_hint, open_tar
from .text import PAD, TOKENIZER, UNK, CharTokenizer, HFTokenizer, load_tokenizer

VOCAB = "vocab.json"  # the word tokenizer's asset file name (the other kinds: TOKENIZER, "tokenizer.json")
TOKENIZERS = ("word", "char", "bpe", "wordpiece")
UNK_ID = 1  # the unknown token's id, for every kind (padding is 0)
WORD = re.compile(r"\w+|[^\w\s]")  # a run of letters/digits/underscores, or one other non-space character
SPLIT_SEED = 0  # seed of every held-out split; changing it changes every val (and financial-phrasebank test)
SENTIMENT2 = ["negative", "positive"]
IMDB_CACHE_VERSION = 1  # bump when the parsing of the archive changes
FINPHRASE = "FinancialPhraseBank-v1.0/Sentences_AllAgree.txt"


def by_frequency(counts: Counter, min_freq: int = 1) -> list[str]:
    """The items counted at least `min_freq` times, the most frequent first (ties in alphabetical order): the
    order of every word vocabulary, so ids do not depend on the order the data was read in."""
    return sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))


class WordTokenizer:
    """Lower-cased words and punctuation marks (`WORD`) to ids: 0 pads, 1 is any word outside the vocabulary,
    then the words of the training split by falling frequency (ties in alphabetical order)."""

    def __init__(self, words: list[str]):
        self.words = words  # id -> word, words[0] == PAD, words[1] == UNK
        self.index = {w: i for i, w in enumerate(words)}

    @staticmethod
    def split(text: str) -> list[str]:
        return WORD.findall(text.lower())

    @staticmethod
    def fit(texts: Sequence[str], min_freq: int = 1, max_size: int = 0, specials: Sequence[str] = (PAD, UNK)
            ) -> WordTokenizer:
        """The words seen at least `min_freq` times, the most frequent first, after the `specials` (pad, unknown
        and, for a masked LM, `<mask>`: never a word of `split`), at most `max_size` ids in all (0: no limit)."""
        counts = Counter(w for t in texts for w in WordTokenizer.split(t))
        kept = by_frequency(counts, min_freq)
        return WordTokenizer([*specials, *(kept[:max_size - len(specials)] if max_size else kept)])

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, UNK_ID) for w in self.split(text)]

    def encode_lines(self, lines: Sequence[str]) -> list[list[int]]:
        return [self.encode(line) for line in lines]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids if i != 0)

    def to_json(self) -> str:
        return json.dumps({"type": "words", "lowercase": True, "pattern": WORD.pattern, "words": self.words})

    @staticmethod
    def from_json(text: str) -> WordTokenizer:
        return WordTokenizer(json.loads(text)["words"])


@specs.register("text")
@dataclass(kw_only=True)
class TextSpec(Spec):
    """Labelled texts: the tokenizer (asset `vocab.json` for words, `tokenizer.json` for the other kinds), the
    classes and the longest text a model sees. `encode` reads text lines for `predict`: an empty or
    whitespace-only line is an error row ("empty text"); a line longer than `max_len` tokens keeps its first
    `max_len` tokens, and the batch's `notes` (one per text, or None) say so. Any script is read (emoji, Arabic,
    CJK): what the tokenizer never saw in training is the unknown token."""

    kind: str = "text"
    vocab_size: int
    num_classes: int
    classes: list[str]
    max_len: int = 256  # tokens per text; longer texts are cut
    pad_id: int = 0
    tokenizer: str = "word"  # word | char | bpe | wordpiece
    cut: str = "head"  # a longer text keeps: head (its first max_len tokens) | ends (its first quarter and last 3/4)
    inputs: ClassVar[str] = "text"

    @property
    def asset(self) -> str:
        return VOCAB if self.tokenizer == "word" else TOKENIZER

    @cached_property
    def tok(self) -> WordTokenizer | CharTokenizer | HFTokenizer:
        if self.asset not in self.assets:
            raise UserError(f"the checkpoint has no assets/{self.asset}: retrain the run")
        return read_tokenizer(self.tokenizer, self.assets[self.asset].decode())

    def keep(self, ids: list[int]) -> list[int]:
        """At most `max_len` of a text's token ids, as `cut` says (a text without tokens: one unknown token).
        `ends` keeps a review's conclusion as well as its opening (Sun et al. 2019 found head + tail the best cut
        of long IMDB reviews for BERT)."""
        if len(ids) <= self.max_len or self.cut == "head":
            return ids[:self.max_len] or [UNK_ID]
        head = self.max_len // 4
        return ids[:head] + ids[len(ids) - (self.max_len - head):]

    def ids(self, texts: Sequence[str]) -> list[torch.Tensor]:
        return [torch.tensor(self.keep(ids)) for ids in self.tok.encode_lines(texts)]

    def encode(self, inputs: Sequence[str]) -> tuple[Batch | None, list[str | None]]:
        errors: list[str | None] = [None if line.strip() else "empty text" for line in inputs]
        good = [line for line in inputs if line.strip()]
        if not good:
            return None, errors
        full = self.tok.encode_lines(good)
        x, _ = pad([torch.tensor(self.keep(ids)) for ids in full], self.pad_id)
        head = self.max_len // 4
        kept = "" if self.cut == "head" else f": its first {head} and last {self.max_len - head}"
        notes = [f"cut to the model's limit of {self.max_len} tokens{kept} (the text has {len(ids)})"
                 if len(ids) > self.max_len else None for ids in full]
        return Batch(x=x, notes=notes), errors

    def example(self, n: int) -> Batch:
        lengths = torch.randint(1, min(self.max_len, 12) + 1, (n,))
        x = torch.randint(2, self.vocab_size, (n, int(lengths.max())))
        x = x.masked_fill(torch.arange(x.shape[1])[None] >= lengths[:, None], self.pad_id)  # (B, T), right-padded
        return Batch(x=x, y=torch.randint(0, self.num_classes, (n,)))


@dataclass
class SentencesConfig:
    name: str = "sst2"  # sst2 | financial-phrasebank | imdb
    data_dir: str | None = None  # folder holding <dataset>/<files>; searched before NNLAB_DATA and the cache
    tokenizer: str = "word"  # word | char | bpe | wordpiece (subwords trained on train with HF tokenizers)
    max_len: int = 256  # tokens per text; longer texts are cut (SST-2's longest: 57 words)
    cut: str = "head"  # what a longer text keeps: head (the first max_len tokens) | ends (first quarter, last 3/4)
    min_freq: int = 1  # words/characters seen fewer times in train are unknown (bpe, wordpiece: merges/pieces)
    max_size: int = 30000  # word, char: the largest vocabulary, pad and unknown included (0: no limit)
    vocab_size: int = 8000  # bpe, wordpiece: the vocabulary to train, pad and unknown included
    vocab_from: str = ""  # a run (or checkpoint) whose tokenizer to use instead of fitting one: a masked-LM run
    #                       that `init.from` copies the encoder of (tokenizer, min_freq, max_size, vocab_size unused)
    val_fraction: float = 0.05  # sst2, imdb: the part of train held out as val (per label); 0 = no val
    bucket: int = 50  # sort runs of this many batches by length before batching (0: off)

    def __post_init__(self) -> None:
        check(self.tokenizer in TOKENIZERS, "data.tokenizer", f"must be one of {', '.join(TOKENIZERS)}")
        check(self.vocab_size >= 3, "data.vocab_size", "must be >= 3 (pad, unknown and one token)")
        check(self.max_len >= 1, "data.max_len", "must be >= 1")
        check(self.cut in ("head", "ends"), "data.cut", "must be head or ends")
        check(self.min_freq >= 1, "data.min_freq", "must be >= 1")
        check(self.max_size == 0 or self.max_size >= 3, "data.max_size", "must be 0 (no limit) or >= 3")
        check(0 <= self.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")
        check(self.bucket >= 0, "data.bucket", "must be >= 0")


class TextData:
    """Splits of labelled texts as token ids; the tokenizer is fitted on the train split alone."""

    def __init__(self, cfg: SentencesConfig, texts: dict[str, tuple[list[str], list[int]]], classes: list[str]):
        for split, (t, _) in texts.items():
            if not t:
                raise UserError(f"the {cfg.name} {split} split is empty: nothing to train or evaluate on")
        self.cfg, self.splits, self.texts = cfg, list(texts), texts
        kind, tok = tokenizer_for(cfg, texts["train"][0])
        self.spec = TextSpec(vocab_size=tok.vocab_size, num_classes=len(classes), classes=classes,
                             max_len=cfg.max_len, tokenizer=kind, cut=cfg.cut)
        self.spec.assets[self.spec.asset] = tok.to_json().encode()
        self.ids = {s: self.spec.ids(t) for s, (t, _) in texts.items()}
        self.labels = {s: torch.tensor(y, dtype=torch.int64) for s, (_, y) in texts.items()}

    def loader(self, split: str, batch_size: int, *, train: bool = False, seed: int = 0, rank: int = 0,
               world: int = 1, device: torch.device | str = "cpu") -> Loader:
        if split not in self.ids:
            raise UserError(f"there is no '{split}' split (the data has: {', '.join(self.splits)})")
        ids, labels = self.ids[split], self.labels[split]

        def make(idx: torch.Tensor, epoch: int, gen: torch.Generator) -> Batch:
            rows = idx.cpu()
            x, _ = pad([ids[i] for i in rows.tolist()], self.spec.pad_id)  # (B, T)
            return Batch(x=x, y=labels[rows]).to(device)

        lengths = torch.tensor([len(t) for t in ids])
        return Loader(len(ids), batch_size, make, shuffle=train, drop_last=train, seed=seed, rank=rank, world=world,
                      device=device, lengths=lengths, bucket=self.cfg.bucket)


Tokenizer = WordTokenizer | CharTokenizer | HFTokenizer


def fit_tokenizer(cfg: SentencesConfig, texts: Sequence[str], specials: Sequence[str] = (PAD, UNK)) -> Tokenizer:
    """The `cfg.tokenizer` kind fitted on `texts` (the training split), `specials` taking the first ids."""
    if cfg.tokenizer == "word":
        return WordTokenizer.fit(texts, cfg.min_freq, cfg.max_size, specials)
    if cfg.tokenizer == "char":
        return CharTokenizer.fit(texts, specials, cfg.min_freq, cfg.max_size)
    return HFTokenizer.fit_words(texts, cfg.tokenizer, cfg.vocab_size, cfg.min_freq, specials)


def read_tokenizer(kind: str, text: str) -> Tokenizer:
    """A tokenizer of `kind` from its asset's text."""
    return WordTokenizer.from_json(text) if kind == "word" else load_tokenizer(text)


def tokenizer_for(cfg: SentencesConfig, texts: Sequence[str], specials: Sequence[str] = (PAD, UNK)
                  ) -> tuple[str, Tokenizer]:
    """(kind, tokenizer): `data.vocab_from`'s, read from that run's best (else last) checkpoint, or else the
    `data.tokenizer` kind fitted on `texts`. A fine-tuning run that copies a pretrained encoder (`init.from`) needs
    the vocabulary the encoder's embeddings were trained with: the ids mean nothing with another."""
    return run_tokenizer(cfg.vocab_from) if cfg.vocab_from else (cfg.tokenizer, fit_tokenizer(cfg, texts, specials))


def run_tokenizer(run: str) -> tuple[str, Tokenizer]:
    """(kind, tokenizer) of a text run (`data.vocab_from=RUN`), from its best (else last) checkpoint."""
    try:
        folder = R.checkpoint_dir(run)
        spec, assets = R.read_meta(folder).get("spec", {}), R.load_assets(folder)
    except UserError as e:
        raise UserError(f"data.vocab_from={run}: {e}") from None
    kind = spec.get("tokenizer")
    asset = VOCAB if kind == "word" else TOKENIZER
    if kind not in TOKENIZERS or asset not in assets:
        raise UserError(f"data.vocab_from={run}: {folder} holds no text tokenizer (its data is of kind "
                        f"'{spec.get('kind')}'); pass a text classification or masked-LM run")
    return kind, read_tokenizer(kind, assets[asset].decode())


def stratified(labels: Sequence[int], fractions: Sequence[float]) -> list[list[int]]:
    """Indices of each part: per label, a permutation seeded by `SPLIT_SEED` cut at the cumulative `fractions`
    (rounded; the last part takes the rest). Each part is in the original order."""
    rng = np.random.default_rng(SPLIT_SEED)
    y = np.asarray(labels)
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = np.round(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
            part.extend(chunk.tolist())
    return [sorted(p) for p in parts]


def hold_out(texts: list[str], labels: list[int], fraction: float) -> dict[str, tuple[list[str], list[int]]]:
    """{"train": ..., "val": ...} with `fraction` of each label in val (no val when 0)."""
    if not fraction:
        return {"train": (texts, labels)}
    train, val = stratified(labels, [1 - fraction, fraction])
    return {s: ([texts[i] for i in p], [labels[i] for i in p]) for s, p in (("train", train), ("val", val))}


def _read_tsv(path: Path) -> tuple[list[str], list[int]]:
    """GLUE's `sentence<TAB>label` with a header row; every other row is checked."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e}); {fix_hint(path)}") from None
    if not lines or lines[0].split("\t")[:2] != ["sentence", "label"]:
        raise UserError(f"{path}:1: expected the header 'sentence<TAB>label' of GLUE's SST-2; {fix_hint(path)}")
    texts, labels = [], []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 2 or parts[1].strip() not in ("0", "1"):
            raise UserError(f"{path}:{n}: expected 'sentence<TAB>0' or 'sentence<TAB>1', got {line[:80]!r}; "
                            f"{fix_hint(path)}")
        texts.append(parts[0].strip())
        labels.append(int(parts[1]))
    return texts, labels


@datasets.register("sst2", config=SentencesConfig)
def sst2(cfg: SentencesConfig) -> TextData:
    """GLUE SST-2 sentence sentiment; its test split is GLUE's dev set (GLUE's test has no labels)."""
    folder = find_files("sst2", ["SST-2/train.tsv", "SST-2/dev.tsv"], cfg.data_dir)
    texts = hold_out(*_read_tsv(folder / "SST-2/train.tsv"), cfg.val_fraction)
    return TextData(cfg, {**texts, "test": _read_tsv(folder / "SST-2/dev.tsv")}, SENTIMENT2)


def read_phrasebank(path: Path, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """`sentence@label` lines (Latin-1); blank lines are skipped, any other line without a known label is an
    error naming the file and line."""
    texts, labels = [], []
    for n, line in enumerate(path.read_text(encoding="iso-8859-1").splitlines(), start=1):
        if not line.strip():
            continue
        text, at, label = line.rpartition("@")
        if not at or label.strip() not in classes or not text.strip():
            raise UserError(f"{path}:{n}: expected 'sentence@label' with label {', '.join(classes)}, got "
                            f"{line[:80]!r}; {fix_hint(path)}")
        texts.append(text.strip())
        labels.append(classes.index(label.strip()))
    return texts, labels


@datasets.register("financial-phrasebank", config=SentencesConfig)
def financial_phrasebank(cfg: SentencesConfig) -> TextData:
    """Financial PhraseBank (all annotators agree), fixed stratified 80/10/10 train/val/test split."""
    classes = ["negative", "neutral", "positive"]
    folder = find_files("financial-phrasebank", [FINPHRASE], cfg.data_dir)
    texts, labels = read_phrasebank(folder / FINPHRASE, classes)
    parts = stratified(labels, [0.8, 0.1, 0.1])
    return TextData(cfg, {s: ([texts[i] for i in p], [labels[i] for i in p])
                          for s, p in zip(("train", "val", "test"), parts, strict=True)}, classes)


IMDB_MEMBER = re.compile(r"aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt")


def read_imdb(archive: Path) -> dict[str, tuple[list[str], list[int]]]:
    """{"train", "test"}: (reviews, labels) from the archive, `<br />` tags as spaces, ordered by folder
    (neg, pos) and review id; from the cache when this archive (size, mtime) was parsed before."""
    st = archive.stat()
    cache = cache_root() / DECODED / f"imdb-v{IMDB_CACHE_VERSION}-{st.st_size}-{st.st_mtime_ns}.json"
    if cache.exists():
        try:
            return {s: (t, y) for s, (t, y) in json.loads(cache.read_text(encoding="utf-8")).items()}
        except (OSError, ValueError) as e:  # a damaged cache is rebuilt
            print(f"warning: imdb cache {cache} is unreadable ({e}); rebuilding it", file=sys.stderr)
    found: dict[str, list[tuple[int, int, str]]] = {"train": [], "test": []}
    with open_tar(archive) as tar:
        try:
            for member in tar:
                m = IMDB_MEMBER.fullmatch(member.name)
                if m and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None  # regular files have data
                    text = f.read().decode("utf-8").replace("<br />", " ")
                    found[m[1]].append((int(m[2] == "pos"), int(m[3]), text))
        except (*CORRUPT, UnicodeDecodeError) as e:
            raise UserError(f"{archive} is damaged ({type(e).__name__}: {e}); {fix_hint(archive)}") from None
    if not found["train"] or not found["test"]:
        raise UserError(f"{archive} holds no aclImdb/{{train,test}}/{{pos,neg}}/<id>_<rating>.txt reviews; "
                        f"{fix_hint(archive)}")
    for rows in found.values():
        rows.sort()
    out = {s: ([t for _, _, t in r], [y for y, _, _ in r]) for s, r in found.items()}
    try:
        atomic_write(cache, lambda p: p.write_text(json.dumps(out), encoding="utf-8"))
    except OSError as e:  # a read-only cache: parse again next time
        print(f"warning: could not write the imdb cache {cache}: {e}", file=sys.stderr)
    return out


@datasets.register("imdb", config=SentencesConfig)
def imdb(cfg: SentencesConfig) -> TextData:
    """IMDB movie reviews (Maas et al. 2011): 25,000 train (minus val) / 25,000 test, negative / positive."""
    folder = find_files("imdb", ["aclImdb_v1_labeled.tar.gz"], cfg.data_dir)
    parts = read_imdb(folder / "aclImdb_v1_labeled.tar.gz")
    return TextData(cfg, {**hold_out(*parts["train"], cfg.val_fraction), "test": parts["test"]}, SENTIMENT2)
