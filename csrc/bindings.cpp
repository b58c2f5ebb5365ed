// Python bindings: argument checks and array plumbing only; the maths is in ops.cpp and kernels/.
// Every array is checked for dtype and shape here, so no call can reach a kernel with a pointer it
// would read past, and brought to a layout the kernels read (aligned, strides they take), copying
// any other. The GIL is released around every kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dispatch.h"
#include "formats.h"
#include "ops.h"
#include "threadpool.h"

namespace py = pybind11;
using namespace lowbit;

namespace {

// (n0, n1, ...) as Python writes a tuple
std::string tuple_str(const py::ssize_t* v, py::ssize_t n) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + (n == 1 ? ",)" : ")");
}
std::string shape_str(const py::array& a) { return tuple_str(a.shape(), a.ndim()); }
std::string strides_str(const py::array& a) { return tuple_str(a.strides(), a.ndim()); }  // bytes

// Whether the kernels can read `a` through a T* as it is: data aligned to T (sizeof(T)), and
// C-contiguous, or with `strided` (activation rows, attention's q / k / v) a contiguous last axis
// and the other strides non-negative multiples of sizeof(T) (rows may overlap: they are only read).
// An empty array has nothing to read (numpy gives it strides of 0).
bool readable(const py::array& a, py::ssize_t item, bool strided) {
  if (a.size() == 0) return true;
  if (reinterpret_cast<uintptr_t>(a.data()) % (uintptr_t)item) return false;
  if (!strided) return a.flags() & py::array::c_style;
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    const py::ssize_t st = a.strides(i);
    if (a.shape(i) > 1 && (i == a.ndim() - 1 ? st != item : st < 0 || st % item))
      return false;
  }
  return true;
}

// Checks dtype (T's, or `dtype` for the float16 that travels as uint16 bits), ndim and (where
// given, >= 0) each dimension, and returns `a`, or a C-contiguous copy when the kernels cannot
// read it as it is (see readable): broadcast rows, structured-array fields, negative strides, a
// buffer at an odd byte offset (np.frombuffer, GGUF files aligned to 1) are valid arrays, copied
// here rather than refused or read through a misaligned pointer.
template <class T>
py::array check(const py::array& a, const char* name, std::initializer_list<int64_t> shape,
                bool strided = false, const py::dtype& dtype = py::dtype::of<T>()) {
  if (!a.dtype().equal(dtype))
    throw py::type_error(std::string(name) + ": expected dtype " + std::string(py::str(dtype)) +
                         ", got " + std::string(py::str(a.dtype())));
  if (a.ndim() != (py::ssize_t)shape.size())
    throw py::value_error(std::string(name) + ": expected " + std::to_string(shape.size()) +
                          " dimensions, got shape " + shape_str(a));
  int i = 0;
  for (int64_t d : shape) {
    if (d >= 0 && a.shape(i) != d)
      throw py::value_error(std::string(name) + ": expected dimension " + std::to_string(i) +
                            " to be " + std::to_string(d) + ", got shape " + shape_str(a));
    ++i;
  }
  return readable(a, (py::ssize_t)sizeof(T), strided) ? a : py::array(a.attr("copy")());
}

// float16 arrays travel as numpy float16; the kernels read their bits.
py::array check_half(const py::array& a, const char* name, std::initializer_list<int64_t> shape) {
  return check<uint16_t>(a, name, shape, false, py::dtype("float16"));
}

template <class T>
const T* cptr(const py::array& a) { return static_cast<const T*>(a.data()); }

// The data of an optional array (None: null). Python calls: with the GIL held, before a NoGil block.
template <class T>
const T* cptr_or_null(const py::object& a) {
  return a.is_none() ? nullptr : static_cast<const T*>(a.cast<py::array>().data());
}

// The row stride in elements of 2-D rows read as `strided` (any stride when there is one row).
template <class T>
int64_t row_stride(const py::array& a) {
  return a.shape(0) > 1 ? a.strides(0) / (int64_t)sizeof(T) : a.shape(1);
}

// Releases the GIL for a block, like py::gil_scoped_release, but safe for daemon threads at
// interpreter exit. There CPython (3.13 and older) ends a thread that asks for the GIL back with
// pthread_exit, an unwinding: out of a noexcept destructor (py::gil_scoped_release's) it calls
// std::terminate, and through the binding's frames it runs the destructors of the Python objects
// they hold (the output array) with no thread state, which since 3.12 frees through a null
// interpreter and crashes. So a thread other than the main one that comes back during
// finalization parks instead (the process is exiting and takes it along): before asking for the
// GIL, and also when the unwinding starts inside PyEval_RestoreThread (a thread that was already
// waiting for the GIL when finalization began), where the handler never returns, so the unwinding
// goes no further. The main thread is the one finalizing (a __del__ at exit calling lowbit): it
// gets the GIL back as usual.
class NoGil {
 public:
  NoGil() : state_(PyEval_SaveThread()) {}
  ~NoGil() {
    if (finalizing() && PyThread_get_thread_ident() != main_thread) park();
    try {
      PyEval_RestoreThread(state_);
    } catch (...) {  // (the forced unwinding of pthread_exit; never rethrown, so never ended)
      park();
    }
  }
  NoGil(const NoGil&) = delete;
  NoGil& operator=(const NoGil&) = delete;

 private:
  [[noreturn]] static void park() {
    for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
  }
  static bool finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
  }
  PyThreadState* state_;

 public:
  static unsigned long main_thread;  // threading.main_thread().ident, set at import
};
unsigned long NoGil::main_thread = 0;

// A recorded sequence of kernel calls (lowbit.nn.record), replayed from C++ with the GIL released
// once: the CUDA-graphs idea on the CPU, for a model's decode step (~300 calls a token, each a
// few microseconds of Python and binding around a kernel that streams its weights).
//
// Recording runs the model's Python code once as usual; each recordable binding (the linear
// plans, norms, RoPE, SwiGLU, add, the KV cache, embedding rows) also appends its kernel call,
// with the raw pointers it was given, to the graph being recorded on this thread. A replay calls
// those kernels again on the same buffers: the graph's inputs (copied in by the caller), the
// outputs of earlier calls, the weights. Anything computed outside lowbit's calls would be frozen
// at its recorded value, so each call's activation inputs must lie in memory the graph knows (its
// inputs or what a recorded call wrote), checked as it is recorded; the arrays the calls return
// while recording are read-only, so numpy cannot write to them in place unseen.
class KVCache;

class Graph {
 public:
  using Op = std::function<void()>;

  // Recording, on this thread: the graph every recordable call appends to, or null.
  static Graph*& recording() {
    thread_local Graph* g = nullptr;
    return g;
  }
  static void not_recordable(const char* what) {
    if (recording())
      throw py::type_error(std::string(what) +
                           " cannot be recorded (lowbit.nn.record): use the recordable lowbit "
                           "calls (Linear, FusedLinear, rms_norm, layer_norm, RoPE, swiglu, "
                           "geglu, add, scale, KVCache, a block weight's dequantize(rows=))");
  }

  void begin() {
    if (recording()) throw py::value_error("record: another recording is under way on this thread");
    if (recorded_) throw py::value_error("record: this graph was recorded already");
    recording() = this;
  }
  void end() {
    if (recording() == this) recording() = nullptr;
    recorded_ = true;
    plan_prefetches();
  }

  // A graph input: the buffer a replay copies its argument into. Returns a read-only view.
  py::array input(py::array a) {
    if (recorded_ || recording()) throw py::value_error("record: inputs come before recording");
    a = py::array(a.attr("copy")());  // C-contiguous, owned
    know(a);
    inputs_.push_back(a);
    return readonly_view(a);
  }
  void output(const py::handle& h) {
    const py::array a = h.cast<py::array>();
    require(a, "a result");
  }

  // While recording: `a` (read by a call being recorded) must lie in memory the graph knows.
  void require(const py::array& a, const char* what) const {
    const char* lo = static_cast<const char*>(a.data());
    const char* hi = lo;
    if (a.size()) {
      for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        const py::ssize_t st = a.strides(i) * (a.shape(i) - 1);
        (st < 0 ? lo : hi) += st;
      }
      hi += a.itemsize();
    }
    require(lo, hi, what);
  }
  void require(const void* p, int64_t bytes, const char* what) const {
    require(static_cast<const char*>(p), static_cast<const char*>(p) + bytes, what);
  }
  // `a` (written by a call being recorded, at `written` when given) becomes known memory; a new
  // result is made read-only. (An `out` given by the caller is made read-only too, with the
  // arrays it views: numpy must not change it unseen between recorded calls either.)
  py::object produce(const py::object& a, bool fresh = true, const void* written = nullptr) {
    if (written && a.cast<py::array>().data() != written)
      throw py::value_error("record: out must be aligned float32 (the kernel wrote a copy)");
    know(a.cast<py::array>());
    auto& api = py::detail::npy_api::get();
    for (PyObject* o = a.ptr(); o && api.PyArray_Check_(o); o = py::detail::array_proxy(o)->base) {
      py::detail::array_proxy(o)->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
      if (fresh) break;
    }
    return a;
  }
  void keep(const py::object& o) { keep_.push_back(o); }
  // A kernel call; `prepare` (optional) runs first with the GIL held, before any call of the
  // replay: checks of the inputs' values, a cache's growth. weights: what the call streams, for
  // the prefetch of the calls ahead.
  void add(Op op, Op prepare = nullptr, const MemRange* weights = nullptr, int n_weights = 0) {
    ops_.push_back({std::move(op), std::vector<MemRange>(weights, weights + n_weights), {}});
    if (prepare) prepares_.push_back(std::move(prepare));
  }
  // What a replay reads through an object whose storage may be replaced (a KV cache, RoPE
  // tables): `storage` gives its arrays, held for the replay's length (once per owner).
  void hold_storage(const void* owner, std::function<py::object()> storage) {
    for (const auto& s : storages_)
      if (s.first == owner) return;
    storages_.emplace_back(owner, std::move(storage));
  }
  // A KV cache's appends in one replay, reserved before it (see KVCache).
  int64_t& appended(KVCache* c) {
    for (auto& e : appends_)
      if (e.first == c) return e.second;
    appends_.emplace_back(c, 0);
    return appends_.back().second;
  }

  void replay(const py::args& args);

  size_t size() const { return ops_.size(); }

 private:
  struct Recorded {
    Op op;
    std::vector<MemRange> weights, ahead;
  };
  struct Span {
    const char *lo, *hi;
  };

  static py::array readonly_view(const py::array& a) {
    py::array v = a.attr("view")();
    py::detail::array_proxy(v.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
    return v;
  }
  void know(const py::array& a) {
    const char* p = static_cast<const char*>(a.data());
    known_.push_back({p, p + a.nbytes()});
    keep_.push_back(a);
  }
  void require(const char* lo, const char* hi, const char* what) const {
    // covered by the union of the known spans
    for (bool moved = true; lo < hi && moved;) {
      moved = false;
      for (const Span& s : known_)
        if (s.lo <= lo && lo < s.hi) {
          lo = s.hi, moved = true;
          break;
        }
    }
    if (lo < hi)
      throw py::value_error(
          std::string("record: ") + what +
          " was not computed by a recorded lowbit call: numpy work on activations (a + b, "
          "concatenate, a reshape that copies, np.asarray of other dtypes) runs once, while "
          "recording, and a replay would reuse its value. Use lowbit.nn.add and the other "
          "recordable calls, or pass the array as an input of record");
  }
  // Each streaming call has the pool's idle threads prefetch the weights of the calls after it
  // (up to 4 of them, ~2 MB), as LinearPlan learns it when called from Python.
  void plan_prefetches() {
    for (size_t i = 0; i < ops_.size(); ++i) {
      if (ops_[i].weights.empty()) continue;
      int64_t bytes = 0;
      int calls = 0;
      for (size_t j = i + 1; j < ops_.size() && calls < 4 && bytes < (int64_t(2) << 20); ++j) {
        if (ops_[j].weights.empty()) continue;
        ++calls;
        for (const MemRange& r : ops_[j].weights)
          if ((int)ops_[i].ahead.size() < kMaxPrefetchRanges) {
            ops_[i].ahead.push_back(r);
            bytes += r.bytes;
          }
      }
    }
  }

  std::vector<Recorded> ops_;
  std::vector<Op> prepares_;
  std::vector<std::pair<KVCache*, int64_t>> appends_;
  std::vector<std::pair<const void*, std::function<py::object()>>> storages_;
  std::vector<Span> known_;
  std::vector<py::object> keep_;  // every array a pointer of ops_ reads or writes, and the caches
  std::vector<py::array> inputs_;
  bool recorded_ = false;
  std::atomic<bool> busy_{false};
};

// The weight shape and group size every format shares: positive, K small enough for exact int32
// dots, groups a multiple of 32 dividing K (0: per channel).
void check_weight_shape(int64_t N, int64_t K, int64_t group) {
  if (N < 1 || K < 1)
    throw py::value_error("weight shape must be positive, got (" + std::to_string(N) + ", " + std::to_string(K) + ")");
  if (K > kMaxK)
    throw py::value_error("K=" + std::to_string(K) + " exceeds " + std::to_string(kMaxK) +
                          ", the largest K whose integer dot products cannot overflow int32");
  if (group && (group < 32 || group % 32 || K % group))
    throw py::value_error("group_size must be a positive multiple of 32 dividing K=" +
                          std::to_string(K) + ", got " + std::to_string(group));
}

// An optional float32 (n,) array (bias, input_scale): None, or the array checked (held by the
// caller while the kernel reads it).
py::object optional_vector(const py::object& v, const char* name, int64_t n) {
  if (v.is_none()) return v;
  if (!py::isinstance<py::array>(v))
    throw py::type_error(std::string(name) + ": expected a numpy array or None");
  return check<float>(v.cast<py::array>(), name, {n});
}

W8Shape w8_shape(int64_t N, int64_t K, int64_t group) {
  check_weight_shape(N, K, group);
  return W8Shape(N, K, group);
}

Q4Shape q4_shape(int64_t N, int64_t K, int64_t group) {
  check_weight_shape(N, K, group);
  return Q4Shape(N, K, group);
}

// A zero-filled C-contiguous array (padding rows and columns of packed weights must read as 0).
template <class T>
py::array_t<T> zeros(std::vector<py::ssize_t> shape) {
  py::array_t<T> a(shape);
  std::memset(a.mutable_data(), 0, (size_t)a.nbytes());
  return a;
}

// The same for float16, which travels as numpy float16 and which the kernels read as bits.
py::array half_zeros(std::vector<py::ssize_t> shape) {
  py::array a(py::dtype("float16"), shape);
  std::memset(a.mutable_data(), 0, (size_t)a.nbytes());
  return a;
}

py::tuple quantize_w8_py(py::array w, int64_t group) {
  w = check<float>(w, "w", {-1, -1}, true);
  const W8Shape s = w8_shape(w.shape(0), w.shape(1), group);
  auto packed = zeros<int8_t>({s.Np, s.Kp});
  auto scales = zeros<float>({s.G, s.Np});
  auto comp = zeros<int32_t>({s.G, s.Np});
  int64_t bad;
  {
    NoGil nogil;
    bad = quantize_w8(cptr<float>(w), row_stride<float>(w), s, packed.mutable_data(), scales.mutable_data(),
                      comp.mutable_data());
  }
  if (bad >= 0)
    throw py::value_error("weight row " + std::to_string(bad) +
                          " holds NaN or Inf; quantization needs finite weights");
  return py::make_tuple(packed, scales, comp);
}

void check_w8(py::array& packed, py::array& scales, py::array& comp, const W8Shape& s) {
  packed = check<int8_t>(packed, "packed", {s.Np, s.Kp});
  scales = check<float>(scales, "scales", {s.G, s.Np});
  comp = check<int32_t>(comp, "comp", {s.G, s.Np});
}

py::tuple pack_w8_py(py::array q, int64_t group) {
  q = check<int8_t>(q, "q", {-1, -1});
  const W8Shape s = w8_shape(q.shape(0), q.shape(1), group);
  auto packed = zeros<int8_t>({s.Np, s.Kp});
  auto comp = zeros<int32_t>({s.G, s.Np});
  {
    NoGil nogil;
    pack_w8(cptr<int8_t>(q), s, packed.mutable_data(), comp.mutable_data());
  }
  return py::make_tuple(packed, comp);
}

// GGUF rows of blocks of 32 (`block_bytes` each) -> the weight shape, with the row length checked.
py::array check_gguf_rows(const py::array& raw, int64_t K, int64_t block_bytes) {
  if (K < 32 || K % 32 || raw.shape(1) != K / 32 * block_bytes)
    throw py::value_error("GGUF rows of K=" + std::to_string(K) + " need K a multiple of 32 and " +
                          std::to_string(block_bytes) + " bytes per 32 weights, got raw shape " +
                          shape_str(raw));
  return raw;
}

// Static activations: act_scale 0 (dynamic) or a positive finite scale; zero point in [-128, 127].
void check_static(float act_scale, int32_t act_zero) {
  if (!(act_scale >= 0.f && std::isfinite(act_scale)))
    throw py::value_error("act_scale: expected 0 (dynamic) or a positive finite scale, got " +
                          std::to_string(act_scale));
  if (act_zero < -128 || act_zero > 127 || (act_scale == 0.f && act_zero != 0))
    throw py::value_error("act_zero: expected an int8 zero point with a static scale, got " +
                          std::to_string(act_zero));
}

// Result arrays of 256 KB and more take their memory from a cache of freed blocks (up to
// LOWBIT_CACHE_MB, default 64, of them kept; 0: none): a model's forward allocates the same
// sizes call after call, and memory that malloc returned to the system (it trims its heap as
// large blocks are freed) comes back as fresh pages, faulted in and zeroed by the kernel as the
// kernel writes them (a SmolLM2 prompt spent 5% of its time there, 10-15% slower after an
// unrelated change of allocation order). Blocks are taken and given back with the GIL held.
class BlockCache {
 public:
  static constexpr size_t kMin = size_t(256) << 10, kAlign = 4096;
  static BlockCache& get() {
    static BlockCache* c = new BlockCache();  // (never destroyed: capsules may outlive statics)
    return *c;
  }
  void* take(size_t bytes) {
    auto it = free_.find(bytes);
    if (it != free_.end()) {
      void* p = it->second;
      free_.erase(it);
      held_ -= bytes;
      return p;
    }
    void* p = std::aligned_alloc(kAlign, bytes);
    if (!p) throw std::bad_alloc();
    return p;
  }
  void give(void* p, size_t bytes) {
    if (held_ + bytes > limit_) {
      std::free(p);
      return;
    }
    free_.emplace(bytes, p);
    held_ += bytes;
  }

  size_t limit() const { return limit_; }

 private:
  BlockCache() : limit_((size_t)env_count("LOWBIT_CACHE_MB", 0, kMaxMB, 64, "MB") << 20) {}
  static constexpr int64_t kMaxMB = int64_t(1) << 20;  // 1 TB: more is a typo, not a cache
  std::multimap<size_t, void*> free_;
  size_t held_ = 0, limit_;
};

// A new C-contiguous float32 array of `shape` (uninitialised).
py::array_t<float> new_floats(const std::vector<py::ssize_t>& shape) {
  size_t n = sizeof(float);
  for (py::ssize_t d : shape) n *= (size_t)d;
  if (n < BlockCache::kMin) return py::array_t<float>(shape);
  const size_t bytes = round_up((int64_t)n, BlockCache::kAlign);
  void* p = BlockCache::get().take(bytes);
  PyObject* capsule = PyCapsule_New(p, "lowbit.block", [](PyObject* c) {
    BlockCache::get().give(PyCapsule_GetPointer(c, "lowbit.block"),
                           reinterpret_cast<size_t>(PyCapsule_GetContext(c)));
  });
  if (!capsule) {
    BlockCache::get().give(p, bytes);
    throw py::error_already_set();
  }
  PyCapsule_SetContext(capsule, reinterpret_cast<void*>(bytes));
  const py::object owner = py::reinterpret_steal<py::object>(capsule);
  return py::array_t<float>(shape, static_cast<float*>(p), owner);
}

// Where a kernel writes its float32 result of `shape`: a new array, or `out` when given, which
// must be a writeable C-contiguous float32 array of exactly that shape (overlap with the inputs is
// checked by the Python callers). An `out` whose data is not 4-byte aligned gets the result
// through an aligned array, copied into it by finish() (with the GIL held).
class Output {
 public:
  Output(const py::object& out, const std::vector<int64_t>& shape) : out_(out) {
    if (out.is_none()) {
      y_ = new_floats(std::vector<py::ssize_t>(shape.begin(), shape.end()));
      data_ = static_cast<float*>(y_.mutable_data());
      return;
    }
    const py::array y = out.cast<py::array>();
    bool ok = y.dtype().equal(py::dtype::of<float>()) && (y.flags() & py::array::c_style) &&
              y.writeable() && y.ndim() == (py::ssize_t)shape.size();
    for (size_t i = 0; ok && i < shape.size(); ++i) ok = y.shape(i) == shape[i];
    if (!ok) {
      std::string want = "(";
      for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
      throw py::value_error("out: expected a writeable C-contiguous float32 array of shape " + want +
                            (shape.size() == 1 ? ",)" : ")") + ", got " +
                            std::string(py::str(y.dtype())) + " " + shape_str(y));
    }
    y_ = readable(y, sizeof(float), false) ? y : py::array(y.attr("copy")());
    data_ = static_cast<float*>(y_.mutable_data());
  }
  float* data() const { return data_; }  // (no Python call: usable without the GIL)
  py::array finish() {
    if (out_.is_none()) return y_;
    if (!y_.is(out_)) py::module_::import("numpy").attr("copyto")(out_, y_);
    return out_.cast<py::array>();
  }

 private:
  py::object out_;
  py::array y_;
  float* data_ = nullptr;
};

py::tuple quantize_w4_py(py::array w, int64_t group, bool symmetric) {
  w = check<float>(w, "w", {-1, -1}, true);
  const Q4Shape s = q4_shape(w.shape(0), w.shape(1), group);
  auto packed = zeros<uint8_t>({s.Np, s.Kp / 2});
  py::array scales = half_zeros({s.Np / kPanel, s.G, kPanel});
  py::object mins = py::none();
  uint16_t* mins_ptr = nullptr;
  if (!symmetric) {
    py::array m = half_zeros({s.Np / kPanel, s.G, kPanel});
    mins_ptr = (uint16_t*)m.mutable_data();
    mins = m;
  }
  int64_t bad;
  int why = 0;
  {
    NoGil nogil;
    bad = quantize_w4(cptr<float>(w), row_stride<float>(w), s, packed.mutable_data(), (uint16_t*)scales.mutable_data(),
                      mins_ptr, &why);
  }
  if (bad >= 0)
    throw py::value_error("weight row " + std::to_string(bad) +
                          (why ? " has values beyond float16 range (|w| up to 65504 scale steps); "
                                 "4-bit weights keep float16 scales"
                               : " holds NaN or Inf; quantization needs finite weights"));
  return py::make_tuple(packed, scales, mins);
}

void check_w4(py::array& packed, py::array& scales, py::object& mins, py::object& zeros,
              const Q4Shape& s) {
  packed = check<uint8_t>(packed, "packed", {s.Np, s.Kp / 2});
  scales = check_half(scales, "scales", {s.Np / kPanel, s.G, kPanel});
  if (!mins.is_none()) mins = check_half(mins.cast<py::array>(), "mins", {s.Np / kPanel, s.G, kPanel});
  if (!zeros.is_none())
    zeros = check<uint8_t>(zeros.cast<py::array>(), "zeros", {s.Np / kPanel, s.G, kPanel});
  if (!mins.is_none() && !zeros.is_none()) throw py::value_error("give mins or zeros, not both");
}

py::array_t<uint8_t> pack_w4_py(py::array q, int64_t group) {
  q = check<uint8_t>(q, "q", {-1, -1});
  const Q4Shape s = q4_shape(q.shape(0), q.shape(1), group);
  const uint8_t* v = cptr<uint8_t>(q);
  for (int64_t i = 0; i < s.N * s.K; ++i)
    if (v[i] > 15)
      throw py::value_error("4-bit values must be in 0..15, got " + std::to_string(v[i]) + " at (" +
                            std::to_string(i / s.K) + ", " + std::to_string(i % s.K) + ")");
  auto packed = zeros<uint8_t>({s.Np, s.Kp / 2});
  {
    NoGil nogil;
    pack_w4(v, s, packed.mutable_data());
  }
  return packed;
}

py::tuple gguf_q4_py(py::array raw, int64_t K, bool has_min) {
  raw = check_gguf_rows(check<uint8_t>(raw, "raw", {-1, -1}), K, has_min ? 20 : 18);
  const Q4Shape s = q4_shape(raw.shape(0), K, 32);
  auto packed = zeros<uint8_t>({s.Np, s.Kp / 2});
  py::array scales = half_zeros({s.Np / kPanel, s.G, kPanel});
  py::array mins = half_zeros({s.Np / kPanel, s.G, kPanel});
  {
    NoGil nogil;
    gguf_q4(cptr<uint8_t>(raw), raw.shape(1), has_min, s, packed.mutable_data(),
            (uint16_t*)scales.mutable_data(), (uint16_t*)mins.mutable_data());
  }
  return py::make_tuple(packed, scales, has_min ? py::object(mins) : py::object(py::none()));
}

// ---- block formats (formats.h) ----

const char* const kPartNames[] = {"q8", "nib", "bits", "d", "dm", "sc", "mc"};
constexpr BlkPart kParts[] = {BlkPart::Q8, BlkPart::Nib, BlkPart::Bits, BlkPart::D, BlkPart::Dm, BlkPart::Sc, BlkPart::Mc};
constexpr int kNumParts = sizeof(kParts) / sizeof(kParts[0]);

int check_format(int fmt) {
  if (fmt < 0 || fmt >= kNumBlockFormats)
    throw py::value_error("block format " + std::to_string(fmt) + " does not exist (0.." +
                          std::to_string(kNumBlockFormats - 1) + ")");
  return fmt;
}

BlkShape blk_shape(int fmt, int64_t N, int64_t K) {
  const BlockFormat& F = kBlockFormats[check_format(fmt)];
  if (N < 1 || K < 1 || K % F.block)
    throw py::value_error(std::string(F.name) + " weights need N >= 1 and K a positive multiple of " +
                          std::to_string(F.block) + ", got (" + std::to_string(N) + ", " +
                          std::to_string(K) + ")");
  if (K > kMaxK)
    throw py::value_error("K=" + std::to_string(K) + " exceeds " + std::to_string(kMaxK) +
                          ", the largest K whose integer dot products cannot overflow int32");
  return BlkShape(fmt, N, K);
}

// (dtype, shape) of each part the format has, in the kernel layout (formats.h).
py::dict blk_parts(int fmt, int64_t N, int64_t K) {
  const BlkShape s = blk_shape(fmt, N, K);
  const BlockFormat& F = kBlockFormats[fmt];
  const int64_t P = s.P;
  py::dict parts;
  for (int i = 0; i < kNumParts; ++i) {
    if (!s.part_size(kParts[i])) continue;
    switch (kParts[i]) {
      case BlkPart::Q8: parts["q8"] = py::make_tuple("uint8", py::make_tuple(s.Np, K)); break;
      case BlkPart::Nib: parts["nib"] = py::make_tuple("uint8", py::make_tuple(s.Np, K / 2)); break;
      case BlkPart::Bits: parts["bits"] = py::make_tuple("uint64", py::make_tuple(P, K / 4, F.planes)); break;
      case BlkPart::D:
        parts["d"] = py::make_tuple(F.scale == ScaleKind::E8M0 ? "uint8" : "float16", py::make_tuple(P, K / F.block, kPanel));
        break;
      case BlkPart::Dm: parts["dm"] = py::make_tuple("float16", py::make_tuple(P, K / F.block, kPanel)); break;
      case BlkPart::Sc: parts["sc"] = py::make_tuple("int8", py::make_tuple(P, K / F.sub, kPanel)); break;
      case BlkPart::Mc: parts["mc"] = py::make_tuple("uint8", py::make_tuple(P, K / F.sub, kPanel)); break;
    }
  }
  return parts;
}

py::list block_formats() {
  static const char* lut[] = {"none", "iq4", "mxfp4"};
  static const char* scale[] = {"half", "code", "e8m0"};
  static const char* mins[] = {"none", "half", "code"};
  py::list out;
  for (int i = 0; i < kNumBlockFormats; ++i) {
    const BlockFormat& F = kBlockFormats[i];
    py::dict d;
    d["index"] = i;
    d["name"] = F.name;
    d["ggml_type"] = F.ggml_type;
    d["block"] = F.block;
    d["bytes"] = F.bytes;
    d["sub"] = F.sub;
    d["bits"] = F.bits;
    d["offset"] = F.offset;
    d["lut"] = lut[(int)F.lut];
    d["scale"] = scale[(int)F.scale];
    d["min"] = mins[(int)F.min];
    out.append(d);
  }
  return out;
}

// The weight fields of BlkArgs from its parts, each checked against the format's layout (a part
// the kernels cannot read as it is, misaligned, is replaced in `parts` by an aligned copy).
BlkArgs blk_weight(int fmt, int64_t N, int64_t K, py::dict& parts) {
  const BlkShape s = blk_shape(fmt, N, K);
  const py::dict expect = blk_parts(fmt, N, K);
  BlkArgs w{};
  w.fmt = fmt;
  w.N = N;
  w.Np = s.Np;
  w.K = K;
  const void* ptr[kNumParts] = {};
  for (int i = 0; i < kNumParts; ++i) {
    const char* name = kPartNames[i];
    const bool want = expect.contains(name), have = parts.contains(name) && !parts[name].is_none();
    if (want != have)
      throw py::value_error(std::string(kBlockFormats[fmt].name) + " weight: part '" + name + "' " +
                            (want ? "missing" : "not expected"));
    if (!have) continue;
    py::array a = parts[name].cast<py::array>();
    const py::tuple spec = expect[name].cast<py::tuple>();
    const py::dtype dt(spec[0].cast<std::string>());
    const py::tuple shape = spec[1].cast<py::tuple>();
    bool ok = a.dtype().equal(dt) && a.ndim() == (py::ssize_t)shape.size() &&
              (a.size() == 0 || (a.flags() & py::array::c_style));
    for (py::ssize_t j = 0; ok && j < a.ndim(); ++j) ok = a.shape(j) == shape[j].cast<int64_t>();
    if (!ok)
      throw py::value_error(std::string(kBlockFormats[fmt].name) + " weight: part '" + name +
                            "' should be a C-contiguous " + std::string(py::str(dt)) + " array of shape " +
                            std::string(py::str(shape)) + ", got " + std::string(py::str(a.dtype())) + " " +
                            shape_str(a));
    if (!readable(a, a.itemsize(), false)) parts[name] = a = py::array(a.attr("copy")());
    ptr[i] = a.data();
  }
  w.q8 = (const uint8_t*)ptr[0];
  w.nib = (const uint8_t*)ptr[1];
  w.bits = (const uint64_t*)ptr[2];
  w.d = ptr[3];
  w.dm = (const uint16_t*)ptr[4];
  w.sc = (const int8_t*)ptr[5];
  w.mc = (const uint8_t*)ptr[6];
  const BlockFormat& f = kBlockFormats[fmt];
  if (w.sc && (f.sc_lo > INT8_MIN || f.sc_hi < INT8_MAX)) {  // (Q3_K's dot holds code * value
    const int64_t n = parts[kPartNames[5]].cast<py::array>().size();  // in a byte)
    for (int64_t i = 0; i < n; ++i)
      if (w.sc[i] < f.sc_lo || w.sc[i] > f.sc_hi)
        throw py::value_error(std::string(f.name) + " weight: part 'sc' holds the scale code " +
                              std::to_string(w.sc[i]) + " at " + std::to_string(i) + "; " +
                              f.name + " codes lie in " + std::to_string(f.sc_lo) + ".." +
                              std::to_string(f.sc_hi));
  }
  return w;
}

// Zero-filled parts of an (N, K) weight of format fmt.
py::dict blk_zeros(int fmt, int64_t N, int64_t K) {
  const py::dict spec = blk_parts(fmt, N, K);
  py::dict parts;
  for (auto item : spec) {
    const py::tuple t = item.second.cast<py::tuple>();
    py::array a(py::dtype(t[0].cast<std::string>()), t[1].cast<std::vector<py::ssize_t>>());
    std::memset(a.mutable_data(), 0, (size_t)a.nbytes());
    parts[item.first] = a;
  }
  return parts;
}

// GGUF rows raw (one file row per weight row) into rows [row0, row0 + raw rows) of `parts`
// (blk_zeros of the whole weight; row0 a multiple of 16): a large tensor is repacked in chunks.
void gguf_blocks_py(int fmt, py::array raw, int64_t N, int64_t K, py::dict& parts, int64_t row0) {
  const BlockFormat& F = kBlockFormats[check_format(fmt)];
  raw = check<uint8_t>(raw, "raw", {-1, -1});
  if (K < F.block || K % F.block || raw.shape(1) != K / F.block * F.bytes)
    throw py::value_error(std::string("GGUF ") + F.name + " rows of K=" + std::to_string(K) +
                          " need K a multiple of " + std::to_string(F.block) + " and " +
                          std::to_string(F.bytes) + " bytes per block, got raw shape " + shape_str(raw));
  if (row0 < 0 || row0 % kPanel || row0 + raw.shape(0) > N)
    throw py::value_error("rows [" + std::to_string(row0) + ", " + std::to_string(row0 + raw.shape(0)) +
                          ") do not start on a 16-row panel inside " + std::to_string(N) + " rows");
  const BlkArgs w = blk_weight(fmt, N, K, parts);  // checks every part's dtype and shape
  const BlkShape s = blk_shape(fmt, N, K);
  for (int i = 0; i < kNumParts; ++i)
    if (parts.contains(kPartNames[i]) && !parts[kPartNames[i]].cast<py::array>().writeable())
      throw py::value_error(std::string("part '") + kPartNames[i] + "' is read-only");
  NoGil nogil;
  blk_from_gguf(cptr<uint8_t>(raw), raw.shape(1), s, row0, row0 + raw.shape(0), (uint8_t*)w.q8,
                (uint8_t*)w.nib, (uint64_t*)w.bits, (void*)w.d, (uint16_t*)w.dm, (int8_t*)w.sc,
                (uint8_t*)w.mc);
}

// A block-format weight's parts, checked once and kept alive with the kernel arguments they give,
// so that a call pays no per-part checks (QuantizedWeight holds one).
class BlockWeight {
 public:
  BlockWeight(int fmt, int64_t N, int64_t K, const py::dict& parts)
      : parts_(py::dict(parts)), w_(blk_weight(fmt, N, K, parts_)) {}
  const BlkArgs& args() const { return w_; }
  const py::dict& parts() const { return parts_; }

 private:
  py::dict parts_;  // a copy of the mapping: replacing an entry later cannot free what w_ reads
  BlkArgs w_;
};

py::array_t<float> dequantize_blk_py(const BlockWeight& weight, py::array rows) {
  const BlkArgs& w = weight.args();
  const int64_t N = w.N, K = w.K;
  rows = check<int64_t>(rows, "rows", {-1});
  const int64_t* r = cptr<int64_t>(rows);
  for (int64_t i = 0; i < rows.shape(0); ++i)
    if (r[i] < 0 || r[i] >= N) throw py::index_error("row " + std::to_string(r[i]) + " out of range");
  py::array_t<float> out = new_floats({(py::ssize_t)rows.shape(0), (py::ssize_t)K});
  const int64_t n = rows.shape(0);
  float* op = out.mutable_data();
  if (Graph* g = Graph::recording()) {
    g->require(rows, "the rows of dequantize");
    g->produce(out);
    g->keep(py::cast(&weight));
    g->add([&w, r, n, op] { blk_dequantize(w, r, n, op); }, [r, n, N] {
      for (int64_t i = 0; i < n; ++i)
        if (r[i] < 0 || r[i] >= N)
          throw py::index_error("row " + std::to_string(r[i]) + " out of range for " +
                                std::to_string(N) + " rows");
    });
  }
  NoGil nogil;
  blk_dequantize(w, r, n, op);
  return out;
}

// A linear layer's kernel call, its weight checked and its settings fixed once, holding the arrays
// it reads: a call then checks only x and out. lowbit.Linear keeps one, so that a small layer costs
// little more than its kernel. plan(x, out) takes the common case (float32 x of shape (..., K)
// that the kernels read as it is; out None, or a float32 C-contiguous aligned array of the output
// shape that does not overlap x) and returns None for anything else, which the Python caller
// converts (or refuses with its message) and passes to run(x2, out2), which takes 2-D rows only.
using PyArrayObj = py::detail::PyArray_Proxy;
constexpr int kCContiguous = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_;
constexpr int kWriteable = py::detail::npy_api::NPY_ARRAY_WRITEABLE_;

// The float32 (native byte order) ndarray behind h, or null.
const PyArrayObj* float_array(const py::handle& h) {
  if (!py::detail::npy_api::get().PyArray_Check_(h.ptr())) return nullptr;
  const PyArrayObj* a = py::detail::array_proxy(h.ptr());
  const auto* d = py::detail::array_descriptor_proxy(a->descr);
  const bool native = d->byteorder == '=' || d->byteorder == (PY_BIG_ENDIAN ? '>' : '<');
  return d->type_num == py::detail::npy_api::NPY_FLOAT_ && native ? a : nullptr;
}

bool aligned(const PyArrayObj* a) { return reinterpret_cast<uintptr_t>(a->data) % sizeof(float) == 0; }


// lowbit.nn.KVCache's storage and calls. Values (kv_heads, capacity, head_dim); keys (kv_heads,
// capacity / 32, head_dim, 32), blocks of 32 keys transposed, as the attention kernel reads them.
// It grows by doubling, with the GIL held: a graph's replay reserves its appends before it
// releases the GIL, and its recorded calls read the storage where it is at the time.
class KVCache {
 public:
  KVCache(int64_t kv_heads, int64_t head_dim, int64_t capacity) : kvh_(kv_heads), d_(head_dim) {
    if (kv_heads < 1 || head_dim < 1)
      throw py::value_error("KVCache: expected kv_heads >= 1 and head_dim >= 1, got " +
                            std::to_string(kv_heads) + " and " + std::to_string(head_dim));
    grow(round_up(std::max<int64_t>(capacity, 32), 32));
  }
  const py::array_t<float>& k() const { return k_; }
  const py::array_t<float>& v() const { return v_; }
  int64_t length() const { return length_; }
  int64_t capacity() const { return cap_; }
  // Keeps the first n positions (0 <= n <= length), with their memory.
  void truncate(int64_t n) {
    Graph::not_recordable("KVCache.clear / a change of its length");
    if (n < 0 || n > length_)
      throw py::value_error("length: expected 0 .. " + std::to_string(length_) + ", got " + std::to_string(n));
    length_ = n;
  }
  // The arrays the calls read now: held by a caller around a call without the GIL, so that a
  // growth on another thread cannot free them under it.
  py::object storage() const { return py::make_tuple(k_, v_); }

  // Room for n keys (with the GIL held).
  void reserve(int64_t n) {
    if (n > cap_) grow(round_up(std::max(2 * cap_, n), 32));
  }

  // k, v: (tokens, kv_heads, head_dim) float32, last axis contiguous.
  void append(py::array k, py::array v) {
    k = check<float>(k, "k", {-1, kvh_, d_}, true);
    v = check<float>(v, "v", {k.shape(0), kvh_, d_}, true);
    const int64_t t = k.shape(0);
    const float *kp = cptr<float>(k), *vp = cptr<float>(v);
    const int64_t ks0 = k.strides(0) / 4, ks1 = k.strides(1) / 4;
    const int64_t vs0 = v.strides(0) / 4, vs1 = v.strides(1) / 4;
    if (Graph* g = Graph::recording()) {
      g->require(k, "the keys appended to a KVCache");
      g->require(v, "the values appended to a KVCache");
      g->appended(this) += t;
      g->keep(py::cast(this));
      g->hold_storage(this, [this] { return storage(); });
      g->add([this, kp, ks0, ks1, vp, vs0, vs1, t] { store(kp, ks0, ks1, vp, vs0, vs1, t); });
    }
    reserve(length_ + t);
    store(kp, ks0, ks1, vp, vs0, vs1, t);
  }

  // Causal attention of q (tokens, heads, head_dim), the last `tokens` positions cached, over
  // every cached key: (tokens, heads * head_dim).
  py::array_t<float> attend(py::array q, float scale, int64_t window) {
    q = check<float>(q, "q", {-1, -1, d_}, true);
    const int64_t t = q.shape(0), H = q.shape(1);
    if (H % kvh_)
      throw py::value_error("q: expected a number of heads divisible by kv_heads " +
                            std::to_string(kvh_) + ", got shape " + shape_str(q));
    if (t > length_)
      throw py::value_error("q: " + std::to_string(t) + " queries, but only " +
                            std::to_string(length_) + " positions cached");
    if (window < 0) throw py::value_error("window: expected a positive number of keys or 0 (none)");
    py::array_t<float> out = new_floats({t, H * d_});
    const float* qp = cptr<float>(q);
    const int64_t qs0 = q.strides(0) / 4, qs1 = q.strides(1) / 4;
    float* op = out.mutable_data();
    if (Graph* g = Graph::recording()) {
      g->require(q, "the queries of KVCache.attend");
      g->produce(out);
      g->keep(py::cast(this));
      g->hold_storage(this, [this] { return storage(); });
      g->add([this, qp, qs0, qs1, t, H, scale, window, op] {
        attend_into(qp, qs0, qs1, t, H, scale, window, op);
      });
    }
    const py::object hold = storage();
    NoGil nogil;
    attend_into(qp, qs0, qs1, t, H, scale, window, op);
    return out;
  }

 private:
  void grow(int64_t cap) {
    py::array_t<float> k({kvh_, cap / 32, d_, int64_t(32)}), v({kvh_, cap, d_});
    float *kd = k.mutable_data(), *vd = v.mutable_data();
    const int64_t blocks = round_up(length_, 32) / 32;
    for (int64_t h = 0; h < kvh_ && length_; ++h) {  // (nothing to copy into a new cache)
      std::memcpy(kd + h * cap * d_, kd_ + h * cap_ * d_, sizeof(float) * blocks * 32 * d_);
      std::memcpy(vd + h * cap * d_, vd_ + h * cap_ * d_, sizeof(float) * length_ * d_);
    }
    k_ = k, v_ = v, kd_ = kd, vd_ = vd, cap_ = cap;
  }

  void store(const float* k, int64_t ks0, int64_t ks1, const float* v, int64_t vs0, int64_t vs1,
             int64_t t) {
    if (length_ + t > cap_) throw std::runtime_error("KVCache: appended past its reserved capacity");
    for (int64_t i = 0; i < t; ++i) {
      const int64_t j = length_ + i;
      for (int64_t h = 0; h < kvh_; ++h) {
        const float* kr = k + i * ks0 + h * ks1;
        float* kb = kd_ + (h * cap_ + j / 32 * 32) * d_ + j % 32;  // block j / 32, lane j % 32
        for (int64_t c = 0; c < d_; ++c) kb[c * 32] = kr[c];
        std::memcpy(vd_ + (h * cap_ + j) * d_, v + i * vs0 + h * vs1, sizeof(float) * d_);
      }
    }
    length_ += t;
  }

  void attend_into(const float* q, int64_t qs0, int64_t qs1, int64_t t, int64_t H, float scale,
                   int64_t window, float* out) const {
    if (t > length_) throw std::runtime_error("KVCache: more queries than positions cached");
    AttnArgs a{};
    a.q = q, a.qs[1] = qs0, a.qs[2] = qs1;
    a.k = kd_, a.ks[1] = 32, a.ks[2] = cap_ * d_, a.kbs = 32 * d_, a.k_transposed = true;
    a.v = vd_, a.vs[1] = d_, a.vs[2] = cap_ * d_;
    a.out = out;
    a.B = 1, a.Sq = t, a.Sk = length_, a.H = H, a.Hkv = kvh_, a.d = d_;
    a.causal = true, a.scale = scale, a.window = window;
    if (t * H) attention(a);
  }

  int64_t kvh_, d_, cap_ = 0, length_ = 0;
  py::array_t<float> k_, v_;
  float *kd_ = nullptr, *vd_ = nullptr;
};

void Graph::replay(const py::args& args) {
  not_recordable("a graph's replay");
  if (!recorded_) throw py::value_error("replay: the graph has not been recorded");
  if (args.size() != inputs_.size())
    throw py::type_error("replay: expected " + std::to_string(inputs_.size()) + " inputs, got " +
                         std::to_string(args.size()));
  if (busy_.exchange(true)) throw std::runtime_error("replay: this graph is running already");
  struct Done {
    std::atomic<bool>& busy;
    ~Done() { busy = false; }
  } done{busy_};
  for (size_t i = 0; i < inputs_.size(); ++i) {
    py::array& buf = inputs_[i];
    const PyArrayObj* a = py::detail::npy_api::get().PyArray_Check_(args[i].ptr())
                              ? py::detail::array_proxy(args[i].ptr()) : nullptr;
    const bool same = a && a->nd == buf.ndim() && (a->flags & kCContiguous) &&
                      py::reinterpret_borrow<py::array>(args[i]).dtype().equal(buf.dtype()) &&
                      std::equal(a->dimensions, a->dimensions + a->nd, buf.shape());
    if (same) {
      std::memmove(buf.mutable_data(), a->data, buf.nbytes());
      continue;
    }
    const py::object arr = py::module_::import("numpy").attr("asarray")(args[i]);
    if (!py::object(arr.attr("shape")).equal(py::object(buf.attr("shape"))))
      throw py::value_error("replay: input " + std::to_string(i) + ": expected shape " +
                            shape_str(buf) + ", got " + std::string(py::str(arr.attr("shape"))));
    py::module_::import("numpy").attr("copyto")(buf, arr, py::arg("casting") = "same_kind");
  }
  for (const Op& p : prepares_) p();
  for (auto& [cache, t] : appends_) cache->reserve(cache->length() + t);
  std::vector<py::object> held;
  for (const auto& s : storages_) held.push_back(s.second());
  NoGil nogil;
  for (const Recorded& r : ops_) {
    r.op();
    if (!r.ahead.empty()) prefetch_async(r.ahead.data(), (int)r.ahead.size());
  }
}

// The block ops' schedule (lowbit.nn.mlp, attention_block): fewer blocks than two per thread run
// as all(h, g) on the caller's thread, whose kernels then use every thread; more run one(i, h, g)
// for each block i on the pool, h and g the thread's buffers (kept for its next blocks and calls).
template <class All, class One>
void run_blocks(int64_t blocks, const All& all, const One& one) {
  if (blocks < 2 * (int64_t)get_num_threads()) {
    std::vector<float> h, g;
    return all(h, g);
  }
  const Kernels& kt = kernels();  // the caller's set (lb.use_isa) for the blocks' ops
  parallel_for(blocks, [&](int64_t i0, int64_t i1) {
    const UseKernels use(kt);
    thread_local std::vector<float> h, g;
    for (int64_t i = i0; i < i1; ++i) one(i, h, g);
    trim(h), trim(g);
  });
}

// lowbit.nn.attention's limits on its settings, for attention and attention_block alike: window 0
// (none) or a key count; int8 dot products within int32 for head_dim d over `keys` keys.
void check_attention(int64_t window, bool int8, int64_t d, int64_t keys) {
  if (window < 0) throw py::value_error("window: expected a positive number of keys or 0 (none)");
  if (int8 && (d > kAttnInt8MaxDim || keys > kAttnInt8MaxKeys))
    throw py::value_error("precision=\"int8\": expected head_dim <= " +
                          std::to_string(kAttnInt8MaxDim) + " and keys <= " +
                          std::to_string(kAttnInt8MaxKeys) + ", got " + std::to_string(d) +
                          " and " + std::to_string(keys));
}

// The residual add and LayerNorm after a block (lowbit.nn's residual_norm): out rows replaced by
// LayerNorm(out + x) with x the block's input rows (dense), in cache as each block finishes.
struct PostNorm {
  py::object weight = py::none(), bias = py::none();  // checked float32 vectors (held), or None
  const float *w = nullptr, *b = nullptr;
  float eps = 0.f;
  PostNorm(const py::object& weight_, const py::object& bias_, float eps_) : eps(eps_) {
    if (weight_.is_none()) return;
    if (!(eps >= 0.f) || !std::isfinite(eps))
      throw py::value_error("residual_norm: eps: expected a finite number >= 0, got " + std::to_string(eps));
    weight = weight_, bias = bias_;
  }
  // For a block of `in` inputs and `n` outputs: the vectors must have n values, and the residual
  // (the input) be as wide as the output. Takes the vectors' data pointers (with the GIL).
  void prepare(int64_t in, int64_t n) {
    if (weight.is_none()) return;
    if (in != n)
      throw py::value_error("residual_norm: the residual is the block's input, " + std::to_string(in) +
                            " wide, and the output is " + std::to_string(n) + " wide");
    weight = check<float>(weight.cast<py::array>(), "residual_norm weight", {n});
    bias = check<float>(bias.cast<py::array>(), "residual_norm bias", {n});
    w = cptr<float>(weight.cast<py::array>()), b = cptr<float>(bias.cast<py::array>());
  }
  // rows of y (n wide) = LayerNorm(y + x), x's rows n apart
  void apply(float* y, const float* x, int64_t rows, int64_t n) const {
    if (w) layer_norm(y, x, n, w, b, eps, false, rows, n, y);
  }
};

class LinearPlan {
 public:
  enum class Kind { W8, W4, Blk };

  static LinearPlan w8(py::array packed, py::array scales, py::array comp, int64_t N, int64_t K,
                       int64_t group, const py::object& bias, bool int8_activations, float act_scale,
                       int32_t act_zero, const py::object& input_scale, bool gelu,
                       const py::object& perm) {
    check_static(act_scale, act_zero);
    if (!int8_activations && act_scale > 0.f)
      throw py::value_error("static activations are int8 activations, not float ones");
    LinearPlan p(Kind::W8, N, K, bias, input_scale, gelu);
    p.set_perm(perm);
    p.int8_ = int8_activations;
    p.w8_ = w8_shape(N, K, group);
    check_w8(packed, scales, comp, p.w8_);
    p.arrays_ = {packed, scales, comp};
    p.w_ = {packed.data(), scales.data(), comp.data(), nullptr};
    p.own_ranges(p.arrays_);
    p.act_scale_ = act_scale, p.act_zero_ = act_zero;
    return p;
  }

  static LinearPlan w4(py::array packed, py::array scales, py::object mins, py::object zeros,
                       int64_t N, int64_t K, int64_t group, const py::object& bias,
                       bool int8_activations, float act_scale, const py::object& input_scale,
                       bool gelu, const py::object& perm) {
    check_static(act_scale, 0);
    LinearPlan p(Kind::W4, N, K, bias, input_scale, gelu);
    p.set_perm(perm);
    p.q4_ = q4_shape(N, K, group);
    check_w4(packed, scales, mins, zeros, p.q4_);
    p.arrays_ = {packed, scales, mins, zeros};
    p.w_ = {packed.data(), scales.data(), cptr_or_null<uint16_t>(mins), cptr_or_null<uint8_t>(zeros)};
    p.own_ranges(p.arrays_);
    p.int8_ = int8_activations, p.act_scale_ = act_scale;
    return p;
  }

  static LinearPlan blk(const py::object& weight, const py::object& bias, bool int8_activations,
                        float act_scale, const py::object& input_scale, bool gelu) {
    check_static(act_scale, 0);
    const BlkArgs& w = weight.cast<const BlockWeight&>().args();
    LinearPlan p(Kind::Blk, w.N, w.K, bias, input_scale, gelu);
    p.blk_ = w;
    p.arrays_ = {weight};
    std::vector<py::object> parts;
    for (auto item : weight.cast<const BlockWeight&>().parts())
      parts.push_back(py::reinterpret_borrow<py::object>(item.second));
    p.own_ranges(parts);
    p.int8_ = int8_activations, p.act_scale_ = act_scale;
    return p;
  }

  // Act-order weights' input order (lowbit.QuantizedWeight.perm): int64 (K,), each in [0, K),
  // gathered by the kernels' quantization pass.
  void set_perm(const py::object& perm) {
    if (perm.is_none()) return;
    perm_array_ = check<int64_t>(perm.cast<py::array>(), "perm", {K_});
    const int64_t* p = cptr<int64_t>(perm_array_);
    for (int64_t k = 0; k < K_; ++k)
      if (p[k] < 0 || p[k] >= K_)
        throw py::value_error("perm: input " + std::to_string(p[k]) + " at " + std::to_string(k) +
                              " outside 0.." + std::to_string(K_ - 1));
    perm_ = p;
  }

  py::object call(const py::handle& xh, const py::handle& outh) const {
    // numpy's own structs, read without a Python call: this path runs per layer per token
    const PyArrayObj* x = float_array(xh);
    if (!x) return py::none();
    const int nd = x->nd;
    if (nd < 1 || nd > 32 || x->dimensions[nd - 1] != K_ || !aligned(x)) return py::none();
    int64_t M = 1;
    for (int i = 0; i + 1 < nd; ++i) M *= x->dimensions[i];
    // rows the kernels read as they are: C-contiguous, or 2-D with a contiguous last axis
    int64_t ldx = K_;
    if (!(x->flags & kCContiguous)) {
      if (nd != 2 || x->strides[1] != (py::ssize_t)sizeof(float) || x->strides[0] < 0 ||
          x->strides[0] % (py::ssize_t)sizeof(float))
        return py::none();
      ldx = M > 1 ? x->strides[0] / (int64_t)sizeof(float) : K_;
    }
    py::ssize_t shape[32];
    std::memcpy(shape, x->dimensions, sizeof(py::ssize_t) * (size_t)nd);
    shape[nd - 1] = N_;
    auto& api = py::detail::npy_api::get();
    py::object y;
    float* yp;
    if (outh.is_none() && M * N_ * (int64_t)sizeof(float) >= (int64_t)BlockCache::kMin) {
      y = new_floats(std::vector<py::ssize_t>(shape, shape + nd));
      yp = reinterpret_cast<float*>(py::detail::array_proxy(y.ptr())->data);
    } else if (outh.is_none()) {
      y = py::reinterpret_steal<py::object>(api.PyArray_NewFromDescr_(
          api.PyArray_Type_, api.PyArray_DescrFromType_(py::detail::npy_api::NPY_FLOAT_), nd,
          shape, nullptr, nullptr, 0, nullptr));
      if (!y) throw py::error_already_set();
      yp = reinterpret_cast<float*>(py::detail::array_proxy(y.ptr())->data);
    } else {
      const PyArrayObj* o = float_array(outh);
      if (!o || o->nd != nd || !(o->flags & kCContiguous) || !(o->flags & kWriteable) || !aligned(o))
        return py::none();
      int64_t size = 1;
      for (int i = 0; i < nd; ++i) {
        if (o->dimensions[i] != shape[i]) return py::none();
        size *= shape[i];
      }
      // out must not overlap what the kernel reads: x (its last row ends K floats after its
      // start), the bias, the input scales
      const char* y0 = o->data;
      auto overlaps = [&](const void* p, int64_t bytes) {
        return p && bytes > 0 && y0 < (const char*)p + bytes &&
               (const char*)p < y0 + size * (int64_t)sizeof(float);
      };
      if (overlaps(x->data, ((M ? M - 1 : 0) * ldx + (M ? K_ : 0)) * (int64_t)sizeof(float)) ||
          overlaps(bias_p_, N_ * (int64_t)sizeof(float)) ||
          overlaps(colscale_p_, K_ * (int64_t)sizeof(float)))
        return py::none();
      y = py::reinterpret_borrow<py::object>(outh);
      yp = reinterpret_cast<float*>(o->data);
    }
    run_kernel(reinterpret_cast<const float*>(x->data), ldx, M, yp);
    if (Graph* g = Graph::recording())
      record(*g, reinterpret_cast<const float*>(x->data), ldx, M, y, yp, outh.is_none());
    return y;
  }

  // The checked path for rows the Python caller prepared: x (M, K) float32, out None or (M, N).
  py::array run(py::array x, const py::object& out) const {
    x = check<float>(x, "x", {-1, K_}, true);
    const int64_t M = x.shape(0);
    Output y(out, {M, N_});
    run_kernel(cptr<float>(x), row_stride<float>(x), M, y.data());
    py::array r = y.finish();
    if (Graph* g = Graph::recording())
      record(*g, cptr<float>(x), row_stride<float>(x), M, r, y.data(), out.is_none());
    return r;
  }

  // lowbit.nn.mlp: down(act(up(x))), act "none" (up's own epilogue only), "silu" (SwiGLU) or
  // "gelu_tanh" (GeGLU) on the halves [gate | up] of up's output. Many rows go in blocks of R,
  // each block all the way through on one thread: up's output (R x up.N floats) is written,
  // activated and quantized for down in that thread's cache, never in memory, which a layer at a
  // time writes and reads back (4096 x 1536 floats in a BERT's intermediate layer: 25 MB each way).
  // Every output element is computed as the three calls compute it (the kernels' results do not
  // depend on how rows are grouped), so bit for bit the same. Few rows: the three calls, each on
  // every thread. None while a graph is recorded (lowbit.nn.mlp then makes the recordable calls).
  static py::object mlp(const LinearPlan& up, const LinearPlan& down, const std::string& act,
                        py::array x, const py::object& out, PostNorm norm) {
    if (act != "none" && act != "silu" && act != "gelu_tanh")
      throw py::value_error("act: expected 'none', 'silu' or 'gelu_tanh', got '" + act + "'");
    const bool gated = act != "none";
    if (gated && up.N_ % 2)
      throw py::value_error("mlp: a gated activation takes the two halves of up's output, and up "
                            "has an odd out_features, " + std::to_string(up.N_));
    const int64_t width = gated ? up.N_ / 2 : up.N_;  // the hidden activations' width
    if (down.K_ != width)
      throw py::value_error("mlp: down takes " + std::to_string(down.K_) + " inputs, but up" +
                            (gated ? std::string(" gated") : std::string()) + " gives " +
                            std::to_string(width));
    norm.prepare(up.K_, down.N_);
    if (Graph::recording()) return py::none();
    x = check<float>(x, "x", {-1, up.K_}, !norm.w);  // (the norm's residual: dense rows)
    const int64_t M = x.shape(0), ldx = row_stride<float>(x);
    Output y(out, {M, down.N_});
    const float* xp = cptr<float>(x);
    float* yp = y.data();
    {
      NoGil nogil;
      // rows per block: 96, 64, 32 or 16, the most whose output of up takes at most 640 KB (in
      // L2 beside the weights' blocks): whole 32-row AMX blocks (AMX pads a call to a multiple of
      // 32 rows) and, at 96, two whole 48-row blocks of the VNNI kernel (kMc)
      int64_t R = 96;
      while (R > 16 && R * up.N_ * (int64_t)sizeof(float) > 640 * 1024) R = R == 96 ? 64 : R / 2;
      const int64_t blocks = (M + R - 1) / R;
      auto rows = [&](int64_t m0, int64_t n, std::vector<float>& h, std::vector<float>& g) {
        h.resize((size_t)(n * up.N_));
        up.run_kernel_nogil(xp + m0 * ldx, ldx, n, up.bias_p_, up.colscale_p_, h.data());
        const float* hidden = h.data();
        if (gated) {
          g.resize((size_t)(n * width));
          const float *gate = h.data(), *upper = h.data() + width;
          act == "silu" ? silu_mul(gate, up.N_, upper, up.N_, n, width, g.data())
                        : gelu_mul(gate, up.N_, upper, up.N_, n, width, true, g.data());
          hidden = g.data();
        }
        down.run_kernel_nogil(hidden, width, n, down.bias_p_, down.colscale_p_, yp + m0 * down.N_);
        norm.apply(yp + m0 * down.N_, xp + m0 * ldx, n, down.N_);
      };
      run_blocks(
          blocks, [&](auto& h, auto& g) { rows(0, M, h, g); },
          [&](int64_t b, auto& h, auto& g) { rows(b * R, std::min(R, M - b * R), h, g); });
    }
    return y.finish();
  }

  // lowbit.nn.attention_block: proj(attention(q, k, v)), [q | k | v] = qkv(x) for x (B, S, K).
  // `a` holds the attention's settings (causal, scale, window, int8) and heads / kv_heads. Many
  // sequences go one at a time through all three steps on one thread, their projections and
  // attention outputs in that thread's cache; each output element is computed as the three calls
  // compute it (attention's tasks never mix sequences), so bit for bit the same. Few sequences:
  // the three calls, each on every thread. None while a graph is recorded.
  static py::object attention_block(const LinearPlan& qkv, const LinearPlan& proj, py::array x,
                                    AttnArgs a, const py::object& lengths, const py::object& out,
                                    PostNorm norm) {
    const int64_t heads = a.H, kv = a.Hkv;
    if (heads < 1 || kv < 1 || heads % kv)
      throw py::value_error("heads and kv_heads: expected kv_heads >= 1 dividing heads, got " +
                            std::to_string(heads) + " and " + std::to_string(kv));
    const int64_t d = qkv.N_ / (heads + 2 * kv);
    if (d * (heads + 2 * kv) != qkv.N_)
      throw py::value_error("attention_block: qkv's " + std::to_string(qkv.N_) +
                            " outputs are not (heads + 2 * kv_heads) = " +
                            std::to_string(heads + 2 * kv) + " heads of one width");
    if (proj.K_ != heads * d)
      throw py::value_error("attention_block: proj takes " + std::to_string(proj.K_) +
                            " inputs, but the attention gives heads * head_dim = " +
                            std::to_string(heads * d));
    norm.prepare(qkv.K_, proj.N_);
    if (Graph::recording()) return py::none();
    x = check<float>(x, "x", {-1, -1, qkv.K_});
    const int64_t B = x.shape(0), S = x.shape(1), Nq = qkv.N_;
    check_attention(a.window, a.int8, d, S);
    const py::object lens =
        lengths.is_none() ? lengths : py::object(check<int64_t>(lengths.cast<py::array>(), "lengths", {B}));
    const int64_t* lp = cptr_or_null<int64_t>(lens);
    Output y(out, {B, S, proj.N_});
    const float* xp = cptr<float>(x);
    float* yp = y.data();
    if (B * S == 0) return y.finish();
    {
      NoGil nogil;
      a.d = d, a.Sq = a.Sk = S;
      a.qs[0] = a.ks[0] = a.vs[0] = S * Nq;  // q, k, v: views of the projection's rows
      a.qs[1] = a.ks[1] = a.vs[1] = Nq;
      a.qs[2] = a.ks[2] = a.vs[2] = d;
      a.k_transposed = false;
      // sequences [b0, b0 + n) through the three steps, with buffers p (projections), c (context)
      auto run = [&](int64_t b0, int64_t n, std::vector<float>& p, std::vector<float>& c) {
        p.resize((size_t)(n * S * Nq));
        c.resize((size_t)(n * S * heads * d));
        qkv.run_kernel_nogil(xp + b0 * S * qkv.K_, qkv.K_, n * S, qkv.bias_p_, qkv.colscale_p_, p.data());
        AttnArgs s = a;
        s.B = n;
        s.q = p.data(), s.k = p.data() + heads * d, s.v = p.data() + (heads + kv) * d;
        s.lengths = lp ? lp + b0 : nullptr;
        s.out = c.data();
        attention(s);
        proj.run_kernel_nogil(c.data(), heads * d, n * S, proj.bias_p_, proj.colscale_p_,
                              yp + b0 * S * proj.N_);
        norm.apply(yp + b0 * S * proj.N_, xp + b0 * S * qkv.K_, n * S, proj.N_);
      };
      // one sequence a block, taken from both ends in turn (0, B-1, 1, B-2, ...): a batch sorted
      // by length (sentence-transformers' order) then gives each thread's range of blocks a like
      // share of the attention, whose cost follows the lengths
      run_blocks(
          B, [&](auto& p, auto& c) { run(0, B, p, c); },
          [&](int64_t i, auto& p, auto& c) { run(i % 2 ? B - 1 - i / 2 : i / 2, 1, p, c); });
    }
    return y.finish();
  }

 private:
  LinearPlan(Kind kind, int64_t N, int64_t K, const py::object& bias, const py::object& input_scale,
             bool gelu)
      : kind_(kind), N_(N), K_(K), gelu_(gelu),
        bias_(optional_vector(bias, "bias", N)),
        colscale_(optional_vector(input_scale, "input_scale", K)),
        bias_p_(cptr_or_null<float>(bias_)), colscale_p_(cptr_or_null<float>(colscale_)) {}

  // Appends this call to the graph being recorded (see Graph): x's rows must be known to it.
  void record(Graph& g, const float* x, int64_t ldx, int64_t M, const py::object& y, float* yp,
              bool fresh) const {
    g.require(x, ((M ? M - 1 : 0) * ldx + (M ? K_ : 0)) * (int64_t)sizeof(float),
              "a linear layer's input");
    g.produce(y, fresh, yp);
    g.keep(py::cast(this));
    const float *b = bias_p_, *cs = colscale_p_;
    const bool stream = M <= kStreamRows;
    g.add([this, x, ldx, M, b, cs, yp] { run_kernel_nogil(x, ldx, M, b, cs, yp); }, nullptr,
          stream ? own_ : nullptr, stream ? own_n_ : 0);
  }

  // The weight's arrays, as prefetch_async reads them.
  void own_ranges(const std::vector<py::object>& arrays) {
    for (const py::object& a : arrays)
      if (py::isinstance<py::array>(a) && own_n_ < kPlanRanges) {
        const auto arr = a.cast<py::array>();
        own_[own_n_++] = {arr.data(), (int64_t)arr.nbytes()};
      }
  }

  // Runs without the GIL: only the raw pointers taken (with it) when the plan was made.
  // A few rows stream the weights from memory, and a model's decode step calls its layers in the
  // same order each token: each plan learns which plan this Python thread called after it (with
  // the GIL held, so threads never race on it), and once its own kernel is done has the pool's
  // idle workers prefetch that one's weights, while Python computes what lies between the two
  // layers (norms, attention).
  void run_kernel(const float* x, int64_t ldx, int64_t M, float* y) const {
    const float *b = bias_p_, *cs = colscale_p_;
    thread_local std::weak_ptr<Successor> last;  // where the plan called before this one learns
    MemRange ahead[kMaxPrefetchRanges];
    int n_ahead = 0;
    if (M <= kStreamRows) {
      if (auto prev = last.lock()) {
        prev->n = own_n_;
        std::copy(own_, own_ + own_n_, prev->r);
        prev->after = next_;
      }
      last = next_;
      // the weights of the next few calls, as far as they were learned, up to ~2 MB
      int64_t bytes = 0;
      std::shared_ptr<const Successor> s = next_;
      for (int depth = 0; s && depth < 4 && bytes < (int64_t(2) << 20); ++depth, s = s->after.lock())
        for (int i = 0; i < s->n && n_ahead < kMaxPrefetchRanges; ++i) {
          ahead[n_ahead++] = s->r[i];
          bytes += s->r[i].bytes;
        }
    } else {
      last.reset();
    }
    NoGil nogil;
    run_kernel_nogil(x, ldx, M, b, cs, y);
    prefetch_async(ahead, n_ahead);
  }

  void run_kernel_nogil(const float* x, int64_t ldx, int64_t M, const float* b, const float* cs,
                        float* y) const {
    switch (kind_) {
      case Kind::W8:
        if (int8_)
          linear_w8a8(x, ldx, M, (const int8_t*)w_[0], (const float*)w_[1], (const int32_t*)w_[2],
                      b, w8_, act_scale_, act_zero_, cs, gelu_, y, perm_);
        else
          linear_w8f32(x, ldx, M, (const int8_t*)w_[0], (const float*)w_[1], b, w8_, cs, gelu_, y,
                       perm_);
        break;
      case Kind::W4:
        linear_w4(x, ldx, M, (const uint8_t*)w_[0], (const uint16_t*)w_[1],
                  (const uint16_t*)w_[2], (const uint8_t*)w_[3], b, q4_, int8_, act_scale_, cs,
                  gelu_, y, perm_);
        break;
      case Kind::Blk:
        linear_blk(x, ldx, M, blk_, b, int8_, act_scale_, cs, gelu_, y);
        break;
    }
  }

  static constexpr int kPlanRanges = 8;  // at least a weight's arrays (block formats: their parts)
  struct Successor {  // the weight of the plan called next, and where that one's successor is
    MemRange r[kPlanRanges];
    int n = 0;
    std::weak_ptr<Successor> after;
  };
  static constexpr int64_t kStreamRows = 16;  // calls of at most this many rows learn and prefetch

  Kind kind_;
  int64_t N_, K_;
  bool gelu_;
  py::array perm_array_;           // (held: perm_ points into it)
  const int64_t* perm_ = nullptr;
  std::shared_ptr<Successor> next_ = std::make_shared<Successor>();  // the weight called after this
  MemRange own_[kPlanRanges];
  int own_n_ = 0;
  py::object bias_, colscale_;      // checked float32 vectors, or None
  std::vector<py::object> arrays_;  // what the pointers below read, kept alive
  const float *bias_p_ = nullptr, *colscale_p_ = nullptr;
  std::array<const void*, 4> w_{};  // the weight's arrays' data (block formats: in blk_)
  W8Shape w8_{1, 1, 0};
  Q4Shape q4_{1, 1, 0};
  BlkArgs blk_{};
  bool int8_ = true;
  float act_scale_ = 0.f;
  int32_t act_zero_ = 0;
};

py::array_t<int32_t> gemm_s8_py(py::array a, py::array b) {
  Graph::not_recordable("lowbit.gemm_s8");
  a = check<int8_t>(a, "a", {-1, -1});
  b = check<int8_t>(b, "b", {-1, a.shape(1)});
  const int64_t M = a.shape(0), N = b.shape(0), K = a.shape(1);
  if (K > kMaxK)
    throw py::value_error("K=" + std::to_string(K) + " exceeds " + std::to_string(kMaxK) +
                          ", the largest K whose int8 dot products cannot overflow int32");
  if (K == 0) return zeros<int32_t>({M, N});
  py::array_t<int32_t> c({M, N});
  {
    NoGil nogil;
    gemm_s8(cptr<int8_t>(a), M, cptr<int8_t>(b), N, K, c.mutable_data());
  }
  return c;
}

py::array_t<uint8_t> pack_int4_py(py::array q) {
  q = check<uint8_t>(q, "q", {-1, -1});
  const int64_t N = q.shape(0), K = q.shape(1);
  if (K % 2) throw py::value_error("pack_int4: K must be even, got shape " + shape_str(q));
  py::array_t<uint8_t> out({N, K / 2});
  int64_t bad;
  {
    NoGil nogil;
    bad = pack_int4(cptr<uint8_t>(q), N * K / 2, out.mutable_data());
  }
  if (bad >= 0)
    throw py::value_error("pack_int4: values must be in 0..15, got " +
                          std::to_string(cptr<uint8_t>(q)[bad]) + " at (" +
                          std::to_string(bad / K) + ", " + std::to_string(bad % K) + ")");
  return out;
}

py::array_t<uint8_t> unpack_int4_py(py::array p) {
  p = check<uint8_t>(p, "p", {-1, -1});
  const int64_t N = p.shape(0), Kh = p.shape(1);
  py::array_t<uint8_t> out({N, 2 * Kh});
  {
    NoGil nogil;
    unpack_int4(cptr<uint8_t>(p), N * Kh, out.mutable_data());
  }
  return out;
}

// x: float32 of any shape; out: None (a new array) or a writeable C-contiguous float32 array of
// x's shape, which may be x itself (elementwise: in place is safe; any other overlap is checked
// by lowbit.nn). tanh: GELU's tanh approximation instead of the erf form.
py::array gelu_py(py::array x, const py::object& out, bool tanh) {
  Graph::not_recordable("lowbit.nn.gelu");
  if (!x.dtype().equal(py::dtype::of<float>()))
    throw py::type_error("gelu: expected a float32 array, got " + std::string(py::str(x.dtype())));
  x = readable(x, sizeof(float), false) ? x : py::array(x.attr("copy")());
  Output y(out, std::vector<int64_t>(x.shape(), x.shape() + x.ndim()));
  {
    NoGil nogil;
    gelu(cptr<float>(x), y.data(), (int64_t)x.size(), tanh);
  }
  return y.finish();
}

py::array layer_norm_py(py::array x, const py::object& r, py::array w, const py::object& b,
                        float eps, bool rms, const py::object& out) {
  if (!(eps >= 0.f) || !std::isfinite(eps))
    throw py::value_error("eps: expected a finite number >= 0, got " + std::to_string(eps));
  x = check<float>(x, "x", {-1, -1}, true);
  const int64_t rows = x.shape(0), n = x.shape(1);
  w = check<float>(w, "weight", {n});
  const py::object res = r.is_none() ? r : py::object(check<float>(r.cast<py::array>(), "residual", {rows, n}));
  const py::object bias = rms ? py::object(py::none()) : optional_vector(b, "bias", n);
  if (!rms && bias.is_none()) throw py::type_error("bias: expected a numpy array for LayerNorm");
  Output y(out, {rows, n});
  const float *xp = cptr<float>(x), *rp = cptr_or_null<float>(res), *wp = cptr<float>(w),
              *bp = cptr_or_null<float>(bias);
  const int64_t ld = row_stride<float>(x);
  float* yp = y.data();
  {
    NoGil nogil;
    layer_norm(xp, rp, ld, wp, bp, eps, rms, rows, n, yp);
  }
  py::array result = y.finish();
  if (Graph* g = Graph::recording()) {
    g->require(x, "a norm's input");
    if (!res.is_none()) g->require(res.cast<py::array>(), "a norm's residual");
    g->produce(result, out.is_none(), yp);
    g->keep(w), g->keep(bias);
    g->add([=] { layer_norm(xp, rp, ld, wp, bp, eps, rms, rows, n, yp); });
  }
  return result;
}

// In place on a writeable C-contiguous float32 array (through an aligned copy when its data is
// not 4-byte aligned).
void softmax_py(py::array x) {
  Graph::not_recordable("lowbit.nn.softmax");
  if (!x.dtype().equal(py::dtype::of<float>()) || !(x.flags() & py::array::c_style) || !x.writeable())
    throw py::type_error("softmax: expected a writeable C-contiguous float32 array");
  if (x.ndim() == 0 || x.size() == 0) return;
  const int64_t n = x.shape(x.ndim() - 1);
  Output y(x, std::vector<int64_t>(x.shape(), x.shape() + x.ndim()));  // (a copy holds x's values)
  {
    NoGil nogil;
    softmax(y.data(), (int64_t)x.size() / n, n);
  }
  y.finish();
}

// act(gate) * up, act "silu" (SwiGLU) or "gelu_tanh" (GeGLU). gate and up: (rows, n) float32 with
// a contiguous last axis (e.g. the halves of a fused gate / up projection's output).
py::array_t<float> gated_py(py::array gate, py::array up, const std::string& act) {
  if (act != "silu" && act != "gelu_tanh")
    throw py::value_error("act: expected 'silu' or 'gelu_tanh', got '" + act + "'");
  gate = check<float>(gate, "gate", {-1, -1}, true);
  up = check<float>(up, "up", {gate.shape(0), gate.shape(1)}, true);
  const int64_t rows = gate.shape(0), n = gate.shape(1);
  py::array_t<float> y = new_floats({rows, n});
  const float *gp = cptr<float>(gate), *upp = cptr<float>(up);
  const int64_t ldg = row_stride<float>(gate), ldu = row_stride<float>(up);
  float* yp = y.mutable_data();
  const bool silu = act == "silu";
  auto run = [=] {
    silu ? silu_mul(gp, ldg, upp, ldu, rows, n, yp) : gelu_mul(gp, ldg, upp, ldu, rows, n, true, yp);
  };
  if (Graph* g = Graph::recording()) {
    g->require(gate, "a gated activation's gate"), g->require(up, "a gated activation's up");
    g->produce(y);
    g->add(run);
  }
  NoGil nogil;
  run();
  return y;
}

// RoPE tables that grow (lowbit.nn.RoPE): cos and sin (rows, d / 2) float32, and `grow`, a
// Python callable (rows) that sets larger ones; what a recorded call reads is looked up when it
// runs, and a replay grows them first (with the GIL held) for the positions it is given.
class RopeTables {
 public:
  // grow(rows) returns (cos, sin) of that many rows (it must not hold this object: pybind11's
  // objects are invisible to the garbage collector, so a cycle through one is never freed).
  RopeTables(py::object grow, int64_t rows) : grow_(std::move(grow)) { set_rows(rows); }
  void set_rows(int64_t rows) {
    const py::tuple t = grow_(rows);
    py::array cos = check<float>(t[0].cast<py::array>(), "cos", {rows, -1});
    py::array sin = check<float>(t[1].cast<py::array>(), "sin", {rows, cos.shape(1)});
    cos_ = cos, sin_ = sin, rows_ = cos.shape(0), half_ = cos.shape(1);
    cp_ = cptr<float>(cos), sp_ = cptr<float>(sin);
  }
  // Most positions the tables grow to (16 M: beyond any model's context; 8 GB of tables at
  // head_dim 128): a larger position is a bug in the caller's positions, not an allocation.
  static constexpr int64_t kMaxRows = int64_t(1) << 24;
  // Room for positions < n (with the GIL held).
  void ensure(int64_t n) {
    if (n > kMaxRows)
      throw py::index_error("position " + std::to_string(n - 1) + " beyond the " +
                            std::to_string(kMaxRows) + " positions RoPE tables are made for");
    if (n > rows_) set_rows(std::min(std::max(n, 2 * rows_), kMaxRows));
    if (n > rows_)
      throw py::index_error("position " + std::to_string(n - 1) + " outside the RoPE tables' " +
                            std::to_string(rows_) + " positions");
  }
  int64_t rows() const { return rows_; }
  int64_t half() const { return half_; }
  py::object storage() const { return py::make_tuple(cos_, sin_); }
  const float* cos() const { return cp_; }
  const float* sin() const { return sp_; }

 private:
  py::object grow_;
  py::array cos_, sin_;
  const float *cp_ = nullptr, *sp_ = nullptr;
  int64_t rows_ = 0, half_ = 0;
};

// The token stride (in floats) of x (T, H, d) whose heads lie side by side in each token's row,
// as in a slice of a fused QKV projection's output; x checked, or copied where it is laid out
// otherwise (copied only outside recording, which must read the rows where they are).
int64_t token_stride(py::array& x, const char* what) {
  const int64_t H = x.shape(1), d = x.shape(2);
  const bool rows = readable(x, sizeof(float), true) && (H <= 1 || x.strides(1) == d * 4);
  if (!rows) {
    if (Graph::recording())
      throw py::value_error(std::string("record: ") + what + " is a view whose heads do not lie "
                            "side by side in each token's row (strides " + strides_str(x) +
                            "); a recorded call reads its input where it is");
    x = py::array(x.attr("copy")());
  }
  return x.shape(0) > 1 ? x.strides(0) / 4 : H * d;
}

// x (T, H, d) rotated at positions (int64 (T,), each >= 0) by the tables' rows.
py::array_t<float> rope_at_py(py::array x, RopeTables& tables, py::array positions, bool neox) {
  if (!x.dtype().equal(py::dtype::of<float>()) || x.ndim() != 3 || x.shape(2) != 2 * tables.half())
    x = check<float>(x, "x", {-1, -1, 2 * tables.half()});  // (its message)
  const int64_t ldx = token_stride(x, "rope's input");
  const int64_t T = x.shape(0), H = x.shape(1), d = x.shape(2);
  positions = check<int64_t>(positions, "positions", {T});
  const int64_t* pp = cptr<int64_t>(positions);
  auto prepare = [pp, T, &tables] {
    int64_t most = -1;
    for (int64_t t = 0; t < T; ++t) {
      if (pp[t] < 0) throw py::index_error("position " + std::to_string(pp[t]) + " is negative");
      most = std::max(most, pp[t]);
    }
    tables.ensure(most + 1);
  };
  prepare();
  py::array_t<float> y = new_floats({T, H, d});
  const float* xp = cptr<float>(x);
  float* yp = y.mutable_data();
  RopeTables* tp = &tables;
  if (Graph* g = Graph::recording()) {
    g->require(x, "rope's input"), g->require(positions, "rope's positions");
    g->produce(y);
    g->keep(py::cast(tp));
    g->hold_storage(tp, [tp] { return tp->storage(); });
    g->add([=] { rope(xp, ldx, T, H, d, tp->cos(), tp->sin(), pp, neox, yp); }, prepare);
  }
  const py::object hold = tables.storage();
  NoGil nogil;
  rope(xp, ldx, T, H, d, tables.cos(), tables.sin(), pp, neox, yp);
  return y;
}

py::array_t<float> rope_py(py::array x, py::array cos, py::array sin, bool neox) {
  if (Graph::recording())
    throw py::value_error("record: rope's tables hold the positions of one call; record "
                          "lowbit.nn.RoPE, which takes the positions as an array");
  x = check<float>(x, "x", {-1, -1, -1});
  const int64_t T = x.shape(0), H = x.shape(1), d = x.shape(2);
  if (d % 2) throw py::value_error("x: expected an even head_dim, got shape " + shape_str(x));
  cos = check<float>(cos, "cos", {T, d / 2});
  sin = check<float>(sin, "sin", {T, d / 2});
  py::array_t<float> y = new_floats({T, H, d});
  float* yp = y.mutable_data();
  {
    NoGil nogil;
    rope(cptr<float>(x), H * d, T, H, d, cptr<float>(cos), cptr<float>(sin), nullptr, neox, yp);
  }
  return y;
}

// An elementwise op of float32 arrays of one shape (lowbit.nn.add, lowbit.nn.scale), recordable:
// f(pointers of xs, n, y) into a new array or `out`.
template <size_t N, class F>
py::array elementwise_py(const char* what, std::array<py::array, N> xs, const py::object& out, F f) {
  std::array<const float*, N> p;
  for (size_t i = 0; i < N; ++i) {
    py::array& x = xs[i];
    if (!x.dtype().equal(py::dtype::of<float>()))
      throw py::type_error(std::string(what) + ": expected float32 arrays, got dtype " +
                           std::string(py::str(x.dtype())));
    if (x.ndim() != xs[0].ndim() || !std::equal(x.shape(), x.shape() + x.ndim(), xs[0].shape()))
      throw py::value_error(std::string(what) + ": expected arrays of one shape, got " +
                            shape_str(xs[0]) + " and " + shape_str(x));
    if (!readable(x, sizeof(float), false)) {
      if (Graph::recording())  // (its copy would be numpy work the replay cannot see)
        throw py::value_error(std::string("record: ") + what + "'s operand " + shape_str(x) +
                              " is not C-contiguous (strides " + strides_str(x) + "); a recorded " +
                              what + " reads whole arrays where they are");
      x = py::array(x.attr("copy")());
    }
    p[i] = cptr<float>(x);
  }
  Output y(out, std::vector<int64_t>(xs[0].shape(), xs[0].shape() + xs[0].ndim()));
  float* yp = y.data();
  const int64_t n = (int64_t)xs[0].size();
  f(p, n, yp);
  py::array result = y.finish();
  if (Graph* g = Graph::recording()) {
    for (const py::array& x : xs) g->require(x, (std::string(what) + "'s operand").c_str());
    g->produce(result, out.is_none(), yp);
    g->add([=] { f(p, n, yp); });
  }
  return result;
}

py::array scale_py(py::array x, float s, const py::object& out) {
  return elementwise_py<1>("scale", {x}, out,
                           [s](const auto& p, int64_t n, float* y) { scale(p[0], s, n, y); });
}

py::array add_py(py::array a, py::array b, const py::object& out) {
  return elementwise_py<2>("add", {a, b}, out,
                           [](const auto& p, int64_t n, float* y) { add(p[0], p[1], n, y); });
}

// q (B, Sq, H, d), k and v (B, Sk, Hkv, d): float32, last axis contiguous, other strides any
// non-negative multiple of 4 bytes (views of a fused QKV output); lengths: None or int64 (B,).
py::array attention_py(py::array q, py::array k, py::array v, const py::object& lengths,
                       bool causal, float scale, int64_t window, const py::object& out,
                       bool k_transposed, bool int8) {
  Graph::not_recordable("lowbit.nn.attention");
  py::array* arrays[3] = {&q, &k, &v};
  const char* names[3] = {"q", "k", "v"};
  AttnArgs a{};
  int64_t* strides[3] = {a.qs, a.ks, a.vs};
  for (int i = 0; i < 3; ++i) {
    py::array& x = *arrays[i];
    const int nd = k_transposed && i == 1 ? 5 : 4;
    if (x.ndim() != nd && x.dtype().equal(py::dtype::of<float>()))
      throw py::value_error(std::string(names[i]) + ": expected " +
                            (nd == 5 ? "5 dimensions (batch, kv_heads, blocks, head_dim, 32)"
                                     : "4 dimensions (batch, tokens, heads, head_dim)") +
                            ", got shape " + shape_str(x));
    x = nd == 5 ? check<float>(x, names[i], {-1, -1, -1, -1, -1}, true)
                : check<float>(x, names[i], {-1, -1, -1, -1}, true);
    for (int j = 0; j < 3; ++j) strides[i][j] = x.strides(j) / 4;  // (an empty array's are unused)
  }
  a.B = q.shape(0), a.Sq = q.shape(1), a.H = q.shape(2), a.d = q.shape(3);
  a.k_transposed = k_transposed;
  if (k_transposed) {
    // (batch, kv_heads, blocks, head_dim, 32): each head's keys 32 at a time, d rows of 32 per
    // block, readable up to the key count rounded up to 32
    a.Sk = v.shape(1), a.Hkv = k.shape(1);
    a.ks[0] = k.strides(0) / 4, a.ks[1] = k.strides(3) / 4, a.ks[2] = k.strides(1) / 4;
    a.kbs = k.strides(2) / 4;
    if (k.shape(0) != a.B || k.shape(3) != a.d || k.shape(4) != 32 ||
        k.shape(2) * 32 < round_up(a.Sk, 32) || a.Hkv < 1 || a.H % a.Hkv)
      throw py::value_error("k (transposed): expected shape (" + std::to_string(a.B) +
                            ", kv_heads, >= " + std::to_string(round_up(a.Sk, 32) / 32) + ", " +
                            std::to_string(a.d) + ", 32) with kv_heads dividing " +
                            std::to_string(a.H) + ", got " + shape_str(k));
  } else {
    a.Sk = k.shape(1), a.Hkv = k.shape(2);
    if (k.shape(0) != a.B || k.shape(3) != a.d || a.Hkv < 1 || a.H % a.Hkv)
      throw py::value_error("k: expected shape (" + std::to_string(a.B) + ", keys, kv_heads, " +
                            std::to_string(a.d) + ") with kv_heads dividing " +
                            std::to_string(a.H) + ", got " + shape_str(k));
  }
  if (v.shape(0) != a.B || v.shape(1) != a.Sk || v.shape(2) != a.Hkv || v.shape(3) != a.d)
    throw py::value_error("v: expected k's shape " + shape_str(k) + ", got " + shape_str(v));
  const py::object lens =
      lengths.is_none() ? lengths : py::object(check<int64_t>(lengths.cast<py::array>(), "lengths", {a.B}));
  a.lengths = cptr_or_null<int64_t>(lens);
  a.q = cptr<float>(q), a.k = cptr<float>(k), a.v = cptr<float>(v);
  a.causal = causal, a.scale = scale, a.window = window;
  if (int8 && k_transposed)
    throw py::value_error("precision=\"int8\": not with keys in a KV cache's layout");
  check_attention(window, int8, a.d, a.Sk);
  a.int8 = int8;
  Output y(out, {a.B, a.Sq, a.H, a.d});
  a.out = y.data();
  if (a.B * a.Sq * a.H * a.d) {
    NoGil nogil;
    attention(a);
  }
  return y.finish();
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lowbit compiled kernels (use the lowbit package, not this module)";
  NoGil::main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  m.attr("__version__") = LOWBIT_VERSION;
  m.attr("PANEL") = kPanel;
  m.attr("MAX_K") = kMaxK;
  m.attr("MAX_THREADS") = kMaxThreads;

  m.def("isa", [] { return std::string(kernels().name); });
  m.def("set_isa", [](const std::string& name) {
    try {
      set_isa(name);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  });
  m.def("set_thread_isa", [](const std::string& name) {
    try {
      return set_thread_isa(name);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }, py::arg("name"), "this thread's kernel set (\"\": the process's); returns the previous choice");
  m.def("available_isas", &available_isas);
  m.def("compiled_isas", &compiled_isas);
  m.def("cpu_features", [] {
    py::dict d;
    for (auto& f : cpu_features()) d[py::str(f.first)] = f.second;
    return d;
  });
  m.def("get_num_threads", &get_num_threads);
  m.def("cache_limit_mb", [] { return (int64_t)(BlockCache::get().limit() >> 20); },
        "MB of freed result blocks kept for reuse (LOWBIT_CACHE_MB)");
  m.def("set_num_threads", [](const py::int_& n) {
    int overflow = 0;  // a count beyond int64 is out of range like any other
    const long long v = PyLong_AsLongLongAndOverflow(n.ptr(), &overflow);
    const int64_t count = overflow > 0 ? INT64_MAX : overflow < 0 ? INT64_MIN : v;
    try {
      NoGil nogil;
      set_num_threads(count);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  });

  m.def("use_openmp", [](const std::string& path) {
    try {
      return use_openmp(path);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }, py::arg("path"), "run parallel work on the OpenMP runtime loaded from path (\"\": lowbit's pool); returns the previous path");
  m.def("openmp_runtime", &openmp_runtime, "the OpenMP runtime parallel work runs on (\"\": lowbit's pool)");

  m.def("quantize_w8", &quantize_w8_py, py::arg("w"), py::arg("group"));
  m.def("pack_w8", &pack_w8_py, py::arg("q"), py::arg("group"));
  m.def("quantize_w4", &quantize_w4_py, py::arg("w"), py::arg("group"), py::arg("symmetric"));
  m.def("pack_w4", &pack_w4_py, py::arg("q"), py::arg("group"));
  m.def("gguf_q4", &gguf_q4_py, py::arg("raw"), py::arg("K"), py::arg("has_min"));
  m.def("block_formats", &block_formats, "the block-format descriptors (formats.h)");
  m.def("blk_parts", &blk_parts, py::arg("fmt"), py::arg("N"), py::arg("K"));
  m.def("blk_zeros", &blk_zeros, py::arg("fmt"), py::arg("N"), py::arg("K"));
  m.def("gguf_blocks", &gguf_blocks_py, py::arg("fmt"), py::arg("raw"), py::arg("N"), py::arg("K"),
        py::arg("parts"), py::arg("row0"));
  py::class_<BlockWeight>(m, "BlockWeight", "a block-format weight's parts, checked for the kernels")
      .def(py::init<int, int64_t, int64_t, const py::dict&>(), py::arg("fmt"), py::arg("N"),
           py::arg("K"), py::arg("parts"));
  m.def("dequantize_blk", &dequantize_blk_py, py::arg("weight"), py::arg("rows"));
  py::class_<LinearPlan>(m, "LinearPlan", "a linear layer's kernel call, checked once")
      .def("__call__", &LinearPlan::call, py::arg("x"), py::arg("out") = py::none(),
           "y for float32 x the kernels read as it is (out None or a fitting array), else None")
      .def("run", &LinearPlan::run, py::arg("x"), py::arg("out") = py::none(),
           "y (M, N) for rows x (M, K), every argument checked");
  m.def("plan_w8", &LinearPlan::w8, py::arg("packed"), py::arg("scales"), py::arg("comp"),
        py::arg("N"), py::arg("K"), py::arg("group"), py::arg("bias"),
        py::arg("int8_activations") = true, py::arg("act_scale") = 0.f, py::arg("act_zero") = 0,
        py::arg("input_scale") = py::none(), py::arg("gelu") = false, py::arg("perm") = py::none());
  m.def("plan_w4", &LinearPlan::w4, py::arg("packed"), py::arg("scales"), py::arg("mins"),
        py::arg("zeros"), py::arg("N"), py::arg("K"), py::arg("group"), py::arg("bias"),
        py::arg("int8_activations"), py::arg("act_scale") = 0.f,
        py::arg("input_scale") = py::none(), py::arg("gelu") = false, py::arg("perm") = py::none());
  m.def("plan_blk", &LinearPlan::blk, py::arg("weight"), py::arg("bias"),
        py::arg("int8_activations"), py::arg("act_scale") = 0.f,
        py::arg("input_scale") = py::none(), py::arg("gelu") = false);
  m.def("mlp",
        [](const LinearPlan& up, const LinearPlan& down, const std::string& act, py::array x,
           const py::object& out, const py::object& norm_weight, const py::object& norm_bias,
           float eps) {
          return LinearPlan::mlp(up, down, act, x, out, PostNorm(norm_weight, norm_bias, eps));
        },
        py::arg("up"), py::arg("down"), py::arg("act"), py::arg("x"), py::arg("out") = py::none(),
        py::arg("norm_weight") = py::none(), py::arg("norm_bias") = py::none(),
        py::arg("eps") = 0.f, "down(act(up(x))) for rows x (M, K), in row blocks");
  m.def("attention_block",
        [](const LinearPlan& qkv, const LinearPlan& proj, py::array x, int64_t heads,
           int64_t kv_heads, const py::object& lengths, bool causal, float scale, int64_t window,
           bool int8, const py::object& out, const py::object& norm_weight,
           const py::object& norm_bias, float eps) {
          AttnArgs a{};
          a.H = heads, a.Hkv = kv_heads, a.causal = causal, a.scale = scale, a.window = window;
          a.int8 = int8;
          return LinearPlan::attention_block(qkv, proj, x, a, lengths, out,
                                             PostNorm(norm_weight, norm_bias, eps));
        },
        py::arg("qkv"), py::arg("proj"), py::arg("x"), py::arg("heads"), py::arg("kv_heads"),
        py::arg("lengths"), py::arg("causal"), py::arg("scale"), py::arg("window"),
        py::arg("int8"), py::arg("out") = py::none(), py::arg("norm_weight") = py::none(),
        py::arg("norm_bias") = py::none(), py::arg("eps") = 0.f,
        "proj(attention(qkv(x))) for x (B, S, K), sequence by sequence");
  m.def("gemm_s8", &gemm_s8_py, py::arg("a"), py::arg("b"));
  m.def("dot_peak", [](double seconds) {
    NoGil nogil;
    return dot_peak(seconds);
  }, py::arg("seconds") = 0.5, "int8 multiply-adds per second of the dot instruction, all threads");
  m.def("read_bandwidth", [](py::array buf, int repeats) {
    buf = check<uint8_t>(buf, "buf", {-1});
    if (repeats < 1) throw py::value_error("repeats must be >= 1");
    NoGil nogil;
    return read_bandwidth(cptr<uint8_t>(buf), buf.shape(0), repeats);
  }, py::arg("buf"), py::arg("repeats") = 10, "bytes per second reading buf, all threads");
  m.def("pack_int4", &pack_int4_py, py::arg("q"));
  m.def("gelu", &gelu_py, py::arg("x"), py::arg("out"), py::arg("tanh") = false);
  m.def("layer_norm", &layer_norm_py, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("rms"), py::arg("out") = py::none());
  m.def("softmax_", &softmax_py, py::arg("x"));
  m.def("attention", &attention_py, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("lengths"),
        py::arg("causal"), py::arg("scale"), py::arg("window") = 0, py::arg("out") = py::none(),
        py::arg("k_transposed") = false, py::arg("int8") = false);
  m.def("unpack_int4", &unpack_int4_py, py::arg("p"));
  m.def("gated", &gated_py, py::arg("gate"), py::arg("up"), py::arg("act"));
  m.def("rope", &rope_py, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("neox"));
  py::class_<RopeTables>(m, "RopeTables", "RoPE tables that grow (lowbit.nn.RoPE)")
      .def(py::init<py::object, int64_t>(), py::arg("grow"), py::arg("rows"))
      .def_property_readonly("rows", &RopeTables::rows);
  m.def("rope_at", &rope_at_py, py::arg("x"), py::arg("tables"), py::arg("positions"),
        py::arg("neox"));
  m.def("scale", &scale_py, py::arg("x"), py::arg("s"), py::arg("out") = py::none());
  m.def("add", &add_py, py::arg("a"), py::arg("b"), py::arg("out") = py::none());
  py::class_<KVCache>(m, "KVCache", "a key / value cache's storage (lowbit.nn.KVCache)")
      .def(py::init<int64_t, int64_t, int64_t>(), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("capacity"))
      .def_property_readonly("k", &KVCache::k)
      .def_property_readonly("v", &KVCache::v)
      .def_property_readonly("length", &KVCache::length)
      .def_property_readonly("capacity", &KVCache::capacity)
      .def("truncate", &KVCache::truncate, py::arg("n"))
      .def("append", &KVCache::append, py::arg("k"), py::arg("v"))
      .def("attend", &KVCache::attend, py::arg("q"), py::arg("scale"), py::arg("window"));
  py::class_<Graph>(m, "Graph", "a recorded sequence of kernel calls (lowbit.nn.record)")
      .def(py::init<>())
      .def("input", &Graph::input, py::arg("a"))
      .def("begin", &Graph::begin)
      .def("end", &Graph::end)
      .def("output", &Graph::output, py::arg("a"))
      .def("replay", &Graph::replay)
      .def("__len__", &Graph::size);
}
