/* curvefs_bpf.h: structs and constants shared by the bpf/ programs and mirrored in
 * curvefs_py/kernel/maps.py (ctypes; the loader checks that the sizes match).
 *
 * Settings come from the loader as -D cflags (never string replacement):
 *   CURVEFS_DEV        kernel dev_t of the mount (MKDEV: major << 20 | minor); equals
 *                      fuse_conn->dev == sb->s_dev, i.e. the tracepoints' `connection`
 *                      and `s_dev` fields
 *   CURVEFS_UDEV       the same device in user-space encoding (os.stat().st_dev,
 *                      new_encode_dev: minor & 0xff | major << 8 | (minor & ~0xff) << 12),
 *                      as found in struct stat.st_dev
 *   CURVEFS_DEV_MAJOR, CURVEFS_DEV_MINOR   the same device as in struct statx
 * Optional: CURVEFS_MAX_INODES, CURVEFS_MAX_TIDS, CURVEFS_MAX_INFLIGHT (map sizes).
 *
 * All counters are cumulative since load: several readers (pusher, .stats, stats CLI)
 * take deltas of the same maps, so nobody clears them.
 */
#ifndef CURVEFS_BPF_H
#define CURVEFS_BPF_H

#if !defined(CURVEFS_DEV) || !defined(CURVEFS_UDEV) || \
    !defined(CURVEFS_DEV_MAJOR) || !defined(CURVEFS_DEV_MINOR)
#error "curvefs_bpf.h: the loader must pass -DCURVEFS_DEV, -DCURVEFS_UDEV, -DCURVEFS_DEV_MAJOR, -DCURVEFS_DEV_MINOR"
#endif

#ifndef CURVEFS_BACKING_DEV
#define CURVEFS_BACKING_DEV 0xffffffffu  /* kernel dev_t of the image directory's file system */
#endif
#ifndef CURVEFS_MAX_INODES
#define CURVEFS_MAX_INODES 65536   /* per-inode LRU hash: least recently used inodes drop out */
#endif
#ifndef CURVEFS_MAX_TIDS
#define CURVEFS_MAX_TIDS 16384     /* per-thread scratch (stat buffer, read cursor) */
#endif
#ifndef CURVEFS_MAX_INFLIGHT
#define CURVEFS_MAX_INFLIGHT 16384 /* FUSE requests between send and end */
#endif

/* FUSE opcodes index arrays directly; larger ones (CUSE_INIT = 4096) count in slot 0. */
#define CURVEFS_MAX_OPCODE 64
/* log2 latency slots in microseconds, as bpf_log2l() returns them: slot s >= 1 counts
 * latencies in [2^(s-1), 2^s) us (slot 1 also holds 0 us); the last slot is open-ended.
 * Same convention as curvefs_py.metrics.observe_us (int.bit_length()). */
#define CURVEFS_HIST_SLOTS 27
#define CURVEFS_FUSE_OUT_HEADER_LEN 16  /* sizeof(struct fuse_out_header) */
#define CURVEFS_FUSE_READ 15            /* FUSE_READ */

/* fuse_req: per opcode (array index = opcode) */
struct curvefs_op_stats {
    u64 requests;        /* fuse_request_send: requests queued for the daemon */
    u64 completed;       /* fuse_request_end matched to a send seen by us */
    u64 errors;          /* ... whose reply carried an error */
    u64 latency_ns_sum;  /* send -> end */
    u64 bytes;           /* READ: reply payload bytes (end.len - sizeof(fuse_out_header)) */
};

struct curvefs_lat_key {
    u32 opcode;
    u32 slot;
};

struct curvefs_req_start {
    u64 ts_ns;
    u32 opcode;
    u32 pad;
};

/* page_cache: per inode (key: i_ino, u64) */
struct curvefs_inode_stats {
    u64 read_calls;      /* read calls that reached the page cache (filemap_get_pages) */
    u64 read_pages;      /* pages those calls asked for (last_index - index + 1) */
    s64 resident_pages;  /* + added, - deleted since load; never below 0 */
    u64 pages_added;
    u64 pages_deleted;
};

/* page_cache: key of backing{} (an image file on the cache disk) */
struct curvefs_backing_key {
    u32 dev;             /* kernel dev_t, as the filemap tracepoints report it */
    u32 pad;
    u64 ino;
};

/* page_cache: one-element array of totals, so snapshots need not walk the inode map */
struct curvefs_page_totals {
    u64 read_calls;
    u64 read_pages;
    u64 pages_added;
    u64 pages_deleted;          /* deletions of pages we saw added */
    u64 pages_deleted_untracked; /* deletions of pages we never saw added (resident
                                    before load, or inode dropped from the LRU map) */
};

/* page_cache: per thread, the last get_pages event, to tell a new read call from the
 * next batch of the same call (same inode and last_index, higher index) */
struct curvefs_read_cursor {
    u64 ino;
    u64 index;
    u64 last_index;
};

/* stat_calls: per thread, between sys_enter and sys_exit */
enum curvefs_stat_sys {
    CURVEFS_SYS_NEWFSTATAT = 0,
    CURVEFS_SYS_STATX = 1,
    CURVEFS_SYS_NEWFSTAT = 2,
    CURVEFS_SYS_NEWSTAT = 3,
    CURVEFS_SYS_NEWLSTAT = 4,
    CURVEFS_STAT_SYSCALLS = 5,
};

struct curvefs_stat_arg {
    u64 buf;   /* user pointer: struct stat * or struct statx * */
    u32 sys;   /* enum curvefs_stat_sys */
    u32 pad;
};

#endif /* CURVEFS_BPF_H */
