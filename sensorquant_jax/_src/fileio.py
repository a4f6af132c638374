"""Safe writes: destination checks, atomic files, atomic folder swaps, leftovers.

Every save in the package goes through here, so that one set of rules holds:

* Nothing is replaced unless the caller asked (``overwrite=True``) and the
  thing in the way is our own output of the same kind (a sensorquant
  checkpoint folder, or a file the caller's ``is_ours`` recognises). The
  current folder, its parents, the home folder and mount points are refused
  whatever the flags say.
* Files are written to a unique temporary in the destination folder, fsynced,
  renamed over the destination, and the folder is fsynced: readers see the old
  or the new bytes, never a torn file; concurrent writers: the last complete
  rename wins.
* Folders are built aside and swapped in with ``renameat2(RENAME_EXCHANGE)``
  where the OS has it, so the destination never goes missing; elsewhere two
  renames are used and :func:`recover_dir` rolls an interrupted swap back.
* Temporaries are named ``.<name>.tmp-sq-<pid>-<random>``; the next save to the
  same place removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import BinaryIO

TEMP_MARK = ".tmp-sq-"
_OLD_MARK = "old-"
_NAME_CHARS = 80  # of the destination's name kept in a temporary's name (NAME_MAX is 255)


class DestinationError(ValueError):
  """A save was refused: the destination holds something we must not replace.

  Attributes:
    path: the destination as the caller gave it.
    reason: why it was refused.
    needs_overwrite: True when ``overwrite=True`` (CLI: ``--overwrite``) would
      allow it, i.e. the destination is our own output of the same kind.
  """

  def __init__(self, path: str, reason: str, needs_overwrite: bool = False):
    self.path = path
    self.reason = reason
    self.needs_overwrite = needs_overwrite
    hint = "; pass overwrite=True to replace it" if needs_overwrite else ""
    super().__init__(f"{path or repr(path)}: {reason}{hint}")


# ---------------------------------------------------------------------------
# Destination checks.
# ---------------------------------------------------------------------------


def _protected(real: str) -> str | None:
  """Why ``real`` (a resolved path) may never be replaced, or None."""
  cwd = os.path.realpath(os.getcwd())
  if real == cwd:
    return "is the current folder"
  if cwd.startswith(real.rstrip(os.sep) + os.sep):
    return "is a parent of the current folder"
  home = os.path.realpath(os.path.expanduser("~"))
  if real == home:
    return "is the home folder"
  if os.path.ismount(real) or real == os.path.dirname(real):
    return "is a filesystem root"
  return None


def check_dir_destination(path: str, *, overwrite: bool, is_ours: Callable[[str], bool]) -> str:
  """Validates a folder destination; returns its absolute path.

  Raises:
    DestinationError: empty path, a protected folder, a file, a symlink, a
      non-empty folder that is not ours, or ours without ``overwrite``.
  """
  if not path:
    raise DestinationError(path, "an empty path is not a destination")
  absolute = os.path.abspath(path)
  reason = _protected(os.path.realpath(absolute))
  if reason:
    raise DestinationError(path, f"{reason}; refusing to write a checkpoint there")
  if not os.path.lexists(absolute):
    _check_writable(path, os.path.dirname(absolute))
    return absolute
  if os.path.islink(absolute):
    raise DestinationError(path, "is a symbolic link; refusing to replace it")
  _check_writable(path, os.path.dirname(absolute))
  if not os.path.isdir(absolute):
    raise DestinationError(path, "is a file, not a checkpoint folder; refusing to replace it")
  if is_ours(absolute):
    if not overwrite:
      raise DestinationError(path, "a checkpoint already exists there", needs_overwrite=True)
    return absolute
  try:
    empty = not os.listdir(absolute)
  except OSError as e:
    raise DestinationError(path, f"cannot read the folder ({e.strerror or e})") from None
  if not empty:
    raise DestinationError(
      path, "is a folder of other files, not a sensorquant checkpoint; refusing to replace it"
    )
  return absolute


def check_file_destination(
  path: str, *, overwrite: bool, is_ours: Callable[[str], bool], kind: str
) -> str:
  """Validates a file destination; returns its absolute path.

  Raises:
    DestinationError: empty path, a folder, a symlink, a file that is not a
      ``kind``, or a ``kind`` without ``overwrite``.
  """
  if not path:
    raise DestinationError(path, "an empty path is not a destination")
  absolute = os.path.abspath(path)
  if not os.path.lexists(absolute):
    folder = os.path.dirname(absolute)
    if not os.path.isdir(folder):
      raise DestinationError(path, "its folder does not exist")
    _check_writable(path, folder)
    return absolute
  if os.path.islink(absolute):
    raise DestinationError(path, "is a symbolic link; refusing to replace it")
  if os.path.isdir(absolute):
    raise DestinationError(path, f"is a folder, not a {kind}; refusing to replace it")
  if not os.path.isfile(absolute):
    raise DestinationError(path, "is not a regular file; refusing to replace it")
  if not is_ours(absolute):
    raise DestinationError(path, f"is not a {kind}; refusing to replace it")
  if not overwrite:
    raise DestinationError(path, f"a {kind} already exists there", needs_overwrite=True)
  _check_writable(path, os.path.dirname(absolute))
  return absolute


def _check_writable(path: str, folder: str) -> None:
  """The nearest existing ancestor of ``folder`` must accept new entries."""
  while folder and not os.path.exists(folder):
    parent = os.path.dirname(folder)
    if parent == folder:
      break
    folder = parent
  if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
    raise DestinationError(path, f"cannot write in {folder} (permission denied)")
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise DestinationError(path, f"{folder} is a file, not a folder")


def file_starts_with(
  path: str, lead: bytes, markers: tuple[bytes, ...], limit: int = 1 << 16
) -> bool:
  """Whether the file's first non-blank byte is ``lead`` and its first ``limit``
  bytes hold one of ``markers`` (a cheap "is this our kind of file" test)."""
  try:
    with open(path, "rb") as f:
      head = f.read(limit)
  except OSError:
    return False
  head = head.lstrip(b" \t\r\n")
  return head[:1] == lead and (not markers or any(m in head for m in markers))


# ---------------------------------------------------------------------------
# Temporaries and leftovers.
# ---------------------------------------------------------------------------


def _temp_prefix(name: str) -> str:
  return f".{name[:_NAME_CHARS]}{TEMP_MARK}"


def _owner_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True  # another thread of ours may be writing it
  if os.name != "posix":
    return True  # no cheap liveness test: keep it
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True
  return True


def remove_leftovers(folder: str, name: str) -> int:
  """Removes temporaries of earlier saves to ``folder/name`` whose process is gone.

  Returns:
    How many were removed (each one a save that was interrupted).
  """
  prefix = _temp_prefix(name)
  try:
    entries = os.listdir(folder)
  except OSError:
    return 0
  removed = 0
  for entry in entries:
    if not entry.startswith(prefix):
      continue
    pid_text = entry[len(prefix) :].split("-", 1)[0]
    if not pid_text.isdigit() or _owner_alive(int(pid_text)):
      continue
    _remove(os.path.join(folder, entry))
    removed += 1
  return removed


def _remove(path: str) -> None:
  with contextlib.suppress(OSError):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      os.unlink(path)


def make_temp_dir(path: str) -> str:
  """A fresh temporary folder next to ``path`` (named for ``path`` and this process)."""
  folder, name = os.path.split(path)
  tmp = tempfile.mkdtemp(prefix=f"{_temp_prefix(name)}{os.getpid()}-", dir=folder)
  os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the checkpoint private
  return tmp


def _umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


def fsync_dir(folder: str) -> None:
  """fsyncs a folder so a rename in it is durable (no-op where unsupported)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def default_file_mode(path: str) -> int:
  """The mode a plain ``open(path, "w")`` would give (or the existing file's)."""
  try:
    return os.stat(path).st_mode & 0o777
  except OSError:
    return 0o666 & ~_umask()


def write_file_atomic(
  path: str, write: Callable[[BinaryIO], object], *, fsync: bool = True
) -> None:
  """Writes a file through a unique temporary, fsync and rename.

  Args:
    path: absolute destination (already checked by :func:`check_file_destination`).
    write: called with the open binary temporary.
    fsync: fsync the file and the folder (durability; atomicity holds without).

  Raises:
    OSError: from the filesystem, with ``filename`` set to ``path`` (never the
      temporary's name).
  """

  def write_to(tmp: str) -> None:
    with open(tmp, "wb", buffering=1 << 20) as f:
      write(f)

  write_path_atomic(path, write_to, fsync=fsync)


def write_path_atomic(path: str, write_to: Callable[[str], object], *, fsync: bool = True) -> None:
  """:func:`write_file_atomic` for writers that open a path themselves: ``write_to``
  gets a unique temporary path in the destination's folder (named so that
  :func:`remove_leftovers` cleans it up after a crash), then fsync and rename.

  Raises:
    OSError: from the filesystem, with ``filename`` set to ``path`` (never the
      temporary's name).
  """
  folder, name = os.path.split(path)
  remove_leftovers(folder, name)
  try:
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(name)}{os.getpid()}-", dir=folder)
    os.close(fd)
  except OSError as e:
    raise OSError(e.errno, e.strerror or str(e), path) from None
  try:
    os.chmod(tmp, default_file_mode(path))
    write_to(tmp)
    if fsync:
      with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    _remove(tmp)
    raise OSError(e.errno, e.strerror or str(e), path) from None
  except BaseException:
    _remove(tmp)
    raise
  if fsync:
    fsync_dir(folder)


# ---------------------------------------------------------------------------
# Folder swaps.
# ---------------------------------------------------------------------------

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _load_renameat2():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return None
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  fn.restype = ctypes.c_int
  return fn


_renameat2 = _load_renameat2()


def _rename2(src: str, dst: str, flags: int) -> bool:
  """renameat2; False where the OS or filesystem lacks it; OSError otherwise."""
  if _renameat2 is None:
    return False
  if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
    return False
  raise OSError(err, os.strerror(err), dst)


def swap_dir_into_place(tmp: str, path: str) -> str | None:
  """Moves the finished folder ``tmp`` to ``path``, replacing what is there.

  Where ``renameat2`` works the swap is one atomic exchange and ``path`` is
  never missing; elsewhere the old folder is renamed aside first (see
  :func:`recover_dir`).

  Returns:
    The temporary path now holding the replaced folder (for the caller to
    delete), or None when nothing was replaced.
  """
  for _ in range(100):
    try:
      if _rename2(tmp, path, _RENAME_NOREPLACE):
        return None
    except FileExistsError:
      try:
        if _rename2(tmp, path, _RENAME_EXCHANGE):
          return tmp
      except FileNotFoundError:
        continue  # removed between the two calls: try creating again
    if not os.path.lexists(path):
      try:
        os.rename(tmp, path)  # creates, or replaces an empty folder
        return None
      except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
          raise
    # Portable two-step swap: the old folder goes aside under our temporary
    # prefix (marked "old-"), so recover_dir can roll back an interruption.
    folder, name = os.path.split(path)
    old = tempfile.mkdtemp(prefix=f"{_temp_prefix(name)}{os.getpid()}-{_OLD_MARK}", dir=folder)
    os.rmdir(old)
    try:
      os.rename(path, old)
    except FileNotFoundError:
      continue
    os.rename(tmp, path)
    return old
  raise OSError(errno.EBUSY, "the destination keeps changing", path)


def recover_dir(path: str) -> None:
  """Rolls back a two-step swap interrupted between its renames.

  Only acts when ``path`` is missing and an "old" temporary of a dead process
  is next to it; the newest such folder is renamed back.
  """
  if os.path.lexists(path):
    return
  folder, name = os.path.split(os.path.abspath(path))
  prefix = _temp_prefix(name)
  try:
    entries = os.listdir(folder)
  except OSError:
    return
  olds = []
  for entry in entries:
    if not entry.startswith(prefix):
      continue
    pid_text, _, rest = entry[len(prefix) :].partition("-")
    if rest.startswith(_OLD_MARK) and pid_text.isdigit() and not _owner_alive(int(pid_text)):
      full = os.path.join(folder, entry)
      with contextlib.suppress(OSError):
        olds.append((os.stat(full).st_mtime, full))
  if olds:
    with contextlib.suppress(OSError):
      os.rename(max(olds)[1], path)


def remove_tree(path: str | None) -> None:
  """Deletes a temporary folder of ours (never raises)."""
  if path:
    shutil.rmtree(path, ignore_errors=True)


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (at most 200 characters)."""
  lines = str(e).strip().splitlines()
  return lines[0][:200] if lines else type(e).__name__
