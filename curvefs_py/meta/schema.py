"""The canonical metadata schema: every table, column, sentinel and invariant.

This module is the specification of what the SQL engines store (DESIGN §4);
``meta/sql.py`` implements the invariants, fsck checks them.  The DDL is
written once, in a portable dialect: ``BIGINT`` for every integer that may
exceed 2^31, ``BLOB`` for byte strings and ``TEXT`` for JSON.  A dialect
renders it with ``render(types)``, e.g. PostgreSQL maps ``BLOB`` to ``BYTEA``.
Names (directory entries, xattr names) are raw bytes, never decoded.

Counters (table ``counter``):

* ``next_inode``   the next inode number to hand out (starts at 2; 1 is root).
* ``next_slice``   the next slice id to hand out (starts at 1; 0 means a hole).
  Engines reserve ids in batches by adding to it in a committed transaction
  before using them, so an id is never handed out twice, even after a crash.
* ``next_session`` the next session id (starts at 1; 0 means "no session").
* ``used_space``   sum over regular-file inodes of ``length`` rounded up to
  4 KiB (includes unlinked-but-sustained files until they are removed).
* ``next_change``  the next change-feed sequence number (``changelog.seq``).
* ``used_inodes``  number of ``node`` rows, the root included (what ``df -i``
  shows as used; ``Format.inodes`` limits it).

Times are integer nanoseconds since the Unix epoch.
"""
from __future__ import annotations

import re
from typing import Mapping

#: Stored in ``setting('schema')``; bump with a migration when the DDL changes.
SCHEMA_VERSION = 1

#: Initial counter values (see the module docstring).
COUNTERS = {
    "next_inode": 2,
    "next_slice": 1,
    "next_session": 1,
    "used_space": 0,
    "used_inodes": 0,
    "next_change": 1,
}

#: Rounding of ``used_space``: every regular file counts ``ceil(length / 4 KiB) * 4 KiB``.
SPACE_UNIT = 4096

TABLES: list[str] = [
    """
CREATE TABLE IF NOT EXISTS setting (
    name   VARCHAR(64) NOT NULL PRIMARY KEY,  -- 'format': the volume's Format; 'schema': SCHEMA_VERSION
    value  TEXT NOT NULL                      -- JSON text
)""",
    """
CREATE TABLE IF NOT EXISTS counter (
    name   VARCHAR(64) NOT NULL PRIMARY KEY,  -- one of COUNTERS
    value  BIGINT NOT NULL                    -- see the module docstring for each counter
)""",
    """
CREATE TABLE IF NOT EXISTS node (
    ino          BIGINT NOT NULL PRIMARY KEY,  -- inode number: 1 = root, others from next_inode,
                                               --   never reused, always < INTERNAL_INODE_BASE
    mode         BIGINT NOT NULL,  -- st_mode: S_IFMT type bits | permission bits (07777)
    uid          BIGINT NOT NULL,  -- owner
    gid          BIGINT NOT NULL,  -- group (inherited from a setgid parent directory)
    rdev         BIGINT NOT NULL,  -- device number of S_IFCHR / S_IFBLK nodes, else 0
    nlink        BIGINT NOT NULL,  -- directory: 2 + number of subdirectories (root included);
                                   -- other: number of edge rows with this ino.
                                   -- 0 only while a sustained row holds the inode (open, unlinked)
    length       BIGINT NOT NULL,  -- regular file: size in bytes; symlink: len(target);
                                   -- directory: 4096; fifo/socket/device: 0
    atime        BIGINT NOT NULL,  -- ns; set at creation and by setattr only (no atime on read)
    mtime        BIGINT NOT NULL,  -- ns; directory: last entry change; file: last write/truncate
    ctime        BIGINT NOT NULL,  -- ns; any change of this row or of the inode's links
    data_version BIGINT NOT NULL,  -- +1 on every write commit and every length change; the
                                   -- kernel page cache is kept across opens while it is unchanged
    parent       BIGINT NOT NULL   -- directory: ino of the directory holding its only entry
                                   -- (root: 1), used for '..' and rename loop checks;
                                   -- non-directory: 0 (hard links have no single parent)
)""",
    """
CREATE TABLE IF NOT EXISTS edge (
    parent BIGINT NOT NULL,  -- directory ino
    name   BLOB NOT NULL,    -- entry name: 1..255 bytes, no '/' or NUL, never '.' or '..'
    ino    BIGINT NOT NULL,  -- the node this entry names; a directory has exactly one edge
                             --   (the root has none)
    PRIMARY KEY (parent, name)
)""",
    """
CREATE TABLE IF NOT EXISTS symlink (
    ino    BIGINT NOT NULL PRIMARY KEY,  -- a node with S_IFLNK
    target BLOB NOT NULL                 -- 1..4095 bytes, as given to symlink(2)
)""",
    """
CREATE TABLE IF NOT EXISTS xattr (
    ino    BIGINT NOT NULL,  -- any node
    name   BLOB NOT NULL,    -- 1..255 bytes, e.g. b'user.foo'
    value  BLOB NOT NULL,    -- 0..65536 bytes
    PRIMARY KEY (ino, name)
)""",
    """
CREATE TABLE IF NOT EXISTS chunk (
    ino    BIGINT NOT NULL,  -- a regular-file node
    idx    BIGINT NOT NULL,  -- chunk index: file offset // chunk_size
    seq    BIGINT NOT NULL,  -- commit order inside (ino, idx), 1, 2, ...: later rows cover earlier ones
    pos    BIGINT NOT NULL,  -- offset in the chunk where the slice shows; pos + len <= chunk_size
    id     BIGINT NOT NULL,  -- slice id (object key prefix); 0 = a hole that reads as zeros
    size   BIGINT NOT NULL,  -- total bytes of slice object id (0 for a hole)
    off    BIGINT NOT NULL,  -- offset inside the slice object; off + len <= size (0 for a hole)
    len    BIGINT NOT NULL,  -- bytes shown, > 0
    PRIMARY KEY (ino, idx, seq)
    -- Invariants: every row still shows through somewhere in its chunk (rows that no
    -- longer do are deleted in the transaction that hid them, and their ids queued in
    -- delslices unless another row still names them); no row lies at or beyond the
    -- file's length except holes; every byte past the length reads as zeros.
)""",
    "CREATE INDEX IF NOT EXISTS chunk_id ON chunk (id)",
    """
CREATE TABLE IF NOT EXISTS delslices (
    id     BIGINT NOT NULL PRIMARY KEY,  -- slice id no chunk row names any more
    size   BIGINT NOT NULL               -- its size: the block objects to delete follow from it
    -- A background worker deletes the objects, then the row (Engine.done_deletes).
)""",
    """
CREATE TABLE IF NOT EXISTS session (
    sid       BIGINT NOT NULL PRIMARY KEY,  -- from next_session; one per mounted client
    heartbeat BIGINT NOT NULL,              -- ns of the last heartbeat; stale sessions are closed
                                            --   by any client (clean_stale_sessions)
    info      TEXT NOT NULL                 -- JSON: host, pid, mountpoint, version
)""",
    """
CREATE TABLE IF NOT EXISTS sustained (
    sid    BIGINT NOT NULL,  -- the session that holds the inode open (0: no session)
    ino    BIGINT NOT NULL,  -- a node with nlink 0 whose data must be kept until released
    PRIMARY KEY (sid, ino)
)""",
    "CREATE INDEX IF NOT EXISTS sustained_ino ON sustained (ino)",
    """
CREATE TABLE IF NOT EXISTS changelog (
    seq    BIGINT NOT NULL PRIMARY KEY,  -- from next_change, in commit order (one writer / SERIALIZABLE)
    sid    BIGINT NOT NULL,              -- the session that made the change (its own rows are skipped)
    ino    BIGINT NOT NULL,              -- > 0: this inode's attributes or data changed
    parent BIGINT NOT NULL,              -- > 0: the entry (parent, name) was added, removed or replaced
    name   BLOB NOT NULL,
    ts     BIGINT NOT NULL,              -- ns; rows older than CHANGELOG_KEEP_S are pruned
    version BIGINT NOT NULL DEFAULT -1   -- the inode's data_version after it, -1: unknown
                                         -- (added later: publish() adds it to older tables)
    -- A feed of kernel-cache invalidations for other clients (Engine.changes_since).
    -- Written after the change itself commits: a lost row only costs staleness up to
    -- the attr/entry timeout, never wrong data (open checks data_version).
)""",
]

#: How long change-feed rows are kept (a client that lags longer rereads from "now").
CHANGELOG_KEEP_S = 600


def render(types: Mapping[str, str] | None = None) -> list[str]:
    """The DDL statements with portable type names replaced (``{'BLOB': 'BYTEA'}``)."""
    if not types:
        return list(TABLES)
    pattern = re.compile(r"\b(" + "|".join(re.escape(t) for t in types) + r")\b")
    return [pattern.sub(lambda m: types[m.group(1)], stmt) for stmt in TABLES]


def round_space(length: int) -> int:
    """``length`` rounded up to SPACE_UNIT (what a file of that length counts in used_space)."""
    return (length + SPACE_UNIT - 1) // SPACE_UNIT * SPACE_UNIT
