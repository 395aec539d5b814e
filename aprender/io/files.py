"""Files from untrusted checkpoints and outputs that never touch an input.

Rules (the README's Safety section states them for users):

* Reading: only regular files are opened (a FIFO, terminal, device or socket is refused before
  a byte is read; the open never blocks).  Names that come from a checkpoint (index entries,
  folder listings) are relative paths that stay inside the checkpoint.
* Writing: everything goes under a fresh temporary name next to OUTPUT (created with
  ``mkstemp``/``mkdtemp``, so never an existing file) and is renamed into place at the end.
  OUTPUT may not be an input, lie inside the INPUT folder, or be a folder that holds an input;
  an existing OUTPUT is replaced only with ``--force`` and never when it is a device, FIFO or
  socket.  The final rename (:func:`commit_path`, every writer's) checks again: without
  ``--force``, an OUTPUT that appeared while the run was in progress is never replaced.  The
  same rules hold for a report file.
* Printing: names and paths pass through :func:`display`, which escapes control characters,
  so a hostile name cannot drive the terminal.
"""
import errno
import os
import shutil
import stat
import sys
import tempfile

from ..errors import CheckpointError, UnsafePathError

__all__ = ["display", "open_regular", "check_member_name", "OutputTarget", "create_new",
           "remove_tree", "atomic_write_text", "temp_name", "replace_path", "commit_path",
           "same_file", "file_kind"]

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


# -- committing an output: the final rename ------------------------------------------------

RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100
PAUSE_COMMIT_ENV = "APRENDER_TEST_PAUSE_BEFORE_COMMIT"


def _load_renameat2():
    """libc's renameat2 through ctypes (Linux, glibc 2.28 or later), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, ImportError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _rename_noreplace(src, dst):
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist, atomically where the platform
    allows it (renameat2 with RENAME_NOREPLACE).  Raises FileExistsError when something is at
    ``dst``, leaving it untouched.  Without renameat2 (another OS, an old libc, a filesystem
    that refuses the flag): a file is hard-linked to ``dst`` (link never replaces) and then
    unlinked from ``src``; a folder first claims ``dst`` with mkdir (which never replaces) and
    is renamed over that empty folder of ours, a rename that fails if anything was put in it."""
    if _renameat2 is not None:
        import ctypes

        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                      RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), dst)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    if not os.path.isdir(src) or os.path.islink(src):
        try:
            os.link(src, dst, follow_symlinks=False)  # FileExistsError if anything is there
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # a filesystem without hard links: the last check is as close to the rename as
            # this platform allows
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
            os.rename(src, dst)
            return
        os.unlink(src)
        return
    os.mkdir(dst, 0o700)  # FileExistsError if anything is there; the name is ours now
    try:
        os.rename(src, dst)  # over our own empty folder; fails if something was put in it
    except OSError as exc:
        try:
            os.rmdir(dst)  # ours, if still empty; never anything that was put in it
        except OSError:
            pass
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        raise


def _test_pause_before_commit(target):
    """Test-only: with APRENDER_TEST_PAUSE_BEFORE_COMMIT set to a path, the commit of that
    path says so on stderr and waits for a line on stdin, so a test can change the target in
    the middle of a run without racing it."""
    want = os.environ.get(PAUSE_COMMIT_ENV)
    if want and os.path.abspath(want) == os.path.abspath(target):
        print("aprender-test: commit paused", file=sys.stderr, flush=True)
        sys.stdin.readline()


def commit_path(tmp, target, *, force, what="OUTPUT"):
    """Move our finished temporary file or folder ``tmp`` to ``target``: the one final rename of
    every writer.

    Without ``force`` nothing at ``target`` is ever replaced, even what appeared while the run
    was in progress (checked at the moment of the rename, atomically where the platform allows
    it): the intruder is left untouched and a CheckpointError names it; the caller removes
    ``tmp``.  With ``force`` a regular file, folder or link at ``target`` is replaced (never a
    device, FIFO or socket, even one that appeared during the run)."""
    _test_pause_before_commit(target)
    shown = display(target)
    if not force:
        try:
            _rename_noreplace(tmp, target)
        except FileExistsError:
            raise CheckpointError(f"{what} {shown} appeared while the run was in progress; it "
                                  "was left untouched (use --force to replace it)") from None
        return
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
    if st is None:
        os.rename(tmp, target)
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise UnsafePathError(f"{what} {shown} is a {file_kind(st.st_mode)}; it is never "
                              "replaced")
    if os.path.isfile(tmp) and not stat.S_ISDIR(st.st_mode):
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


def same_file(path, st):
    """``path`` (not followed if a link) is still the file or folder whose lstat was ``st``."""
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def replace_path(tmp, target):
    """:func:`commit_path` with ``force=True`` (for callers whose contract is to replace)."""
    commit_path(tmp, target, force=True)


def atomic_write_text(path, text, *, force, what="OUTPUT"):
    """Write ``text`` to ``path`` through a temporary file committed with :func:`commit_path`
    (``force=False``: never over anything that appeared meanwhile)."""
    tmp = temp_name(path, "file")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        commit_path(tmp, path, force=force, what=what)
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
        self.force = force
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
