"""Writing result files safely: check an output path before any work, then write through a temporary file
and rename it into place, so a failure (an exception, Ctrl-C, SIGTERM, a full disk) leaves the previous file
or nothing -- never half a file.

    out = check_output_path(args.out, suffix=".png")   # ValueError naming the problem, before any work
    with atomic_path(out) as tmp:                       # write to tmp; renamed to out on success
        image.save(tmp, format="PNG")
    atomic_write_text(stats_path, json.dumps(stats))
    save_figure(fig, "result.png", dpi=110)             # a matplotlib figure, the same way
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import matplotlib.figure


def check_output_path(path: str | Path, suffix: str | tuple[str, ...] | None = None, what: str = "output") -> Path:
    """``path`` as a :class:`Path` after checking that a file can be written there; raises ``ValueError``.

    Missing parent folders are fine (writers create them) as long as the nearest existing ancestor is a
    writable folder. Rejected: a path that names a folder, a parent that is a regular file, a place this
    process cannot write to (probed by creating and removing a temporary file, which also catches read-only
    file systems and root-owned folders), and -- with ``suffix`` -- a wrong file extension. A ``path`` that is
    not a ``str`` or :class:`os.PathLike` raises ``TypeError``."""
    path = _file_path(path, what)
    if suffix is not None:
        suffixes = (suffix,) if isinstance(suffix, str) else suffix
        if path.suffix.lower() not in suffixes:
            raise ValueError(f"{what} must name a {' or '.join(suffixes)} file, got {str(path)!r}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"cannot write {what} {str(path)!r}: the file is read-only")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot write {what} {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ar-course-probe-", dir=ancestor)
    except OSError as exc:
        raise ValueError(f"cannot write {what} {str(path)!r}: no file can be created in {str(ancestor)!r} "
                         f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _file_path(path: object, what: str) -> Path:
    """``path`` as a :class:`Path` that may name a file: ``TypeError`` for something that is not a ``str`` or
    :class:`os.PathLike`, ``ValueError`` for an empty path or a folder (``what`` names it in the message)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} path must be a str or os.PathLike, got {path!r} ({type(path).__name__})")
    path = Path(path)
    if str(path) in ("", "."):
        raise ValueError(f"{what} path is empty")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; name a file inside it")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit it is renamed to ``path`` (atomic on POSIX and
    Windows), on an exception it is removed and ``path`` is left as it was. Creates missing parent folders. A new
    file gets an ordinary file's mode (``0o666`` less the umask); a file replaced keeps its own mode.

    Raises ``TypeError`` for a ``path`` that is not a ``str`` or :class:`os.PathLike` and ``ValueError`` for an
    empty path or one that names a folder, before anything is written."""
    path = _file_path(path, "output")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:  # replacing a file keeps its mode (a private 0600 file stays private)
        mode = path.stat().st_mode & 0o7777
    except OSError:  # a new file: mkstemp makes it private; give it an ordinary file's mode
        mode = 0o666 & ~_umask()
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # once written: a read-only mode must not stop the writing
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_path`; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig: "matplotlib.figure.Figure", path: str | Path, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure to ``path`` through :func:`atomic_path` (the format from the suffix, ``.png``
    when there is none); ``savefig_kwargs`` go to ``fig.savefig`` (e.g. ``dpi=110``). Returns ``path``."""
    path = _file_path(path, "figure")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    return path
