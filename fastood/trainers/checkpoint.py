"""Checkpoint files that are written safely, verified on load, and never hold a broken model.

A checkpoint is an ordinary ``torch.save`` file (a zip archive), so ``torch.load(path)`` still opens it. Writing:

1. the state is checked finite (parameters, buffers, optimizer state): a model that went to inf/NaN must not
   replace the last good checkpoint (:class:`NonFiniteStateError` names the tensor);
2. it is written to ``PATH.tmp``, a SHA-256 of the archive is stored in the zip's archive comment
   (``fastood-sha256:<hex>``), the file is fsynced, renamed over ``PATH`` and the directory fsynced, so a crash
   or a power loss leaves either the old or the new checkpoint, never a mix;
3. any failure (permission, disk full, ...) removes ``PATH.tmp`` and raises :class:`CheckpointError` naming the
   file and the cause.

Loading verifies the checksum first: a truncated, overwritten or bit-flipped file is a :class:`CheckpointError`
naming the file, never a silent load or a bare ``EOFError``/``UnpicklingError``. Files without the comment
(written by fastood before checksums) load unverified.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil

import torch

__all__ = ["CheckpointError", "NonFiniteStateError", "check_writable", "save_checkpoint_file",
           "load_checkpoint_file", "first_non_finite"]

_EOCD = b"PK\x05\x06"          # zip end-of-central-directory signature; the record is 22 bytes + comment
_EOCD_SIZE = 22
_TAG = b"fastood-sha256:"
_COMMENT_SIZE = len(_TAG) + 64  # hex digest
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the cause."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class NonFiniteStateError(FloatingPointError):
    """The trainer's state holds inf/NaN: it was not saved (the previous checkpoint is kept)."""

    def __init__(self, message: str, tensor_name: str):
        super().__init__(message)
        self.tensor_name = tensor_name


def _cause(exc: BaseException, directory=None) -> str:
    """A short human reason for an I/O failure."""
    if isinstance(exc, OSError) and exc.errno is not None:
        reason = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.ENOENT: "no such file or directory"}.get(exc.errno)
        if reason:
            return reason
    text = str(exc) or type(exc).__name__
    if directory is not None:  # torch's own writer reports a full disk as "unexpected pos ..."
        try:
            free = shutil.disk_usage(directory).free
            text += f" (free space on its disk: {free / 2 ** 20:.1f} MiB)"
        except OSError:
            pass
    return text


def check_writable(directory) -> None:
    """Create ``directory`` if needed and check a file can be written there (before any training starts).

    Raises :class:`CheckpointError` naming the directory and the cause."""
    directory = os.fspath(directory)
    probe = os.path.join(directory, f".fastood-write-test-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as exc:
        raise CheckpointError(f"checkpoint directory {directory} is not writable: {_cause(exc)}", directory) from exc


def first_non_finite(named_tensors):
    """The first ``(name, tensor)`` whose floating or complex values are not all finite, or None.

    One host synchronization per device (not one per tensor): the check runs before every checkpoint write."""
    checked = [(name, value, torch.isfinite(value).all()) for name, value in named_tensors
               if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
               and value.numel() > 0]
    by_device = {}
    for _, _, ok in checked:
        by_device.setdefault(ok.device, []).append(ok)
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return None
    for name, value, ok in checked:
        if not bool(ok):
            return name, value
    return None


def describe_non_finite(value: torch.Tensor) -> str:
    v = value.detach()
    nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
    parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} inf"] if inf else [])
    return f"{' and '.join(parts)} of {v.numel()} values"


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(f, length: int) -> str:
    f.seek(0)
    digest, left = hashlib.sha256(), length
    while left > 0:
        block = f.read(min(_CHUNK, left))
        if not block:
            raise EOFError(f"file ended {left} bytes early")
        digest.update(block)
        left -= len(block)
    return digest.hexdigest()


def save_checkpoint_file(state: dict, path) -> None:
    """Write ``state`` to ``path`` atomically with a checksum (see the module doc).

    Raises :class:`CheckpointError` naming ``path`` and the cause; ``path + ".tmp"`` is removed on failure and
    an existing ``path`` is left untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = path + ".tmp"
    try:
        with open(tmp, "w+b") as f:
            torch.save(state, f)
            f.flush()
            size = f.seek(0, os.SEEK_END)
            f.seek(size - _EOCD_SIZE)
            eocd = f.read(_EOCD_SIZE)
            if eocd[:4] != _EOCD or eocd[-2:] != b"\x00\x00":
                raise CheckpointError(f"could not write checkpoint {path}: torch.save wrote no plain zip archive",
                                      path)
            # The digest covers everything but the comment-length field, which is written after it.
            digest = _sha256(f, size - 2)
            f.seek(size - 2)
            f.write(_COMMENT_SIZE.to_bytes(2, "little") + _TAG + digest.encode("ascii"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(directory)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, CheckpointError) or not isinstance(exc, Exception):
            raise
        raise CheckpointError(f"could not write checkpoint {path}: {_cause(exc, directory)}", path) from exc


def verify_checkpoint_file(path) -> bool:
    """Check the stored SHA-256 of ``path``. Returns True when verified, False for a file without a checksum
    (written before checksums existed); raises :class:`CheckpointError` when the file is damaged."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            tail_start = size - _EOCD_SIZE - _COMMENT_SIZE
            if tail_start >= 0:
                f.seek(tail_start)
                tail = f.read()
                comment = tail[_EOCD_SIZE:]
                if tail[:4] == _EOCD and comment.startswith(_TAG):
                    stored = comment[len(_TAG):].decode("ascii", "replace")
                    if int.from_bytes(tail[_EOCD_SIZE - 2:_EOCD_SIZE], "little") != _COMMENT_SIZE:
                        raise CheckpointError(f"checkpoint {path} is corrupt: its zip trailer is damaged", path)
                    actual = _sha256(f, tail_start + _EOCD_SIZE - 2)
                    if actual != stored:
                        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 checksum does not match "
                                              "(the file was modified or damaged after it was written)", path)
                    return True
            if size >= _EOCD_SIZE:
                f.seek(size - _EOCD_SIZE)
                last = f.read()
                if last[:4] == _EOCD and last[-2:] == b"\x00\x00":
                    return False  # an intact-looking archive written without a checksum
            f.seek(max(0, size - 4096))
            if _TAG in f.read():
                raise CheckpointError(f"checkpoint {path} is corrupt: its checksum trailer is damaged", path)
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({size} bytes): no zip archive end "
                                  "record", path)
    except OSError as exc:
        raise CheckpointError(f"could not read checkpoint {path}: {_cause(exc)}", path) from exc


def load_checkpoint_file(path, map_location=None) -> dict:
    """Verify and load a checkpoint written by :func:`save_checkpoint_file` (or by ``torch.save``).

    Raises :class:`CheckpointError` naming ``path`` and the cause (unreadable, damaged, not a checkpoint)."""
    path = os.fspath(path)
    verify_checkpoint_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except OSError as exc:
        raise CheckpointError(f"could not read checkpoint {path}: {_cause(exc)}", path) from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint: {type(exc).__name__}: {exc}",
                              path) from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a fastood trainer checkpoint (no 'model' entry)", path)
    return state
