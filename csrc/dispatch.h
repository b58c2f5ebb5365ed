// Run-time ISA dispatch: the kernel tables compiled into this module, the CPU's support for each,
// and the one in use: the calling thread's own choice (set_thread_isa, lb.use_isa) if it made
// one, else the process's (best supported by default; LOWBIT_ISA or set_isa() force one). Pool
// workers never ask: every op resolves kernels() once on the calling thread and hands that
// table to its tasks, or its tasks take it as theirs (UseKernels), so a thread's choice covers
// the work it submits.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"

namespace lowbit {

const Kernels& kernels();                       // the table in use on this thread
std::vector<std::string> available_isas();      // compiled in and supported here, best first
std::vector<std::string> compiled_isas();       // compiled in, best first
void set_isa(const std::string& name);          // process-wide; throws std::invalid_argument
// This thread's choice ("" for none: the process's); returns the previous one ("" if none).
std::string set_thread_isa(const std::string& name);
std::vector<std::pair<std::string, bool>> cpu_features();

// `kt` as this thread's choice while it lives (the previous one back after): for pool tasks that
// run whole ops, which resolve kernels() themselves (the block ops' blocks), on the set of the
// thread that submitted them.
class UseKernels {
 public:
  explicit UseKernels(const Kernels& kt);
  ~UseKernels();
  UseKernels(const UseKernels&) = delete;
  UseKernels& operator=(const UseKernels&) = delete;

 private:
  const Kernels* previous_;
};

}  // namespace lowbit
