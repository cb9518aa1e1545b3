"""Data files and vision datasets: parsers, verification, safe extraction, downloads and the decoded cache.

Everything runs offline on small files built in tmp_path; the real MNIST / CIFAR-10 tests read
`$NNLAB_DATA` (or the shared data folder next to the repository) and skip when the files are absent.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need_data

from nnlab.data import datasets, files, vision
from nnlab.errors import UserError


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the user cache at tmp_path and clear NNLAB_DATA, so no test reads or writes ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NNLAB_DATA", raising=False)
    return tmp_path / "xdg" / "nnlab"


def xy(data) -> dict:
    """{split: (images, labels)} of an image dataset (its tensors held in memory)."""
    return {k: (v["x"], v["y"]) for k, v in data.tensors.items()}


def load(name: str, **kw: object) -> object:
    entry = datasets[name]
    return entry.factory(entry.config(**kw))


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def decoded_files(cache: Path) -> list[Path]:
    return sorted((cache / files.DECODED).glob("*")) if (cache / files.DECODED).exists() else []


# --------------------------------------------------------------------------------- configs and roots
def test_config_validation() -> None:
    with pytest.raises(UserError, match="did you mean 'random'"):
        vision.VisionData(flip="randm")
    with pytest.raises(UserError, match="val_size must be >= 0"):
        vision.DigitsData(val_size=-1)
    with pytest.raises(UserError, match="num_classes"):
        vision.SyntheticData(num_classes=1)
    with pytest.raises(UserError, match="subset 5000 is larger"):
        load("digits", subset=5000)
    with pytest.raises(UserError, match="leaves no training images"):
        load("synthetic", n_train=10, val_size=10)


def test_data_roots_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    monkeypatch.setenv("NNLAB_DATA", f"{tmp_path / 'e1'}{os.pathsep}{tmp_path / 'e2'}")
    expected = [tmp_path / "d", tmp_path / "e1", tmp_path / "e2", isolated]
    assert files.data_roots(str(tmp_path / "d")) == expected
    assert files.data_roots(None)[-1] == isolated


# ---------------------------------------------------------------------------------- digits, synthetic
def test_digits_splits_deterministic() -> None:
    a, b = load("digits"), load("digits")
    assert a.spec.classes == [str(i) for i in range(10)] and a.spec.input_shape == (1, 8, 8)
    assert {k: len(v[0]) for k, v in xy(a).items()} == {"train": 1258, "val": 180, "test": 359}
    for k, (x, y) in xy(a).items():
        assert x.dtype == torch.uint8 and x.is_contiguous() and y.dtype == torch.int64
        assert torch.equal(x, xy(b)[k][0]) and torch.equal(y, xy(b)[k][1])
    x, y = xy(a)["test"]
    assert int(x.max()) == 255 and torch.bincount(y).min() >= 35  # stratified: ~36 per class
    assert 0.2 < a.spec.mean[0] < 0.4
    c = load("digits", val_size=0, subset=100)
    assert list(xy(c)) == ["train", "test"] and len(xy(c)["train"][0]) == 100


def test_synthetic_learnable_and_deterministic() -> None:
    d = load("synthetic", channels=3, image_size=6, num_classes=3)
    assert d.spec.input_shape == (3, 6, 6) and d.spec.num_classes == 3 and len(d.spec.mean) == 3
    assert torch.equal(xy(d)["train"][0], xy(load("synthetic", channels=3, image_size=6, num_classes=3))["train"][0])
    (x, y), (xt, yt) = xy(d)["train"], xy(d)["test"]
    centroids = torch.stack([x[y == k].float().mean(0) for k in range(3)])  # nearest class mean
    pred = torch.cdist(xt.float().flatten(1), centroids.flatten(1)).argmin(1)
    assert (pred == yt).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------- mnist
def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 2048 + arr.ndim  # 0x08 = unsigned byte, then the number of dimensions
    dims = b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return magic.to_bytes(4, "big") + dims + arr.astype(np.uint8).tobytes()


def fake_mnist(folder: Path, n: int = 12, m: int = 5) -> dict[str, bytes]:
    """Four small gzip IDX files in `folder`; returns their bytes by file name."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (n, 28, 28)),
              "train-labels-idx1-ubyte.gz": np.arange(n) % 10,
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (m, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": np.arange(m) % 10}
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, arr in arrays.items():
        out[name] = gzip.compress(idx_bytes(arr), mtime=0)
        (folder / name).write_bytes(out[name])
    return out


def test_read_idx_checks(tmp_path: Path) -> None:
    good = tmp_path / "good.gz"
    good.write_bytes(gzip.compress(idx_bytes(np.arange(24).reshape(2, 3, 4))))
    assert vision.read_idx(good, 2051).tolist() == np.arange(24).reshape(2, 3, 4).tolist()
    with pytest.raises(UserError, match=r"good\.gz is not the expected IDX file: magic number 2051"):
        vision.read_idx(good, 2049)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(idx_bytes(np.arange(24).reshape(2, 3, 4))[:-5]))
    with pytest.raises(UserError, match=r"short\.gz is truncated.*delete"):
        vision.read_idx(short, 2051)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good.read_bytes()[:-10])  # truncated gzip stream
    with pytest.raises(UserError, match=r"cut\.gz is not a valid gzip file"):
        vision.read_idx(cut, 2051)
    raw = tmp_path / "plain.gz"
    raw.write_bytes(b"this is not gzip at all")
    with pytest.raises(UserError, match=r"plain\.gz is not a valid gzip file"):
        vision.read_idx(raw, 2051)


def test_mnist_fake_decode_cache_and_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             isolated: Path) -> None:
    blobs = fake_mnist(tmp_path / "data" / "mnist")
    monkeypatch.setattr(vision, "MNIST_MD5", {k: md5(v) for k, v in blobs.items()})
    d = load("mnist", data_dir=str(tmp_path / "data"), val_size=2)
    assert d.spec.input_shape == (1, 28, 28) and d.spec.classes[9] == "9"
    assert [len(x) for x, _ in xy(d).values()] == [10, 2, 5]
    x, y = xy(d)["test"]
    assert y.tolist() == [0, 1, 2, 3, 4] and x.shape == (5, 1, 28, 28)
    [cache] = decoded_files(isolated)
    read_idx = vision.read_idx
    monkeypatch.setattr(vision, "read_idx", None)  # a second load must not parse the files again
    again = load("mnist", data_dir=str(tmp_path / "data"), val_size=2)
    assert torch.equal(xy(again)["train"][0], xy(d)["train"][0])
    monkeypatch.setattr(vision, "read_idx", read_idx)
    cache.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")  # corrupt cache: deleted and rebuilt
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load("mnist", data_dir=str(tmp_path / "data"), val_size=2)
    assert torch.equal(xy(rebuilt)["val"][0], xy(d)["val"][0])
    assert files.load_decoded(cache) is not None


def test_mnist_corrupt_file_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            isolated: Path) -> None:
    blobs = fake_mnist(tmp_path / "mnist")
    monkeypatch.setattr(vision, "MNIST_MD5", {k: md5(v) for k, v in blobs.items()})
    bad = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(blobs[bad.name][:-20])
    with pytest.raises(UserError, match=rf"{bad}.*MD5.*delete"):  # checksum catches it first
        load("mnist", data_dir=str(tmp_path))
    monkeypatch.setattr(vision, "MNIST_MD5", {})  # verification off: the parser must catch it too
    with pytest.raises(UserError, match=rf"{bad} is not a valid gzip file"):
        load("mnist", data_dir=str(tmp_path))
    assert decoded_files(isolated) == []


def test_missing_files_lists_every_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          isolated: Path) -> None:
    monkeypatch.setenv("NNLAB_DATA", str(tmp_path / "env"))
    with pytest.raises(UserError) as e:
        load("mnist", data_dir=str(tmp_path / "explicit"), download=False)
    msg = str(e.value)
    for folder in (tmp_path / "explicit" / "mnist", tmp_path / "env" / "mnist", isolated / "mnist"):
        assert str(folder) in msg
    assert "train-images-idx3-ubyte.gz" in msg and "--data-dir" in msg and "NNLAB_DATA" in msg
    monkeypatch.setattr(vision, "MNIST_URLS", {k: [(tmp_path / "nowhere" / k).as_uri()]
                                               for k in vision.MNIST_MD5})
    with pytest.raises(UserError, match="download failed"):  # offline / unreachable
        load("mnist", data_dir=str(tmp_path / "explicit"))


def test_download_file_url_and_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        isolated: Path) -> None:
    blobs = fake_mnist(tmp_path / "server")
    urls = {k: [(tmp_path / "server" / k).as_uri()] for k in blobs}
    monkeypatch.setattr(vision, "MNIST_URLS", urls)
    monkeypatch.setattr(vision, "MNIST_MD5", {k: "0" * 32 for k in blobs})  # published MD5s do not match
    with pytest.raises(UserError, match="checksum mismatch") as e:
        load("mnist")
    assert str(isolated / "mnist") in str(e.value)
    assert list((isolated / "mnist").iterdir()) == []  # no partial or bad file left behind
    monkeypatch.setattr(vision, "MNIST_MD5", {k: md5(v) for k, v in blobs.items()})
    d = load("mnist", val_size=0)
    assert sorted(p.name for p in (isolated / "mnist").iterdir()) == sorted(blobs)
    assert len(xy(d)["train"][0]) == 12


# -------------------------------------------------------------------------------------------- cifar10
def cifar_pickle(obj: object) -> bytes:
    """Pickle like the original files: numpy >= 2 names numpy._core, the 2009 files numpy.core. Protocol 3
    keeps GLOBAL as text, so the module name can be rewritten in place."""
    return pickle.dumps(obj, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def fake_cifar(n: int = 4) -> tuple[dict[str, bytes], np.ndarray]:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (6 * n, 3072), dtype=np.uint8)
    blobs = {"batches.meta": cifar_pickle({b"label_names": [b"cat", b"dog", b"emu"], b"num_vis": 3072})}
    for i, m in enumerate(vision.CIFAR10_MEMBERS[:-1]):
        blobs[m] = cifar_pickle({b"batch_label": m.encode(), b"labels": [(i + j) % 3 for j in range(n)],
                                 b"data": data[i * n:(i + 1) * n]})
    return blobs, data


def write_tar(path: Path, blobs: dict[str, bytes], prefix: str = vision.CIFAR10_FOLDER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in blobs.items():
            info = tarfile.TarInfo(f"{prefix}/{name}" if prefix else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_cifar10_fake_archive_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         isolated: Path) -> None:
    blobs, data = fake_cifar()
    monkeypatch.setattr(vision, "CIFAR10_MD5", {k: md5(v) for k, v in blobs.items()})
    write_tar(tmp_path / "a" / "cifar10" / vision.CIFAR10_ARCHIVE, blobs)
    d = load("cifar10", data_dir=str(tmp_path / "a"), val_size=3)
    assert d.spec.classes == ["cat", "dog", "emu"] and d.spec.input_shape == (3, 32, 32)
    assert [len(x) for x, _ in xy(d).values()] == [17, 3, 4]
    xt, yt = xy(d)["test"]
    assert yt.tolist() == [2, 0, 1, 2]  # test_batch is member 5: labels (5 + j) % 3
    assert torch.equal(xt[1, 2], torch.from_numpy(data[21, 2048:].reshape(32, 32)))  # blue plane, row-major
    folder = tmp_path / "b" / "cifar10" / vision.CIFAR10_FOLDER  # already extracted layout
    folder.mkdir(parents=True)
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    for p in decoded_files(isolated):
        p.unlink()
    e = load("cifar10", data_dir=str(tmp_path / "b"), val_size=3)
    assert all(torch.equal(xy(e)[k][0], xy(d)[k][0]) for k in xy(d))
    blobs["data_batch_2"] = blobs["data_batch_2"][:-1] + b"!"  # one changed byte
    write_tar(tmp_path / "c" / "cifar10" / vision.CIFAR10_ARCHIVE, blobs)
    for p in decoded_files(isolated):
        p.unlink()
    with pytest.raises(UserError, match=r"data_batch_2 is corrupt.*MD5"):
        load("cifar10", data_dir=str(tmp_path / "c"))


def test_cifar10_truncated_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    monkeypatch.setattr(vision, "CIFAR10_MD5", {})
    archive = tmp_path / "cifar10" / vision.CIFAR10_ARCHIVE
    write_tar(archive, fake_cifar(n=50)[0])
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"{archive} is not a readable tar archive.*delete"):
        load("cifar10", data_dir=str(tmp_path))
    assert decoded_files(isolated) == []


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": Evil(marker)}, protocol=2)  # str key: no _codecs global before os.system
    with pytest.raises(UserError, match=r"system, which CIFAR data never needs"):
        vision.load_pickle(evil, "evil.pkl")
    assert not marker.exists()
    blobs = fake_cifar()[0]
    blobs["data_batch_3"] = evil  # also through the dataset, with its checksum "published"
    monkeypatch.setattr(vision, "CIFAR10_MD5", {k: md5(v) for k, v in blobs.items()})
    write_tar(tmp_path / "cifar10" / vision.CIFAR10_ARCHIVE, blobs)
    with pytest.raises(UserError, match=r"data_batch_3 is not a valid CIFAR pickle"):
        load("cifar10", data_dir=str(tmp_path))
    assert not marker.exists()
    with pytest.raises(UserError, match="_codecs.encode"):  # python-3 protocol-2 bytes are refused too
        vision.load_pickle(pickle.dumps(b"x", protocol=2), "p3.pkl")


# ------------------------------------------------------------------------------ extraction and saving
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_safe_extract_rejects(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        ok = tarfile.TarInfo("pkg/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        name = {"dotdot": "pkg/../../evil", "absolute": "/tmp/nnlab-evil"}.get(kind, "pkg/link")
        info = tarfile.TarInfo(name)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "pkg/ok.txt"
        elif kind == "device":
            info.type = tarfile.CHRTYPE
        info.size = 0 if kind in ("symlink", "hardlink", "device") else 4
        tar.addfile(info, io.BytesIO(b"evil") if info.size else None)
    with pytest.raises(UserError, match="refusing to extract"):
        files.safe_extract(archive, tmp_path / "out" / "dest")
    assert list((tmp_path / "out").iterdir()) == []  # nothing extracted, temp folder removed
    assert not (tmp_path / "evil").exists() and not Path("/tmp/nnlab-evil").exists()


def test_safe_extract_and_atomic_save(tmp_path: Path) -> None:
    archive = tmp_path / "good.tar.gz"
    write_tar(archive, {"a.txt": b"A", "sub/b.txt": b"B"}, prefix="pkg")
    dest = files.safe_extract(archive, tmp_path / "out")
    assert (dest / "pkg" / "sub" / "b.txt").read_bytes() == b"B"
    path = files.atomic_torch_save({"x": torch.arange(3)}, tmp_path / "c" / "t.pt")
    assert torch.load(path, weights_only=True)["x"].tolist() == [0, 1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["t.pt"]
    with pytest.raises(RuntimeError):
        files.atomic_write(tmp_path / "c" / "t.pt", lambda tmp: (_ for _ in ()).throw(RuntimeError("boom")))
    assert [p.name for p in path.parent.iterdir()] == ["t.pt"]  # old file intact, temp file gone


# ------------------------------------------------------------------------------------------ real data
# (`need_data` reads $NNLAB_DATA as the session starts: the `isolated` fixture clears it for each test)
def test_real_mnist() -> None:
    root = need_data("mnist", "train-images-idx3-ubyte.gz")
    d = load("mnist", data_dir=str(root), download=False)
    assert [len(x) for x, _ in xy(d).values()] == [55000, 5000, 10000]
    assert abs(d.spec.mean[0] - 0.1307) < 1e-3 and abs(d.spec.std[0] - 0.3081) < 1e-3
    assert torch.bincount(xy(d)["test"][1]).tolist()[:2] == [980, 1135]


def test_real_cifar10() -> None:
    root = need_data("cifar10", vision.CIFAR10_ARCHIVE)
    d = load("cifar10", data_dir=str(root), download=False, val_size=0)
    assert d.spec.classes[:3] == ["airplane", "automobile", "bird"]
    (x, y), (xt, yt) = xy(d)["train"], xy(d)["test"]
    assert x.shape == (50000, 3, 32, 32) and xt.shape == (10000, 3, 32, 32)
    assert torch.bincount(y).tolist() == [5000] * 10 and yt[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert abs(d.spec.mean[0] - 0.4914) < 1e-3 and abs(d.spec.std[2] - 0.2616) < 1e-3
    cached = load("cifar10", data_dir=str(root), download=False, val_size=0)  # from the decoded cache
    assert torch.equal(xy(cached)["test"][0], xt)
