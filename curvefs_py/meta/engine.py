"""The metadata ``Engine`` interface: one blocking method per operation, one transaction each.

Design (../DESIGN.md §4, STYLE §6.3 rules 3–4):

* Every public method is **blocking** and runs whole in one worker thread
  (``threads.run_blocking(..., limiter=META)``); an engine never awaits.
* Every method that touches several rows (rename, link, unlink, write commit,
  truncate) is **one transaction**; implementations retry conflicts / busy
  errors a bounded number of times with backoff and then raise ``MetaError``.
* Input checks that do not need the database (name length, ``.``/``..``) are
  done once, here, in the public methods; the ``do_*`` methods that
  implementations provide may assume valid names.
* Errors are ``FsError(errno)``: ENOENT, EEXIST, ENOTDIR, EISDIR, ENOTEMPTY,
  EINVAL, ENAMETOOLONG, ENOSPC, ENODATA (xattr), EXDEV is never raised here
  (one volume).

Data model (DESIGN §3): a regular file's bytes are described per chunk
(``chunk_idx = offset // chunk_size``) by an ordered list of ``Slice``s; later
slices cover earlier ones.  Slices that no longer show through anywhere are
removed from the chunk *in the same transaction* that hid them and their
objects are queued in a *pending delete* list; a background worker deletes
the objects and then calls ``done_deletes``.  A file whose last link goes and
that is not open anywhere has all its slices queued the same way; one that is
still open (``is_open(ino)`` is true) is *sustained* by the caller's session
until ``release_sustained``.
"""
from __future__ import annotations

import abc
import errno
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from .. import NAME_MAX
from ..errors import FsError
from ..types import Attr, DirEntry, Format, SetAttr, Slice, StatFs, Usage

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

XATTR_CREATE = 1
XATTR_REPLACE = 2

IsOpen = Callable[[int], bool]


@dataclass(frozen=True)
class Change:
    """One committed metadata change, for other clients' kernel caches.

    ``ino`` > 0: the inode's attributes or data changed (its kernel attrs and
    pages are stale); ``parent`` > 0: the directory entry ``(parent, name)``
    was added, removed or replaced.  ``sid`` is the session that made it.
    ``version``: the inode's data_version after the change, when the change
    knew it (a write, a setattr), else -1.  A client whose kernel pages are of
    that version keeps them: a chmod does not drop others' caches, nor does the
    note of a write arrive too late and drop pages read after it."""

    seq: int
    sid: int
    ino: int = 0
    parent: int = 0
    name: bytes = b""
    version: int = -1


def check_name(name: bytes) -> None:
    """Validate one directory-entry name (raises FsError)."""
    if not name or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"invalid name {name!r}")
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, "name longer than 255 bytes")


def _check_new_name(name: bytes) -> None:
    check_name(name)
    if name in (b".", b".."):
        raise FsError(errno.EEXIST, "name exists")


class Engine(abc.ABC):
    """A metadata engine. Subclasses implement the ``do_*`` methods."""

    #: set by ``new_session``; sustained inodes and heartbeats belong to it
    sid: int = 0

    def __init__(self) -> None:
        #: inodes this engine's session may sustain (an unlink or a rename took
        #: their last link while they were open here; ``sustained`` below): the
        #: only ones whose last close has work in the database
        self._sustaining: set[int] = set()

    def sustained(self, ino: int) -> None:
        """For implementations: ``ino`` is now sustained by this session."""
        self._sustaining.add(ino)

    # ------------------------------------------------------------ lifecycle
    @abc.abstractmethod
    def init(self, fmt: Format, force: bool = False) -> None:
        """Blocking. Create the schema, store ``fmt``, create the root inode
        (ino 1, mode 0o40777 | sticky off, owned by root, nlink 2).
        Raises FsError(EEXIST) if a volume exists and not ``force``; with
        ``force`` only the settings are overwritten (data is kept)."""

    @abc.abstractmethod
    def load(self) -> Format:
        """Blocking. Return the volume settings; FsError(ENOENT) if not formatted."""

    @abc.abstractmethod
    def close(self) -> None:
        """Blocking. Close connections."""

    # ------------------------------------------------------------- sessions
    @abc.abstractmethod
    def new_session(self, info: dict) -> int:
        """Blocking. Register a mounted client (info: host, pid, mountpoint,
        version) with a heartbeat time; set and return ``self.sid``."""

    @abc.abstractmethod
    def heartbeat(self) -> None:
        """Blocking. Refresh this session's heartbeat."""

    @abc.abstractmethod
    def close_session(self) -> None:
        """Blocking. Release every inode this session sustains (deleting the
        data of those with nlink 0) and remove the session row."""

    @abc.abstractmethod
    def clean_stale_sessions(self, max_age_s: float) -> list[int]:
        """Blocking. Close sessions whose heartbeat is older than
        ``max_age_s`` as ``close_session`` would; return their ids."""

    @abc.abstractmethod
    def list_sessions(self) -> list[dict]:
        """Blocking. Every session: sid, heartbeat (unix seconds), info..."""

    # ---------------------------------------------------------- change feed
    def changes_since(self, cursor: int, limit: int = 1000) -> tuple[int, list[Change]]:
        """Blocking. Changes committed after ``cursor`` by sessions other than
        this one, oldest first, and the new cursor.  ``cursor`` -1 means "from
        now": returns the current position and no changes.  Engines without a
        feed return ``(cursor, [])``; clients then rely on timeouts."""
        return cursor, []

    def publish(self, changes: list[Change]) -> None:
        """Blocking. Record changes this session made (after they committed),
        for other clients' ``changes_since``.  Default: no feed."""

    def wait_changes(self, cursor: int, timeout: float) -> None:
        """Blocking. Return when changes after ``cursor`` may exist, or after
        ``timeout`` seconds (pub/sub, LISTEN/NOTIFY; default: sleep)."""
        import time

        time.sleep(timeout)

    # ------------------------------------------------------------------ ids
    @abc.abstractmethod
    def next_slice_id(self) -> int:
        """Blocking. A new, never reused slice id (> 0). Implementations may
        reserve ids in batches."""

    # ----------------------------------------------------------- namespace
    def lookup(self, parent: int, name: bytes) -> Attr:
        """Blocking. The attributes of ``name`` in directory ``parent``.
        ``.`` and ``..`` resolve to ``parent`` and its parent."""
        check_name(name)
        return self.do_lookup(parent, name)

    def getattr(self, ino: int) -> Attr:
        """Blocking. FsError(ENOENT) if the inode does not exist."""
        return self.do_getattr(ino)

    def setattr(self, ino: int, changes: SetAttr) -> Attr:
        """Blocking. Apply ``changes``; ctime becomes now when anything changes.
        ``SetAttr.NOW`` as a time means now.  A length change truncates
        (regular files only, else EISDIR/EINVAL): shrinking queues slices that
        no longer show and hides the rest of the boundary chunk with a hole
        slice (id 0), so growing again reads zeros; it bumps data_version and
        mtime.  chmod by a non-owner is the kernel's check (default_permissions)."""
        if changes.length is not None and changes.length < 0:
            raise FsError(errno.EINVAL, "negative length")
        return self.do_setattr(ino, changes)

    def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
              rdev: int = 0, target: Optional[bytes] = None) -> Attr:
        """Blocking. Create a file, directory (nlink 2; parent's nlink + 1),
        symlink (``target``, length = len(target)), fifo, socket or device
        node.  Times are now; parent mtime/ctime become now.  If the parent has
        the setgid bit, the new inode takes the parent's gid (and a new
        directory keeps setgid).  EEXIST, ENOENT (parent), ENOTDIR (parent),
        ENOSPC (inode limit)."""
        _check_new_name(name)
        return self.do_mknod(parent, name, mode, uid, gid, rdev, target)

    def unlink(self, parent: int, name: bytes, is_open: IsOpen) -> Attr:
        """Blocking. Remove a non-directory entry (EISDIR for a directory);
        nlink - 1, ctime now.  At nlink 0: if ``is_open(ino)`` the inode is
        sustained by this session, else its slices are queued for deletion
        and the inode row removed.  Returns the inode's attributes after the
        change (nlink may be 0)."""
        check_name(name)
        if name in (b".", b".."):
            raise FsError(errno.EINVAL if name == b"." else errno.ENOTEMPTY)
        return self.do_unlink(parent, name, is_open)

    def rmdir(self, parent: int, name: bytes) -> int:
        """Blocking. Remove an empty directory (ENOTEMPTY, ENOTDIR); parent
        nlink - 1.  Returns the removed inode number."""
        check_name(name)
        if name == b".":
            raise FsError(errno.EINVAL)
        if name == b"..":
            raise FsError(errno.ENOTEMPTY)
        return self.do_rmdir(parent, name)

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int, is_open: IsOpen) -> tuple[int, Optional[Attr]]:
        """Blocking. Move an entry, atomically replacing a target (which is
        unlinked as ``unlink``/``rmdir`` would).  ``RENAME_NOREPLACE``: EEXIST
        if the target exists.  ``RENAME_EXCHANGE``: swap two existing entries
        (ENOENT if the target is missing).  A directory over a non-empty
        directory is ENOTEMPTY, a directory over a file ENOTDIR, a file over a
        directory EISDIR, a directory into its own subtree EINVAL.  Moving a
        directory fixes ``..`` and both parents' nlink.  Renaming an entry onto
        itself (same inode) does nothing.  Returns (moved ino, attributes of
        the replaced inode or None)."""
        check_name(name)
        _check_new_name(newname)
        if name in (b".", b".."):
            raise FsError(errno.EINVAL)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FsError(errno.EINVAL, "bad rename flags")
        return self.do_rename(parent, name, newparent, newname, flags, is_open)

    def link(self, ino: int, newparent: int, newname: bytes) -> Attr:
        """Blocking. A hard link to a non-directory (EPERM for a directory);
        nlink + 1, ctime now.  Returns the inode's attributes."""
        _check_new_name(newname)
        return self.do_link(ino, newparent, newname)

    @abc.abstractmethod
    def readlink(self, ino: int) -> bytes:
        """Blocking. A symlink's target (EINVAL if not a symlink)."""

    @abc.abstractmethod
    def readdir(self, ino: int) -> list[DirEntry]:
        """Blocking. The entries of a directory (ENOTDIR), without ``.`` and
        ``..``, in a stable order (by name)."""

    @abc.abstractmethod
    def statfs(self) -> StatFs:
        """Blocking. Capacity and usage (capacity 0 = report 1 PiB)."""

    @abc.abstractmethod
    def usage(self) -> Usage:
        """Blocking. Used space (sum of file lengths rounded up to 4 KiB) and inodes."""

    # ------------------------------------------------------------- xattrs
    @abc.abstractmethod
    def getxattr(self, ino: int, name: bytes) -> bytes:
        """Blocking. ENODATA if absent."""

    @abc.abstractmethod
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """Blocking. XATTR_CREATE: EEXIST if present; XATTR_REPLACE: ENODATA if absent."""

    @abc.abstractmethod
    def listxattr(self, ino: int) -> list[bytes]:
        """Blocking."""

    @abc.abstractmethod
    def removexattr(self, ino: int, name: bytes) -> None:
        """Blocking. ENODATA if absent."""

    # --------------------------------------------------------------- data
    @abc.abstractmethod
    def read_chunk(self, ino: int, chunk_idx: int) -> list[Slice]:
        """Blocking. The slices of one chunk in commit order (empty: a hole)."""

    @abc.abstractmethod
    def write(self, ino: int, slices: list[tuple[int, Slice]], min_length: int,
              mtime_ns: int, expect_version: Optional[int] = None,
              expect_rows: Optional[list[Slice]] = None) -> Attr:
        """Blocking. Commit written slices ``[(chunk_idx, slice), ...]`` in one
        transaction: append each to its chunk, set length = max(length,
        min_length), mtime = ctime = ``mtime_ns``, bump data_version, update
        used space (ENOSPC over capacity; nothing is committed then).  Slices
        that no longer show through are removed and queued for deletion.
        ENOENT if the inode is gone (then the caller deletes the objects).
        ``expect_version``: a rewrite of the visible bytes (compaction: a
        chunk's bytes as one slice).  Committed only if the inode's data_version
        still is that (else EAGAIN, nothing committed), so it never covers a
        newer write; and it leaves data_version, mtime and ctime as they are:
        the file reads the same, so every cache of its bytes stays valid.
        ``expect_rows`` (with it, one chunk): also only if that chunk still
        holds exactly these rows — the version alone does not move for a
        rewrite, so it cannot tell that another client compacted meanwhile."""

    @abc.abstractmethod
    def skip_slice_ids(self, past: int) -> None:
        """Blocking. Slice ids handed out from now on (by any client) are above
        ``past``: ``load`` keeps the ids of the slices it restores."""

    @abc.abstractmethod
    def scan_slices(self) -> set[tuple[int, int, int]]:
        """Blocking, read only. ``(slice id, size, ino)`` of every slice a chunk of
        a file names (holes left out), each once: what ``gc`` and ``fsck`` hold
        the bucket against.  Not one snapshot on every engine (Redis reads chunk
        by chunk): a caller that must not act on a stale view checks again."""

    @abc.abstractmethod
    def pending_deletes(self, limit: int = 1000) -> list[tuple[int, int]]:
        """Blocking. Slices whose objects are to be deleted: [(id, size)]."""

    @abc.abstractmethod
    def done_deletes(self, ids: Iterable[int]) -> None:
        """Blocking. Forget pending deletes whose objects are gone."""

    def release_sustained(self, ino: int) -> None:
        """Blocking. The last local handle of ``ino`` closed: stop sustaining
        it; if its nlink is 0 queue its slices and remove the inode.  Nothing to
        do (no transaction) for an inode this session never sustained."""
        if ino in self._sustaining:
            self.do_release_sustained(ino)
            self._sustaining.discard(ino)

    # -------------------------------------------- implementation hooks
    @abc.abstractmethod
    def do_release_sustained(self, ino: int) -> None: ...

    @abc.abstractmethod
    def do_lookup(self, parent: int, name: bytes) -> Attr: ...

    @abc.abstractmethod
    def do_getattr(self, ino: int) -> Attr: ...

    @abc.abstractmethod
    def do_setattr(self, ino: int, changes: SetAttr) -> Attr: ...

    @abc.abstractmethod
    def do_mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
                 rdev: int, target: Optional[bytes]) -> Attr: ...

    @abc.abstractmethod
    def do_unlink(self, parent: int, name: bytes, is_open: IsOpen) -> Attr: ...

    @abc.abstractmethod
    def do_rmdir(self, parent: int, name: bytes) -> int: ...

    @abc.abstractmethod
    def do_rename(self, parent: int, name: bytes, newparent: int, newname: bytes,
                  flags: int, is_open: IsOpen) -> tuple[int, Optional[Attr]]: ...

    @abc.abstractmethod
    def do_link(self, ino: int, newparent: int, newname: bytes) -> Attr: ...
