"""Named entities in CoNLL column files: the `conll2003` dataset (Tjong Kim Sang & De Meulder 2003), `TagSpec`
with its word and character vocabularies (run assets), and the tag-scheme conversion.

Files: `<data root>/conll2003/eng.train`, `eng.testa`, `eng.testb`: train / val / test (14,041 / 3,250 / 3,453
sentences). Each token line is `word POS chunk NER`; a blank line ends a sentence; a `-DOCSTART-` line starts a
document (it is not a sentence; each sentence keeps the number of its document, `Sentence.doc`). The NER column
is IOB1 as shipped (`I-PER`; `B-PER` only where an entity directly follows another of the same type); IOB2 files
read the same way. The tags are converted to `data.scheme`: `bio` (IOB2) or `bioes` (default; Ratinov & Roth
2009 found it better than BIO, and Lample et al. 2016 use it), through the entity spans, so no entity changes.

Entity types: the tag set is `O` plus every prefix of the scheme for each entity type of the training split. A
type that occurs in val or test but not in train is an error naming the file and line (a model could never
predict it; relabel it or drop those sentences), rather than a silent mapping to `O`.

Words: lower-cased, every digit read as 0 (`1996-08-22` -> `0000-00-00`, as Lample et al. 2016), ids by falling
frequency in the training split (`min_freq`); `singleton_unk` reads a word seen once in train as unknown with
that probability during training (Lample et al. 2016: the unknown word's embedding gets trained). The case and
the digits stay visible to the model through the characters of each word, which keep the original text.

Pretrained encoders: `data.vocab_from=RUN` (a masked-LM run, tasks/mlm.py) gives every word a second id, its first
token under that run's tokenizer (asset `tokens.json`), so that a tagger can run the run's encoder (copied by
`init.from=RUN`) on ids it was trained with; the word vocabulary above stays as it is.

Batches: `Batch(x=(B, T) word ids right-padded with 0, chars=(B, T, W) character ids (0: padding),
y=(B, T) tag ids, -100 at padding)`, plus `tokens=(B, T)` (the pretrained tokenizer's ids, 0 at padding) with
`vocab_from`, cut from length-bucketed runs of sentences. Sentences are never cut; `max_len` only limits the
texts that `predict` tags.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch

from ..config import check
from ..errors import UserError
from . import Batch, Loader, Spec, datasets, pad, specs
from .files import find_files, fix_hint
from .sentences import PAD, UNK, UNK_ID, VOCAB, Tokenizer, by_frequency, read_tokenizer, run_tokenizer

CHARS = "chars.json"  # the character vocabulary's asset file name (the words': VOCAB, vocab.json)
TOKENS = "tokens.json"  # with data.vocab_from: that run's tokenizer, giving each word its `tokens` id
DOCSTART = "-DOCSTART-"
FILES = {"train": "eng.train", "val": "eng.testa", "test": "eng.testb"}
SCHEMES = {"bio": "BI", "bioes": "BIES"}  # the prefixes of each scheme
IGNORE = -100  # the tag id at padding (cross-entropy's ignore_index)
# predict's tokenizer, close to CoNLL's: abbreviations (U.S.), words and numbers with inner - . , / : & (1996-08-22,
# 1,000.5), clitics ('s), and every other non-space character alone (punctuation, emoji)
TOKEN = re.compile(r"(?:\w\.){2,}|\w+(?:[-.,/:&]\w+)*|'\w+|[^\w\s]")
TAG = re.compile(r"O|[BI]-[^\s-][^\s]*")  # an IOB1/IOB2 tag as read


class Sentence(NamedTuple):
    words: list[str]
    tags: list[str]  # IOB1 (or IOB2) as in the file
    doc: int  # its document's number in the file (documents that hold sentences, from 0)
    line: int  # the line number of the first word


def read_conll(path: Path) -> list[Sentence]:
    """The sentences of a CoNLL-2003 column file; a malformed line is an error naming the file and line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); {fix_hint(path)}") from None
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    doc, first = 0, 0
    for n, line in enumerate([*text.split("\n"), ""], start=1):  # a last blank line ends the last sentence
        cols = line.split()
        if not cols or cols[0] == DOCSTART:
            if words:
                sentences.append(Sentence(words, tags, doc, first))
                words, tags = [], []
            doc += bool(cols) and bool(sentences) and sentences[-1].doc == doc  # a new document after sentences
            continue
        if len(cols) != 4 or not TAG.fullmatch(cols[3]):
            raise UserError(f"{path}:{n}: expected 'word POS chunk NER' with an NER tag O, I-TYPE or B-TYPE, got "
                            f"{line[:80]!r}; {fix_hint(path)}")
        if not words:
            first = n
        words.append(cols[0])
        tags.append(cols[3])
    return sentences


def spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities (type, start, end) [start, end) of IOB1 or IOB2 tags: `B-X` starts an entity, `I-X` continues
    one of type X or else starts one."""
    out: list[tuple[str, int, int]] = []
    for i, tag in enumerate(tags):
        if tag == "O":
            continue
        kind = tag[2:]
        if tag[0] == "B" or not out or out[-1][0] != kind or out[-1][2] != i:
            out.append((kind, i, i + 1))
        else:
            out[-1] = (kind, out[-1][1], i + 1)
    return out


def to_scheme(entities: Sequence[tuple[str, int, int]], n: int, scheme: str) -> list[str]:
    """`n` tags in `scheme` (bio | bioes) marking `entities` (type, start, end)."""
    tags = ["O"] * n
    for kind, a, b in entities:
        for i in range(a, b):
            tags[i] = f"I-{kind}"
        tags[a] = f"B-{kind}"
        if scheme == "bioes":
            if b - a == 1:
                tags[a] = f"S-{kind}"
            else:
                tags[b - 1] = f"E-{kind}"
    return tags


def normalise(word: str) -> str:
    """A word as the word vocabulary sees it: lower-cased, digits as 0."""
    return re.sub(r"\d", "0", word.lower())


class Vocab:
    """Strings to ids: 0 pads, 1 is anything unknown, then the items by falling frequency (ties alphabetical)."""

    def __init__(self, items: list[str]):
        self.items = items  # id -> item; items[0] == PAD, items[1] == UNK
        self.index = {w: i for i, w in enumerate(items)}

    @staticmethod
    def fit(counts: Counter, min_freq: int = 1) -> Vocab:
        return Vocab([PAD, UNK, *by_frequency(counts, min_freq)])

    def __len__(self) -> int:
        return len(self.items)

    def ids(self, items: Sequence[str]) -> list[int]:
        return [self.index.get(w, 1) for w in items]

    def to_json(self, kind: str) -> str:
        extra = {"lowercase": True, "digits": "0"} if kind == "words" else {}
        return json.dumps({"type": kind, **extra, "items": self.items})

    @staticmethod
    def from_json(text: str) -> Vocab:
        return Vocab(json.loads(text)["items"])


@specs.register("tags")
@dataclass(kw_only=True)
class TagSpec(Spec):
    """Tagged word sequences: the word and character vocabularies (assets `vocab.json`, `chars.json`), the tags
    (id -> tag; 0 is `O`) and the longest text `predict` tags. `encode` reads text lines: an empty or
    whitespace-only line is an error row ("empty text"); a line is cut into words by `TOKEN`, each with its
    character span (`spans`), and only its first `max_len` words are tagged (`notes`: one per text, or None)."""

    kind: str = "tags"
    vocab_size: int
    char_vocab_size: int
    num_tags: int
    tags: list[str]
    scheme: str = "bioes"
    max_len: int = 256  # words per text that `predict` tags; the rest are cut (with a note)
    max_word_len: int = 30  # characters per word the character features see; longer words keep their first ones
    token_vocab_size: int = 0  # with data.vocab_from: the pretrained tokenizer's size (0: no `tokens` ids)
    token_kind: str = ""  # with data.vocab_from: that tokenizer's kind (word | char | bpe | wordpiece)
    inputs: ClassVar[str] = "text"

    @property
    def types(self) -> list[str]:
        """The entity types, in the order of the tags."""
        return list(dict.fromkeys(t[2:] for t in self.tags if t != "O"))

    def _asset(self, name: str) -> Vocab:
        if name not in self.assets:
            raise UserError(f"the checkpoint has no assets/{name}: retrain the run")
        return Vocab.from_json(self.assets[name].decode())

    @cached_property
    def words(self) -> Vocab:
        return self._asset(VOCAB)

    @cached_property
    def chars(self) -> Vocab:
        return self._asset(CHARS)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        if TOKENS not in self.assets:
            raise UserError(f"the checkpoint has no assets/{TOKENS}: retrain the run")
        return read_tokenizer(self.token_kind, self.assets[TOKENS].decode())

    def tensors(self, words: Sequence[str]) -> dict[str, torch.Tensor]:
        """Word ids x (L,), character ids chars (L, W) (W: the longest word's characters, at most
        `max_word_len`) and, with a pretrained tokenizer, tokens (L,): each word's first token (unknown if none)."""
        x = torch.tensor(self.words.ids([normalise(w) for w in words]))
        ids = [self.chars.ids(list(w[:self.max_word_len])) for w in words]
        width = max(map(len, ids))
        row = {"x": x, "chars": torch.tensor([r + [0] * (width - len(r)) for r in ids])}
        if self.token_vocab_size:
            row["tokens"] = torch.tensor([t[0] if t else UNK_ID for t in self.tokenizer.encode_lines(words)])
        return row

    def encode(self, inputs: Sequence[str]) -> tuple[Batch | None, list[str | None]]:
        errors: list[str | None] = [None if line.strip() else "empty text" for line in inputs]
        found = [[(m[0], m.start(), m.end()) for m in TOKEN.finditer(line)] for line in inputs if line.strip()]
        if not found:
            return None, errors
        rows = [self.tensors([w for w, _, _ in f[:self.max_len]]) for f in found]
        notes = [f"cut to the model's limit of {self.max_len} words (the text has {len(f)}; the rest is not tagged)"
                 if len(f) > self.max_len else None for f in found]
        return Batch(**collate(rows), spans=[[(a, b) for _, a, b in f[:self.max_len]] for f in found],
                     notes=notes), errors

    def example(self, n: int) -> Batch:
        lengths = torch.randint(1, min(self.max_len, 10) + 1, (n,))
        real = torch.arange(int(lengths.max()))[None] < lengths[:, None]  # (B, T)
        x = torch.randint(2, self.vocab_size, real.shape).masked_fill(~real, 0)
        w = min(self.max_word_len, 6)
        chars = torch.randint(2, self.char_vocab_size, (*real.shape, w))  # (B, T, W)
        chars = chars.masked_fill(torch.arange(w) >= torch.randint(1, w + 1, real.shape)[..., None], 0)
        chars = chars.masked_fill(~real[..., None], 0)
        out = Batch(x=x, chars=chars, y=torch.randint(0, self.num_tags, real.shape).masked_fill(~real, IGNORE))
        if self.token_vocab_size:
            out.fields["tokens"] = torch.randint(2, self.token_vocab_size, real.shape).masked_fill(~real, 0)
        return out


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sentences' fields (`TagSpec.tensors`, and tag ids y (L,)) as a batch's: x (B, T) and tokens (B, T) padded
    with 0, chars (B, T, W) padded with 0, y (B, T) padded with IGNORE."""
    out = {k: pad([r[k] for r in rows], IGNORE if k == "y" else 0)[0] for k in rows[0] if k != "chars"}
    chars = torch.zeros(*out["x"].shape, max(r["chars"].shape[1] for r in rows), dtype=torch.int64)  # (B, T, W)
    for i, r in enumerate(rows):
        chars[i, :r["chars"].shape[0], :r["chars"].shape[1]] = r["chars"]
    return out | {"chars": chars}


@dataclass
class ConllConfig:
    name: str = "conll2003"
    data_dir: str | None = None  # folder holding conll2003/eng.*; searched before NNLAB_DATA and the cache
    scheme: str = "bioes"  # the tags the model learns: bio (IOB2) | bioes; the files' IOB1 is converted
    min_freq: int = 1  # keep the words seen at least this often in the training split; the rest are unknown
    singleton_unk: float = 0.5  # training: a word seen once in train is read as unknown with this probability
    max_len: int = 256  # words per text that predict tags (data sentences are never cut)
    max_word_len: int = 30  # characters per word the character features see
    vocab_from: str = ""  # a masked-LM run whose tokenizer gives each word a `tokens` id, for its encoder (init.from)
    bucket: int = 50  # sort runs of this many batches by length before batching (0: off)

    def __post_init__(self) -> None:
        check(self.scheme in SCHEMES, "data.scheme", "must be bio or bioes")
        check(self.min_freq >= 1, "data.min_freq", "must be >= 1")
        check(0 <= self.singleton_unk <= 1, "data.singleton_unk", "must be in [0, 1]")
        for key in ("max_len", "max_word_len"):
            check(getattr(self, key) >= 1, f"data.{key}", "must be >= 1")
        check(self.bucket >= 0, "data.bucket", "must be >= 0")


class TagData:
    """Splits of tagged sentences as ids; the vocabularies and the entity types come from the train split alone."""

    def __init__(self, cfg: ConllConfig, sentences: dict[str, list[Sentence]], paths: dict[str, Path]):
        for split, s in sentences.items():
            if not s:
                raise UserError(f"{paths[split]} holds no sentences: nothing to train or evaluate on")
        self.cfg, self.splits, self.sentences = cfg, list(sentences), sentences
        train = sentences["train"]
        types = sorted({k for s in train for k, _, _ in spans(s.tags)})
        for split, rows in sentences.items():
            for s in rows:
                for kind, a, _ in spans(s.tags):
                    if kind not in types:
                        raise UserError(f"{paths[split]}:{s.line + a}: entity type '{kind}' does not occur in the "
                                        f"training split {paths['train']} (its types: {', '.join(types) or 'none'}); "
                                        f"a model could not learn it: relabel it or drop those sentences")
        counts = Counter(normalise(w) for s in train for w in s.words)
        words = Vocab.fit(counts, cfg.min_freq)
        chars = Vocab.fit(Counter(c for s in train for w in s.words for c in w))
        tags = ["O", *(f"{p}-{k}" for k in types for p in SCHEMES[cfg.scheme])]
        kind, tok = run_tokenizer(cfg.vocab_from) if cfg.vocab_from else ("", None)
        self.spec = TagSpec(vocab_size=len(words), char_vocab_size=len(chars), num_tags=len(tags), tags=tags,
                            scheme=cfg.scheme, max_len=cfg.max_len, max_word_len=cfg.max_word_len,
                            token_vocab_size=tok.vocab_size if tok else 0, token_kind=kind)
        self.spec.assets[VOCAB] = words.to_json("words").encode()
        self.spec.assets[CHARS] = chars.to_json("chars").encode()
        if tok:
            self.spec.assets[TOKENS] = tok.to_json().encode()
        self.singletons = torch.zeros(len(words), dtype=torch.bool)  # (V,) words seen once in train
        self.singletons[torch.tensor([words.index[w] for w, c in counts.items() if c == 1 and w in words.index],
                                     dtype=torch.int64)] = True
        index = {t: i for i, t in enumerate(tags)}
        self.rows = {split: [self.spec.tensors(s.words) | {
                             "y": torch.tensor([index[t] for t in to_scheme(spans(s.tags), len(s.tags), cfg.scheme)])}
                             for s in rows] for split, rows in sentences.items()}

    def loader(self, split: str, batch_size: int, *, train: bool = False, seed: int = 0, rank: int = 0,
               world: int = 1, device: torch.device | str = "cpu") -> Loader:
        if split not in self.rows:
            raise UserError(f"there is no '{split}' split (the data has: {', '.join(self.splits)})")
        rows, p = self.rows[split], self.cfg.singleton_unk if train else 0.0
        singletons = self.singletons.to(device)

        def make(idx: torch.Tensor, epoch: int, gen: torch.Generator) -> Batch:
            b = Batch(**collate([rows[i] for i in idx.cpu().tolist()])).to(device)
            if p:  # singletons read as unknown (Lample et al. 2016), drawn from this batch's generator
                x = b["x"]
                drop = singletons[x] & (torch.rand(x.shape, generator=gen, device=gen.device) < p).to(x.device)
                b.fields["x"] = x.masked_fill(drop, 1)
            return b

        lengths = torch.tensor([len(r["x"]) for r in rows])
        return Loader(len(rows), batch_size, make, shuffle=train, drop_last=train, seed=seed, rank=rank, world=world,
                      device=device, lengths=lengths, bucket=self.cfg.bucket)


@datasets.register("conll2003", config=ConllConfig)
def conll2003(cfg: ConllConfig) -> TagData:
    """CoNLL-2003 English named entities (PER, LOC, ORG, MISC): eng.train / eng.testa / eng.testb."""
    folder = find_files("conll2003", list(FILES.values()), cfg.data_dir)
    paths = {split: folder / name for split, name in FILES.items()}
    return TagData(cfg, {split: read_conll(path) for split, path in paths.items()}, paths)
