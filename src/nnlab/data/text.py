"""Text as token streams for language models: tokenizers fitted on the training split (a run asset) and the
corpora `tinyshakespeare` and `pystdlib`, tokenized once into memory-mapped files and sampled by step.

Tokenizers (`tokenizer.json` in every checkpoint's assets/):
- `char`: one id per character seen in the training split (nanoGPT's shakespeare-char has 65). A character
  outside it cannot be encoded: `encode` drops it and reports which (a prompt says so, then goes on).
- `bpe`: byte-level BPE trained on the training split with Hugging Face `tokenizers` (GPT-2's scheme: every
  byte is in the alphabet, so nothing is ever unknown).
Text classification (`data/sentences.py`) uses the same classes with `<pad>` and `<unk>` as ids 0 and 1: a
`CharTokenizer` whose unseen characters are unknown, and `HFTokenizer.fit_words` (BPE or WordPiece).

Corpora (`TokenSpec.chars_per_token` is measured on the val split, so bits per character = nats per token /
ln 2 / chars_per_token whatever the tokenizer):
- `tinyshakespeare`: `input.txt` (1,115,394 characters); train = the first 90%, val = the last 10%, cut at
  the same character as nanoGPT's `prepare.py`.
- `pystdlib`: the Python standard library's own `.py` files, found through `sysconfig` (no download): every
  file under `sysconfig.get_path("stdlib")` except `site-packages`/`dist-packages` and test folders (`test`,
  `tests`, `idle_test`), read as UTF-8, in sorted relative-path order; every 10th file (index % 10 == 9) is
  val. Files are joined with a blank line. CPython 3.11 ships 734 such files, 12.1 MB; another Python version
  has another corpus (the spec records the version).

A corpus is tokenized once per (text, tokenizer options) and cached under `<user cache>/decoded/` as
`.npy` files read with `np.memmap`, so training only touches the windows it draws.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import sysconfig
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..config import check
from ..errors import UserError
from . import Batch, Loader, Spec, Windows, datasets, pad, specs
from .files import CORRUPT, DECODED, atomic_write, cache_root, find_files, fix_hint

TOKENIZER = "tokenizer.json"  # the asset's file name
PAD, UNK = "<pad>", "<unk>"  # a text classifier's ids 0 and 1 (CharTokenizer and HFTokenizer.fit_words)
CACHE_VERSION = 1  # bump when tokenization changes, so no stale cache is read
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class CharTokenizer:
    """Characters to ids by a fixed, sorted alphabet, after `specials` (e.g. pad and unknown for text
    classification), which take the first ids. A character outside the alphabet is the `<unk>` special when
    there is one, else dropped (a language model's prompt)."""

    def __init__(self, chars: str, specials: Sequence[str] = ()):
        self.chars, self.specials = chars, tuple(specials)
        self.codes = np.array([ord(c) for c in chars], dtype=np.int64)  # sorted code points
        self.unk = self.specials.index(UNK) if UNK in self.specials else None

    @staticmethod
    def fit(text: str | Sequence[str], specials: Sequence[str] = (), min_freq: int = 1, max_size: int = 0
            ) -> CharTokenizer:
        """The characters of `text` (one string or many) seen at least `min_freq` times; with `max_size`, only
        the most frequent, up to `max_size` ids with the specials."""
        counts: Counter[str] = Counter()
        for t in [text] if isinstance(text, str) else text:
            counts.update(t)
        kept = [c for c, n in counts.most_common() if n >= min_freq]
        return CharTokenizer("".join(sorted(kept[:max_size - len(specials)] if max_size else kept)), specials)

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.chars)

    def encode(self, text: str) -> tuple[np.ndarray, str]:
        """(ids, the distinct characters outside the alphabet: unknown, or dropped)."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self.codes, cps).clip(max=len(self.codes) - 1)
        known = self.codes[pos] == cps
        unknown = "".join(sorted({chr(c) for c in np.unique(cps[~known])})) if not known.all() else ""
        ids = pos + len(self.specials)
        return (ids[known] if self.unk is None else np.where(known, ids, self.unk)), unknown

    def encode_lines(self, lines: Sequence[str]) -> list[list[int]]:
        return [self.encode(line)[0].tolist() for line in lines]

    def decode(self, ids: Sequence[int]) -> str:
        """The characters of `ids`; specials (padding, unknown) are skipped."""
        n = len(self.specials)
        return "".join(self.chars[i - n] for i in ids if i >= n)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars, "specials": list(self.specials)})


class HFTokenizer:
    """A Hugging Face `tokenizers` pipeline: byte-level BPE for language models (`fit`), or BPE / WordPiece over
    lower-cased words for text classification (`fit_words`)."""

    def __init__(self, tok):
        self.tok = tok

    @staticmethod
    def fit(text: str, vocab_size: int, specials: tuple[str, ...] = ()) -> HFTokenizer:
        """Byte-level BPE (GPT-2's scheme: every byte is in the alphabet) trained on `text`; `specials` (e.g. pad,
        BOS, EOS) take the first ids, in order."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=list(specials), show_progress=False)
        tok.train_from_iterator(_pieces(text), trainer=trainer)
        return HFTokenizer(tok)

    @staticmethod
    def fit_words(texts: Sequence[str], kind: str, vocab_size: int, min_freq: int = 1,
                  specials: Sequence[str] = (PAD, UNK)) -> HFTokenizer:
        """Subwords of lower-cased words and punctuation runs (`Whitespace` pre-tokenization: \\w+|[^\\w\\s]+),
        trained on `texts`: `bpe` (Sennrich et al. 2016; a word's last piece ends in `</w>`) or `wordpiece`
        (BERT's; `##` continues a word). Ids 0 and 1 are `<pad>` and `<unk>` (a character never seen in training),
        then any further `specials` (a masked LM's `<mask>`); merges (bpe) and pieces (wordpiece) need `min_freq`
        occurrences."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        kw = {"vocab_size": vocab_size, "min_frequency": min_freq, "special_tokens": list(specials),
              "show_progress": False}
        if kind == "bpe":
            tok = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix="</w>"))
            tok.decoder = decoders.BPEDecoder(suffix="</w>")
            trainer = trainers.BpeTrainer(end_of_word_suffix="</w>", **kw)
        elif kind == "wordpiece":
            tok = Tokenizer(models.WordPiece(unk_token=UNK))
            tok.decoder = decoders.WordPiece(cleanup=False)
            trainer = trainers.WordPieceTrainer(**kw)
        else:
            raise ValueError(f"unknown subword kind {kind!r}: bpe or wordpiece")
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(texts, trainer=trainer)
        return HFTokenizer(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> tuple[np.ndarray, str]:
        ids = [i for enc in self.tok.encode_batch(_pieces(text)) for i in enc.ids]
        return np.array(ids, dtype=np.int64), ""

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)  # special tokens are skipped

    def encode_lines(self, lines: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(lines))]

    def to_json(self) -> str:
        return self.tok.to_str()


def _pieces(text: str, size: int = 1 << 16) -> list[str]:
    """`text` cut into pieces of about `size` characters, each ending after a newline that a non-space follows,
    so byte-level pre-tokenization (which never merges across such a boundary) gives the same tokens."""
    out, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        while end < len(text) and not (text[end - 1] == "\n" and not text[end].isspace()):
            end += 1
        out.append(text[start:end])
        start = end
    return out


def load_tokenizer(text: str) -> CharTokenizer | HFTokenizer:
    doc = json.loads(text)
    if doc.get("type") == "char":
        return CharTokenizer(doc["chars"], doc.get("specials", ()))
    from tokenizers import Tokenizer

    return HFTokenizer(Tokenizer.from_str(text))


@specs.register("tokens")
@dataclass(kw_only=True)
class TokenSpec(Spec):
    """A token stream: the tokenizer (asset), the vocabulary size and the context a model is trained on."""

    kind: str = "tokens"
    vocab_size: int
    block_size: int  # tokens per training window: the model's context
    tokenizer: str = "char"  # char | bpe
    chars_per_token: float = 1.0  # measured on the val split (bits per character from nats per token)
    corpus: str = ""  # what the stream is, for the report (e.g. "pystdlib of CPython 3.11.7, 12.1 MB")
    inputs: ClassVar[str] = "text"

    @cached_property
    def tok(self) -> CharTokenizer | HFTokenizer:
        if TOKENIZER not in self.assets:
            raise UserError(f"the checkpoint has no assets/{TOKENIZER}: retrain the run")
        return load_tokenizer(self.assets[TOKENIZER].decode())

    def example(self, n: int) -> Batch:
        x = torch.randint(0, self.vocab_size, (n, self.block_size + 1))
        return Batch(x=x[:, :-1], y=x[:, 1:])


@specs.register("pairs")
@dataclass(kw_only=True)
class PairSpec(Spec):
    """Sentence pairs for sequence-to-sequence models (translation): batches hold `src` (B, S) and `tgt`
    (B, T) token ids, each sentence BOS ... EOS and padded with `pad_id`, and bool masks `src_mask`, `tgt_mask`
    (True on real tokens). The tokenizers are assets: `src_tokenizer.json` and `tgt_tokenizer.json` (the same
    bytes when `shared`, one vocabulary for both languages)."""

    kind: str = "pairs"
    src_vocab_size: int
    tgt_vocab_size: int
    max_len: int  # the longest sentence a model takes, in tokens with BOS and EOS
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    shared: bool = False  # one vocabulary for both sides (a model may then share its embeddings)
    src_lang: str = "de"
    tgt_lang: str = "en"
    inputs: ClassVar[str] = "text"

    @cached_property
    def toks(self) -> dict[str, HFTokenizer]:
        return {side: load_tokenizer(self.assets[f"{side}_tokenizer.json"].decode()) for side in ("src", "tgt")}

    def ids(self, lines: list[str], side: str) -> list[torch.Tensor]:
        """BOS ... EOS ids of each line, cut to `max_len`."""
        body = self.max_len - 2
        return [torch.tensor([self.bos_id, *ids[:body], self.eos_id]) for ids in self.toks[side].encode_lines(lines)]

    def text(self, ids: list[int], side: str = "tgt") -> str:
        return self.toks[side].decode(ids)

    def encode(self, inputs: Sequence[str]) -> tuple[Batch | None, list[str | None]]:
        """Source sentences as a padded batch; an empty line is an error row, a line longer than `max_len` tokens
        is cut (the row says so)."""
        lines = [line.strip() for line in inputs]
        errors: list[str | None] = [None if line else "empty text: nothing to translate" for line in lines]
        good = [line for line in lines if line]
        if not good:
            return None, errors
        seqs = self.ids(good, "src")
        src, mask = pad(seqs, self.pad_id)
        return Batch(src=src, src_mask=mask), errors

    def example(self, n: int) -> Batch:
        def side(vocab: int, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
            lengths = torch.randint(3, longest + 1, (n,))
            ids = torch.randint(3, vocab, (n, int(lengths.max())))
            mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
            ids[:, 0] = self.bos_id
            ids[torch.arange(n), lengths - 1] = self.eos_id
            return ids.masked_fill(~mask, self.pad_id), mask

        src, src_mask = side(self.src_vocab_size, min(self.max_len, 9))
        tgt, tgt_mask = side(self.tgt_vocab_size, min(self.max_len, 7))
        return Batch(src=src, src_mask=src_mask, tgt=tgt, tgt_mask=tgt_mask)


@dataclass
class CorpusConfig:
    name: str = "tinyshakespeare"  # tinyshakespeare | pystdlib
    data_dir: str | None = None  # folder holding <dataset>/<files>; searched before NNLAB_DATA and the cache
    tokenizer: str = "char"  # char | bpe (byte-level BPE trained on the train split with HF tokenizers)
    vocab_size: int = 1024  # bpe: the vocabulary to train (bytes + merges); char: ignored
    block_size: int = 256  # tokens per training window (the model's context)
    eval_windows: int = 0  # evaluate at most this many consecutive windows per split (0: the whole split)
    download: bool = True  # fetch missing files into the user cache when the corpus has a public URL

    def __post_init__(self) -> None:
        check(self.tokenizer in ("char", "bpe"), "data.tokenizer", "must be char or bpe")
        check(self.vocab_size >= 257, "data.vocab_size", "must be >= 257 (the 256 bytes and one merge)")
        check(self.block_size >= 1, "data.block_size", "must be >= 1")
        check(self.eval_windows >= 0, "data.eval_windows", "must be >= 0")


class TokenData:
    """Splits of one token stream, sampled by `Windows`."""

    def __init__(self, cfg: CorpusConfig, name: str, texts: dict[str, str], corpus: str):
        for split, text in texts.items():
            if len(text.strip().splitlines()) < 2:
                raise UserError(f"the {name} corpus' {split} split is empty or a single line ({len(text)} "
                                f"characters): a language model needs a text of many lines")
        self.cfg, self.splits = cfg, list(texts)
        tok_json, self.tokens = _tokenized(cfg, name, texts)
        chars_per_token = len(texts["val"]) / max(len(self.tokens["val"]), 1) if "val" in texts else 1.0
        self.spec = TokenSpec(vocab_size=load_tokenizer(tok_json).vocab_size, block_size=cfg.block_size,
                              tokenizer=cfg.tokenizer, chars_per_token=round(chars_per_token, 6), corpus=corpus)
        self.spec.assets[TOKENIZER] = tok_json.encode()

    def loader(self, split: str, batch_size: int, *, train: bool = False, seed: int = 0, rank: int = 0,
               world: int = 1, device: torch.device | str = "cpu") -> Windows:
        if split not in self.tokens:
            raise UserError(f"there is no '{split}' split (the corpus has: {', '.join(self.splits)})")
        return Windows(self.tokens[split], self.cfg.block_size, batch_size, train=train, seed=seed, rank=rank,
                       world=world, device=device, eval_windows=0 if train else self.cfg.eval_windows)


def _tokenized(cfg: CorpusConfig, name: str, texts: dict[str, str]) -> tuple[str, dict[str, np.ndarray]]:
    """The tokenizer (fitted on the train split) and each split's ids as a memory-mapped array, from the cache
    when this text was tokenized this way before."""
    key = hashlib.sha256(json.dumps([CACHE_VERSION, cfg.tokenizer, cfg.vocab_size if cfg.tokenizer == "bpe" else 0,
                                     {s: hashlib.sha256(t.encode()).hexdigest() for s, t in texts.items()}]
                                    ).encode()).hexdigest()[:16]
    folder = cache_root() / DECODED / f"{name}-{cfg.tokenizer}-{key}"
    done = folder / "done.json"

    def load() -> tuple[str, dict[str, np.ndarray]]:
        return (folder / TOKENIZER).read_text(), {s: np.load(folder / f"{s}.npy", mmap_mode="r") for s in texts}

    if done.exists():
        try:
            return load()
        except (OSError, ValueError) as e:  # a damaged cache is rebuilt
            print(f"warning: token cache {folder} is unreadable ({e}); rebuilding it", file=sys.stderr)
            done.unlink(missing_ok=True)
    train = texts["train"]
    tok = CharTokenizer.fit(train) if cfg.tokenizer == "char" else HFTokenizer.fit(train, cfg.vocab_size)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    ids = {s: tok.encode(t)[0].astype(dtype) for s, t in texts.items()}
    try:
        atomic_write(folder / TOKENIZER, lambda p: p.write_text(tok.to_json()))
        for s, a in ids.items():
            atomic_write(folder / f"{s}.npy", lambda p, a=a: _save_npy(p, a))
        atomic_write(done, lambda p: p.write_text(json.dumps({s: len(a) for s, a in ids.items()})))
        return load()  # memory-mapped: training reads only the windows it draws
    except OSError as e:  # a read-only cache: use the tokens in memory
        print(f"warning: could not write the token cache {folder}: {e}", file=sys.stderr)
        return tok.to_json(), ids


def _save_npy(path: Path, a: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to the temp file's name
        np.save(f, a)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e}); {fix_hint(path)}") from None


@datasets.register("tinyshakespeare", config=CorpusConfig)
def tinyshakespeare(cfg: CorpusConfig) -> TokenData:
    """Tiny Shakespeare (Karpathy's char-rnn), nanoGPT's 90/10 split."""
    folder = find_files("tinyshakespeare", ["input.txt"], cfg.data_dir, urls={"input.txt": [SHAKESPEARE_URL]},
                        download=cfg.download)
    text = _read(folder / "input.txt")
    cut = int(len(text) * 0.9)
    return TokenData(cfg, "tinyshakespeare", {"train": text[:cut], "val": text[cut:]},
                     f"tinyshakespeare, {len(text):,} characters")


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files, sorted by relative path, without site-packages and test folders."""
    root = Path(root or sysconfig.get_path("stdlib"))
    return sorted((p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])),
                  key=lambda p: p.relative_to(root).as_posix())


@datasets.register("pystdlib", config=CorpusConfig)
def pystdlib(cfg: CorpusConfig) -> TokenData:
    """The Python standard library's own source (no download); every 10th file is val."""
    files = stdlib_files()
    if len(files) < 10:
        raise UserError(f"found only {len(files)} standard-library files under {sysconfig.get_path('stdlib')}: "
                        f"this Python installation has no stdlib sources to train on")
    parts: dict[str, list[str]] = {"train": [], "val": []}
    for i, f in enumerate(files):
        parts["val" if i % 10 == 9 else "train"].append(f.read_text(encoding="utf-8", errors="replace"))
    texts = {s: "\n\n".join(p) for s, p in parts.items()}
    size = sum(len(t.encode()) for t in texts.values())
    version = ".".join(map(str, sys.version_info[:3]))
    return TokenData(cfg, "pystdlib", texts, f"pystdlib of CPython {version}: {len(files)} files, {size / 1e6:.1f} MB")


# --- sentence pairs (translation) -------------------------------------------------------------------------
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: PairSpec's pad_id, bos_id, eos_id
MULTI30K_SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}  # the standard benchmark's files
MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{}"


@dataclass
class PairsConfig:
    name: str = "multi30k"
    data_dir: str | None = None  # folder holding <dataset>/<files>; searched before NNLAB_DATA and the cache
    src: str = "de"  # source language (multi30k: de or en)
    tgt: str = "en"  # target language
    vocab_size: int = 8000  # byte-level BPE vocabulary per tokenizer (trained on the train split)
    shared: bool = True  # one tokenizer for both languages (lets a model share its embeddings)
    max_len: int = 128  # tokens per sentence with BOS and EOS; longer ones are cut (multi30k's longest: ~90)
    bucket: int = 50  # sort runs of this many batches by length before batching (0: off)
    subset: int = 0  # use only the first N training pairs (0: all); the tokenizer is fitted on them
    download: bool = True  # fetch missing files into the user cache from the official repository

    def __post_init__(self) -> None:
        check(self.src != self.tgt, "data.tgt", "must differ from data.src")
        check(self.vocab_size >= 260, "data.vocab_size", "must be >= 260 (256 bytes, 3 special tokens, a merge)")
        check(self.max_len >= 4, "data.max_len", "must be >= 4")
        check(self.bucket >= 0 and self.subset >= 0, "data.bucket", "bucket and subset must be >= 0")


class PairData:
    """Aligned sentence pairs per split, as BOS ... EOS token ids; batches padded to their longest sentence,
    from length-bucketed runs of examples (little padding)."""

    def __init__(self, cfg: PairsConfig, texts: dict[str, tuple[list[str], list[str]]]):
        self.cfg, self.splits, self.texts = cfg, list(texts), texts
        src_train, tgt_train = texts["train"]
        src_tok = HFTokenizer.fit("\n".join(src_train + tgt_train if cfg.shared else src_train), cfg.vocab_size,
                                   SPECIALS)
        tgt_tok = src_tok if cfg.shared else HFTokenizer.fit("\n".join(tgt_train), cfg.vocab_size, SPECIALS)
        self.spec = PairSpec(src_vocab_size=src_tok.vocab_size, tgt_vocab_size=tgt_tok.vocab_size,
                             max_len=cfg.max_len, shared=cfg.shared, src_lang=cfg.src, tgt_lang=cfg.tgt)
        self.spec.assets = {"src_tokenizer.json": src_tok.to_json().encode(),
                            "tgt_tokenizer.json": tgt_tok.to_json().encode()}
        self.ids = {s: (self.spec.ids(src, "src"), self.spec.ids(tgt, "tgt")) for s, (src, tgt) in texts.items()}

    def loader(self, split: str, batch_size: int, *, train: bool = False, seed: int = 0, rank: int = 0,
               world: int = 1, device: torch.device | str = "cpu") -> Loader:
        if split not in self.ids:
            raise UserError(f"there is no '{split}' split (the data has: {', '.join(self.splits)})")
        src, tgt = self.ids[split]

        def make(idx: torch.Tensor, epoch: int, gen: torch.Generator) -> Batch:
            rows = idx.cpu().tolist()
            s, s_mask = pad([src[i] for i in rows], self.spec.pad_id)
            t, t_mask = pad([tgt[i] for i in rows], self.spec.pad_id)
            return Batch(src=s, src_mask=s_mask, tgt=t, tgt_mask=t_mask, index=idx.cpu()).to(device)

        lengths = torch.tensor([max(len(a), len(b)) for a, b in zip(src, tgt, strict=True)])
        return Loader(len(src), batch_size, make, shuffle=train, drop_last=train, seed=seed, rank=rank, world=world,
                      device=device, lengths=lengths, bucket=self.cfg.bucket)


@datasets.register("multi30k", config=PairsConfig)
def multi30k(cfg: PairsConfig) -> PairData:
    """Multi30k task 1 (German-English image captions): train 29,000 / val 1,014 / test2016 1,000 pairs."""
    langs = (cfg.src, cfg.tgt)
    check(set(langs) <= {"de", "en"}, "data.src", "multi30k has de and en (the fr/cs files are not used)")
    names = [f"{f}.{lang}.gz" for f in MULTI30K_SPLITS.values() for lang in langs]
    folder = find_files("multi30k", names, cfg.data_dir, urls={n: [MULTI30K_URL.format(n)] for n in names},
                        download=cfg.download)
    texts = {}
    for split, f in MULTI30K_SPLITS.items():
        src, tgt = (_gz_lines(folder / f"{f}.{lang}.gz") for lang in langs)
        if len(src) != len(tgt):
            raise UserError(f"{folder}/{f}.{cfg.src}.gz has {len(src)} lines but {f}.{cfg.tgt}.gz {len(tgt)}: the "
                            f"files are not aligned; {fix_hint(folder / f'{f}.{cfg.src}.gz')}")
        texts[split] = (src[:cfg.subset], tgt[:cfg.subset]) if split == "train" and cfg.subset else (src, tgt)
    return PairData(cfg, texts)


def _gz_lines(path: Path) -> list[str]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read().rstrip("\n").split("\n")
    except (*CORRUPT, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not readable gzip'd UTF-8 text ({type(e).__name__}); {fix_hint(path)}") from None
