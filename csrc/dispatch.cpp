#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__linux__) && defined(__aarch64__)
#include <sys/auxv.h>
#endif

namespace lowbit {
#define LOWBIT_DECLARE(ns) namespace ns { extern const Kernels table; }
LOWBIT_DECLARE(ref)
#ifdef LOWBIT_HAVE_avx2
LOWBIT_DECLARE(avx2)
#endif
#ifdef LOWBIT_HAVE_avxvnni
LOWBIT_DECLARE(avxvnni)
#endif
#ifdef LOWBIT_HAVE_avx512vnni
LOWBIT_DECLARE(avx512vnni)
#endif
#ifdef LOWBIT_HAVE_amx
LOWBIT_DECLARE(amx)
#endif
#ifdef LOWBIT_HAVE_i8mm
LOWBIT_DECLARE(i8mm)
#endif
#ifdef LOWBIT_HAVE_dotprod
LOWBIT_DECLARE(dotprod)
#endif
#ifdef LOWBIT_HAVE_neon
LOWBIT_DECLARE(neon)
#endif

namespace {

#if defined(__x86_64__) || defined(__i386__)
// AMX needs the CPU flags, the OS saving tile state (XCR0 bits 17, 18) and, on Linux, this
// process's permission to use tile data, asked for once.
bool amx_usable() {
#ifdef LOWBIT_EMULATE_AMX
  return true;  // kernel_check's build with emulated tiles (tests/native/amx_emu.h)
#endif
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3) != 3) return false;
#if defined(__linux__) && defined(__x86_64__)
    const long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}

bool has(const char* f) {
  __builtin_cpu_init();
  // __builtin_cpu_supports needs literal names; map the few we use.
  const std::string s = f;
  if (s == "avx2") return __builtin_cpu_supports("avx2");
  if (s == "fma") return __builtin_cpu_supports("fma");
  if (s == "f16c") return __builtin_cpu_supports("f16c");
  if (s == "bmi2") return __builtin_cpu_supports("bmi2");
  if (s == "avx512f") return __builtin_cpu_supports("avx512f");
  if (s == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (s == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (s == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (s == "avx512vnni") return __builtin_cpu_supports("avx512vnni");
  if (s == "avxvnni") return __builtin_cpu_supports("avxvnni");
  if (s == "amx-int8") return amx_usable();
  return false;
}
const char* const kFeatures[] = {"avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw",
                                 "avx512vl", "avx512dq", "avx512vnni", "avxvnni", "amx-int8"};
#elif defined(__aarch64__)
// The kernel's view of the CPU (what it lets user space run): AT_HWCAP / AT_HWCAP2 bits.
bool has(const char* f) {
#if defined(__linux__)
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  const std::string s = f;
  if (s == "asimd") return (hw >> 1) & 1;     // HWCAP_ASIMD
  if (s == "asimddp") return (hw >> 20) & 1;  // HWCAP_ASIMDDP: SDOT / UDOT
  if (s == "i8mm") return (hw2 >> 13) & 1;    // HWCAP2_I8MM: SMMLA / UMMLA / USMMLA / USDOT
  return false;
#else
  (void)f;
  return false;
#endif
}
const char* const kFeatures[] = {"asimd", "asimddp", "i8mm"};
#else
bool has(const char*) { return false; }
const char* const kFeatures[] = {};
#endif

bool all(std::initializer_list<const char*> fs) {
  for (const char* f : fs)
    if (!has(f)) return false;
  return true;
}

struct Entry {
  const Kernels* table;
  bool (*supported)();
};

// Best first.
const std::vector<Entry>& entries() {
  static const std::vector<Entry> list = {
#ifdef LOWBIT_HAVE_amx
      {&amx::table, [] {
         return all({"avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl",
                     "avx512dq", "avx512vnni", "amx-int8"});
       }},
#endif
#ifdef LOWBIT_HAVE_avx512vnni
      {&avx512vnni::table, [] {
         return all({"avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl",
                     "avx512dq", "avx512vnni"});
       }},
#endif
#ifdef LOWBIT_HAVE_avxvnni
      {&avxvnni::table, [] { return all({"avx2", "fma", "f16c", "bmi2", "avxvnni"}); }},
#endif
#ifdef LOWBIT_HAVE_avx2
      {&avx2::table, [] { return all({"avx2", "fma", "f16c", "bmi2"}); }},
#endif
#ifdef LOWBIT_HAVE_i8mm
      {&i8mm::table, [] { return all({"asimd", "asimddp", "i8mm"}); }},
#endif
#ifdef LOWBIT_HAVE_dotprod
      {&dotprod::table, [] { return all({"asimd", "asimddp"}); }},
#endif
#ifdef LOWBIT_HAVE_neon
      {&neon::table, [] { return all({"asimd"}); }},
#endif
      {&ref::table, [] { return true; }},
  };
  return list;
}

std::string joined_available() {
  std::string s;
  for (const std::string& n : available_isas()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

const Kernels* find(const std::string& name) {
  for (const Entry& e : entries()) {
    if (name != e.table->name) continue;
    if (!e.supported())
      throw std::invalid_argument("ISA '" + name + "' is compiled in but this CPU lacks it; "
                                  "available on this CPU: " + joined_available());
    return e.table;
  }
  throw std::invalid_argument("unknown ISA '" + name + "'; available on this CPU: " +
                              joined_available());
}

std::atomic<const Kernels*>& current() {
  static std::atomic<const Kernels*> cur{[] {
    if (const char* env = std::getenv("LOWBIT_ISA"))
      if (*env) return find(env);  // throws: surfaces as an ImportError naming the choices
    for (const Entry& e : entries())
      if (e.supported()) return e.table;
    return &ref::table;
  }()};
  return cur;
}

// A thread's own choice (lb.use_isa), or null for the process's: one switch per thread, so
// threads entering and leaving use_isa in any interleaving each restore only their own.
thread_local const Kernels* thread_choice = nullptr;

}  // namespace

const Kernels& kernels() {
  return thread_choice ? *thread_choice : *current().load(std::memory_order_acquire);
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const Entry& e : entries())
    if (e.supported()) out.push_back(e.table->name);
  return out;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (const Entry& e : entries()) out.push_back(e.table->name);
  return out;
}

void set_isa(const std::string& name) { current().store(find(name), std::memory_order_release); }

std::string set_thread_isa(const std::string& name) {
  const Kernels* next = name.empty() ? nullptr : find(name);
  const std::string previous = thread_choice ? thread_choice->name : "";
  thread_choice = next;
  return previous;
}

UseKernels::UseKernels(const Kernels& kt) : previous_(thread_choice) { thread_choice = &kt; }
UseKernels::~UseKernels() { thread_choice = previous_; }

std::vector<std::pair<std::string, bool>> cpu_features() {
  std::vector<std::pair<std::string, bool>> out;
  for (const char* f : kFeatures) out.emplace_back(f, has(f));
  return out;
}

}  // namespace lowbit
