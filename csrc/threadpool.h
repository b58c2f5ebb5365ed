// A persistent thread pool with a cheap hand-off: workers spin briefly after each job, then sleep.
// Work is split into contiguous task ranges by a fixed rule, and every kernel computes each output
// element entirely inside one task, so results never depend on the thread count.
#pragma once
#include <cstdint>
#include <functional>

namespace lowbit {

// Number of threads used by kernels (the caller counts as one).
int get_num_threads();
void set_num_threads(int n);

// Calls fn(begin, end) on disjoint contiguous ranges covering [0, ntasks), in parallel.
// Runs inline when ntasks <= 1, when called from inside a pool job, or when another caller
// holds the pool (concurrent Python threads then each compute on their own thread).
void parallel_for(int64_t ntasks, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace lowbit
