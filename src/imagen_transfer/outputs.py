"""Where the tool writes: checked before any work starts, and never at the cost of a user's files.

Rules (issue #18): a command writes only into a path that does not exist, an empty folder, or (with an explicit
`--overwrite`) a folder that holds nothing but what this tool wrote there before. Files are written beside their
final name and renamed into place, so a crash leaves either the old output or the new one. A run folder is locked
while one process writes it, so two runs cannot interleave their checkpoints.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: run folders are not locked there
    fcntl = None


def check_output_dir(out: Path, *, what: str, overwrite: bool = False,
                     is_ours: Callable[[Path], bool] | None = None) -> None:
    """Refuse (before any work) an output folder that would cost the user files: an existing file, a non-empty
    folder that is not ours, or one of ours without `overwrite`. Creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        ours = is_ours is not None and is_ours(out)
        if not ours:
            raise UserError(f"--out {out} is a folder that holds files this tool did not write; choose another "
                            f"--out (nothing was changed)")
        if not overwrite:
            raise UserError(f"--out {out} already holds a {what}; pass --overwrite to replace it, or choose another "
                            "--out")
    check_writable_dir(out)  # out itself, or the nearest folder above it that exists


def check_writable_dir(folder: Path, target: Path | None = None) -> None:
    """The nearest existing folder of `folder` must accept new files (checked by creating and removing one)."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {target or folder}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".imagen-transfer-write-check-")
    except OSError as err:
        raise UserError(f"cannot write {target or folder}: {existing} is not writable ({err.strerror}); "
                        "choose another --out") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Path, *, image: bool = False) -> None:
    """An output file's folder must be writable and the path must not be a folder (and, for an `image`, its
    extension one that Pillow writes); checked before the compute."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file name")
    if image:
        from PIL import Image  # Pillow's writers register on init; only image outputs need them

        Image.init()
        if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
            raise UserError(f"--out {path}: '{path.suffix or 'no extension'}' is not an image format to save; end the "
                            "name in .png (lossless) or .jpg")
    check_writable_dir(path.parent, path)


def free_bytes(folder: Path) -> int:
    """Free space on the disk of `folder` (or of the nearest folder above it that exists)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def nbytes(tensors: dict) -> int:
    """The bytes a dict of tensors takes (what writing it needs, before file overhead)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def require_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start writing `what` (about `needed` bytes) into `folder` when its disk has less free (plus 1%
    and 1 MB for file system overhead): one line naming the path and both sizes, before a half-written file."""
    free = free_bytes(folder)
    if free < needed * 1.01 + 1e6:
        raise OSError(errno.ENOSPC, f"no space left for {what}: it needs about {_mb(needed)}, {_mb(free)} free; free "
                      "some space and rerun", str(folder))


@contextmanager
def disk_full_as_oserror(path: Path, needed: int | None = None) -> Iterator[None]:
    """Libraries report a full disk their own way (safetensors: `SafetensorError ... os error 28`); inside this
    block any such failure becomes OSError(ENOSPC) naming `path`, the space needed and the space free, which the
    command line prints as one line (exit 1)."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC or "needs about" in str(err.strerror):
            raise
        raise _disk_full(path, needed) from None
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a full disk in a library's words
        if "os error 28" not in str(err) and "No space left" not in str(err):
            raise
        raise _disk_full(path, needed) from None


def _disk_full(path: Path, needed: int | None) -> OSError:
    need = f"it needs about {_mb(needed)}, " if needed else ""
    return OSError(errno.ENOSPC, f"no space left on device ({need}{_mb(free_bytes(Path(path).parent))} free); free some "
                   "space and rerun", str(path))


@contextmanager
def replaced_atomically(path: Path, needed: int | None = None, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` (ending in `suffix`, for writers that insist on one) for the block to write;
    renamed onto `path` when the block ends, removed when it fails, a full disk reported as one line naming `path`
    (disk_full_as_oserror). The module's rule: readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}{suffix}")
    try:
        with disk_full_as_oserror(path, needed):
            yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    """`text` written to `path` through replaced_atomically, flushed to disk before the rename."""
    with replaced_atomically(path, len(text.encode())) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def remove_stale_partials(out: Path) -> int:
    """Remove the `.NAME.partial-*` / `.NAME.old-*` folders a killed save of `out` left beside it (names only this
    tool makes, see fresh_sibling and replace_dir); call it after a successful save, under the run's lock."""
    out = Path(out)
    removed = 0
    for stale in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            removed += 1
    return removed


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder `tmp` into place; an existing `final` (ours, checked by the caller) is swapped
    out under a fresh unique name and removed only after the new one is in place."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        os.replace(final, old / final.name)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old)


def fresh_sibling(out: Path) -> Path:
    """A new, unique, empty folder beside `out` to write into before the rename (never a name a user may hold)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the final folder gets the usual permissions
    return tmp


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir/.lock` (advisory, released when the process ends, even by kill -9)."""
    if fcntl is None:
        yield
        return
    path = Path(run_dir) / ".lock"
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"run folder {run_dir} is in use by another process (it holds the lock {path}); wait for "
                            "it to finish or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def cache_root() -> Path:
    """Where decoded data, text embeddings, features and judges are cached ($IMAGEN_TRANSFER_CACHE)."""
    return Path(os.environ.get("IMAGEN_TRANSFER_CACHE", Path.home() / ".cache" / "imagen-transfer"))
