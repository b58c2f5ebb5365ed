// Run-time ISA dispatch: the kernel tables compiled into this module, the CPU's support for each,
// and the one in use (best supported by default; LOWBIT_ISA or set_isa() force one).
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"

namespace lowbit {

const Kernels& kernels();                       // the table in use
std::vector<std::string> available_isas();      // compiled in and supported here, best first
std::vector<std::string> compiled_isas();       // compiled in, best first
void set_isa(const std::string& name);          // throws std::invalid_argument saying why
std::vector<std::pair<std::string, bool>> cpu_features();

}  // namespace lowbit
