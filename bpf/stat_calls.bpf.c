/* stat_calls.bpf.c: stat-family syscalls whose result describes a file of THIS mount.
 *
 * At sys_enter we keep the user buffer per thread; at sys_exit with ret == 0 we read
 * the device from it with bpf_probe_read_user and compare like with like:
 *   struct stat  (newfstatat, newfstat, newstat, newlstat): st_dev, u64 at offset 0, in
 *                user-space encoding (cp_new_stat: new_encode_dev) == CURVEFS_UDEV
 *   struct statx (statx): stx_dev_major / stx_dev_minor == CURVEFS_DEV_MAJOR/MINOR
 * glibc 2.36 on x86_64 turns stat/lstat/fstat/fstatat into newfstatat (fstat with
 * AT_EMPTY_PATH); coreutils and newer programs use statx; the other three are only
 * reached by direct syscalls.  Whether the kernel answered from its attribute cache or
 * sent GETATTR/LOOKUP to the daemon is not visible here: compare with fuse_req.
 *
 * Maps: stat_calls[sys] (cumulative matches per syscall), stat_args{pid_tgid} (LRU).
 * Not seen: stats done by io_uring workers (no syscall tracepoints there).
 */
#include <uapi/linux/stat.h>
#include "curvefs_bpf.h"

BPF_ARRAY(stat_calls, u64, CURVEFS_STAT_SYSCALLS);
/* One slot per thread, reused in place (a lookup and a store per event, no update or
 * delete on the hot path: that halved the cost per stat call).  LRU: slots of exited
 * threads drop out.  buf == 0 marks a slot with no syscall in flight. */
BPF_TABLE("lru_hash", u64, struct curvefs_stat_arg, stat_args, CURVEFS_MAX_TIDS);

static __always_inline int stat_enter(const void *buf, u32 sys)
{
    u64 tid = bpf_get_current_pid_tgid();
    struct curvefs_stat_arg *ap = stat_args.lookup(&tid);
    if (ap) {
        ap->buf = (u64)buf;
        ap->sys = sys;
        return 0;
    }
    struct curvefs_stat_arg arg = {};
    arg.buf = (u64)buf;
    arg.sys = sys;
    stat_args.update(&tid, &arg);
    return 0;
}

static __always_inline int stat_exit(long ret)
{
    u64 tid = bpf_get_current_pid_tgid();
    struct curvefs_stat_arg *ap = stat_args.lookup(&tid);
    if (!ap || ap->buf == 0)
        return 0;
    u64 buf = ap->buf;
    u32 sys = ap->sys;
    ap->buf = 0;
    if (ret != 0)
        return 0;

    int match = 0;
    if (sys == CURVEFS_SYS_STATX) {
        u32 mm[2] = {};
        if (bpf_probe_read_user(mm, sizeof(mm),
                (void *)(buf + offsetof(struct statx, stx_dev_major))) == 0)
            match = mm[0] == CURVEFS_DEV_MAJOR && mm[1] == CURVEFS_DEV_MINOR;
    } else {
        u64 st_dev = 0;
        if (bpf_probe_read_user(&st_dev, sizeof(st_dev), (void *)buf) == 0)
            match = st_dev == (u64)CURVEFS_UDEV;
    }
    if (match) {
        u64 *n = stat_calls.lookup(&sys);
        if (n)
            __sync_fetch_and_add(n, 1);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_newfstatat)
{
    return stat_enter(args->statbuf, CURVEFS_SYS_NEWFSTATAT);
}
TRACEPOINT_PROBE(syscalls, sys_exit_newfstatat) { return stat_exit(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_statx)
{
    return stat_enter(args->buffer, CURVEFS_SYS_STATX);
}
TRACEPOINT_PROBE(syscalls, sys_exit_statx) { return stat_exit(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_newfstat)
{
    return stat_enter(args->statbuf, CURVEFS_SYS_NEWFSTAT);
}
TRACEPOINT_PROBE(syscalls, sys_exit_newfstat) { return stat_exit(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_newstat)
{
    return stat_enter(args->statbuf, CURVEFS_SYS_NEWSTAT);
}
TRACEPOINT_PROBE(syscalls, sys_exit_newstat) { return stat_exit(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_newlstat)
{
    return stat_enter(args->statbuf, CURVEFS_SYS_NEWLSTAT);
}
TRACEPOINT_PROBE(syscalls, sys_exit_newlstat) { return stat_exit(args->ret); }
