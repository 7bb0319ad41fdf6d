"""Private runtime folders and secret files that other local users cannot take over.

Job info files carry the job's store token, so they live in a folder only their user can
enter. A folder under a shared ``/tmp`` (mode 1777) may have been created in advance by
another user, with a file or a symlink waiting in it: :func:`private_dir` refuses a folder
that is not a real directory owned by this user with no group/other access, and
:func:`write_private` never follows or reuses an existing file (a fresh ``O_EXCL |
O_NOFOLLOW`` file of mode 0600, renamed into place).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from mnemosyne.core.errors import ConfigError

__all__ = ["check_private_dir", "private_dir", "write_private"]


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_private_dir(path: str | os.PathLike[str], what: str = "runtime folder") -> Path:
    """Refuse ``path`` unless it is a directory (not a symlink) of this user with mode 0700 or less.

    Args:
        path: The folder.
        what: What the folder is for, used in the message.

    Raises:
        ConfigError: Missing, not a directory, a symlink, owned by another user, or open to
            group/others; the message names the folder, its owner and its mode.
    """
    p = Path(path)
    try:
        st = os.lstat(p)
    except OSError as exc:
        msg = f"{what} {p}: cannot inspect it ({exc})"
        raise ConfigError(msg) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        msg = f"{what} {p} is {kind} (owner {_owner(st.st_uid)}); refusing to use it: remove it"
        raise ConfigError(msg)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.getuid() or mode & 0o077:
        msg = (f"{what} {p} is owned by {_owner(st.st_uid)} with mode {mode:o}; it must belong to "
               f"{_owner(os.getuid())} with mode 700 (another user may have created it to read this job's "
               f"secrets): remove it or point the tool elsewhere")
        raise ConfigError(msg)
    return p


def private_dir(path: str | os.PathLike[str], what: str = "runtime folder") -> Path:
    """Create ``path`` with mode 0700 (parents as needed) or check an existing one.

    Raises:
        ConfigError: See :func:`check_private_dir`, or the folder cannot be created.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(p, 0o700)  # the umask can only remove bits: never more than 0700
    except FileExistsError:
        pass
    except OSError as exc:
        msg = f"{what} {p}: cannot create it ({exc})"
        raise ConfigError(msg) from None
    return check_private_dir(p, what)


def write_private(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a new file of mode 0600 and rename it to ``path``.

    The temporary file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``: a file or symlink
    planted under that name is never opened. The rename replaces ``path`` itself (never
    the target of a symlink there). Put ``path`` in a :func:`private_dir`.

    Raises:
        OSError: The file could not be written.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p
