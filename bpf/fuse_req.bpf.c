/* fuse_req.bpf.c: FUSE requests that reached the daemon of THIS mount.
 *
 * fuse:fuse_request_send fires in fuse_send_one() after the request got its `unique`
 * and before it is queued for the daemon; fuse:fuse_request_end fires in
 * fuse_request_end() (reply, error or abort).  `connection` is fuse_conn->dev, which
 * fuse_fill_super_common() sets to sb->s_dev: the mount's device, kernel encoding.
 * FORGET/BATCH_FORGET and INTERRUPT go through other queues and are not seen.
 *
 * Maps (cumulative):
 *   op_stats[opcode]            struct curvefs_op_stats
 *   lat_hist{opcode, slot}      log2 histogram of send->end latency in us
 *   inflight{unique}            send time + opcode until the request ends
 */
#include <uapi/linux/fuse.h>
#include "curvefs_bpf.h"

BPF_ARRAY(op_stats, struct curvefs_op_stats, CURVEFS_MAX_OPCODE);
BPF_HISTOGRAM(lat_hist, struct curvefs_lat_key, CURVEFS_MAX_OPCODE * CURVEFS_HIST_SLOTS);
BPF_HASH(inflight, u64, struct curvefs_req_start, CURVEFS_MAX_INFLIGHT);

TRACEPOINT_PROBE(fuse, fuse_request_send)
{
    if (args->connection != CURVEFS_DEV)
        return 0;
    u32 op = args->opcode;
    if (op >= CURVEFS_MAX_OPCODE)
        op = 0;
    struct curvefs_op_stats *s = op_stats.lookup(&op);
    if (s)
        __sync_fetch_and_add(&s->requests, 1);

    u64 unique = args->unique;
    struct curvefs_req_start start = {};
    start.ts_ns = bpf_ktime_get_ns();
    start.opcode = op;
    inflight.update(&unique, &start);
    return 0;
}

TRACEPOINT_PROBE(fuse, fuse_request_end)
{
    if (args->connection != CURVEFS_DEV)
        return 0;
    u64 unique = args->unique;
    struct curvefs_req_start *sp = inflight.lookup(&unique);
    if (!sp)
        return 0;               /* sent before we loaded, or the inflight map was full */
    struct curvefs_req_start start = *sp;
    inflight.delete(&unique);

    u64 delta_ns = bpf_ktime_get_ns() - start.ts_ns;
    u64 delta_us = delta_ns / 1000;
    u32 op = start.opcode;
    struct curvefs_op_stats *s = op_stats.lookup(&op);
    if (s) {
        __sync_fetch_and_add(&s->completed, 1);
        __sync_fetch_and_add(&s->latency_ns_sum, delta_ns);
        if (args->error != 0)
            __sync_fetch_and_add(&s->errors, 1);
        else if (op == CURVEFS_FUSE_READ && args->len > CURVEFS_FUSE_OUT_HEADER_LEN)
            __sync_fetch_and_add(&s->bytes, args->len - CURVEFS_FUSE_OUT_HEADER_LEN);
    }

    struct curvefs_lat_key key = {};
    key.opcode = op;
    key.slot = bpf_log2l(delta_us);
    if (key.slot >= CURVEFS_HIST_SLOTS)
        key.slot = CURVEFS_HIST_SLOTS - 1;
    lat_hist.increment(key);
    return 0;
}
