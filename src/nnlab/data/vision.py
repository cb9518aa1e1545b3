"""Image classification datasets: digits, mnist, cifar10, and a generated `synthetic` set for tests.

Every factory returns a `TensorData` of uint8 images `x` (N, C, H, W) and int64 labels `y` (N,) for the
splits `train`, `val` (only when `val_size > 0`) and `test`; its batches are augmented (training only, on
the device, batched) and normalised to float here, so loops and tasks never see uint8 pixels. Validation
images are held out of the official training split by a fixed seeded permutation, so `val` never changes
with `subset` or between runs. Normalisation statistics (`ImageSpec.mean/std`) come from the whole official
training split. MNIST and CIFAR-10 are decoded once from their canonical files and then read back from a
cache (see `files.decoded_path`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError, did_you_mean
from . import Batch, TensorData, datasets
from .files import (
    CORRUPT,
    check_md5,
    check_member,
    decoded_path,
    drop_decoded,
    find_files,
    fix_hint,
    load_decoded,
    open_tar,
    save_decoded,
)
from .image import Augment, ImageSpec

try:  # numpy >= 2 moved the module; the CIFAR pickles still name numpy.core.multiarray
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

FLIPS = ("none", "random", "alternate")
VAL_SEED = 0  # seed of the permutation that picks validation images; changing it changes every val split



@dataclass
class VisionData:
    """Options shared by every image classification dataset."""

    name: str = "mnist"  # registered dataset to load
    data_dir: str | None = None  # folder holding <dataset>/<files>; searched before NNLAB_DATA and the cache
    val_size: int = 5000  # training images held out for validation (fixed seeded permutation); 0 = no val
    subset: int = 0  # use only the first N training images left after the val hold-out; 0 = all
    crop_padding: int = 0  # random translation by up to this many pixels, training batches only
    padding_mode: str = "zeros"  # pixels the translation brings in: zeros | reflect (mirror the border)
    flip: str = "none"  # horizontal flips of training batches: none | random | alternate
    download: bool = True  # download missing files from their public URL into the user cache

    def __post_init__(self) -> None:
        for field in ("val_size", "subset", "crop_padding"):
            if getattr(self, field) < 0:
                raise UserError(f"dataset option {field} must be >= 0, got {getattr(self, field)}")
        if self.padding_mode not in ("zeros", "reflect"):
            raise UserError(f"dataset option padding_mode must be zeros or reflect, got '{self.padding_mode}'")
        if self.flip not in FLIPS:
            raise UserError(f"dataset option flip must be one of {', '.join(FLIPS)}, got "
                            f"'{self.flip}'{did_you_mean(self.flip, FLIPS)}")


@dataclass
class MnistData(VisionData):
    name: str = "mnist"  # LeCun et al.'s 28x28 handwritten digits: 60,000 train / 10,000 test


@dataclass
class Cifar10Data(VisionData):
    name: str = "cifar10"  # Krizhevsky's 32x32 colour images in 10 classes: 50,000 train / 10,000 test


@dataclass
class DigitsData(VisionData):
    name: str = "digits"  # scikit-learn's bundled 8x8 digits: 1,438 train / 359 test (20% of each class)
    val_size: int = 180  # one eighth of the 1,438 training images


@dataclass
class SyntheticData(VisionData):
    name: str = "synthetic"  # generated class patterns plus noise; needs no files
    val_size: int = 64  # training images held out for validation; 0 = no val
    num_classes: int = 4  # number of classes, each with its own random pattern
    channels: int = 1  # image channels
    image_size: int = 8  # image height and width in pixels
    n_train: int = 512  # training images (before the val hold-out)
    n_test: int = 128  # test images
    noise: float = 0.5  # std of the Gaussian pixel noise, relative to the [0, 1] pattern range
    seed: int = 0  # generator seed: the same seed always gives the same images

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("num_classes", "channels", "image_size", "n_train", "n_test"):
            if getattr(self, field) < 1:
                raise UserError(f"dataset option {field} must be >= 1, got {getattr(self, field)}")
        if self.num_classes < 2 or self.noise < 0:
            raise UserError(f"synthetic data needs num_classes >= 2 and noise >= 0, got "
                            f"{self.num_classes} and {self.noise}")


# ------------------------------------------------------------------------------------- shared parts
def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) scaled to [0, 1], exact via 256-bin
    histograms (bincount on uint8 is several times faster than summing in float64)."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(x.shape[1]):
        h = torch.bincount(x[:, c].reshape(-1), minlength=256).double()  # (256,) pixel-value counts
        m = (h * values).sum() / h.sum()
        mean.append(round(m.item(), 6))
        std.append(round(((h * values.square()).sum() / h.sum() - m.square()).clamp_min(0).sqrt().item(), 6))
    return tuple(mean), tuple(std)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] along the first dim; index_select on a 2-D view is several times faster for uint8 images."""
    return x.reshape(len(x), -1).index_select(0, idx).view(len(idx), *x.shape[1:])


def build(cfg: VisionData, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
          classes: list[str], stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> TensorData:
    """Hold out `val_size` training images (fixed permutation), apply `subset`, and make the ImageSpec."""
    x, y = train
    n = len(x)
    if cfg.val_size >= n:
        raise UserError(f"val_size {cfg.val_size} leaves no training images: {cfg.name} has {n}")
    mean, std = stats or channel_stats(x)
    splits: dict[str, dict[str, torch.Tensor]] = {}
    if cfg.val_size:
        perm = torch.from_numpy(np.random.default_rng(VAL_SEED).permutation(n))
        val_idx, train_idx = perm[:cfg.val_size].sort().values, perm[cfg.val_size:].sort().values
        x_val, y_val = _take(x, val_idx), y[val_idx]
        x, y = _take(x, train_idx), y[train_idx]
    if cfg.subset:
        if cfg.subset > len(x):
            raise UserError(f"subset {cfg.subset} is larger than the {len(x)} training images of {cfg.name} "
                            f"(after holding out val_size {cfg.val_size})")
        x, y = x[:cfg.subset], y[:cfg.subset]
    splits["train"] = {"x": x.contiguous(), "y": y.contiguous()}
    if cfg.val_size:
        splits["val"] = {"x": x_val.contiguous(), "y": y_val.contiguous()}
    splits["test"] = {"x": test[0].contiguous(), "y": test[1].contiguous()}
    spec = ImageSpec(input_shape=tuple(x.shape[1:]), num_classes=len(classes), classes=classes, mean=mean, std=std)
    def transform(batch: Batch, idx: torch.Tensor, epoch: int, gen: torch.Generator, train: bool, seed: int) -> Batch:
        augment = Augment(cfg.crop_padding, cfg.flip, seed, cfg.padding_mode)
        x = augment(batch["x"], idx, epoch, gen) if train and augment.enabled else batch["x"]
        return Batch(x=spec.normalize(x), y=batch["y"])

    return TensorData(spec, splits, transform)


Decoded = tuple[dict[str, torch.Tensor], list[str]]  # {train_x, train_y, test_x, test_y}, class names
KEYS = ("train_x", "train_y", "test_x", "test_y")


def decode_once(cfg: VisionData, dataset: str, md5s: dict[str, str],
                decode: Callable[[], Decoded]) -> TensorData:
    """Build the dataset from the decoded cache, or `decode()` the source files and cache the result.

    The cache is keyed by the published MD5s that `decode` checks; with no MD5s (verification turned
    off) nothing is cached. A cache that cannot be read or holds the wrong things is deleted and rebuilt.
    """
    path = decoded_path(dataset, md5s) if md5s else None
    hit = load_decoded(path) if path is not None else None
    if hit is not None and path is not None:
        t, meta = hit
        try:
            classes, mean, std = (json.loads(meta[k]) for k in ("classes", "mean", "std"))
            ok = (all(k in t for k in KEYS) and t["train_x"].dtype == t["test_x"].dtype == torch.uint8
                  and t["train_x"].ndim == 4 and t["train_y"].dtype == torch.int64
                  and len(t["train_x"]) == len(t["train_y"]) and len(t["test_x"]) == len(t["test_y"]))
        except (KeyError, ValueError, TypeError):
            ok = False
        if ok:
            return build(cfg, (t["train_x"], t["train_y"]), (t["test_x"], t["test_y"]), classes,
                         (tuple(mean), tuple(std)))
        drop_decoded(path, "unexpected contents")
    t, classes = decode()
    mean, std = channel_stats(t["train_x"])
    if path is not None:
        meta = {"classes": json.dumps(classes), "mean": json.dumps(mean), "std": json.dumps(std)}
        save_decoded(path, t, meta)
    return build(cfg, (t["train_x"], t["train_y"]), (t["test_x"], t["test_y"]), classes, (mean, std))


# --------------------------------------------------------------------------------------------- digits
@datasets.register("digits", config=DigitsData)
def digits(cfg: DigitsData) -> TensorData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images); stratified 80/20 train/test split.

    Read straight from the CSV that scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`: 64 pixel
    values 0..16 then the label per row), which saves the ~2 s import of scikit-learn itself."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the digits dataset ships with scikit-learn, which is not installed: pip install scikit-learn")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    raw = np.loadtxt(csv, delimiter=",", dtype=np.float64)
    x = torch.from_numpy(np.rint(raw[:, :64] * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8))  # (N, 1, 8, 8)
    y = torch.from_numpy(raw[:, 64].astype(np.int64))
    rng = np.random.default_rng(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(raw[:, 64] == c))[: round(0.2 * (raw[:, 64] == c).sum())]
                           for c in range(10)])
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test] = True
    tr, te = torch.from_numpy(np.flatnonzero(~is_test)), torch.from_numpy(np.flatnonzero(is_test))
    return build(cfg, (x[tr], y[tr]), (x[te], y[te]), [str(i) for i in range(10)])


# ---------------------------------------------------------------------------------------------- mnist
MNIST_FILES = {  # decoded key -> (file name, IDX magic number)
    "train_x": ("train-images-idx3-ubyte.gz", 2051),
    "train_y": ("train-labels-idx1-ubyte.gz", 2049),
    "test_x": ("t10k-images-idx3-ubyte.gz", 2051),
    "test_y": ("t10k-labels-idx1-ubyte.gz", 2049),
}
MNIST_MD5 = {  # published MD5s (LeCun's page, torchvision); an empty dict turns verification off
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# The original site first, then the mirror torchvision uses (the original often refuses downloads).
MNIST_MIRRORS = ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")
MNIST_URLS = {f: [m + f for m in MNIST_MIRRORS] for f, _ in MNIST_FILES.values()}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An unsigned-byte IDX array (gzip-compressed if the name ends in .gz), checking the magic number
    (2049 = 1-D labels, 2051 = 3-D images), the dimensions and the exact length."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except CORRUPT as e:
        raise UserError(f"{path} is not a valid gzip file ({type(e).__name__}: {e}); {fix_hint(path)}") from e
    ndim = magic & 0xFF  # IDX magic: 0x00 0x00 <type 0x08 = ubyte> <ndim>
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise UserError(f"{path} is not the expected IDX file: magic number {got}, expected {magic}; "
                        f"{fix_hint(path)}")
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    want = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) < header or len(raw) != want:
        raise UserError(f"{path} is truncated or damaged: {len(raw)} bytes after decompression, its IDX "
                        f"header {dims} needs {want}; {fix_hint(path)}")
    return np.frombuffer(bytearray(raw), np.uint8, offset=header).reshape(dims)


@datasets.register("mnist", config=MnistData)
def mnist(cfg: MnistData) -> TensorData:
    """MNIST handwritten digits from the four canonical IDX files (60,000 train / 10,000 test)."""

    def decode() -> Decoded:
        files = [f for f, _ in MNIST_FILES.values()]
        folder = find_files("mnist", files, cfg.data_dir, MNIST_URLS, MNIST_MD5, cfg.download)
        for f, md5 in MNIST_MD5.items():
            check_md5(folder / f, md5)
        a = {k: read_idx(folder / f, magic) for k, (f, magic) in MNIST_FILES.items()}
        for split in ("train", "test"):
            x, y = a[f"{split}_x"], a[f"{split}_y"]
            if len(x) != len(y) or (len(y) and y.max() > 9):
                raise UserError(f"{folder}: the {split} images and labels do not match ({len(x)} images, "
                                f"{len(y)} labels, largest label {y.max() if len(y) else '-'}); replace them")
        t = {k: torch.from_numpy(v) for k, v in a.items()}
        t = {**t, "train_x": t["train_x"][:, None], "test_x": t["test_x"][:, None],  # (N, 1, 28, 28)
             "train_y": t["train_y"].long(), "test_y": t["test_y"].long()}
        return t, [str(i) for i in range(10)]

    return decode_once(cfg, "mnist", MNIST_MD5, decode)


# -------------------------------------------------------------------------------------------- cifar10
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"  # the folder inside the archive (also accepted already extracted)
CIFAR10_URLS = {CIFAR10_ARCHIVE: ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]}
CIFAR10_ARCHIVE_MD5 = {CIFAR10_ARCHIVE: "c58f30108f718f92721af3b95e74349a"}  # checked on download
CIFAR10_MD5 = {  # published MD5 of each member (torchvision's list); an empty dict turns verification off
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_MEMBERS = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                   "test_batch", "batches.meta")


class SafeUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR pickles. Besides dicts, lists, bytes, strings and ints, the protocol-2
    files need exactly three globals to rebuild a numpy array; every other global is refused, so a
    tampered file cannot run code (`os.system`, `eval`, ...)."""

    ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which CIFAR data never needs; "
                                         f"refusing to load it")
        return self.ALLOWED[(module, name)]


def load_pickle(data: bytes, where: str) -> Any:
    """Unpickle CIFAR data (encoding='bytes') with `SafeUnpickler`; any failure is a UserError."""
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a damaged pickle can fail in many ways; all of them mean "bad file"
        raise UserError(f"{where} is not a valid CIFAR pickle ({type(e).__name__}: {e}); "
                        f"replace it with the canonical file (delete it to download it again)") from e


def _read_members(archive: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of `CIFAR10_FOLDER/<name>` for each name, read straight from the archive."""
    wanted = {f"{CIFAR10_FOLDER}/{n}": n for n in names}
    out: dict[str, bytes] = {}
    with open_tar(archive) as tar:
        for member in tar:
            rel = str(check_member(member, archive))  # also refuses links posing as members
            if rel in wanted and member.isfile():
                f = tar.extractfile(member)
                out[wanted[rel]] = f.read() if f else b""
                if len(out) == len(wanted):
                    break
    if missing := [n for n in names if n not in out]:
        raise UserError(f"{archive} lacks {', '.join(f'{CIFAR10_FOLDER}/{n}' for n in missing)}; "
                        f"{fix_hint(archive)}")
    return out


def _cifar_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(data (N, 3072) uint8, labels (N,) int64) from one batch pickle, checking what it holds."""
    d = load_pickle(blob, where)
    data = d.get(b"data") if isinstance(d, dict) else None
    try:
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        labels = np.zeros(0, np.int64) - 1
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072
            or labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9):
        raise UserError(f"{where} does not hold a CIFAR-10 batch (uint8 data (N, 3072) and N labels "
                        f"0..9); replace it with the canonical file")
    return data, labels


@datasets.register("cifar10", config=Cifar10Data)
def cifar10(cfg: Cifar10Data) -> TensorData:
    """CIFAR-10 from the canonical cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)."""

    def decode() -> Decoded:
        members = [f"{CIFAR10_FOLDER}/{m}" for m in CIFAR10_MEMBERS]
        folder = find_files("cifar10", [CIFAR10_ARCHIVE], cfg.data_dir, CIFAR10_URLS, CIFAR10_ARCHIVE_MD5,
                            cfg.download, or_names=members)
        if (folder / CIFAR10_ARCHIVE).exists():
            src = folder / CIFAR10_ARCHIVE
            blobs = _read_members(src, CIFAR10_MEMBERS)
        else:
            src = folder / CIFAR10_FOLDER
            blobs = {m: (src / m).read_bytes() for m in CIFAR10_MEMBERS}
        for m, md5 in CIFAR10_MD5.items():
            check_md5(src / m, md5, got=hashlib.md5(blobs[m]).hexdigest())
        meta = load_pickle(blobs.pop("batches.meta"), f"{src}/batches.meta")
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, bytes) for n in names):
            raise UserError(f"{src}/batches.meta has no list of label_names; replace it with the original")
        parts = {m: _cifar_batch(blobs.pop(m), f"{src}/{m}") for m in CIFAR10_MEMBERS[:-1]}
        if any(labels.max(initial=0) >= len(names) for _, labels in parts.values()):
            raise UserError(f"{src}: labels exceed the {len(names)} label_names; replace the files")
        train, test = [parts[f"data_batch_{i}"] for i in range(1, 6)], [parts["test_batch"]]
        t: dict[str, torch.Tensor] = {}
        for split, batches in (("train", train), ("test", test)):
            t[f"{split}_x"] = torch.from_numpy(np.concatenate([b[0] for b in batches])).view(-1, 3, 32, 32)
            t[f"{split}_y"] = torch.from_numpy(np.concatenate([b[1] for b in batches]))
        return t, [n.decode() for n in names]

    return decode_once(cfg, "cifar10", CIFAR10_MD5, decode)


# ------------------------------------------------------------------------------------------ synthetic
@datasets.register("synthetic", config=SyntheticData)
def synthetic(cfg: SyntheticData) -> TensorData:
    """Generated images: one random pattern per class plus Gaussian noise; learnable, needs no files."""
    g = torch.Generator().manual_seed(cfg.seed)
    k, c, s = cfg.num_classes, cfg.channels, cfg.image_size
    patterns = torch.rand(k, c, s, s, generator=g)  # (K, C, S, S) in [0, 1]

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randperm(n, generator=g) % k  # balanced classes in random order
        x = patterns[y] + cfg.noise * torch.randn(n, c, s, s, generator=g)  # (N, C, S, S)
        return x.clamp(0, 1).mul(255).round().to(torch.uint8), y

    train = sample(cfg.n_train)
    return build(cfg, train, sample(cfg.n_test), [f"class{i}" for i in range(k)])
