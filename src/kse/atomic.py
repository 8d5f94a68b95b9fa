"""Atomic file writing: write to a temporary file beside the target, then rename.

A crash or an error half-way never leaves a half-written file under the final name. The file
is flushed to disk (fsync) before the rename and the folder after it, so that after a power
loss the target is the old file or the new one, complete. A temporary file left behind by a
killed writer (``.NAME.HOST-PID.XXXXXXXX.tmp``) is removed by the next write of the same
target, once no process of that id runs on this host.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Union

# this host in temporary names: on a folder shared between machines, a writer only ever
# removes the leftovers of its own host's processes
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


@contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success flush it to disk and rename
    it onto ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        # mkstemp creates 0600, and some writers (safetensors) recreate the file: set the usual
        # permissions once it is written
        os.chmod(tmp, 0o666 & ~umask)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # about the target, not the temporary name
            raise _naming(exc, path) from None
        raise


def remove_stale_temporaries(path: Union[str, Path]) -> list:
    """Remove the temporary files of ``path`` whose writer was killed (its process no longer
    runs on this host); returns their paths. Those of running writers are left alone."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_HOST}-(\d+)\.[A-Za-z0-9_]+\.tmp")
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match and not _running(int(match.group(1))):
            try:
                os.unlink(path.parent / name)
                removed.append(path.parent / name)
            except FileNotFoundError:  # another writer removed it first
                pass
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or unknown: keep its file
    return True


def _fsync(file: Union[str, Path]) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Flush the folder entry of the renamed file; where a file system cannot fsync a folder
    (EINVAL and similar), there is nothing more to do."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` as the same kind of error, its message naming the file being written."""
    reason = exc.strerror or str(exc)
    return type(exc)(exc.errno, f"cannot write {path}: {reason}") if exc.errno else type(exc)(
        f"cannot write {path}: {reason}")


def write_text(path: Union[str, Path], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_safetensors(tensors: Dict[str, "torch.Tensor"], path: Union[str, Path], metadata: Dict[str, str]) -> None:
    """``safetensors.torch.save_file``, atomically; a failed write (a full disk) is the
    ``OSError`` it is, naming ``path``, rather than safetensors' own exception type."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:
            found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(exc))
            if found is None:
                raise
            raise OSError(int(found.group(2)), found.group(1)) from None
