"""Just-in-time checkpoints: atomic torch.distributed.checkpoint (DCP) directories.

When a job cannot continue in place, its healthy ranks call :func:`write` at the failure.
Data-parallel replicas hold identical state, so the tensors are split among the writer
ranks by a greedy balance of bytes; each writer saves its part with DCP's
``FileSystemWriter`` (``no_dist``) into ``<staging>/shard-<rank>/``. One coordinator (the
lowest writer rank) waits, through the job's store, until every writer reported its
files (size and sha256), merges the writers' DCP metadata into one top-level
``.metadata`` (so the directory is a single DCP checkpoint: ``dcp.load`` reads it), writes
the manifest ``mnemosyne-ckpt.json`` last, fsyncs, and renames the staging directory
``<dir>.tmp-<id>`` to ``<dir>`` in one ``rename(2)``, then fsyncs the parent. A crash at
any point leaves either no ``<dir>`` or a complete one.

Non-tensor values (step counters, learning rates, param groups) live in the manifest's
JSON skeleton, not in DCP, so nothing but DCP's own ``.metadata`` is ever pickled; the
data files are read by DCP with ``torch.load(weights_only=True)``. Checkpoints are trusted
local files: :func:`load` checks the sha256 of every file, ``.metadata`` included, against
the manifest before DCP reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mnemosyne.core.errors import ConfigError, CorruptStateError, StateError, StoreTimeout
from mnemosyne.core.store import Store
from mnemosyne.jit.__about__ import __version__
from mnemosyne.jit._ckpt_io import describe_files as _describe_files
from mnemosyne.jit._ckpt_io import fsync_path as _fsync_path
from mnemosyne.jit._ckpt_io import published, wait_keys
from mnemosyne.jit._ckpt_io import sha256 as _sha256
from mnemosyne.jit._ckpt_io import size_mismatch as _size_mismatch
from mnemosyne.jit._state import TensorSpec, assign_stripes, rebuild, skeleton, spec_of

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "CkptEntry",
    "VerifyReport",
    "checkpoint_name",
    "latest",
    "list_checkpoints",
    "load",
    "read_manifest",
    "remove_staging",
    "verify",
    "write",
]

logger = logging.getLogger(__name__)

#: Name of the manifest file, written last inside the staging directory.
MANIFEST = "mnemosyne-ckpt.json"
#: Value of the manifest's ``format`` field.
FORMAT = "mnemosyne-jit-ckpt"
#: Version of the layout described here; readers refuse other versions.
FORMAT_VERSION = 1
#: Marker between a checkpoint's name and the id of one of its staging directories.
STAGING_MARK = ".tmp-"
_DCP_METADATA = ".metadata"


def checkpoint_name(step: int) -> str:
    """Conventional directory name of the checkpoint taken at ``step`` (``step-00000042``)."""
    return f"step-{step:08d}"


# ----------------------------------------------------------------- state <-> named tensors
def _named(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON skeleton of ``obj``: tensors become ``{"T": name}`` and land in ``tensors``."""

    def name_of(t: torch.Tensor, at: str) -> str:
        name = at.removeprefix("/") or "<root>"  # checkpoint keys read "model/layer.weight"
        if name in tensors:
            msg = f"state: two tensors map to the checkpoint key {name!r}"
            raise StateError(msg)
        tensors[name] = t
        return name

    return skeleton(obj, name_of, path, use="checkpointed")


def _rebuild(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    return rebuild(skel, lambda ref: tensors[ref], CorruptStateError)


# ----------------------------------------------------------------- write
def write(path: str | os.PathLike[str], state: Any, *, step: int, rank: int, world_size: int, store: Store,
          writer_ranks: Sequence[int] | None = None, meta: dict[str, Any] | None = None, timeout: float = 300.0,
          progress: Callable[[str], None] | None = None) -> Path:
    """Write ``state`` as the checkpoint directory ``path``; call on every writer rank.

    Call order: every rank in ``writer_ranks`` calls ``write`` with identical ``state``
    (replicas), the same ``path``, ``step`` and ``writer_ranks``, and a store view private
    to this checkpoint attempt (e.g. ``store.prefixed(f"ckpt/{epoch}")``). Each writer
    saves a disjoint, byte-balanced subset of the tensors; the lowest writer rank commits.
    Every writer returns once the checkpoint is committed.

    Args:
        path: Final directory (e.g. ``root / checkpoint_name(step)``); must not exist.
        state: Nested dicts/lists/tuples of tensors and JSON scalars (model, optimizer,
            scheduler, extra state), identical on every writer.
        step: The last committed step the state reflects; resume at ``step + 1``.
        rank: This process's rank (must be in ``writer_ranks``).
        world_size: Size of the job that took the checkpoint (recorded).
        store: Store view shared by the writers of this checkpoint only.
        writer_ranks: Ranks sharing the writing; default every rank of ``world_size``.
        meta: Extra JSON-able information recorded in the manifest (e.g. seed, epoch).
        timeout: Bound, in seconds, of every wait on another writer.
        progress: Called with ``"shard"`` (this writer's files are on disk, not yet
            reported), ``"manifest"`` (coordinator: merged metadata written, manifest next)
            and ``"committed"``; a hook for tests and logs.

    Returns:
        The committed checkpoint directory.

    Raises:
        StateError: ``path`` exists, ``rank`` is not a writer, or ``state`` holds a value
            that cannot be checkpointed.
        StoreTimeout: A writer did not report within ``timeout`` (nothing is committed;
            the staging directory stays, listed as incomplete).
        MultiRankError: This writer or another failed (an ``OSError`` while saving or
            syncing, DCP's ``finish``...): every writer raises it within a poll of the
            failure, naming each failed rank and its error; nothing is committed.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    final = Path(path)
    writers = sorted(set(range(world_size) if writer_ranks is None else writer_ranks))
    if rank not in writers:
        msg = f"checkpoint {final}: rank {rank} is not among the writer ranks {writers}"
        raise StateError(msg)
    if final.exists():
        msg = f"checkpoint {final} already exists; refusing to overwrite it"
        raise StateError(msg)
    note = progress or (lambda _: None)
    # Keys under the checkpoint's name (two checkpoints sharing a view never mix); failures in the
    # attempt's view, where the agent publishes a dead writer's (_ckpt_io.publish_exit).
    fails, store = store, store.prefixed(f"ckpt/{final.name}")
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _named(state, tensors, "")
    names = sorted(tensors)
    specs = [spec_of(tensors[n]) for n in names]
    owner = dict(zip(names, assign_stripes(specs, writers), strict=True))
    what = f"checkpoint {final}"
    with published(fails, rank, writers, what):
        # The first writer to arrive names the staging directory; the others adopt its id.
        sid = store.compare_set("id", b"", uuid.uuid4().hex[:12].encode()).decode()
        staging = final.with_name(f"{final.name}{STAGING_MARK}{sid}")
        # Model and optimizer state: owner-only. The files DCP writes inside follow the umask,
        # but nobody else can enter a 0700 directory (the final one keeps the mode on rename).
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging.mkdir(exist_ok=True, mode=0o700)
        sub = f"shard-{rank:05d}"
        mine = {n: tensors[n].detach() for n in names if owner[n] == rank}
        if mine:
            with warnings.catch_warnings():  # no_dist is deliberate: the store is our barrier
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled", category=UserWarning)
                dcp_save(mine, storage_writer=FileSystemWriter(staging / sub, sync_files=True), no_dist=True)
        files = _describe_files(staging, sub) if mine else {}
        note("shard")
        store.set(f"done/{rank}", json.dumps({"files": files}).encode())
    coordinator = writers[0]
    if rank == coordinator:
        _commit(final, staging, (store, fails), writers, names, specs, owner, skeleton, step, world_size, meta,
                timeout, note)
    else:
        # The coordinator may spend ``timeout`` waiting for the last writer, then merge
        # and hash: wait for its verdict twice as long plus slack (a failure, published
        # by whichever writer hit it, ends the wait at once).
        wait_keys(store, ["committed"], writers, 2 * timeout + 30.0, what, fails)
        got = store.get("committed", 5.0).decode()
        if got != "ok":
            msg = f"checkpoint {final}: the coordinator (rank {coordinator}) failed to commit: {got}"
            raise StateError(msg)
    note("committed")
    return final


def _commit(final: Path, staging: Path, stores: tuple[Store, Store], writers: list[int], names: list[str],
            specs: list[TensorSpec], owner: dict[str, int], skeleton: Any, step: int, world_size: int,
            meta: dict[str, Any] | None, timeout: float, note: Callable[[str], None]) -> None:
    store, fails = stores
    try:
        wait_keys(store, [f"done/{r}" for r in writers], writers, timeout, f"checkpoint {final}", fails)
    except StoreTimeout as exc:
        missing = [r for r in writers if not store.check([f"done/{r}"])]
        store.set("committed", f"writers {missing} did not report".encode())
        msg = f"checkpoint {final}: writer ranks {missing} did not report within {timeout} s; not committed"
        raise StoreTimeout(msg) from exc
    with published(fails, writers[0], writers, f"checkpoint {final}"):
        _merge_and_rename(final, staging, store, writers, names, specs, owner, skeleton, step, world_size, meta,
                          timeout, note)


def _merge_and_rename(final: Path, staging: Path, store: Store, writers: list[int], names: list[str],
                      specs: list[TensorSpec], owner: dict[str, int], skeleton: Any, step: int, world_size: int,
                      meta: dict[str, Any] | None, timeout: float, note: Callable[[str], None]) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.storage import WriteResult

    files: dict[str, dict[str, Any]] = {}
    merged = Metadata(state_dict_metadata={}, planner_data={}, storage_data={})
    results = []
    for r in writers:
        files.update(json.loads(store.get(f"done/{r}", timeout))["files"])
        sub = staging / f"shard-{r:05d}"
        if not (sub / _DCP_METADATA).exists():
            continue
        # Our own writers' metadata, written seconds ago to this directory (trusted).
        part = FileSystemReader(sub).read_metadata()
        merged.state_dict_metadata.update(part.state_dict_metadata)
        if isinstance(part.planner_data, dict):
            merged.planner_data.update(part.planner_data)
        for idx, info in part.storage_data.items():
            moved = dataclasses.replace(info, relative_path=f"{sub.name}/{info.relative_path}")
            results.append(WriteResult(index=idx, size_in_bytes=info.length, storage_data=moved))
        (sub / _DCP_METADATA).unlink()
        files.pop(f"{sub.name}/{_DCP_METADATA}", None)
    # FileSystemWriter.finish serialises the merged metadata exactly as dcp.save would.
    FileSystemWriter(staging, sync_files=True).finish(merged, [results])
    files[_DCP_METADATA] = {"size": (staging / _DCP_METADATA).stat().st_size,
                            "sha256": _sha256(staging / _DCP_METADATA)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mnemosyne_version": __version__,
        "torch_version": torch.__version__,
        "step": step,
        "world_size": world_size,
        "writer_ranks": writers,
        "created": time.time(),
        "meta": meta or {},
        "keys": {n: {"dtype": s.dtype, "shape": list(s.shape), "owner": owner[n]}
                 for n, s in zip(names, specs, strict=True)},
        "files": dict(sorted(files.items())),
        "skeleton": skeleton,
    }
    note("manifest")
    with (staging / MANIFEST).open("w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted({(staging / rel).parent for rel in files}):
        _fsync_path(d)
    _fsync_path(staging)
    if final.exists():
        store.set("committed", f"{final} appeared meanwhile".encode())
        msg = f"checkpoint {final} appeared while it was being written; left {staging} uncommitted"
        raise StateError(msg)
    os.rename(staging, final)  # the commit point
    _fsync_path(final.parent)
    store.set("committed", b"ok")
    logger.info("checkpoint of step %d committed at %s (%d files, %d writers)", step, final, len(files), len(writers))


# ----------------------------------------------------------------- verify / load
@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify` checked."""

    path: Path
    step: int
    world_size: int
    files: int
    bytes: int
    keys: int
    manifest: dict[str, Any]


def _corrupt(path: Path, what: str) -> CorruptStateError:
    return CorruptStateError(f"checkpoint {path}: {what}")


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and check the manifest of a checkpoint (no data file is read).

    Raises:
        CorruptStateError: Missing, unparsable or not of this format and version.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise _corrupt(path, "not a directory")
    if not mpath.is_file():
        raise _corrupt(path, f"manifest {MANIFEST} is missing (an incomplete or foreign checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"manifest {MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise _corrupt(path, f"manifest {MANIFEST}: expected a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise _corrupt(path, f"manifest {MANIFEST}: expected format {FORMAT!r} version {FORMAT_VERSION}, found "
                             f"{manifest.get('format')!r} version {manifest.get('format_version')!r}")
    fields = {"step": int, "world_size": int, "keys": dict, "files": dict, "writer_ranks": list}
    for name, typ in fields.items():
        if not isinstance(manifest.get(name), typ):
            raise _corrupt(path, f"manifest {MANIFEST}: field {name!r} missing or not a {typ.__name__}")
    if "skeleton" not in manifest:
        raise _corrupt(path, f"manifest {MANIFEST}: field 'skeleton' missing")
    return manifest


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Check a checkpoint completely before anything reads its data.

    Checks: manifest present and well formed; every listed file present with the listed
    size and sha256; DCP metadata readable (after its hash matched); every key of the
    manifest in the DCP metadata with the same shape and dtype, stored in listed files.

    Raises:
        CorruptStateError: Naming the file and what was expected vs found.
    """
    root = Path(path)
    manifest = read_manifest(root)
    try:
        return _verify(root, manifest)
    except (KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(root, f"manifest {MANIFEST} is malformed: {type(exc).__name__}: {exc}") from None


def _verify(root: Path, manifest: dict[str, Any]) -> VerifyReport:
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    files = manifest["files"]
    if _DCP_METADATA not in files:
        raise _corrupt(root, f"manifest lists no DCP {_DCP_METADATA} file")
    total = 0
    for rel, info in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise _corrupt(root, f"manifest lists file {rel!r} outside the checkpoint directory")
        p = root / rel
        if not p.is_file():
            raise _corrupt(root, f"file {rel} is missing (expected {info['size']} bytes)")
        size = p.stat().st_size
        if size != info["size"]:
            raise _corrupt(root, f"file {rel} is {size} bytes, expected {info['size']} (truncated or overwritten)")
        digest = _sha256(p)
        if digest != info["sha256"]:
            raise _corrupt(root, f"file {rel} has sha256 {digest}, expected {info['sha256']} (corrupted)")
        total += size
    try:
        md = FileSystemReader(root).read_metadata()
    except Exception as exc:  # hash matched, so this is a torch version mismatch or a bad writer
        raise _corrupt(root, f"DCP {_DCP_METADATA} is unreadable: {type(exc).__name__}: {exc}") from None
    for name, want in manifest["keys"].items():
        got = md.state_dict_metadata.get(name)
        if not isinstance(got, TensorStorageMetadata):
            raise _corrupt(root, f"key {name!r} of the manifest is not a tensor in DCP {_DCP_METADATA}")
        dtype = str(got.properties.dtype).removeprefix("torch.")
        if list(got.size) != want["shape"] or dtype != want["dtype"]:
            raise _corrupt(root, f"key {name!r}: manifest says {want['dtype']}{want['shape']}, DCP metadata "
                                 f"says {dtype}{list(got.size)}")
    extra = sorted(set(md.state_dict_metadata) - set(manifest["keys"]))
    if extra:
        raise _corrupt(root, f"DCP {_DCP_METADATA} holds keys the manifest does not list: {extra[:5]}")
    for idx, info in md.storage_data.items():
        if info.relative_path not in files:
            raise _corrupt(root, f"DCP data of {idx.fqn!r} is in {info.relative_path}, a file the manifest "
                                 "does not list")
        if info.offset + info.length > files[info.relative_path]["size"]:
            raise _corrupt(root, f"DCP data of {idx.fqn!r} extends past the end of {info.relative_path}")
    return VerifyReport(root, manifest["step"], manifest["world_size"], len(files), total, len(manifest["keys"]),
                        manifest)


def load(path: str | os.PathLike[str], template: Any = None) -> tuple[Any, dict[str, Any]]:
    """Verify the checkpoint, then read it back.

    Args:
        path: A committed checkpoint directory.
        template: Optional state of the same structure (e.g. the freshly built
            ``{"model": model.state_dict(), ...}``): tensors found at the same key with
            the same shape and dtype are filled in place (on their device); every other
            tensor is allocated on the CPU.

    Returns:
        The state as written (same nesting, scalars and tensors, bit for bit) and the
        manifest (``step``, ``world_size``, ``meta``...).

    Raises:
        CorruptStateError: The checkpoint is truncated, corrupted or incomplete (see
            :func:`verify`); nothing was read into ``template``.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    from mnemosyne.jit._state import _dtype

    report = verify(path)
    manifest = report.manifest
    given: dict[str, torch.Tensor] = {}
    if template is not None:
        _named(template, given, "")
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in manifest["keys"].items():
        t = given.get(name)
        if t is not None and list(t.shape) == spec["shape"] and spec_of(t).dtype == spec["dtype"]:
            tensors[name] = t
        else:
            tensors[name] = torch.empty(spec["shape"], dtype=_dtype(spec["dtype"]))
    if tensors:
        with warnings.catch_warnings():  # single-process read by design
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled", category=UserWarning)
            dcp_load(tensors, storage_reader=FileSystemReader(report.path), no_dist=True)
    try:
        state = _rebuild(manifest["skeleton"], tensors)
    except KeyError as exc:
        raise _corrupt(report.path, f"skeleton names tensor {exc} that the manifest does not list") from None
    return state, manifest


# ----------------------------------------------------------------- listing
@dataclasses.dataclass
class CkptEntry:
    """One directory found by :func:`list_checkpoints`."""

    path: Path
    complete: bool
    step: int | None = None
    world_size: int | None = None
    bytes: int = 0
    note: str = ""


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_checkpoints(root: str | os.PathLike[str]) -> list[CkptEntry]:
    """Checkpoints under ``root`` (or ``root`` itself), complete ones and staging leftovers.

    A directory is complete when its manifest parses and every file it lists is there with
    the listed size (the full check, hashes included, is :func:`verify`);
    ``<name>.tmp-<id>`` directories are interrupted writes, never read by :func:`load`.
    """
    base = Path(root)
    if not base.is_dir():
        msg = f"checkpoint directory {base} does not exist or is not a directory"
        raise ConfigError(msg)
    cands = [base] if (base / MANIFEST).exists() else sorted(p for p in base.iterdir() if p.is_dir())
    out = []
    for p in cands:
        if STAGING_MARK in p.name:
            out.append(CkptEntry(p, False, bytes=_du(p), note="staging leftover of an interrupted write"))
            continue
        if not (p / MANIFEST).exists():
            if (p / _DCP_METADATA).exists():
                out.append(CkptEntry(p, False, bytes=_du(p), note=f"no {MANIFEST}"))
            continue
        try:
            m = read_manifest(p)
        except CorruptStateError as exc:
            out.append(CkptEntry(p, False, bytes=_du(p), note=str(exc)))
            continue
        size = sum(int(f.get("size", 0)) if isinstance(f, dict) else 0 for f in m["files"].values())
        bad = _size_mismatch(p, m["files"])
        if bad:
            out.append(CkptEntry(p, False, m["step"], m["world_size"], _du(p), note=bad))
            continue
        out.append(CkptEntry(p, True, m["step"], m["world_size"], size))
    return out


def latest(root: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (or ``root`` itself), if any.

    Only the manifest is read; call :func:`load` (which verifies everything) on the result.
    """
    done = [e for e in list_checkpoints(root) if e.complete and e.step is not None]
    return max(done, key=lambda e: (e.step, e.path.name)).path if done else None


def remove_staging(root: str | os.PathLike[str]) -> list[Path]:
    """Delete the staging leftovers under ``root``; return what was removed."""
    gone = []
    for e in list_checkpoints(root):
        if not e.complete and STAGING_MARK in e.path.name:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(e.path)
            gone.append(e.path)
    return gone
