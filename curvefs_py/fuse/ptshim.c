/*
 * FUSE passthrough for a libfuse that predates it (Debian 12's libfuse 3.14).
 *
 * Linux >= 6.9 lets a FUSE server hand the kernel an open file ("backing
 * file"): reads, writes and mmap of a file opened with FOPEN_PASSTHROUGH then
 * go straight to the backing file, inside the kernel, without a round trip to
 * the daemon.  Three things are needed, and libfuse 3.14 can do none of them:
 *
 *   1. FUSE_INIT reply: flag FUSE_PASSTHROUGH (bit 37, via FUSE_INIT_EXT and
 *      flags2) and max_stack_depth >= 1;
 *   2. FUSE_DEV_IOC_BACKING_OPEN / _CLOSE ioctls on the /dev/fuse fd, which
 *      register a backing file and return its id;
 *   3. OPEN reply: FOPEN_PASSTHROUGH in open_flags and the backing id in the
 *      field that older headers call padding.
 *
 * (2) is a plain ioctl.  For (1) and (3) this library redirects libfuse's own
 * calls to writev() (its GOT entry, nothing else in the process) to a wrapper
 * that rewrites exactly two kinds of replies before they reach the kernel:
 *
 *   - the first reply of the session when it is a FUSE_INIT reply (64-byte
 *     fuse_init_out, major 7), and
 *   - an OPEN reply (16-byte fuse_open_out) whose file handle the daemon
 *     registered with cfpt_expect() in its open handler.  pyfuse3 writes the
 *     reply right after the handler returns, on the same thread, so no other
 *     reply can come between the registration and its reply.
 *
 * Everything else passes through untouched.  Loaded with ctypes by
 * curvefs_py/fuse/backing.py; built by scripts/setup.sh.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

struct out_header { uint32_t len; int32_t error; uint64_t unique; };
struct init_out {                     /* include/uapi/linux/fuse.h, 7.40+ */
	uint32_t major, minor, max_readahead, flags;
	uint16_t max_background, congestion_threshold;
	uint32_t max_write, time_gran;
	uint16_t max_pages, map_alignment;
	uint32_t flags2, max_stack_depth;
	uint16_t request_timeout, unused[11];
};
struct open_out { uint64_t fh; uint32_t open_flags; int32_t backing_id; };
struct backing_map { int32_t fd; uint32_t flags; uint64_t padding; };

#define IOC_BACKING_OPEN  _IOW(229, 1, struct backing_map)
#define IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)
#define INIT_EXT          (1u << 30)
#define FLAGS2_PASSTHROUGH (1u << (37 - 32))
#define FOPEN_DIRECT_IO   (1u << 0)
#define FOPEN_PASSTHROUGH (1u << 7)
/* the only flags the kernel accepts together with FOPEN_PASSTHROUGH */
#define FOPEN_PT_MASK     (FOPEN_PASSTHROUGH | FOPEN_DIRECT_IO | (1u << 6) | (1u << 5))

_Static_assert(sizeof(struct init_out) == 64, "fuse_init_out");
_Static_assert(sizeof(struct open_out) == 16, "fuse_open_out");

#define SLOTS 256
static struct { uint64_t fh; int32_t id; uint32_t flags; int used; } pending[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int fuse_fd = -1;
static int init_state;                /* 0: no reply yet, 1: INIT patched, 2: first reply was not INIT */

static int take(uint64_t fh, int32_t *id, uint32_t *flags)
{
	int found = 0;
	pthread_mutex_lock(&lock);
	for (int i = 0; i < SLOTS; i++) {
		if (pending[i].used && pending[i].fh == fh) {
			*id = pending[i].id;
			*flags = pending[i].flags;
			pending[i].used = 0;
			found = 1;
			break;
		}
	}
	pthread_mutex_unlock(&lock);
	return found;
}

static ssize_t hook_writev(int fd, const struct iovec *iov, int cnt)
{
	if (cnt < 2 || iov[0].iov_len != sizeof(struct out_header))
		return writev(fd, iov, cnt);
	const struct out_header *oh = iov[0].iov_base;
	if (oh->unique == 0 || oh->error != 0)        /* notification or error reply */
		return writev(fd, iov, cnt);
	size_t plen = 0;
	for (int i = 1; i < cnt; i++)
		plen += iov[i].iov_len;

	if (init_state == 0) {
		struct init_out io;
		if (cnt == 2 && plen == sizeof(io)) {
			memcpy(&io, iov[1].iov_base, sizeof(io));
			if (io.major == 7) {
				io.flags |= INIT_EXT;
				io.flags2 |= FLAGS2_PASSTHROUGH;
				if (io.max_stack_depth == 0)
					io.max_stack_depth = 1;
				fuse_fd = fd;
				init_state = 1;
				struct iovec v[2] = {{iov[0].iov_base, iov[0].iov_len}, {&io, sizeof(io)}};
				return writev(fd, v, 2);
			}
		}
		init_state = 2;
		return writev(fd, iov, cnt);
	}
	if (cnt == 2 && plen == sizeof(struct open_out)) {
		struct open_out oo;
		int32_t id;
		uint32_t flags;
		memcpy(&oo, iov[1].iov_base, sizeof(oo));
		if (take(oo.fh, &id, &flags)) {
			oo.open_flags = (oo.open_flags | FOPEN_PASSTHROUGH | flags) & FOPEN_PT_MASK;
			oo.backing_id = id;
			struct iovec v[2] = {{iov[0].iov_base, iov[0].iov_len}, {&oo, sizeof(oo)}};
			return writev(fd, v, 2);
		}
	}
	return writev(fd, iov, cnt);
}

/* Point libfuse3's GOT entry for writev at hook_writev. */
static int patched_slots;

static void patch_object(struct dl_phdr_info *info)
{
	ElfW(Addr) base = info->dlpi_addr;
	const ElfW(Dyn) *dyn = NULL;
	ElfW(Addr) relro_lo = 0, relro_hi = 0;
	for (int i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		if (ph->p_type == PT_DYNAMIC)
			dyn = (const ElfW(Dyn) *)(base + ph->p_vaddr);
		if (ph->p_type == PT_GNU_RELRO) {
			relro_lo = base + ph->p_vaddr;
			relro_hi = relro_lo + ph->p_memsz;
		}
	}
	if (!dyn)
		return;
	const ElfW(Sym) *symtab = NULL;
	const char *strtab = NULL;
	const ElfW(Rela) *tabs[2] = {NULL, NULL};
	size_t sizes[2] = {0, 0};
	for (; dyn->d_tag != DT_NULL; dyn++) {
		ElfW(Addr) p = dyn->d_un.d_ptr;
		ElfW(Addr) abs = p < base ? p + base : p;   /* glibc relocates these in place */
		switch (dyn->d_tag) {
		case DT_SYMTAB: symtab = (const ElfW(Sym) *)abs; break;
		case DT_STRTAB: strtab = (const char *)abs; break;
		case DT_JMPREL: tabs[0] = (const ElfW(Rela) *)abs; break;
		case DT_PLTRELSZ: sizes[0] = dyn->d_un.d_val; break;
		case DT_RELA: tabs[1] = (const ElfW(Rela) *)abs; break;
		case DT_RELASZ: sizes[1] = dyn->d_un.d_val; break;
		}
	}
	if (!symtab || !strtab)
		return;
	long pg = sysconf(_SC_PAGESIZE);
	for (int t = 0; t < 2; t++) {
		if (!tabs[t])
			continue;
		for (size_t i = 0; i < sizes[t] / sizeof(ElfW(Rela)); i++) {
			const ElfW(Rela) *r = &tabs[t][i];
			unsigned type = ELF64_R_TYPE(r->r_info);
			if (type != R_X86_64_JUMP_SLOT && type != R_X86_64_GLOB_DAT)
				continue;
			const char *name = strtab + symtab[ELF64_R_SYM(r->r_info)].st_name;
			if (strcmp(name, "writev") != 0)
				continue;
			void **slot = (void **)(base + r->r_offset);
			void *page = (void *)((uintptr_t)slot & ~(uintptr_t)(pg - 1));
			if (mprotect(page, pg, PROT_READ | PROT_WRITE) != 0)
				continue;
			*slot = (void *)hook_writev;
			if ((ElfW(Addr))slot >= relro_lo && (ElfW(Addr))slot < relro_hi)
				mprotect(page, pg, PROT_READ);
			patched_slots++;
		}
	}
}

static int find_libfuse(struct dl_phdr_info *info, size_t size, void *data)
{
	(void)size;
	(void)data;
	if (info->dlpi_name && strstr(info->dlpi_name, "libfuse3.so"))
		patch_object(info);
	return 0;
}

/* Install the hook (before the session reads FUSE_INIT). Returns the number
 * of GOT slots redirected (0: libfuse3 not loaded or not found). */
int cfpt_install(void)
{
	pthread_mutex_lock(&lock);
	if (patched_slots == 0)
		dl_iterate_phdr(find_libfuse, NULL);
	pthread_mutex_unlock(&lock);
	return patched_slots;
}

/* 0: no reply seen yet, 1: FUSE_INIT asked for passthrough, 2: could not */
int cfpt_init_state(void) { return init_state; }

/* Register an open file as a backing file; returns its id (> 0) or -errno. */
int cfpt_backing_open(int fd)
{
	if (fuse_fd < 0)
		return -ENOTCONN;
	struct backing_map m = {.fd = fd, .flags = 0, .padding = 0};
	int id = ioctl(fuse_fd, IOC_BACKING_OPEN, &m);
	return id < 0 ? -errno : id;
}

int cfpt_backing_close(int id)
{
	if (fuse_fd < 0)
		return -ENOTCONN;
	uint32_t v = (uint32_t)id;
	return ioctl(fuse_fd, IOC_BACKING_CLOSE, &v) < 0 ? -errno : 0;
}

/* The OPEN reply carrying file handle fh gets FOPEN_PASSTHROUGH, backing id
 * and extra open flags (FOPEN_DIRECT_IO: reads/writes still reach the daemon). */
int cfpt_expect(uint64_t fh, int32_t backing_id, uint32_t flags)
{
	static unsigned next;
	pthread_mutex_lock(&lock);
	int slot = -1;
	for (int i = 0; i < SLOTS && slot < 0; i++)
		if (!pending[i].used)
			slot = i;
	if (slot < 0)       /* full of registrations whose replies never went out */
		slot = next++ % SLOTS;
	pending[slot].fh = fh;
	pending[slot].id = backing_id;
	pending[slot].flags = flags;
	pending[slot].used = 1;
	pthread_mutex_unlock(&lock);
	return 0;
}

