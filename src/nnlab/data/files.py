"""Data files: the one place that finds, downloads, verifies, extracts and caches them.

Every data root holds one folder per dataset, like `shared/data`: `<root>/mnist/train-images-idx3-ubyte.gz`,
`<root>/cifar10/cifar-10-python.tar.gz`. Roots are searched in this order: an explicit `data_dir`
(`--data-dir`), the `NNLAB_DATA` environment variable (one folder, or several joined by `os.pathsep`),
then the user cache `$XDG_CACHE_HOME/nnlab` (default `~/.cache/nnlab`), which is also where downloads go.
Decoded tensors are cached under `<user cache>/decoded/` so a dataset is parsed only once.
Every failure a user can fix is a `UserError` that names the file or folders and says how to fix it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import lzma
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..errors import UserError

ENV_VAR = "NNLAB_DATA"
DECODED = "decoded"  # folder under the user cache holding decoded tensors
# Exceptions that mean "this file is damaged" when reading gzip / xz / tar data (truncation is EOFError).
CORRUPT = (EOFError, zlib.error, tarfile.TarError, gzip.BadGzipFile, lzma.LZMAError)


def _file_mode() -> int:
    """Permissions for new files under the current umask (mkstemp alone would make them 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


def cache_root() -> Path:
    """The user cache: `$XDG_CACHE_HOME/nnlab`, or `~/.cache/nnlab`. Downloads go here."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "nnlab"


def data_roots(data_dir: str | None) -> list[Path]:
    """Data roots in look-up order: `data_dir`, then `NNLAB_DATA`, then the user cache (no duplicates)."""
    roots = [Path(data_dir).expanduser()] if data_dir else []
    roots += [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    roots.append(cache_root())
    unique: list[Path] = []
    for r in roots:
        if r not in unique:
            unique.append(r)
    return unique


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fix_hint(path: Path) -> str:
    """The standard advice for a damaged data file."""
    return (f"delete {path} and run again to download a fresh copy (or replace it with the canonical "
            f"file)")


def check_md5(path: Path, expected: str, got: str | None = None) -> None:
    """Raise UserError unless `path` (or the already computed digest `got`) has MD5 `expected`."""
    got = got or md5_file(path)
    if got != expected:
        raise UserError(f"{path} is corrupt or not the canonical file: MD5 {got}, expected {expected}; "
                        f"{fix_hint(path)}")


def find_files(dataset: str, names: Sequence[str], data_dir: str | None,
               urls: Mapping[str, Sequence[str]] | None = None, md5s: Mapping[str, str] | None = None,
               download: bool = True, *, or_names: Sequence[str] = ()) -> Path:
    """The folder `<root>/<dataset>` holding all of `names`, downloading missing ones into the cache.

    Within each root, `names` are looked for first, then `or_names` (an alternative layout that is never
    downloaded, e.g. an already extracted archive); the caller checks which one the folder holds.
    `urls` maps a file name to URLs tried in order; `md5s` holds the published MD5 of each download,
    which is checked while downloading (files found on disk are checked by the caller when it parses
    them, because only it knows which checksums apply, e.g. per archive member).
    """
    roots = data_roots(data_dir)
    for root in roots:
        for want in (names, or_names):
            if want and all((root / dataset / n).exists() for n in want):
                return root / dataset
    failures: list[str] = []
    can_download = bool(urls) and all(n in urls for n in names)
    if download and can_download:
        folder = cache_root() / dataset
        try:
            for n in names:
                if not (folder / n).exists():
                    _download_any(urls[n], folder / n, (md5s or {}).get(n))
            return folder
        except _DownloadFailed as e:
            failures = e.failures
    wanted = _describe(names) + (f" (or {_describe(or_names)})" if or_names else "")
    lines = [f"cannot find the {dataset} data files {wanted}", "searched these folders:"]
    lines += [f"  - {root / dataset}" for root in roots]
    if not download:
        lines.append("downloading is off (download: false)")
    elif not can_download:
        lines.append(f"{dataset} has no public download URL")
    else:
        lines += ["download failed:"] + [f"  - {f}" for f in failures]
    lines.append(f"fix: put the files in one of the folders above, or set --data-dir or {ENV_VAR} to a "
                 f"folder that holds {dataset}/<files>")
    raise UserError("\n".join(lines))


def _describe(names: Sequence[str]) -> str:
    """'a, b' or, when all names share one folder, 'folder/ holding a, b'."""
    parents = {PurePosixPath(n).parent for n in names}
    if len(parents) == 1 and (parent := parents.pop()) != PurePosixPath("."):
        return f"{parent}/ holding " + ", ".join(PurePosixPath(n).name for n in names)
    return ", ".join(names)


class _DownloadFailed(Exception):
    def __init__(self, failures: list[str]):
        super().__init__("; ".join(failures))
        self.failures = failures


def _download_any(urls: Sequence[str], dest: Path, md5: str | None) -> None:
    """Try each URL in turn; raise _DownloadFailed listing why each failed."""
    failures = []
    for url in urls:
        try:
            download_file(url, dest, md5)
            return
        except (OSError, UserError, ValueError) as e:  # URLError and HTTPError are OSErrors
            failures.append(f"{url}: {e}")
    raise _DownloadFailed(failures)


def download_file(url: str, dest: Path, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` with a progress bar on stderr: into a temp file that is checked
    against `md5` and then renamed. A failed or mismatching download leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    os.chmod(tmp, FILE_MODE)
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      file=sys.stderr, leave=False) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
        if md5 and h.hexdigest() != md5:
            raise UserError(f"checksum mismatch: MD5 {h.hexdigest()}, expected {md5}; the bad download "
                            f"was removed")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------------------------------------- tar
def check_member(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The member's safe relative path; UserError for absolute paths, `..`, links, devices and fifos."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or member.name.startswith("\\") or ".." in path.parts:
        raise UserError(f"{archive} holds an unsafe path '{member.name}'; refusing to extract it")
    if not (member.isdir() or (member.isfile() and path.parts)):
        raise UserError(f"{archive} holds '{member.name}', which is a link or special file; refusing to "
                        f"extract it")
    return path


@contextlib.contextmanager
def open_tar(archive: Path) -> Iterator[tarfile.TarFile]:
    """Open a (possibly compressed) tar archive; a damaged one raises UserError naming it and the fix."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            yield tar
    except CORRUPT as e:
        raise UserError(f"{archive} is not a readable tar archive ({type(e).__name__}: {e}); "
                        f"{fix_hint(archive)}") from e


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract `archive` into the folder `dest`, which must not exist yet.

    Only regular files and folders with relative paths inside `dest` are accepted (no absolute paths,
    no `..`, no symlinks/hardlinks/devices). Everything lands in a temp folder next to `dest` that is
    renamed into place at the end, so an interrupted or refused extraction leaves nothing behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        with open_tar(archive) as tar:
            for member in tar:
                rel = check_member(member, archive)
                target = tmp.joinpath(*rel.parts)
                if not target.resolve().is_relative_to(tmp.resolve()):  # belt and braces
                    raise UserError(f"{archive}: '{member.name}' would land outside {dest}")
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None  # regular files always have data
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # else another process finished the same extraction first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ------------------------------------------------------------------------------------- atomic writes
def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp file next to `path`, then rename it over `path` (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, FILE_MODE)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_torch_save(obj: object, path: Path) -> Path:
    """`torch.save` to a temp file, then rename (load it back with `torch.load(..., weights_only=True)`)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path,
                        metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors to a temp file, then rename."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ------------------------------------------------------------------------------------ decoded cache
def decoded_path(dataset: str, source_md5s: Mapping[str, str], version: int = 1) -> Path:
    """`<user cache>/decoded/<dataset>-<hash>.safetensors`; the hash covers the source files' MD5s
    and the decoder's `version`, so new sources or a changed decoder never read a stale cache."""
    key = json.dumps({"version": version, "md5": dict(sorted(source_md5s.items()))}, sort_keys=True)
    return cache_root() / DECODED / f"{dataset}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def load_decoded(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) from a decoded cache, or None when absent. A corrupt cache is deleted."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (OSError, ValueError, SafetensorError, RuntimeError) as e:
        drop_decoded(path, f"{type(e).__name__}: {e}")
        return None


def drop_decoded(path: Path, why: str) -> None:
    """Delete a bad decoded cache so it is rebuilt, with a warning."""
    warnings.warn(f"decoded data cache {path} is unreadable ({why}); deleting and rebuilding it",
                  stacklevel=2)
    path.unlink(missing_ok=True)


def save_decoded(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a decoded cache atomically; failure to write (e.g. read-only cache) only warns."""
    try:
        atomic_save_tensors(tensors, path, metadata)
    except OSError as e:
        warnings.warn(f"could not write the decoded data cache {path}: {e}", stacklevel=2)
