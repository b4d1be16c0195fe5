"""curvefs_py: a shared POSIX file system on object storage (pyfuse3 + trio)."""

__version__ = "0.1.0"

ROOT_INODE = 1
#: A file is cut into chunks of this many bytes; slices never cross a chunk boundary.
CHUNK_SIZE = 64 << 20
#: Default size of one block object (a slice's bytes are stored in blocks of this size).
BLOCK_SIZE = 4 << 20
#: Longest name of one directory entry, in bytes (as on ext4).
NAME_MAX = 255
#: Inodes at and above this value are virtual files of the daemon (.stats, .config).
INTERNAL_INODE_BASE = 0x7FFF_FFFF_0000_0000
