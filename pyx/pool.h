/* pool.h: a small thread pool for the attention kernel.
 *
 * Why not OpenMP: its idle workers spin on the cores, and next to NumPy's
 * threaded BLAS in the same process the two pools fought over 2 cores
 * (a 2-thread decode step took 12 ms instead of 0.1 ms). Here:
 *   - the caller works too, and items are claimed one at a time from a
 *     shared counter, so a worker the OS has not scheduled yet claims
 *     nothing and is never waited for: a call on n threads cannot take
 *     much longer than on one;
 *   - a worker with nothing to do spins for KV_SPIN_NANOSECONDS (50 us:
 *     back-to-back calls come soon) and then sleeps on a condition variable;
 *   - a sleeping worker is woken only when that can pay (see kv_parallel):
 *     a model's calls are ~100 us apart, the workers asleep at every one;
 *   - one job at a time: a second caller (another thread, another cache)
 *     runs its job on its own thread rather than queueing.
 * A forked child starts with no workers (pthread_atfork). POSIX threads
 * only: the project builds with GCC or Clang on Linux and macOS.
 */
#ifndef KVARENA_POOL_H
#define KVARENA_POOL_H

typedef int (*kv_task)(void *ctx, ptrdiff_t item);

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>

/* Scratch for one work item, kept per thread and grown as needed: a
 * malloc and free per item made glibc trim and regrow its heap every time
 * (two brk calls and fresh zeroed pages per item, half the time of a small
 * call). Freed when its thread ends. */
static pthread_key_t kv_scratch_key;
static pthread_once_t kv_scratch_once = PTHREAD_ONCE_INIT;

static void kv_scratch_key_make(void) { pthread_key_create(&kv_scratch_key, free); }

static void *kv_scratch(size_t bytes)
{
    pthread_once(&kv_scratch_once, kv_scratch_key_make);
    size_t *held = (size_t *)pthread_getspecific(kv_scratch_key);
    if (held && held[0] >= bytes) return held + 8;   /* after a 64-byte header: aligned */
    free(held);
    void *fresh = NULL;
    if (posix_memalign(&fresh, 64, bytes + 64)) fresh = NULL;
    held = (size_t *)fresh;
    pthread_setspecific(kv_scratch_key, held);
    if (!held) return NULL;
    held[0] = bytes;
    return held + 8;
}

#define KV_MAX_WORKERS 63
/* how long a worker polls for the next job before it sleeps, by the clock:
 * 1,000 pauses were 25 us on Zen 4 but 10 us on a Xeon, where the Python
 * between two back-to-back calls of 1 x 12 x 1024 decode (6 MiB) took
 * 10.9 us on average: the worker slept before half the jobs, was woken
 * late (63 us) or not at all, and 2 threads took 174 us a call against
 * 224 on one (the C loop, whose OpenMP workers spin: 106); polling 25 us
 * there: 92 us. That pause is not Python's alone: a call that reads more
 * than the L2 evicts the interpreter, which then runs cold; with the host
 * slower (run AY), the pause between the same calls was 30 us and the
 * worker slept before every one (2 threads 206 us, one 237). Polling 50 us
 * covers both. Between a model's layers, ~100 us apart and more, the
 * workers sleep anyway (KVCache times that, see _arena.pyx's
 * EXPLORE_EVERY) */
#define KV_SPIN_NANOSECONDS 50000

typedef struct {
    kv_task fn;
    void *ctx;
    ptrdiff_t n_items;
    int workers;                 /* how many pool workers may join */
    int joined;                  /* how many have (under kv_pool.mu) */
    atomic_ptrdiff_t next;       /* the next unclaimed item */
    atomic_int inside;           /* workers running items of this job */
    atomic_int failed;
} kv_pool_job;

static struct {
    pthread_mutex_t submit;      /* held by the one caller whose job runs */
    pthread_mutex_t mu;          /* guards job, joined and the sleep */
    pthread_cond_t wake;
    kv_pool_job *job;            /* the job on offer, or NULL */
    atomic_ulong generation;     /* bumped for every job offered */
    int started;
    /* when the last job ended, in kv_nanoseconds(), and the last job
       offered to workers (one a spinning worker joined); on a line apart:
       written after every job, they would evict `generation`, which the
       spinning workers poll */
    _Alignas(64) atomic_llong last_end;
    atomic_llong offered_end;
} kv_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
             NULL, 0, 0, 0, 0};

/* jobs closer together than this (from the end of one to the start of the
 * next, on any number of threads) keep a worker that took one spinning
 * until the next (it spins KV_SPIN_NANOSECONDS past the job's end), so
 * waking a sleeping one pays off in the jobs that follow */
#define KV_DENSE_NANOSECONDS 40000

/* the monotonic clock in nanoseconds (also what KVCache times calls with) */
static long long kv_nanoseconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* one turn of a polling loop: a spin-wait hint to the core */
static inline void kv_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static void kv_drain(kv_pool_job *job)
{
    ptrdiff_t i;
    while ((i = atomic_fetch_add(&job->next, 1)) < job->n_items)
        if (job->fn(job->ctx, i)) atomic_store(&job->failed, 1);
}

static void *kv_worker(void *arg)
{
    (void)arg;
    unsigned long seen = atomic_load(&kv_pool.generation);
    for (;;) {
        /* wait for a new job: spin a little (until KV_SPIN_NANOSECONDS past
           the later of now and the end of the last job offered, which a
           spinning worker joins: one that finished its items before the
           caller did is not left with less), then sleep */
        const long long until = kv_nanoseconds() + KV_SPIN_NANOSECONDS;
        while (atomic_load(&kv_pool.generation) == seen) {
            const long long now = kv_nanoseconds();
            if (now >= until && now >= atomic_load(&kv_pool.offered_end) + KV_SPIN_NANOSECONDS)
                break;
            kv_pause();
        }
        pthread_mutex_lock(&kv_pool.mu);
        while (atomic_load(&kv_pool.generation) == seen)
            pthread_cond_wait(&kv_pool.wake, &kv_pool.mu);
        seen = atomic_load(&kv_pool.generation);
        kv_pool_job *job = kv_pool.job;
        if (job && job->joined < job->workers) {
            job->joined++;
            atomic_fetch_add(&job->inside, 1);
        } else {
            job = NULL;
        }
        pthread_mutex_unlock(&kv_pool.mu);
        if (job) {
            kv_drain(job);
            atomic_fetch_sub(&job->inside, 1);
        }
    }
    return NULL;
}

static void kv_pool_after_fork(void)
{
    /* the child has none of the parent's threads */
    pthread_mutex_init(&kv_pool.submit, NULL);
    pthread_mutex_init(&kv_pool.mu, NULL);
    pthread_cond_init(&kv_pool.wake, NULL);
    kv_pool.job = NULL;
    kv_pool.started = 0;
}

/* start workers until there are `want`; returns how many there are */
static int kv_pool_grow(int want)
{
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, kv_pool_after_fork);
        registered = 1;
    }
    /* the common case, before any system call: blocking signals below costs
       two, which made a waiting worker join 0.6 us after the offer, not 0.2 */
    if (kv_pool.started >= want) return kv_pool.started;
    /* workers take no signals: a process-directed one (SIGINT) goes to a
       thread that can act on it, not to a worker */
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    while (kv_pool.started < want) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int ok = pthread_create(&thread, &attr, kv_worker, NULL) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        kv_pool.started++;
    }
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    return kv_pool.started;
}

/* fn(ctx, i) for every i in [0, n_items), on up to num_threads threads
 * (the caller's included); 0, or -1 if any call returned non-zero.
 * Workers still spinning from an earlier job join; sleeping ones are woken
 * when `large` (the job is long enough to pay for it) or when jobs come
 * close together (KV_DENSE_NANOSECONDS). Waking one cost the caller 15-20 us
 * on this VM (the system call, the worker's late grab of the pool's mutex),
 * against ~18 us for a whole small call on one thread; a model's calls,
 * ~100 us apart, found the workers asleep at every one, and each woken
 * made the call take 1.7-2x as long */
static int kv_parallel(ptrdiff_t n_items, int num_threads, int large, kv_task fn, void *ctx)
{
    kv_pool_job job;
    job.fn = fn;
    job.ctx = ctx;
    job.n_items = n_items;
    atomic_init(&job.next, 0);
    atomic_init(&job.inside, 0);
    atomic_init(&job.failed, 0);
    job.joined = 0;
    int helpers = num_threads - 1;
    if (helpers > KV_MAX_WORKERS) helpers = KV_MAX_WORKERS;
    if (helpers > n_items - 1) helpers = (int)(n_items - 1);
    if (helpers > 0 && pthread_mutex_trylock(&kv_pool.submit) == 0) {
        job.workers = kv_pool_grow(helpers);
        if (job.workers > helpers) job.workers = helpers;
        const int wake = large ||
                         kv_nanoseconds() - atomic_load(&kv_pool.last_end) < KV_DENSE_NANOSECONDS;
        pthread_mutex_lock(&kv_pool.mu);
        kv_pool.job = &job;
        atomic_fetch_add(&kv_pool.generation, 1);
        for (int w = 0; wake && w < job.workers; w++)   /* as many as may join, not all */
            pthread_cond_signal(&kv_pool.wake);
        pthread_mutex_unlock(&kv_pool.mu);
        kv_drain(&job);
        /* withdraw the offer: a worker that has not joined yet never will */
        pthread_mutex_lock(&kv_pool.mu);
        kv_pool.job = NULL;
        pthread_mutex_unlock(&kv_pool.mu);
        /* the workers finish the items they claimed: spin as a worker waits
           for a job (sched_yield, a system call, cost 0.6 us per call on
           this VM), then yield, in case a worker shares this core (there
           the 50 us cost such calls 25 us more than before 7864725; the
           cache's timing then runs one thread) */
        const long long until = kv_nanoseconds() + KV_SPIN_NANOSECONDS;
        while (atomic_load(&job.inside) > 0)
            if (kv_nanoseconds() < until) kv_pause();
            else sched_yield();
        atomic_store(&kv_pool.offered_end, kv_nanoseconds());
        pthread_mutex_unlock(&kv_pool.submit);
    } else {
        kv_drain(&job);
    }
    atomic_store(&kv_pool.last_end, kv_nanoseconds());
    return atomic_load(&job.failed) ? -1 : 0;
}

#endif /* KVARENA_POOL_H */
