"""Files from untrusted checkpoints and outputs that never touch an input.

Rules (the README's Safety section states them for users):

* Reading: only regular files are opened (a FIFO, terminal, device or socket is refused before
  a byte is read; the open never blocks).  Names that come from a checkpoint (index entries,
  folder listings) are relative paths that stay inside the checkpoint.
* Writing: everything goes under a fresh temporary name next to OUTPUT (created with
  ``mkstemp``/``mkdtemp``, so never an existing file) and is renamed into place at the end.
  OUTPUT may not be an input, lie inside the INPUT folder, or be a folder that holds an input;
  an existing OUTPUT is replaced only with ``--force`` and never when it is a device, FIFO or
  socket.  The same rules hold for a report file.
* Printing: names and paths pass through :func:`display`, which escapes control characters,
  so a hostile name cannot drive the terminal.
"""
import errno
import os
import shutil
import stat
import tempfile

from ..errors import CheckpointError, UnsafePathError

__all__ = ["display", "open_regular", "check_member_name", "OutputTarget", "create_new",
           "remove_tree", "atomic_write_text", "temp_name", "replace_path", "file_kind"]

TMP_SUFFIX = ".aprender-tmp"


def display(text):
    """``text`` (a str or path) with every non-printable character escaped (``\\x1b``,
    ``\\n``, lone surrogates), for messages and tables."""
    text = os.fspath(text)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def file_kind(mode):
    """A word for a file type (for messages)."""
    for test, word in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"),
                       (stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return word
    return "special file"


def _os_error(path, exc, doing="open"):
    shown = display(path)
    if exc.errno == errno.ENOENT:
        return CheckpointError(f"{shown}: no such file or folder")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return CheckpointError(f"{shown}: permission denied")
    if exc.errno == errno.ELOOP:
        return CheckpointError(f"{shown}: too many levels of symbolic links")
    return CheckpointError(f"{shown}: cannot {doing} ({exc.strerror or exc})")


def open_regular(path):
    """Open ``path`` for binary reading, refusing anything but a regular file (without
    blocking on a FIFO or taking a terminal)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{display(path)}: is a {file_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_member_name(name, what):
    """A name from a checkpoint (index entry, file listing) used as a relative path: a
    non-empty string of '/'-separated parts, none empty, '.', '..' or holding NUL, not
    absolute.  Returns the normalised name."""
    if not isinstance(name, str):
        raise CheckpointError(f"{what}: file name {name!r} is not a string")
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name
            or any(p in ("", ".", "..") for p in parts)):
        raise CheckpointError(f"{what}: file name {name!r} is not a plain relative path "
                              "inside the checkpoint folder")
    return name


def _inside(path, root):
    """path is root or below it (both real, absolute)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _umask():
    old = os.umask(0o022)
    os.umask(old)
    return old


def temp_name(target, kind):
    """A fresh temporary file or folder next to ``target`` (never an existing name), with the
    usual (umask) permissions."""
    d = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(os.path.abspath(target))
    if kind == "dir":
        path = tempfile.mkdtemp(prefix=f".{base}.", suffix=TMP_SUFFIX, dir=d)
        os.chmod(path, 0o777 & ~_umask())
        return path
    fd, path = tempfile.mkstemp(prefix=f".{base}.", suffix=TMP_SUFFIX, dir=d)
    os.close(fd)
    os.chmod(path, 0o666 & ~_umask())
    return path


def remove_tree(path):
    """Remove a file or folder we created (links are removed, never followed)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
    except OSError:
        pass


def create_new(root, relname, mode=0o644):
    """Open ``root/relname`` for writing as a new file (O_EXCL, no symlink followed), making
    its parent folders inside ``root``; ``relname`` was checked by check_member_name."""
    parts = relname.split("/")
    d = root
    for p in parts[:-1]:
        d = os.path.join(d, p)
        try:
            os.mkdir(d, 0o777)
        except FileExistsError:
            if os.path.islink(d) or not os.path.isdir(d):
                raise CheckpointError(f"{display(relname)}: its folder clashes with a file of "
                                      "the same name") from None
    path = os.path.join(root, relname)
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                       | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), mode)
    except FileExistsError:
        raise CheckpointError(f"{display(relname)}: two files of the checkpoint would be "
                              "written under this name") from None


def replace_path(tmp, target):
    """Move tmp into place; an existing target (only reached with --force, and only a
    regular file, folder or link: checked before any work) is replaced."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    if os.path.isfile(tmp) and not os.path.isdir(target):
        os.replace(tmp, target)
        return
    old = temp_name(target, "file")
    os.unlink(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    remove_tree(old)


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    tmp = temp_name(path, "file")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        replace_path(tmp, path)
    except BaseException:
        remove_tree(tmp)
        raise


class OutputTarget:
    """Where a command may write: checked against every input before any work is done.

    ``inputs``: the paths that will be read (the INPUT file or folder and, for a folder, the
    real files behind its entries).  Raises CheckpointError (or ValueError subclasses of it)
    with a message that names the user's paths, never a temporary one."""

    def __init__(self, path, inputs, *, force=False, what="OUTPUT", kind="file",
                 avoid=()):
        self.what = what
        if not isinstance(path, str) or not path:
            raise UnsafePathError(f"{what} is empty")
        if kind == "file" and path.endswith((os.sep, "/")):
            raise UnsafePathError(f"{what} {display(path)} ends with '/' but must name a "
                                  "file")
        self.path = path.rstrip(os.sep) or os.sep
        shown = display(self.path)
        real = os.path.realpath(self.path)
        for src in inputs:
            src_real = os.path.realpath(src)
            if real == src_real:
                raise UnsafePathError(f"{what} {shown} is the same as INPUT "
                                      f"{display(src)}; writing it in place is refused")
            if _inside(src_real, real):
                raise UnsafePathError(f"{what} {shown} contains the input {display(src)}; "
                                      "it would be replaced")
            if os.path.isdir(src_real) and _inside(real, src_real):
                raise UnsafePathError(f"{what} {shown} is inside the input folder "
                                      f"{display(src)}")
        for other_what, other in avoid:
            other_real = os.path.realpath(other)
            if real == other_real or _inside(real, other_real) or _inside(other_real, real):
                raise UnsafePathError(f"{what} {shown} overlaps {other_what} "
                                      f"{display(other)}")
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise _os_error(self.path, exc, "use") from None
        if st is not None:
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
                    or stat.S_ISLNK(st.st_mode)):
                raise UnsafePathError(f"{what} {shown} is a {file_kind(st.st_mode)}; it is "
                                      "never replaced")
            if not force:
                raise CheckpointError(f"{what} {shown} already exists (use --force to "
                                      "replace it)")
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise CheckpointError(f"{what} {shown}: folder {display(parent)} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CheckpointError(f"{what} {shown}: folder {display(parent)} is not writable")
