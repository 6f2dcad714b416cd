"""LoRA files: the rule for `loras[i].path`, downloads, the on-disk cache and the safetensors check.

A path is an http(s) URL or a bare file name found in `LORA_DIRS`. URLs go through the
Runpod SDK's SSRF-safe `safe_get`, as input images do, with their own caps (`LORA_MAX_MB`,
300 s). Only safetensors is accepted: its header (8-byte little-endian length, then JSON)
is checked on the first bytes, so a pickle is refused before the rest arrives and is never
opened; after the download the file's size must match what the header declares.

Downloads land in `LORA_CACHE_DIR` as `<sha256 of the whole URL>.safetensors`, written to a
temp file in the same folder and renamed into place, so two workers sharing a network volume
never see each other's half-written files. Each use touches the file's mtime; past
`LORA_CACHE_GB` the least recently used files are deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from src.inputs.downloads import Limits, stream, without_query
from src.runtime.errors import JobError
from src.runtime.gpu import Stop

log = logging.getLogger(__name__)

MAX_LORAS = 3
DOWNLOAD_SECONDS = 300.0
# Refused by name before any byte is fetched (patterns, as the weights' skip lists write them).
PICKLE_PATTERNS = ("*.ckpt", "*.pt", "*.bin", "*.pth", "*.pkl")
PICKLE_EXTENSIONS = tuple(pattern.removeprefix("*") for pattern in PICKLE_PATTERNS)
FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}\.safetensors", flags=re.ASCII)
LORA_PATH_RULE = (
    "an http(s) URL of a .safetensors LoRA (a download link without a file extension, like "
    "Civitai's, is fine too) or a bare file name like 'name.safetensors' from LORA_DIRS"
)
# A LoRA's header lists a few thousand tensors; a larger one is not a LoRA (or is hostile).
MAX_HEADER_BYTES = 16 * 1024 * 1024
_PARTIAL_MAX_AGE_S = 3600


def check_lora_path(path: str) -> str:
    """`path` if it is a URL or file name API.md allows; else ValueError saying why."""
    if len(path) > 4096:
        raise ValueError("it is over 4096 characters")
    if "://" in path:
        parts = urlsplit(path)
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError(f"the scheme {parts.scheme[:16]!r} is not allowed: use an http or https URL")
        if not parts.hostname:
            raise ValueError("the URL has no host")
        last = parts.path.rsplit("/", 1)[-1].lower()
        if last.endswith(PICKLE_EXTENSIONS):
            raise ValueError(_pickle_refusal())
        if "." in last and not last.endswith(".safetensors"):
            raise ValueError(
                f"a URL must name a .safetensors file (or have no file extension): {LORA_PATH_RULE}"
            )
        return path
    if "/" in path or "\\" in path:
        raise ValueError("path separators are not allowed: give a bare file name from LORA_DIRS")
    if ".." in path:
        raise ValueError("'..' is not allowed in a file name")
    if path.lower().endswith(PICKLE_EXTENSIONS):
        raise ValueError(_pickle_refusal())
    if not FILE_NAME.fullmatch(path):
        raise ValueError("a file name must be 'name.safetensors' (letters, digits, '.', '_', '-')")
    return path


def is_url(path: str) -> bool:
    return "://" in path


def shown_path(path: str) -> str:
    """A path as messages show it: a URL without its query (download tokens), cut when long."""
    shown = without_query(path) if is_url(path) else path
    return repr(shown if len(shown) <= 120 else shown[:117] + "...")


def _pickle_refusal() -> str:
    return (
        "pickle formats (.ckpt, .pt, .bin, .pth) are never loaded (they can run code): "
        "convert the LoRA to .safetensors"
    )


@dataclass(frozen=True)
class LoraFile:
    """A checked local safetensors file; `digest` is the sha256 of its bytes."""

    index: int
    path: Path
    digest: str

    @property
    def short(self) -> str:
        return self.digest[:12]


class LoraFiles:
    def __init__(self, dirs: tuple[str, ...], cache: Path, cache_gb: float, max_mb: int) -> None:
        self.dirs = [Path(folder) for folder in dirs]
        self.cache = cache
        self.cache_bytes = int(cache_gb * 1e9)
        self.max_bytes = max_mb * 1024 * 1024
        self._digests: dict[tuple[str, int, int, int], str] = {}
        self._url_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.downloads = 0  # URLs fetched over the network since start (tests and logs read it)

    def fetch(self, index: int, path: str, stop: Stop) -> LoraFile:
        """`loras[index]` as a checked local file: downloaded, from the cache, or from LORA_DIRS."""
        name = f"loras[{index}]"
        local = self._cached(index, path, stop) if is_url(path) else self._in_dirs(name, path)
        check_safetensors_file(name, local)
        return LoraFile(index, local, self._digest(local))

    def _in_dirs(self, name: str, file_name: str) -> Path:
        for folder in self.dirs:
            candidate = folder / file_name
            if candidate.is_file():
                return candidate
        looked = ", ".join(str(folder) for folder in self.dirs)
        raise JobError(f"{name}.path: {file_name!r} was not found in LORA_DIRS ({looked})")

    def _cached(self, index: int, url: str, stop: Stop) -> Path:
        key = hashlib.sha256(url.encode()).hexdigest()
        target = self.cache / f"{key}.safetensors"
        with self._lock:
            url_lock = self._url_locks.setdefault(key, threading.Lock())
        with url_lock:  # two jobs in flight with one URL download it once
            try:
                os.utime(target)  # the cache's least-recently-used clock
                log.info("loras[%d]: cache hit %s", index, key[:12])
                return target
            except FileNotFoundError:
                pass
            self.cache.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            self._download(index, url, target, stop)
            self.downloads += 1
            log.info(
                "loras[%d]: downloaded %s, %.1f MB in %.1f s",
                index,
                key[:12],
                target.stat().st_size / 1e6,
                time.monotonic() - started,
            )
        self._evict(keep=target)
        return target

    def _download(self, index: int, url: str, target: Path, stop: Stop) -> None:
        name = f"loras[{index}]"
        limits = Limits(
            self.max_bytes,
            DOWNLOAD_SECONDS,
            f"the LORA_MAX_MB cap of {self.max_bytes >> 20} MiB",
            30,
            1 << 20,
        )
        partial = target.with_name(f".{target.stem}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            # closing(): a refused header or a stop ends the download (and its socket) at once.
            with open(partial, "wb") as out, closing(stream(url, name, shown_path(url), limits)) as body:
                head = b""
                for chunk in body:
                    stop.check()
                    if head is not None:
                        head += chunk
                        if check_safetensors_head(name, head):
                            head = None  # the header is whole and valid
                    out.write(chunk)
                if head is not None:
                    raise JobError(
                        f"{name}: {shown_path(url)} is not a safetensors file (it ended inside its header)"
                    )
            check_safetensors_file(name, partial)
            os.replace(partial, target)  # atomic: readers see the old file or the whole new one
        finally:
            partial.unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        """Delete least recently used files past the budget; another worker's reader keeps its open file."""
        now = time.time()
        files = []
        for entry in os.scandir(self.cache):
            try:
                stat = entry.stat()
            except FileNotFoundError:  # deleted meanwhile by another worker on the volume
                continue
            if entry.name.endswith(".part"):
                if now - stat.st_mtime > _PARTIAL_MAX_AGE_S:  # left by a worker that died mid-download
                    Path(entry.path).unlink(missing_ok=True)
            elif entry.name.endswith(".safetensors"):
                files.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.cache_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size
                log.info("LoRA cache over %.1f GB: deleted %s", self.cache_bytes / 1e9, path.name[:12])

    def _digest(self, path: Path) -> str:
        """sha256 of the file, once per file version (the cache touches mtime: not part of the key)."""
        stat = path.stat()
        identity = (
            str(path),
            stat.st_ino,
            stat.st_size,
            0 if path.parent == self.cache else stat.st_mtime_ns,
        )
        digest = self._digests.get(identity)
        if digest is None:
            sha = hashlib.sha256()
            with open(path, "rb") as file:
                while block := file.read(1 << 22):
                    sha.update(block)
            digest = self._digests[identity] = sha.hexdigest()
        return digest


def check_safetensors_head(name: str, head: bytes) -> bool:
    """True once `head` holds a whole valid safetensors header; False while more bytes are needed.
    JobError as soon as the bytes cannot be one (a pickle or zip file is caught on its first bytes)."""
    if len(head) < 8:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    if not 2 <= length <= MAX_HEADER_BYTES or head[8:9] not in (b"{", b""):
        # torch.save writes a zip ("PK"); older torch and plain pickles start with protocol byte 0x80.
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise JobError(
                f"{name}: the file is a pickle (PyTorch .ckpt/.pt/.bin), not safetensors; {_pickle_refusal()}"
            )
        raise JobError(f"{name}: not a safetensors file (it does not start with a safetensors header)")
    if len(head) < 8 + length:
        return False
    _parse_header(name, head[8 : 8 + length])
    return True


def check_safetensors_file(name: str, path: Path) -> None:
    """The whole file: a valid header whose tensors end exactly at the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if not check_safetensors_head(name, head + file.read(min(MAX_HEADER_BYTES, max(0, size - 8)))):
            raise JobError(f"{name}: the safetensors file is truncated (it ends inside its header)")
        (length,) = struct.unpack("<Q", head)
        file.seek(8)
        header = _parse_header(name, file.read(length))
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        raise JobError(
            f"{name}: the safetensors file is truncated or damaged ({size} bytes, its header says {expected})"
        )


def _parse_header(name: str, raw: bytes) -> dict:
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
        for key, entry in header.items():
            if key != "__metadata__":
                begin, end = entry["data_offsets"]
                if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                    raise ValueError
    except (ValueError, KeyError, TypeError):
        raise JobError(f"{name}: not a safetensors file (its header is not valid safetensors JSON)") from None
    return header
