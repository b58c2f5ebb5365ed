#include "threadpool.h"

#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

namespace lowbit {

// (threadpool.h) Digits only: atoi read "1e3" as 1 and "99999999999" as 1215752191.
int64_t env_count(const char* name, int64_t lo, int64_t hi, int64_t unset, const char* what) {
  const char* env = std::getenv(name);
  if (!env || !*env) return unset;
  int64_t n = 0;
  const char* c = env;
  for (; *c >= '0' && *c <= '9' && n <= hi; ++c) n = n * 10 + (*c - '0');
  if (*c || n < lo || n > hi)
    throw std::invalid_argument(std::string(name) + ": expected a whole number of " + what + " in " +
                                std::to_string(lo) + ".." + std::to_string(hi) + ", got '" + env + "'");
  return n;
}

namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kSpin = std::chrono::microseconds(200);  // how long an idle worker stays hot

// Waiting threads pause a few times, then yield the core at each check: another runnable
// thread (PyTorch's OpenMP workers between two lowbit layers, a preempted pool worker this
// thread waits for, another process on a shared machine) then runs instead of a spin that
// holds the core for a whole time slice. Alone on its core, a yielding thread stays as hot.
constexpr int kPauses = 64;
inline void pause_or_yield(int spins) {
  if (spins < kPauses)
    cpu_relax();
  else
    std::this_thread::yield();
}


void check_count(int64_t n) {
  if (n < 1 || n > kMaxThreads)
    throw std::invalid_argument("num_threads must be in 1.." + std::to_string(kMaxThreads) +
                                ", got " + std::to_string(n));
}

// LOWBIT_NUM_THREADS: a count in 1..kMaxThreads; unset or empty: the CPUs available.
int default_threads() {
  if (const int64_t n = env_count("LOWBIT_NUM_THREADS", 1, kMaxThreads, 0, "threads")) return (int)n;
  long n = 0;
#ifdef __linux__
  cpu_set_t set;  // the CPUs this process may run on (containers, taskset)
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
  if (n < 1) n = sysconf(_SC_NPROCESSORS_ONLN);
  return n < 1 ? 1 : n > kMaxThreads ? (int)kMaxThreads : (int)n;
}

thread_local bool in_pool_job = false;

// An OpenMP runtime already in the process (PyTorch's libgomp, or Intel's libiomp5, which exports
// the same GNU entry points), when lowbit is told to run its parallel work on that runtime's
// threads: two pools on the same cores take turns badly, each one's idle threads spinning while
// the other works. Only entry points of the stable GNU ABI are used.
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned);  // GOMP_parallel
  int (*thread_num)();
  int (*num_threads)();
  std::string path;
};
std::atomic<const OpenMP*> openmp{nullptr};

struct OmpJob {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t ntasks;
  const OpenMP* omp;
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
};

void omp_task(void* p) {
  OmpJob& job = *(OmpJob*)p;
  // the team may be smaller than asked for (OMP_DYNAMIC, thread limits): split by its real size
  const int64_t id = job.omp->thread_num(), nt = job.omp->num_threads();
  const int64_t b = job.ntasks * id / nt, e = job.ntasks * (id + 1) / nt;
  const bool nested = in_pool_job;
  in_pool_job = true;
  try {
    if (b < e) (*job.fn)(b, e);
  } catch (...) {  // an exception must not leave an OpenMP thread: hand it to the caller
    std::lock_guard<std::mutex> lock(job.error_mutex);
    if (!job.failed.exchange(true)) job.error = std::current_exception();
  }
  in_pool_job = nested;
}

struct Pool {
  int nthreads = default_threads();
  std::vector<std::thread>* workers = new std::vector<std::thread>();  // never destroyed: see fork
  std::mutex run_mutex;  // one parallel job at a time
  std::mutex sleep_mutex;
  std::condition_variable wake;
  std::atomic<uint64_t> epoch{0};
  std::atomic<int> pending{0};
  std::atomic<bool> stop{false};
  const std::function<void(int64_t, int64_t)>* job = nullptr;
  int64_t ntasks = 0;
  int job_threads = 0;
  // prefetch_async's request: its ranges, numbered by side_epoch
  std::mutex side_mutex;
  MemRange side[kMaxPrefetchRanges];
  int side_n = 0;
  std::atomic<uint64_t> side_epoch{0};

  // Worker `id` prefetches its own share of each requested range first: with the next call split
  // over threads the same way (contiguous panel ranges, thread t the t-th of nthreads), that is the
  // part it will read itself; worker 1 then goes on with the caller's share (thread 0's). Stops at
  // the next job.
  void prefetch_share(int id, uint64_t seen) {
    MemRange r[kMaxPrefetchRanges];
    int n;
    {
      std::lock_guard<std::mutex> lock(side_mutex);
      n = side_n;
      std::copy(side, side + n, r);
    }
    const int64_t nt = nthreads;
    for (const int64_t t : {(int64_t)id, id == 1 ? int64_t(0) : int64_t(-1)}) {
      if (t < 0 || t >= nt) continue;
      for (int i = 0; i < n; ++i) {
        const char* p = static_cast<const char*>(r[i].p);
        const int64_t hi = r[i].bytes * (t + 1) / nt;
        // (a share starts anywhere: the job check counts lines, not offsets)
        int64_t lines = 0;
        for (int64_t o = r[i].bytes * t / nt; o < hi; o += 64) {
          __builtin_prefetch(p + o, 0, 3);
          if (++lines % 64 == 0 && epoch.load(std::memory_order_relaxed) != seen) return;
        }
      }
    }
  }

  void worker(int id, uint64_t seen) {
    in_pool_job = true;
    uint64_t side_seen = side_epoch.load();
    for (;;) {
      auto idle_since = Clock::now();
      uint64_t now_epoch;
      for (int spins = 0;; ++spins) {
        now_epoch = epoch.load(std::memory_order_acquire);
        if (now_epoch != seen) break;
        if (const uint64_t s = side_epoch.load(std::memory_order_acquire); s != side_seen) {
          side_seen = s;
          prefetch_share(id, seen);
          idle_since = Clock::now();
          continue;
        }
        pause_or_yield(spins);
        if (spins >= kPauses && Clock::now() - idle_since > kSpin) {
          std::unique_lock<std::mutex> lock(sleep_mutex);
          wake.wait(lock, [&] { return epoch.load(std::memory_order_acquire) != seen; });
          idle_since = Clock::now();
        }
      }
      seen = now_epoch;
      if (stop.load(std::memory_order_acquire)) return;
      if (id < job_threads) {
        const int64_t b = ntasks * id / job_threads, e = ntasks * (id + 1) / job_threads;
        if (b < e) (*job)(b, e);
      }
      pending.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  void start() {  // run_mutex held
    for (int i = (int)workers->size() + 1; i < nthreads; ++i)
      // the epoch as of now, before the job that follows bumps it, so no job is missed
      workers->emplace_back([this, i, e = epoch.load()] { worker(i, e); });
  }

  void shrink_to(int n) {  // run_mutex held: stop and join every worker, restart lazily
    if (!workers->empty()) {
      stop.store(true, std::memory_order_release);
      {
        std::lock_guard<std::mutex> lock(sleep_mutex);
        epoch.fetch_add(1, std::memory_order_acq_rel);
      }
      wake.notify_all();
      for (auto& t : *workers) t.join();
      workers->clear();
      stop.store(false, std::memory_order_release);
    }
    nthreads = n;
  }

  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    if (const OpenMP* omp = openmp.load(std::memory_order_acquire)) {
      if (in_pool_job || nthreads == 1 || n <= 1) return fn(0, n);
      OmpJob job{&fn, n, omp};
      omp->parallel(omp_task, &job, (unsigned)(n < nthreads ? n : nthreads), 0);
      if (job.failed.load()) std::rethrow_exception(job.error);
      return;
    }
    std::unique_lock<std::mutex> lock(run_mutex, std::try_to_lock);
    if (in_pool_job || !lock.owns_lock() || nthreads == 1 || n <= 1) {
      fn(0, n);
      return;
    }
    start();
    const int used = (int)(n < nthreads ? n : nthreads);
    job = &fn;
    ntasks = n;
    job_threads = used;
    pending.store((int)workers->size(), std::memory_order_release);
    {
      std::lock_guard<std::mutex> l(sleep_mutex);
      epoch.fetch_add(1, std::memory_order_acq_rel);
    }
    wake.notify_all();
    in_pool_job = true;
    fn(0, n / used);
    in_pool_job = false;
    for (int spins = 0; pending.load(std::memory_order_acquire) != 0; ++spins) pause_or_yield(spins);
    job = nullptr;
  }
};

Pool& pool() {
  static Pool* p = [] {
    Pool* created = new Pool();  // intentionally leaked: no join races at interpreter exit
    // fork: hold the pool across fork(); the child has none of the worker threads, so it forgets
    // them (without destroying the std::thread objects) and starts new ones on first use.
    pthread_atfork([] { pool().run_mutex.lock(); },
                   [] { pool().run_mutex.unlock(); },
                   [] {
                     Pool& q = pool();
                     q.workers = new std::vector<std::thread>();
                     new (&q.run_mutex) std::mutex();
                     new (&q.sleep_mutex) std::mutex();
                     new (&q.side_mutex) std::mutex();
                     new (&q.wake) std::condition_variable();
                     q.pending.store(0);
                     q.stop.store(false);
                   });
    return created;
  }();
  return *p;
}

}  // namespace

int get_num_threads() { return pool().nthreads; }

std::string openmp_runtime() {
  const OpenMP* omp = openmp.load(std::memory_order_acquire);
  return omp ? omp->path : "";
}

void set_num_threads(int64_t n) {
  check_count(n);
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.run_mutex);
  p.shrink_to((int)n);
}

void prefetch_async(const MemRange* ranges, int n) {
  Pool& p = pool();
  // LOWBIT_PREFETCH=0: never (to measure what it gains)
  static const bool off = [] {
    const char* env = std::getenv("LOWBIT_PREFETCH");
    return env && std::string(env) == "0";
  }();
  if (off || n < 1 || p.nthreads == 1 || openmp.load(std::memory_order_relaxed))
    return;
  constexpr int64_t kMaxBytes = int64_t(2) << 20;  // within what a worker's L2 cache holds
  {
    std::lock_guard<std::mutex> lock(p.side_mutex);
    int64_t left = kMaxBytes;
    p.side_n = 0;
    for (int i = 0; i < n && i < kMaxPrefetchRanges && left > 0; ++i) {
      const int64_t bytes = ranges[i].bytes < left ? ranges[i].bytes : left;
      p.side[p.side_n++] = {ranges[i].p, bytes};
      left -= bytes;
    }
  }
  p.side_epoch.fetch_add(1, std::memory_order_acq_rel);
}

std::string use_openmp(const std::string& path) {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  // fork: a child cannot use its parent's OpenMP team (GNU libgomp then waits forever for threads
  // that were not copied), so it goes back to lowbit's pool, which is fork-safe (see pool())
  static const bool child_handler = [] {
    pthread_atfork(nullptr, nullptr, [] { openmp.store(nullptr, std::memory_order_relaxed); });
    return true;
  }();
  (void)child_handler;
  const OpenMP* old = openmp.load();
  std::string previous = old ? old->path : "";
  if (path.empty()) {
    openmp.store(nullptr, std::memory_order_release);  // the old runtime record is kept: see below
    return previous;
  }
  // RTLD_NOLOAD: attach to the runtime already loaded from `path`, never load a second one
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (!lib) throw std::invalid_argument("use_openmp: no OpenMP runtime loaded from '" + path + "'");
  auto* omp = new OpenMP{};  // never freed: a call on another thread may still be using one
  omp->parallel = (decltype(omp->parallel))dlsym(lib, "GOMP_parallel");
  omp->thread_num = (int (*)())dlsym(lib, "omp_get_thread_num");
  omp->num_threads = (int (*)())dlsym(lib, "omp_get_num_threads");
  omp->path = path;
  if (!omp->parallel || !omp->thread_num || !omp->num_threads) {
    delete omp;
    dlclose(lib);
    throw std::invalid_argument("use_openmp: '" + path +
                                "' lacks GOMP_parallel / omp_get_thread_num / omp_get_num_threads");
  }
  openmp.store(omp, std::memory_order_release);  // the handle stays open as long as the process
  return previous;
}

void parallel_for(int64_t ntasks, const std::function<void(int64_t, int64_t)>& fn) {
  pool().run(ntasks, fn);
}

}  // namespace lowbit
