/* page_cache.bpf.c: the kernel page cache of THIS mount, per inode.
 *
 * filemap:mm_filemap_get_pages fires at the end of each successful filemap_get_pages()
 * (buffered read(2)/pread/readv/splice through filemap_read; not mmap faults).  A read
 * call fires it once per batch of folios: a small read once, a large read (more than a
 * folio batch, or one that waits on a page still being read) several times, each with
 * the same last_index and a higher index.  Per thread we keep the last event and count
 * such continuations as the same call.  Known limit: a thread that reads a sub-range
 * ending on the same page just after a larger read of that inode (pread 0-8K, then
 * pread 4K-8K) is counted once.
 *
 * filemap:mm_filemap_add_to_page_cache / mm_filemap_delete_from_page_cache fire per
 * folio (1 << order pages) on insert and on removal (reclaim, truncate, invalidation,
 * posix_fadvise(DONTNEED), drop_caches, inode eviction).  Page migration fires neither.
 * Pages that were resident before load are unknown; deleting them is counted apart
 * (pages_deleted_untracked), so resident counts never go below zero.
 *
 * Passthrough: a file of this mount opened with FOPEN_PASSTHROUGH is read by the kernel
 * from its image (a file on the cache disk, CURVEFS_BACKING_DEV); the daemon writes
 * backing{image dev, image ino} = mount inode for each image it hands to the kernel, and
 * events on those images count for the mount inode (reads in the totals too; resident
 * pages per inode only, so the totals stay "pages of the FUSE mapping" for the pusher).
 *
 * Maps (cumulative): inodes{i_ino} (LRU), totals[0], read_cursor{pid_tgid} (LRU),
 * backing{dev, ino} (written by the daemon).
 */
#include "curvefs_bpf.h"

BPF_TABLE("lru_hash", u64, struct curvefs_inode_stats, inodes, CURVEFS_MAX_INODES);
BPF_ARRAY(totals, struct curvefs_page_totals, 1);
BPF_TABLE("lru_hash", u64, struct curvefs_read_cursor, read_cursor, CURVEFS_MAX_TIDS);
BPF_TABLE("hash", struct curvefs_backing_key, u64, backing, CURVEFS_MAX_INODES);

/* The mount inode an event belongs to: its own, or the one an image backs; 0: neither. */
static __always_inline u64 mount_inode(u32 dev, u64 i_ino)
{
    if (dev == CURVEFS_DEV)
        return i_ino;
    if (dev != CURVEFS_BACKING_DEV)
        return 0;
    struct curvefs_backing_key k = {};
    k.dev = dev;
    k.ino = i_ino;
    u64 *ino = backing.lookup(&k);
    return ino ? *ino : 0;
}

static __always_inline struct curvefs_inode_stats *inode_stats(u64 ino)
{
    struct curvefs_inode_stats zero = {};
    return inodes.lookup_or_try_init(&ino, &zero);
}

TRACEPOINT_PROBE(filemap, mm_filemap_get_pages)
{
    u64 ino = mount_inode(args->s_dev, args->i_ino);
    if (!ino)
        return 0;
    u64 index = args->index;
    u64 last = args->last_index;
    u64 tid = bpf_get_current_pid_tgid();

    struct curvefs_read_cursor *cur = read_cursor.lookup(&tid);
    if (cur && cur->ino == ino && cur->last_index == last && index > cur->index) {
        cur->index = index;     /* next batch of the same read call */
        return 0;
    }
    if (cur) {                  /* reuse the thread's slot in place: no map update */
        cur->ino = ino;
        cur->index = index;
        cur->last_index = last;
    } else {
        struct curvefs_read_cursor next = {};
        next.ino = ino;
        next.index = index;
        next.last_index = last;
        read_cursor.update(&tid, &next);
    }

    u64 pages = last >= index ? last - index + 1 : 1;
    u32 zero = 0;
    struct curvefs_page_totals *t = totals.lookup(&zero);
    if (t) {
        __sync_fetch_and_add(&t->read_calls, 1);
        __sync_fetch_and_add(&t->read_pages, pages);
    }
    struct curvefs_inode_stats *s = inode_stats(ino);
    if (s) {
        __sync_fetch_and_add(&s->read_calls, 1);
        __sync_fetch_and_add(&s->read_pages, pages);
    }
    return 0;
}

TRACEPOINT_PROBE(filemap, mm_filemap_add_to_page_cache)
{
    u64 ino = mount_inode(args->s_dev, args->i_ino);
    if (!ino)
        return 0;
    s64 pages = 1LL << (args->order & 31);
    u32 zero = 0;
    struct curvefs_page_totals *t = args->s_dev == CURVEFS_DEV ? totals.lookup(&zero) : 0;
    if (t)
        __sync_fetch_and_add(&t->pages_added, pages);
    struct curvefs_inode_stats *s = inode_stats(ino);
    if (s) {
        __sync_fetch_and_add(&s->resident_pages, pages);
        __sync_fetch_and_add(&s->pages_added, pages);
    }
    return 0;
}

TRACEPOINT_PROBE(filemap, mm_filemap_delete_from_page_cache)
{
    u64 ino = mount_inode(args->s_dev, args->i_ino);
    if (!ino)
        return 0;
    s64 pages = 1LL << (args->order & 31);
    u32 zero = 0;
    struct curvefs_page_totals *t = args->s_dev == CURVEFS_DEV ? totals.lookup(&zero) : 0;
    struct curvefs_inode_stats *s = inodes.lookup(&ino);
    /* Never below zero: a page we did not see added was resident before load (or
     * its inode dropped out of the LRU map).  Check-then-add races only with a
     * concurrent add/delete of the same inode, an error of one folio at most. */
    if (s && s->resident_pages >= pages) {
        __sync_fetch_and_add(&s->resident_pages, -pages);
        __sync_fetch_and_add(&s->pages_deleted, pages);
        if (t)
            __sync_fetch_and_add(&t->pages_deleted, pages);
    } else if (t) {
        __sync_fetch_and_add(&t->pages_deleted_untracked, pages);
    }
    return 0;
}
