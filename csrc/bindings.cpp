// Python bindings: argument checks and array plumbing only; the maths is in ops.cpp and kernels/.
// Every array is checked for dtype, shape and layout here, so no call can reach a kernel with a
// pointer it would read past. The GIL is released around every kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <cstring>
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

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Checks dtype, ndim and (where given, >= 0) each dimension; requires C-contiguity unless
// `row_strided` (then only the last axis must be contiguous, as for activation rows).
template <class T>
void check(const py::array& a, const char* name, std::initializer_list<int64_t> shape,
           bool row_strided = false) {
  if (!a.dtype().equal(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + ": expected dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(a.dtype())));
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
  const py::ssize_t item = (py::ssize_t)sizeof(T);
  if (row_strided) {  // 2-D: contiguous rows at any positive, non-overlapping row stride
    const bool cols_ok = a.shape(1) <= 1 || a.strides(1) == item;
    const bool rows_ok = a.shape(0) <= 1 || (a.strides(0) >= a.shape(1) * item && a.strides(0) % item == 0);
    if (!cols_ok || !rows_ok)
      throw py::value_error(std::string(name) + ": expected contiguous rows (last axis stride " +
                            std::to_string(item) + " bytes)");
  } else if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + ": expected a C-contiguous array");
  }
}

template <class T>
const T* cptr(const py::array& a) { return static_cast<const T*>(a.data()); }

// Releases the GIL for a block, like py::gil_scoped_release, but safe for daemon threads at
// interpreter exit. There CPython ends a thread that asks for the GIL back with pthread_exit, an
// unwinding, and unwinding out of a noexcept destructor (py::gil_scoped_release's) calls
// std::terminate: the process aborts. This one parks the thread instead when the interpreter is
// finalizing (the process is exiting and takes it along), and lets the unwinding through in the
// narrow race where finalization begins inside PyEval_RestoreThread.
class NoGil {
 public:
  NoGil() : state_(PyEval_SaveThread()) {}
  ~NoGil() noexcept(false) {
    while (finalizing()) std::this_thread::sleep_for(std::chrono::seconds(3600));
    PyEval_RestoreThread(state_);
  }
  NoGil(const NoGil&) = delete;
  NoGil& operator=(const NoGil&) = delete;

 private:
  static bool finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
  }
  PyThreadState* state_;
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

// An optional float32 (N,) bias array (kept alive by the caller's object), or null.
const float* bias_ptr(const py::object& bias, int64_t N) {
  if (bias.is_none()) return nullptr;
  if (!py::isinstance<py::array>(bias)) throw py::type_error("bias: expected a numpy array or None");
  const py::array a = bias.cast<py::array>();
  check<float>(a, "bias", {N});
  return cptr<float>(a);
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

py::tuple quantize_w8_py(const py::array& w, int64_t group) {
  check<float>(w, "w", {-1, -1}, true);
  const W8Shape s = w8_shape(w.shape(0), w.shape(1), group);
  auto packed = zeros<int8_t>({s.Np, s.Kp});
  auto scales = zeros<float>({s.G, s.Np});
  auto comp = zeros<int32_t>({s.G, s.Np});
  const int64_t ldw = w.shape(0) > 1 ? w.strides(0) / (int64_t)sizeof(float) : s.K;
  int64_t bad;
  {
    NoGil nogil;
    bad = quantize_w8(cptr<float>(w), ldw, s, packed.mutable_data(), scales.mutable_data(),
                      comp.mutable_data());
  }
  if (bad >= 0)
    throw py::value_error("weight row " + std::to_string(bad) +
                          " holds NaN or Inf; quantization needs finite weights");
  return py::make_tuple(packed, scales, comp);
}

void check_w8(const py::array& packed, const py::array& scales, const py::array& comp,
              const W8Shape& s) {
  check<int8_t>(packed, "packed", {s.Np, s.Kp});
  check<float>(scales, "scales", {s.G, s.Np});
  check<int32_t>(comp, "comp", {s.G, s.Np});
}

py::tuple pack_w8_py(const py::array& q, int64_t group) {
  check<int8_t>(q, "q", {-1, -1});
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
void check_gguf_rows(const py::array& raw, int64_t K, int64_t block_bytes) {
  check<uint8_t>(raw, "raw", {-1, -1});
  if (K < 32 || K % 32 || raw.shape(1) != K / 32 * block_bytes)
    throw py::value_error("GGUF rows of K=" + std::to_string(K) + " need K a multiple of 32 and " +
                          std::to_string(block_bytes) + " bytes per 32 weights, got raw shape " +
                          shape_str(raw));
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

// The result array: a new float32 array of `shape`, or `out` when given, which must be a
// writeable C-contiguous float32 array of exactly that shape (overlap with the inputs is checked
// by the Python callers).
py::array_t<float> result(const py::object& out, const std::vector<int64_t>& shape) {
  if (out.is_none()) return py::array_t<float>(std::vector<py::ssize_t>(shape.begin(), shape.end()));
  py::array y = out.cast<py::array>();
  bool ok = y.dtype().equal(py::dtype::of<float>()) && (y.flags() & py::array::c_style) && y.writeable() &&
            y.ndim() == (py::ssize_t)shape.size();
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = y.shape(i) == shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    throw py::value_error("out: expected a writeable C-contiguous float32 array of shape " + want +
                          (shape.size() == 1 ? ",)" : ")") + ", got " + std::string(py::str(y.dtype())) +
                          " " + shape_str(y));
  }
  return py::reinterpret_borrow<py::array_t<float>>(y);
}

// input_scale: None or float32 (K,) factors the inputs are multiplied by in the kernel.
const float* column_factors(const py::object& input_scale, int64_t K) {
  if (input_scale.is_none()) return nullptr;
  const py::array c = input_scale.cast<py::array>();
  check<float>(c, "input_scale", {K});
  return cptr<float>(c);
}

py::array_t<float> linear_w8a8_py(const py::array& x, const py::array& packed,
                                  const py::array& scales, const py::array& comp, int64_t N,
                                  int64_t K, int64_t group, const py::object& bias,
                                  float act_scale, int32_t act_zero, const py::object& input_scale,
                                  bool gelu, const py::object& out) {
  check_static(act_scale, act_zero);
  const W8Shape s = w8_shape(N, K, group);
  check<float>(x, "x", {-1, K}, true);
  check_w8(packed, scales, comp, s);
  const float* b = bias_ptr(bias, N);
  const float* cs = column_factors(input_scale, K);
  const int64_t M = x.shape(0);
  py::array_t<float> y = result(out, {M, N});
  const int64_t ldx = M > 1 ? x.strides(0) / (int64_t)sizeof(float) : K;
  {
    NoGil nogil;
    linear_w8a8(cptr<float>(x), ldx, M, cptr<int8_t>(packed), cptr<float>(scales),
                cptr<int32_t>(comp), b, s, act_scale, act_zero, cs, gelu, y.mutable_data());
  }
  return y;
}

// float16 arrays travel as numpy float16; the kernels read their bits.
void check_half(const py::array& a, const char* name, std::initializer_list<int64_t> shape) {
  if (!a.dtype().equal(py::dtype("float16")))
    throw py::type_error(std::string(name) + ": expected dtype float16, got " + std::string(py::str(a.dtype())));
  check<uint16_t>(py::array(a).view("uint16"), name, shape);
}

py::tuple quantize_w4_py(const py::array& w, int64_t group, bool symmetric) {
  check<float>(w, "w", {-1, -1}, true);
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
  const int64_t ldw = w.shape(0) > 1 ? w.strides(0) / (int64_t)sizeof(float) : s.K;
  int64_t bad;
  int why = 0;
  {
    NoGil nogil;
    bad = quantize_w4(cptr<float>(w), ldw, s, packed.mutable_data(), (uint16_t*)scales.mutable_data(),
                      mins_ptr, &why);
  }
  if (bad >= 0)
    throw py::value_error("weight row " + std::to_string(bad) +
                          (why ? " has values beyond float16 range (|w| up to 65504 scale steps); "
                                 "4-bit weights keep float16 scales"
                               : " holds NaN or Inf; quantization needs finite weights"));
  return py::make_tuple(packed, scales, mins);
}

void check_w4(const py::array& packed, const py::array& scales, const py::object& mins,
              const py::object& zeros, const Q4Shape& s) {
  check<uint8_t>(packed, "packed", {s.Np, s.Kp / 2});
  check_half(scales, "scales", {s.Np / kPanel, s.G, kPanel});
  if (!mins.is_none()) check_half(mins.cast<py::array>(), "mins", {s.Np / kPanel, s.G, kPanel});
  if (!zeros.is_none()) check<uint8_t>(zeros.cast<py::array>(), "zeros", {s.Np / kPanel, s.G, kPanel});
  if (!mins.is_none() && !zeros.is_none()) throw py::value_error("give mins or zeros, not both");
}

py::array_t<uint8_t> pack_w4_py(const py::array& q, int64_t group) {
  check<uint8_t>(q, "q", {-1, -1});
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

py::tuple gguf_q4_py(const py::array& raw, int64_t K, bool has_min) {
  check_gguf_rows(raw, K, has_min ? 20 : 18);
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

py::array_t<float> linear_w4_py(const py::array& x, const py::array& packed, const py::array& scales,
                                const py::object& mins, const py::object& zeros, int64_t N,
                                int64_t K, int64_t group, const py::object& bias,
                                bool int8_activations, float act_scale,
                                const py::object& input_scale, bool gelu, const py::object& out) {
  check_static(act_scale, 0);
  const Q4Shape s = q4_shape(N, K, group);
  check<float>(x, "x", {-1, K}, true);
  check_w4(packed, scales, mins, zeros, s);
  const float* b = bias_ptr(bias, N);
  const float* cs = column_factors(input_scale, K);
  const uint16_t* mins_ptr = mins.is_none() ? nullptr : (const uint16_t*)mins.cast<py::array>().data();
  const uint8_t* zeros_ptr = zeros.is_none() ? nullptr : cptr<uint8_t>(zeros.cast<py::array>());
  const int64_t M = x.shape(0);
  py::array_t<float> y = result(out, {M, N});
  const int64_t ldx = M > 1 ? x.strides(0) / (int64_t)sizeof(float) : K;
  {
    NoGil nogil;
    linear_w4(cptr<float>(x), ldx, M, cptr<uint8_t>(packed), (const uint16_t*)scales.data(), mins_ptr,
              zeros_ptr, b, s, int8_activations, act_scale, cs, gelu, y.mutable_data());
  }
  return y;
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

// The weight fields of BlkArgs from its parts, each checked against the format's layout.
BlkArgs blk_weight(int fmt, int64_t N, int64_t K, const py::dict& parts) {
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
    const py::array a = parts[name].cast<py::array>();
    const py::tuple spec = expect[name].cast<py::tuple>();
    const py::dtype dt(spec[0].cast<std::string>());
    const py::tuple shape = spec[1].cast<py::tuple>();
    bool ok = a.dtype().equal(dt) && a.ndim() == (py::ssize_t)shape.size() && (a.flags() & py::array::c_style);
    for (py::ssize_t j = 0; ok && j < a.ndim(); ++j) ok = a.shape(j) == shape[j].cast<int64_t>();
    if (!ok)
      throw py::value_error(std::string(kBlockFormats[fmt].name) + " weight: part '" + name +
                            "' should be a C-contiguous " + std::string(py::str(dt)) + " array of shape " +
                            std::string(py::str(shape)) + ", got " + std::string(py::str(a.dtype())) + " " +
                            shape_str(a));
    ptr[i] = a.data();
  }
  w.q8 = (const uint8_t*)ptr[0];
  w.nib = (const uint8_t*)ptr[1];
  w.bits = (const uint64_t*)ptr[2];
  w.d = ptr[3];
  w.dm = (const uint16_t*)ptr[4];
  w.sc = (const int8_t*)ptr[5];
  w.mc = (const uint8_t*)ptr[6];
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
void gguf_blocks_py(int fmt, const py::array& raw, int64_t N, int64_t K, py::dict& parts, int64_t row0) {
  const BlockFormat& F = kBlockFormats[check_format(fmt)];
  check<uint8_t>(raw, "raw", {-1, -1});
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

py::array_t<float> dequantize_blk_py(int fmt, int64_t N, int64_t K, const py::dict& parts,
                                     const py::array& rows) {
  const BlkArgs w = blk_weight(fmt, N, K, parts);
  check<int64_t>(rows, "rows", {-1});
  const int64_t* r = cptr<int64_t>(rows);
  for (int64_t i = 0; i < rows.shape(0); ++i)
    if (r[i] < 0 || r[i] >= N) throw py::index_error("row " + std::to_string(r[i]) + " out of range");
  py::array_t<float> out({(py::ssize_t)rows.shape(0), (py::ssize_t)K});
  {
    NoGil nogil;
    blk_dequantize(w, r, rows.shape(0), out.mutable_data());
  }
  return out;
}

py::array_t<float> linear_blk_py(const py::array& x, int fmt, int64_t N, int64_t K,
                                 const py::dict& parts, const py::object& bias,
                                 bool int8_activations, float act_scale,
                                 const py::object& input_scale, bool gelu, const py::object& out) {
  check_static(act_scale, 0);
  const BlkArgs w = blk_weight(fmt, N, K, parts);
  check<float>(x, "x", {-1, K}, true);
  const float* b = bias_ptr(bias, N);
  const float* cs = column_factors(input_scale, K);
  const int64_t M = x.shape(0);
  py::array_t<float> y = result(out, {M, N});
  const int64_t ldx = M > 1 ? x.strides(0) / (int64_t)sizeof(float) : K;
  {
    NoGil nogil;
    linear_blk(cptr<float>(x), ldx, M, w, b, int8_activations, act_scale, cs, gelu, y.mutable_data());
  }
  return y;
}

py::array_t<int32_t> gemm_s8_py(const py::array& a, const py::array& b) {
  check<int8_t>(a, "a", {-1, -1});
  check<int8_t>(b, "b", {-1, a.shape(1)});
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

py::array_t<uint8_t> pack_int4_py(const py::array& q) {
  check<uint8_t>(q, "q", {-1, -1});
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

py::array_t<uint8_t> unpack_int4_py(const py::array& p) {
  check<uint8_t>(p, "p", {-1, -1});
  const int64_t N = p.shape(0), Kh = p.shape(1);
  py::array_t<uint8_t> out({N, 2 * Kh});
  {
    NoGil nogil;
    unpack_int4(cptr<uint8_t>(p), N * Kh, out.mutable_data());
  }
  return out;
}

// x: float32 (..., n) with contiguous rows; returns (rows, n) views' shapes as given.
// x: C-contiguous float32; out: None (a new array) or a writeable array of x's shape (may be x).
py::array gelu_py(const py::array& x, py::object out) {
  if (!x.dtype().equal(py::dtype::of<float>()) || !(x.flags() & py::array::c_style))
    throw py::type_error("gelu: expected a C-contiguous float32 array");
  py::array y = out.is_none() ? py::array_t<float>(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()))
                              : out.cast<py::array>();
  if (!y.dtype().equal(py::dtype::of<float>()) || !(y.flags() & py::array::c_style) || !y.writeable() ||
      y.size() != x.size())
    throw py::value_error("gelu: out must be a writeable C-contiguous float32 array of x's size");
  {
    NoGil nogil;
    gelu(cptr<float>(x), (float*)y.mutable_data(), (int64_t)x.size());
  }
  return y;
}

py::array_t<float> layer_norm_py(const py::array& x, const py::object& r, const py::array& w,
                                 const py::object& b, float eps, bool rms, const py::object& out) {
  check<float>(x, "x", {-1, -1}, true);
  const int64_t rows = x.shape(0), n = x.shape(1);
  check<float>(w, "weight", {n});
  const float* rp = nullptr;
  if (!r.is_none()) {
    check<float>(r.cast<py::array>(), "residual", {rows, n});
    rp = cptr<float>(r.cast<py::array>());
  }
  const float* bp = nullptr;
  if (!rms) {
    check<float>(b.cast<py::array>(), "bias", {n});
    bp = cptr<float>(b.cast<py::array>());
  }
  py::array_t<float> y = result(out, {rows, n});
  const int64_t ld = rows > 1 ? x.strides(0) / (int64_t)sizeof(float) : n;
  {
    NoGil nogil;
    layer_norm(cptr<float>(x), rp, ld, cptr<float>(w), bp, eps, rms, rows, n, y.mutable_data());
  }
  return y;
}

void softmax_py(py::array& x) {
  if (!x.dtype().equal(py::dtype::of<float>()) || !(x.flags() & py::array::c_style) || !x.writeable())
    throw py::type_error("softmax: expected a writeable C-contiguous float32 array");
  if (x.ndim() == 0 || x.size() == 0) return;
  const int64_t n = x.shape(x.ndim() - 1);
  NoGil nogil;
  softmax((float*)x.mutable_data(), (int64_t)x.size() / n, n);
}

// q (B, Sq, H, d), k and v (B, Sk, Hkv, d): float32, last axis contiguous, other strides any
// non-negative multiple of 4 bytes (views of a fused QKV output); lengths: None or int64 (B,).
py::array_t<float> attention_py(const py::array& q, const py::array& k, const py::array& v,
                                const py::object& lengths, bool causal, float scale,
                                const py::object& out) {
  const py::array* arrays[3] = {&q, &k, &v};
  const char* names[3] = {"q", "k", "v"};
  AttnArgs a{};
  int64_t* strides[3] = {a.qs, a.ks, a.vs};
  for (int i = 0; i < 3; ++i) {
    const py::array& x = *arrays[i];
    if (!x.dtype().equal(py::dtype::of<float>()))
      throw py::type_error(std::string(names[i]) + ": expected dtype float32, got " +
                           std::string(py::str(x.dtype())));
    if (x.ndim() != 4)
      throw py::value_error(std::string(names[i]) + ": expected 4 dimensions (batch, tokens, "
                            "heads, head_dim), got shape " + shape_str(x));
    for (int j = 0; j < 4; ++j) {  // (an empty array's strides are never used)
      const bool ok = x.size() == 0 || (j == 3 ? x.shape(3) <= 1 || x.strides(3) == 4
                                               : x.strides(j) >= 0 && x.strides(j) % 4 == 0);
      if (!ok)
        throw py::value_error(std::string(names[i]) + ": expected a contiguous last axis and "
                              "non-negative strides");
      if (j < 3) strides[i][j] = x.strides(j) / 4;
    }
  }
  a.B = q.shape(0), a.Sq = q.shape(1), a.H = q.shape(2), a.d = q.shape(3);
  a.Sk = k.shape(1), a.Hkv = k.shape(2);
  if (k.shape(0) != a.B || k.shape(3) != a.d || a.Hkv < 1 || a.H % a.Hkv)
    throw py::value_error("k: expected shape (" + std::to_string(a.B) + ", keys, kv_heads, " +
                          std::to_string(a.d) + ") with kv_heads dividing " + std::to_string(a.H) +
                          ", got " + shape_str(k));
  if (v.shape(0) != a.B || v.shape(1) != a.Sk || v.shape(2) != a.Hkv || v.shape(3) != a.d)
    throw py::value_error("v: expected k's shape " + shape_str(k) + ", got " + shape_str(v));
  py::array_t<int64_t> lens;
  if (!lengths.is_none()) {
    lens = lengths.cast<py::array>();
    check<int64_t>(lens, "lengths", {a.B});
    a.lengths = lens.data();
  }
  a.q = cptr<float>(q), a.k = cptr<float>(k), a.v = cptr<float>(v);
  a.causal = causal, a.scale = scale;
  py::array_t<float> y = result(out, {a.B, a.Sq, a.H, a.d});
  a.out = y.mutable_data();
  if (y.size()) {
    NoGil nogil;
    attention(a);
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lowbit compiled kernels (use the lowbit package, not this module)";
  m.attr("__version__") = LOWBIT_VERSION;
  m.attr("PANEL") = kPanel;
  m.attr("MAX_K") = kMaxK;

  m.def("isa", [] { return std::string(kernels().name); });
  m.def("set_isa", [](const std::string& name) {
    try {
      set_isa(name);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  });
  m.def("available_isas", &available_isas);
  m.def("compiled_isas", &compiled_isas);
  m.def("cpu_features", [] {
    py::dict d;
    for (auto& f : cpu_features()) d[py::str(f.first)] = f.second;
    return d;
  });
  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(n));
    NoGil nogil;
    set_num_threads(n);
  });

  m.def("quantize_w8", &quantize_w8_py, py::arg("w"), py::arg("group"));
  m.def("pack_w8", &pack_w8_py, py::arg("q"), py::arg("group"));
  m.def("linear_w8a8", &linear_w8a8_py, py::arg("x"), py::arg("packed"), py::arg("scales"),
        py::arg("comp"), py::arg("N"), py::arg("K"), py::arg("group"), py::arg("bias"),
        py::arg("act_scale") = 0.f, py::arg("act_zero") = 0, py::arg("input_scale") = py::none(),
        py::arg("gelu") = false,
        py::arg("out") = py::none());
  m.def("quantize_w4", &quantize_w4_py, py::arg("w"), py::arg("group"), py::arg("symmetric"));
  m.def("pack_w4", &pack_w4_py, py::arg("q"), py::arg("group"));
  m.def("gguf_q4", &gguf_q4_py, py::arg("raw"), py::arg("K"), py::arg("has_min"));
  m.def("linear_w4", &linear_w4_py, py::arg("x"), py::arg("packed"), py::arg("scales"),
        py::arg("mins"), py::arg("zeros"), py::arg("N"), py::arg("K"), py::arg("group"), py::arg("bias"),
        py::arg("int8_activations"), py::arg("act_scale") = 0.f,
        py::arg("input_scale") = py::none(), py::arg("gelu") = false,
        py::arg("out") = py::none());
  m.def("block_formats", &block_formats, "the block-format descriptors (formats.h)");
  m.def("blk_parts", &blk_parts, py::arg("fmt"), py::arg("N"), py::arg("K"));
  m.def("blk_zeros", &blk_zeros, py::arg("fmt"), py::arg("N"), py::arg("K"));
  m.def("gguf_blocks", &gguf_blocks_py, py::arg("fmt"), py::arg("raw"), py::arg("N"), py::arg("K"),
        py::arg("parts"), py::arg("row0"));
  m.def("dequantize_blk", &dequantize_blk_py, py::arg("fmt"), py::arg("N"), py::arg("K"),
        py::arg("parts"), py::arg("rows"));
  m.def("linear_blk", &linear_blk_py, py::arg("x"), py::arg("fmt"), py::arg("N"), py::arg("K"),
        py::arg("parts"), py::arg("bias"), py::arg("int8_activations"), py::arg("act_scale") = 0.f,
        py::arg("input_scale") = py::none(), py::arg("gelu") = false, py::arg("out") = py::none());
  m.def("gemm_s8", &gemm_s8_py, py::arg("a"), py::arg("b"));
  m.def("dot_peak", [](double seconds) {
    NoGil nogil;
    return dot_peak(seconds);
  }, py::arg("seconds") = 0.5, "int8 multiply-adds per second of the dot instruction, all threads");
  m.def("read_bandwidth", [](const py::array& buf, int repeats) {
    check<uint8_t>(buf, "buf", {-1});
    if (repeats < 1) throw py::value_error("repeats must be >= 1");
    NoGil nogil;
    return read_bandwidth(cptr<uint8_t>(buf), buf.shape(0), repeats);
  }, py::arg("buf"), py::arg("repeats") = 10, "bytes per second reading buf, all threads");
  m.def("pack_int4", &pack_int4_py, py::arg("q"));
  m.def("gelu", &gelu_py, py::arg("x"), py::arg("out"));
  m.def("layer_norm", &layer_norm_py, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("rms"), py::arg("out") = py::none());
  m.def("softmax_", &softmax_py, py::arg("x"));
  m.def("attention", &attention_py, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("lengths"),
        py::arg("causal"), py::arg("scale"), py::arg("out") = py::none());
  m.def("unpack_int4", &unpack_int4_py, py::arg("p"));
}
