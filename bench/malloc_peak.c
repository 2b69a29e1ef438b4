/* Peak heap bytes of a process: an LD_PRELOAD interposer over malloc and friends.
 *
 * The CPU analogue of torch.cuda.max_memory_allocated. Every allocation is counted with its
 * usable size (malloc_usable_size), so live and peak bytes include allocator rounding but not
 * pages glibc keeps after free (which is what makes RSS unreliable). Read it from Python:
 *
 *   lib = ctypes.CDLL(path_of_this_so)   # the already-preloaded copy
 *   lib.mp_live(); lib.mp_peak(); lib.mp_reset_peak()
 *
 * Build: gcc -O2 -shared -fPIC -o malloc_peak.so malloc_peak.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static void (*real_free)(void *);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static void *(*real_memalign)(size_t, size_t);

static _Atomic long long live_bytes;
static _Atomic long long peak_bytes;

/* dlsym may allocate before the real functions are known: serve it from a static arena. */
static char boot_arena[65536];
static size_t boot_used;
static int resolving;

static int in_boot(void *p) {
    return (char *)p >= boot_arena && (char *)p < boot_arena + sizeof(boot_arena);
}

static void *boot_alloc(size_t n) {
    size_t at = (boot_used + 15) & ~(size_t)15;
    if (at + n > sizeof(boot_arena)) return NULL;
    boot_used = at + n;
    return boot_arena + at;
}

static void resolve(void) {
    if (real_malloc || resolving) return;
    resolving = 1;
    real_calloc = dlsym(RTLD_NEXT, "calloc");
    real_realloc = dlsym(RTLD_NEXT, "realloc");
    real_free = dlsym(RTLD_NEXT, "free");
    real_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
    real_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
    real_memalign = dlsym(RTLD_NEXT, "memalign");
    real_malloc = dlsym(RTLD_NEXT, "malloc");
    resolving = 0;
}

static void count_add(void *p) {
    if (!p) return;
    long long n = (long long)malloc_usable_size(p);
    long long now = atomic_fetch_add(&live_bytes, n) + n;
    long long peak = atomic_load(&peak_bytes);
    while (now > peak && !atomic_compare_exchange_weak(&peak_bytes, &peak, now)) {
    }
}

static void count_sub(void *p) {
    if (!p) return;
    atomic_fetch_sub(&live_bytes, (long long)malloc_usable_size(p));
}

void *malloc(size_t n) {
    resolve();
    if (!real_malloc) return boot_alloc(n);
    void *p = real_malloc(n);
    count_add(p);
    return p;
}

void *calloc(size_t a, size_t b) {
    resolve();
    if (!real_calloc) {
        void *p = boot_alloc(a * b);
        if (p) memset(p, 0, a * b);
        return p;
    }
    void *p = real_calloc(a, b);
    count_add(p);
    return p;
}

void *realloc(void *old, size_t n) {
    resolve();
    if (in_boot(old)) {
        void *p = malloc(n);
        if (p && old) memcpy(p, old, n);
        return p;
    }
    if (old) count_sub(old);
    void *p = real_realloc(old, n);
    if (p) {
        count_add(p);
    } else if (old && n) {
        count_add(old); /* failed realloc keeps the old block */
    }
    return p;
}

void free(void *p) {
    if (!p || in_boot(p)) return;
    resolve();
    count_sub(p);
    real_free(p);
}

int posix_memalign(void **out, size_t align, size_t n) {
    resolve();
    int rc = real_posix_memalign(out, align, n);
    if (rc == 0) count_add(*out);
    return rc;
}

void *aligned_alloc(size_t align, size_t n) {
    resolve();
    void *p = real_aligned_alloc(align, n);
    count_add(p);
    return p;
}

void *memalign(size_t align, size_t n) {
    resolve();
    void *p = real_memalign(align, n);
    count_add(p);
    return p;
}

long long mp_live(void) { return atomic_load(&live_bytes); }
long long mp_peak(void) { return atomic_load(&peak_bytes); }
void mp_reset_peak(void) { atomic_store(&peak_bytes, atomic_load(&live_bytes)); }
