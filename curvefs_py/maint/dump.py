"""``curvefs dump`` / ``curvefs load``: a volume's metadata as JSON lines, and back.

For backups of the metadata and for moving a volume to another engine (the embedded
SQLite volume that outgrew one machine goes to Redis or PostgreSQL).  The file data
stays where it is: the dump names the slices by id, and ``load`` restores them with
the same ids into a new, empty database of the same volume (same bucket, same uuid),
then moves the slice-id counter past them.

Format (one JSON object per line, ASCII; names, link targets and xattr names are
strings with undecodable bytes as surrogate escapes (\\udcXX), xattr values base64)::

    {"curvefs_dump": 1, "format": {...Format, secret_key omitted unless kept...},
     "next_slice_id": n}                       (above every slice id handed out so far)
    {"ino": 1, "attr": {...}, "xattrs": {...}}                      the root
    {"ino": N, "parent": P, "name": "...", "attr": {...}, "xattrs": {...},
     "target": "..." (symlink) | "chunks": {"idx": [[pos, id, size, off, len], ...]}}
    {"ino": N, "parent": P, "name": "..."}                           another hard link
    {"end": {"inodes": n, "entries": n, "slices": n, "max_slice_id": n}}

Entries come parent before child (a walk of the tree from the root).  Inode
numbers are the dump's own: ``load`` gives new ones (and keeps hard links
together); data versions start afresh.  Not in a dump: the sessions, the change
feed, files deleted while still open, and the delete queue, whose objects become
leaks that ``gc`` reclaims.  A dump of a mounted volume is not a snapshot: dump a
volume nobody writes to.

Blocking throughout (a command-line tool, not the daemon).
"""
from __future__ import annotations

import base64
import dataclasses
import errno
import json
import stat
from typing import IO, Callable, Iterator, Optional

from .. import ROOT_INODE
from ..errors import FsError, QuietError
from ..meta.engine import Engine
from ..types import Attr, Format, SetAttr, Slice

VERSION = 1
_ATTR_FIELDS = ("mode", "uid", "gid", "rdev", "length", "atime_ns", "mtime_ns", "ctime_ns")

Progress = Callable[[int], None]  # (inodes so far)


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _raw(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _attr(a: Attr) -> dict:
    return {f: getattr(a, f) for f in _ATTR_FIELDS}


def _xattrs(engine: Engine, ino: int) -> dict:
    out = {}
    for name in engine.listxattr(ino):
        try:
            out[_name(name)] = base64.b64encode(engine.getxattr(ino, name)).decode()
        except FsError:
            continue  # removed while we read
    return out


def dump(engine: Engine, out: IO[str], keep_secret: bool = False,
         progress: Optional[Progress] = None) -> dict:
    """Blocking. Write the volume's metadata to ``out``; returns the end record."""
    fmt = engine.load()
    setting = fmt.to_dict()
    if not keep_secret:
        setting.pop("secret_key", None)
    chunk_size = fmt.chunk_size

    def line(obj: dict) -> None:
        out.write(json.dumps(obj, separators=(",", ":")) + "\n")  # ASCII: surrogates escaped

    setting.pop("loading", None)
    # above every slice id handed out so far, also of slices no file names any more
    # (queued deletes, leaks): load moves the new database's counter past it first
    next_id = engine.next_slice_id()
    line({"curvefs_dump": VERSION, "format": setting, "next_slice_id": next_id})
    root = engine.getattr(ROOT_INODE)
    line({"ino": ROOT_INODE, "attr": _attr(root), "xattrs": _xattrs(engine, ROOT_INODE)})
    seen = {ROOT_INODE}
    entries = 0
    slice_ids: set[int] = set()
    todo = [ROOT_INODE]
    while todo:
        parent = todo.pop()
        for e in engine.readdir(parent):
            entries += 1
            rec: dict = {"ino": e.ino, "parent": parent, "name": _name(e.name)}
            if e.ino in seen:  # another link of a file already written
                line(rec)
                continue
            seen.add(e.ino)
            a = engine.getattr(e.ino)
            rec["attr"] = _attr(a)
            rec["xattrs"] = _xattrs(engine, e.ino)
            if a.is_symlink:
                rec["target"] = _name(engine.readlink(e.ino))
            elif a.is_file:
                chunks = {}
                for idx in range((a.length + chunk_size - 1) // chunk_size):
                    rows = engine.read_chunk(e.ino, idx)
                    if rows:
                        chunks[str(idx)] = [[s.pos, s.id, s.size, s.off, s.len] for s in rows]
                        slice_ids.update(s.id for s in rows if s.id)
                rec["chunks"] = chunks
            elif a.is_dir:
                todo.append(e.ino)
            line(rec)
            if progress is not None and len(seen) % 1000 == 0:
                progress(len(seen))
    end = {"inodes": len(seen), "entries": entries, "slices": len(slice_ids),
           "max_slice_id": max(slice_ids, default=0)}
    line({"end": end})
    return end


def _records(src: IO[str]) -> Iterator[tuple[int, dict]]:
    for n, text in enumerate(src, 2):  # (line 1, the header, is read by read_header)
        if text.strip():
            try:
                rec = json.loads(text)
            except ValueError as exc:
                raise QuietError(f"line {n} of the dump is not JSON: {exc}", 3) from None
            if not isinstance(rec, dict):
                raise QuietError(f"line {n} of the dump is not an object", 3)
            yield n, rec


def read_header(src: IO[str]) -> tuple[Format, int]:
    """The Format and the next slice id in the dump's first line (the stream is left
    after it)."""
    try:
        head = json.loads(src.readline())
        if head.get("curvefs_dump") != VERSION:
            raise ValueError(f"dump version {head.get('curvefs_dump')!r}, not {VERSION}")
        return Format.from_dict(head["format"]), int(head.get("next_slice_id", 0))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # (UnicodeDecodeError too)
        raise QuietError(f"not a curvefs dump: {exc}", 3) from None


#: errors of the metadata engine that mean the dump's content is wrong (exit 3)
_BAD_CONTENT = {errno.EINVAL, errno.EEXIST, errno.ENAMETOOLONG, errno.ENOENT, errno.ENOTDIR,
                errno.EISDIR, errno.EPERM, errno.ENOTEMPTY, errno.ERANGE, errno.E2BIG}


def load(engine: Engine, fmt: Format, next_slice_id: int, src: IO[str],
         progress: Optional[Progress] = None) -> dict:
    """Blocking. Create the volume ``fmt`` in ``engine`` (an empty database) and
    the dumped tree in it; ``src`` is past the header.  Returns the end record.

    The volume is marked ``loading`` until the last record is in (mount, gc and
    fsck refuse it meanwhile), and the slice-id counter is moved past the dump's
    ids before anything else, so even a half-loaded volume never reuses one."""
    engine.init(dataclasses.replace(fmt, loading=True))
    engine.skip_slice_ids(next_slice_id - 1)
    try:
        end = _load_records(engine, src, progress)
    except UnicodeDecodeError as exc:
        raise QuietError(f"the dump is not text: {exc}", 3) from None
    engine.init(dataclasses.replace(fmt, loading=False), force=True)
    return end


def _load_records(engine: Engine, src: IO[str], progress: Optional[Progress]) -> dict:
    inos = {ROOT_INODE: ROOT_INODE}  # dump's inode -> new one
    times: list[tuple[int, dict]] = []  # set last: creating children moves a directory's
    end = None
    max_id = 0
    entries, slice_ids, root_seen = 0, set(), False  # checked against the end record
    for n, rec in _records(src):
        try:
            if "end" in rec:
                end = rec["end"]
                break
            old = int(rec["ino"])
            if "parent" not in rec:  # the root
                if old != ROOT_INODE:
                    raise ValueError("a record without a parent that is not the root")
                _set_xattrs(engine, ROOT_INODE, rec.get("xattrs", {}))
                times.append((ROOT_INODE, rec["attr"]))
                root_seen = True
                continue
            parent, name = inos[int(rec["parent"])], _raw(rec["name"])
            entries += 1
            if "attr" not in rec:  # another hard link
                engine.link(inos[old], parent, name)
                continue
            at = rec["attr"]
            target = _raw(rec["target"]) if "target" in rec else None
            new = engine.mknod(parent, name, int(at["mode"]), int(at["uid"]), int(at["gid"]),
                               int(at.get("rdev", 0)), target).ino
            inos[old] = new
            _set_xattrs(engine, new, rec.get("xattrs", {}))
            if stat.S_ISREG(int(at["mode"])):
                length = int(at["length"])
                # one commit for the file (a write whose first slice id is named
                # already counts as a replay): each chunk's rows in commit order
                slices = [(int(idx), Slice(*map(int, r)))
                          for idx, rows in sorted(rec.get("chunks", {}).items(), key=lambda kv: int(kv[0]))
                          for r in rows]
                if slices:
                    max_id = max([max_id] + [s.id for _, s in slices])
                    slice_ids.update(s.id for _, s in slices if s.id)
                    engine.write(new, slices, length, int(at["mtime_ns"]))
                if length and not rec.get("chunks"):  # all hole
                    engine.setattr(new, SetAttr(length=length))
            times.append((new, at))
        except QuietError:
            raise
        except FsError as exc:
            raise QuietError(f"line {n} of the dump: {exc}", 3 if exc.errno in _BAD_CONTENT else 4) from None
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise QuietError(f"line {n} of the dump is malformed: {exc!r}", 3) from None
        if progress is not None and len(inos) % 1000 == 0:
            progress(len(inos))
    if end is None:
        raise QuietError("the dump ends early (no end record): a partial file?", 3)
    want = (int(end.get("inodes", -1)), int(end.get("entries", -1)), int(end.get("slices", -1)))
    got = (len(inos), entries, len(slice_ids))
    if not root_seen or got != want:  # a record lost from the middle: a file gone silently
        raise QuietError("the dump is damaged: it lists {} inodes, {} entries, {} slices; "
                         "{} inodes, {} entries, {} slices were in it{}".format(
                             *want, *got, "" if root_seen else ", and no root record"), 3)
    engine.skip_slice_ids(max(max_id, int(end.get("max_slice_id", 0))))
    for ino, at in times:
        engine.setattr(ino, SetAttr(mode=int(at["mode"]) & 0o7777, uid=int(at["uid"]), gid=int(at["gid"]),
                                    atime_ns=int(at["atime_ns"]), mtime_ns=int(at["mtime_ns"]),
                                    ctime_ns=int(at["ctime_ns"])))
    return end


def _set_xattrs(engine: Engine, ino: int, xattrs: dict) -> None:
    for name, value in xattrs.items():
        engine.setxattr(ino, _raw(name), base64.b64decode(value))
