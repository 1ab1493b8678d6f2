"""The on-disk artifact: `artifacts/<name>/manifest.json` is the runtime ABI (DESIGN.md decision 5).

Layout:
    manifest.json                 format version, recipe, model config, versions, target, KV spec,
                                  graphs (phase, file, inputs), weight map, special tokens, sha256s
    model/                        a loadable HF checkpoint: config.json, *.safetensors, tokenizer
    graphs/<phase>.pt2            AOTInductor packages (inductor) or exported programs (eager)
    graphs/constants.safetensors  graph constants the checkpoint does not hold (e.g. rotary tables)
    report/lint.json              the graph-mode constraint report
    report/verify.json            written by `graphgen verify` after the build, deliberately NOT in the
                                  sha256 set (a statement about the artifact, rewritten by each verify);
                                  it records the sha256 of the manifest it verified instead

Writes are atomic (built in a temp dir beside the target, then renamed into place). Loading checks
the format version, that every listed file exists, and its sha256; each refusal names the file and
says how to rebuild.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .spec import KVSpec

# 2: a graph may leave its LM head to the runtime (graphs.<phase>.head; outputs ["hidden"])
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: every graph returns logits
MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact that cannot be loaded; the message names the file and the fix."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def graphgen_source_hash() -> str:
    """Hash of graphgen's own source, part of the build key: changed code means a rebuild."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Manifest:
    """The parsed manifest. `data` is the JSON as written; the properties read the parts the
    runtime needs."""

    root: Path
    data: dict[str, Any]
    _check: _BackgroundCheck | None = field(default=None, repr=False, compare=False)

    @property
    def kv(self) -> KVSpec:
        return KVSpec.from_dict(self.data["kv"])

    @property
    def graphs(self) -> dict[str, dict[str, Any]]:
        return self.data["graphs"]

    @property
    def limits(self) -> dict[str, int]:
        return self.data["limits"]

    @property
    def special_tokens(self) -> dict[str, Any]:
        return self.data["special_tokens"]

    @property
    def model_dir(self) -> Path:
        return self.root / self.data["model_dir"]

    def path(self, rel: str) -> Path:
        return self.root / rel

    def wait_verified(self) -> None:
        """Wait for the checksums `read_manifest(..., weights_later=True)` left running; raises
        ArtifactError if a file did not match. No-op otherwise."""
        if self._check is not None:
            self._check.result()


class _BackgroundCheck:
    """sha256 of files checked in a thread (hashlib and file reads release the GIL)."""

    def __init__(self, paths: list[tuple[Path, str]], rebuild: str):
        self.error: ArtifactError | None = None
        self._thread = threading.Thread(target=self._run, args=(paths, rebuild), name="graphgen-checksums", daemon=True)
        self._thread.start()

    def _run(self, paths: list[tuple[Path, str]], rebuild: str) -> None:
        for path, digest in paths:
            try:
                _verify_file(path, digest, rebuild)
            except ArtifactError as e:
                self.error = e
                return
            except OSError as e:
                self.error = ArtifactError(f"{path}: cannot be read for its checksum ({e}); {rebuild}")
                return

    def result(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside `target`; on success it replaces `target` in one rename (the
    old artifact, if any, is removed only after the new one is in place)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(root: Path, data: dict[str, Any]) -> Manifest:
    """Add the sha256 of every file under root (but the manifest) and write manifest.json."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(root).as_posix()] = sha256_file(path)
    data = {"format_version": FORMAT_VERSION, **data, "files": files}
    (root / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return Manifest(root=root, data=data)


def _verify_file(path: Path, digest: str, rebuild: str) -> None:
    if sha256_file(path) != digest:
        raise ArtifactError(f"{path}: checksum mismatch (file changed or corrupt); {rebuild}")


def read_manifest(root: str | Path, *, verify: bool = True, weights_later: bool = False) -> Manifest:
    """Load and check an artifact's manifest. verify=True also checks every file's sha256.
    weights_later=True checks the .safetensors files (data, read by graphgen's own checked
    reader; never executed, unlike a graph's library) in a background thread instead, so a loader
    reads the weights while they are hashed; it must call `manifest.wait_verified()` before it
    trusts them."""
    root = Path(root)
    rebuild = "rebuild it with `graphgen compile <recipe> --force`"
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: no manifest; {root} is not a graphgen artifact ({rebuild})")
    try:
        data = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e}); {rebuild}") from None
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{mpath}: artifact format version {version!r}, this graphgen reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; {rebuild}"
        )
    for key in ("graphs", "kv", "files", "model_dir", "special_tokens", "limits"):
        if key not in data:
            raise ArtifactError(f"{mpath}: manifest has no '{key}' entry; {rebuild}")
    later = []
    for rel, digest in data["files"].items():
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing; {rebuild}")
        if verify and weights_later and path.suffix == ".safetensors":
            later.append((path, digest))
        elif verify:
            _verify_file(path, digest, rebuild)
    for phase, graph in data["graphs"].items():
        if graph["file"] not in data["files"]:
            raise ArtifactError(f"{mpath}: graph '{phase}' file {graph['file']} is not in the artifact; {rebuild}")
    return Manifest(root=root, data=data, _check=_BackgroundCheck(later, rebuild) if later else None)
