// A persistent thread pool with a cheap hand-off: workers spin briefly after each job, then sleep.
// Work is split into contiguous task ranges by a fixed rule, and every kernel computes each output
// element entirely inside one task, so results never depend on the thread count.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace lowbit {

// Most threads a pool may have: more is a typo or an overflow ("99999999999"), not a machine, and
// each one is an OS thread started on the first large call.
constexpr int64_t kMaxThreads = 1024;

// Number of threads used by kernels (the caller counts as one). set_num_threads throws
// std::invalid_argument for n outside 1..kMaxThreads; so does the first use of the pool when
// LOWBIT_NUM_THREADS is not a whole number in that range.
int get_num_threads();
void set_num_threads(int64_t n);

// A whole number in lo..hi from environment variable `name` (digits only), `unset` when it is
// unset or empty; anything else throws std::invalid_argument naming the variable and `what` it
// counts.
int64_t env_count(const char* name, int64_t lo, int64_t hi, int64_t unset, const char* what);

// Calls fn(begin, end) on disjoint contiguous ranges covering [0, ntasks), in parallel.
// Runs inline when ntasks <= 1, when called from inside a pool job, or when another caller
// holds the pool (concurrent Python threads then each compute on their own thread).
void parallel_for(int64_t ntasks, const std::function<void(int64_t, int64_t)>& fn);

// Bytes at p, for prefetch_async.
struct MemRange {
  const void* p;
  int64_t bytes;
};
constexpr int kMaxPrefetchRanges = 16;

// Asks the pool's idle workers to bring `ranges` (at most kMaxPrefetchRanges, the first few MB of
// them) into their caches while the caller goes on with other work: a decode step's next weight,
// streamed from memory while Python computes between two layers. Prefetch instructions only (any
// address is safe, nothing is read into a register); dropped when no worker is awake or lowbit runs
// on OpenMP's threads, and cut short by the next parallel job. Never changes a result.
void prefetch_async(const MemRange* ranges, int n);

// Runs parallel_for's work on the threads of the OpenMP runtime already loaded from `path` (its
// GOMP_parallel), e.g. PyTorch's, instead of lowbit's own pool, so that lowbit and the other
// library's kernels share one set of threads; "" goes back to lowbit's pool. Returns the previous
// path ("" for lowbit's pool). Throws std::invalid_argument when no runtime is loaded from `path`
// or it lacks the GNU OpenMP entry points.
// In a child process made by fork, lowbit's own pool again (a forked child cannot use its parent's
// OpenMP team).
std::string use_openmp(const std::string& path);
std::string openmp_runtime();  // the path in use, "" for lowbit's pool

}  // namespace lowbit
