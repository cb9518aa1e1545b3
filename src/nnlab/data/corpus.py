"""Unlabelled text for masked-language-model pretraining (tasks/mlm.py): the dataset `unlabelled`, the training text
of the text datasets at hand, and `MaskedTextSpec`, whose tokenizer has a `<mask>` token.

Sources (`data.sources`), each read only from its training split, never from a test split, nor from the val
part that a classifier of the same data holds out (with the default `data.val_fraction` of 0.05):
- `imdb`: the train reviews of aclImdb_v1_labeled.tar.gz, minus imdb's val part;
- `sst2`: GLUE's SST-2/train.tsv, minus sst2's val part (dev.tsv, the classifier's test split, is never read);
- `financial-phrasebank`: the train part (80%) of its fixed split;
- `conll2003`: eng.train, each sentence's words joined by spaces (eng.testa and eng.testb are never read);
- `multi30k`: train.en.gz, the English side (the val and test files are never read).
The labels are dropped. The corpus' own val split is `data.val_fraction` of its texts, drawn with the fixed seed
`SPLIT_SEED`; the tokenizer (`data.tokenizer`, or `data.vocab_from`'s) is fitted on the rest, with `<mask>` as id 2
after padding (0) and unknown (1) whatever its kind. A text longer than `max_len` tokens is cut into consecutive
pieces of `max_len` tokens, each a text of its own, so long reviews are read whole.

Batches are `Batch(x=(B, T) token ids right-padded with 0)` from length-bucketed runs of texts; the task masks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..config import check
from ..errors import UserError
from . import Batch, Loader, datasets, sentences, specs
from .conll import FILES as CONLL_FILES
from .conll import read_conll
from .files import find_files
from .sentences import FINPHRASE, SPLIT_SEED, SentencesConfig, TextSpec, Tokenizer, WordTokenizer, tokenizer_for
from .text import MULTI30K_URL, PAD, UNK, CharTokenizer, _gz_lines

MASK = "<mask>"  # the masked LM's mask token, id MASK_ID for every tokenizer kind
MASK_ID = 2
SPECIALS = (PAD, UNK, MASK)  # ids 0, 1, 2; a random replacement token is drawn from the ids after them
CLASSIFIER_VAL = SentencesConfig.val_fraction  # sst2's and imdb's default val part, left out of the corpus


def _imdb(data_dir: str | None) -> list[str]:
    folder = find_files("imdb", ["aclImdb_v1_labeled.tar.gz"], data_dir)
    texts, labels = sentences.read_imdb(folder / "aclImdb_v1_labeled.tar.gz")["train"]
    return sentences.hold_out(texts, labels, CLASSIFIER_VAL)["train"][0]


def _sst2(data_dir: str | None) -> list[str]:
    folder = find_files("sst2", ["SST-2/train.tsv"], data_dir)
    return sentences.hold_out(*sentences._read_tsv(folder / "SST-2/train.tsv"), CLASSIFIER_VAL)["train"][0]


def _phrasebank(data_dir: str | None) -> list[str]:
    folder = find_files("financial-phrasebank", [FINPHRASE], data_dir)
    texts, labels = sentences.read_phrasebank(folder / FINPHRASE, ["negative", "neutral", "positive"])
    return [texts[i] for i in sentences.stratified(labels, [0.8, 0.1, 0.1])[0]]  # the dataset's train part


def _conll(data_dir: str | None) -> list[str]:
    folder = find_files("conll2003", [CONLL_FILES["train"]], data_dir)
    return [" ".join(s.words) for s in read_conll(folder / CONLL_FILES["train"])]


def _multi30k(data_dir: str | None) -> list[str]:
    name = "train.en.gz"
    folder = find_files("multi30k", [name], data_dir, urls={name: [MULTI30K_URL.format(name)]})
    return _gz_lines(folder / name)


SOURCES = {"imdb": _imdb, "sst2": _sst2, "financial-phrasebank": _phrasebank, "conll2003": _conll,
           "multi30k": _multi30k}


@specs.register("masked-text")
@dataclass(kw_only=True)
class MaskedTextSpec(TextSpec):
    """Unlabelled texts for a masked LM: a `TextSpec` (tokenizer asset, `max_len`) without classes, whose
    vocabulary has `<mask>` at `mask_id` and its special tokens below `specials`."""

    kind: str = "masked-text"
    num_classes: int = 0
    classes: list[str] = field(default_factory=list)
    mask_id: int = MASK_ID
    specials: int = len(SPECIALS)  # ids below this are special (pad, unknown, mask): never a random replacement
    corpus: str = ""  # what the text is, for the report
    inputs: ClassVar[str] = "text"

    def example(self, n: int) -> Batch:
        lengths = torch.randint(1, min(self.max_len, 12) + 1, (n,))
        x = torch.randint(self.specials, self.vocab_size, (n, int(lengths.max())))
        return Batch(x=x.masked_fill(torch.arange(x.shape[1])[None] >= lengths[:, None], self.pad_id))  # (B, T)


@dataclass
class UnlabelledConfig(SentencesConfig):
    name: str = "unlabelled"  # unlabelled text of the sources below, for masked-LM pretraining (task mlm)
    sources: list[str] = field(default_factory=lambda: ["imdb"])  # imdb | sst2 | financial-phrasebank | conll2003
    #                                                               | multi30k: their training text, joined
    val_fraction: float = 0.02  # the part of the corpus' texts held out as its val split

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.sources), "data.sources", f"name at least one of {', '.join(SOURCES)}")
        for s in self.sources:
            check(s in SOURCES, "data.sources", f"'{s}' is not one of {', '.join(SOURCES)}")
        check(len(set(self.sources)) == len(self.sources), "data.sources", "names a source twice")
        check(self.val_fraction > 0, "data.val_fraction", "must be > 0 (the val split measures pretraining)")


def mask_id(tok: Tokenizer) -> int | None:
    """The id of `<mask>` in `tok`, or None."""
    if isinstance(tok, WordTokenizer):
        return tok.index.get(MASK)
    if isinstance(tok, CharTokenizer):
        return tok.specials.index(MASK) if MASK in tok.specials else None
    return tok.tok.token_to_id(MASK)


class CorpusData:
    """The train and val texts of a corpus as token ids, cut into pieces of at most `max_len`."""

    def __init__(self, cfg: UnlabelledConfig, texts: dict[str, list[str]], corpus: str):
        for split, t in texts.items():
            if not t:
                raise UserError(f"the {cfg.name} corpus' {split} split is empty: give more text (data.sources)")
        self.cfg, self.splits, self.texts = cfg, list(texts), texts
        kind, tok = tokenizer_for(cfg, texts["train"], SPECIALS)
        if mask_id(tok) != MASK_ID:
            raise UserError(f"data.vocab_from={cfg.vocab_from}: its tokenizer has no {MASK} token at id {MASK_ID}: "
                            f"pass a masked-LM run (or leave data.vocab_from empty to fit a tokenizer)")
        if tok.vocab_size <= len(SPECIALS):
            raise UserError(f"the {cfg.name} corpus' tokenizer has no tokens but its specials: give more text")
        self.spec = MaskedTextSpec(vocab_size=tok.vocab_size, max_len=cfg.max_len, tokenizer=kind, corpus=corpus)
        self.spec.assets[self.spec.asset] = tok.to_json().encode()
        L = cfg.max_len
        self.ids = {s: [torch.tensor(ids[i:i + L]) for ids in tok.encode_lines(t) for i in range(0, len(ids), L)]
                    for s, t in texts.items()}  # a text of no tokens (only unknown characters) has no piece

    def loader(self, split: str, batch_size: int, *, train: bool = False, seed: int = 0, rank: int = 0,
               world: int = 1, device: torch.device | str = "cpu") -> Loader:
        if split not in self.ids:
            raise UserError(f"there is no '{split}' split (the data has: {', '.join(self.splits)})")
        ids = self.ids[split]

        def make(idx: torch.Tensor, epoch: int, gen: torch.Generator) -> Batch:
            x = torch.nn.utils.rnn.pad_sequence([ids[i] for i in idx.cpu().tolist()], batch_first=True,
                                                padding_value=self.spec.pad_id)  # (B, T)
            return Batch(x=x).to(device)

        lengths = torch.tensor([len(t) for t in ids])
        return Loader(len(ids), batch_size, make, shuffle=train, drop_last=train, seed=seed, rank=rank, world=world,
                      device=device, lengths=lengths, bucket=self.cfg.bucket)


@datasets.register("unlabelled", config=UnlabelledConfig)
def unlabelled(cfg: UnlabelledConfig) -> CorpusData:
    """The training text of `data.sources` without labels, for masked-LM pretraining; val held out from it."""
    texts: list[str] = []
    counts = []
    for name in cfg.sources:
        got = [t for t in SOURCES[name](cfg.data_dir) if t.strip()]
        texts += got
        counts.append(f"{name} {len(got):,}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    n_val = max(1, round(cfg.val_fraction * len(texts)))
    parts = {"train": sorted(order[n_val:].tolist()), "val": sorted(order[:n_val].tolist())}
    return CorpusData(cfg, {s: [texts[i] for i in p] for s, p in parts.items()},
                      f"{len(texts):,} texts ({', '.join(counts)})")
