// The per-module-call work of fast module-level GPU stats, out of Python.
//
// Probed replaces a module's forward (probes/module_hooks.py): one vectorcall per module call that
// counts the call, opens / closes the root forward, finds the user's source line, records the
// tensors of args, kwargs and output, and calls the real forward with the caller's argument array
// (nothing copied). For every tensor (tuples, lists and dicts walked here; anything else flattened by
// the Python callable given at construction) the Recorder
//   * recognises data captured before and unchanged since (same TensorImpl, or a contiguous view of
//     the same memory, with the same version counter, while the captured tensor is alive): an alias
//     record, nothing launched;
//   * otherwise launches the fused stats kernel (fused_stats.cu, through the function pointer of the
//     nvcc-built library) on the caller's stream into the next row of a device buffer.
// Records are plain structs: module names, slots, source lines and devices are Python strings made
// once and referred to by index, so a record allocates no Python object on the model's thread. The
// writer's thread turns a detached Block into tuples for TraceWriter.write_block after the forward.
#include <torch/extension.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <ctime>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

// Nanoseconds spent in each part of probed calls, compiled in only for benchmarks/gpu_probe_parts.py
// (-DTENSORDIFF_PART_TIMES): 0 source line, 1 argument records, 2 output records, 3 launches;
// 4 probed calls, 5 launches (counts).
#ifdef TENSORDIFF_PART_TIMES
#include <chrono>
static long long g_part[6];
static long long now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
#define PART_START(var) long long var = now_ns()
#define PART_ADD(i, start) (g_part[i] += now_ns() - (start), (void)0)
#define PART_COUNT(i) (++g_part[i], (void)0)
#else
#define PART_START(var)
#define PART_ADD(i, start) ((void)0)
#define PART_COUNT(i) ((void)0)
#endif

namespace {

using LaunchFn = int (*)(const void*, long long, int, long long, char*, long long, void*);

// Python strings that records point at by index: module names, directions, slots, source lines,
// devices. Process-wide and never freed (bounded by the distinct names a process traces), so that
// every capture after the first finds its strings made. Touched only with the GIL held.
struct Strings {
  std::vector<PyObject*> items;  // owned references
  PyObject* by_text = PyDict_New();  // str -> id, for intern()

  // Takes a new reference to s.
  int32_t add_new(PyObject* s) {
    items.push_back(s);
    return (int32_t)items.size() - 1;
  }
  // The id of a string's text (module names are new objects at each capture; their text is not).
  int32_t intern(PyObject* s) {
    PyObject* hit = PyDict_GetItemWithError(by_text, s);  // borrowed
    if (hit != nullptr) return (int32_t)PyLong_AsLong(hit);
    if (PyErr_Occurred()) throw py::error_already_set();
    int32_t id = add_new(Py_NewRef(s));
    PyObject* value = PyLong_FromLong(id);
    int err = PyDict_SetItem(by_text, s, value);
    Py_DECREF(value);
    if (err) throw py::error_already_set();
    return id;
  }
  PyObject* get(int32_t id) const { return items[id]; }
};

struct Rec {
  int32_t module, direction, call, slot;
  int32_t source;             // -1: no source line (outputs)
  int32_t device;
  int32_t alias_module = -1;  // alias_*: the original record's id, when this one is an alias
  int32_t alias_direction = 0, alias_call = 0, alias_slot = 0;
  int32_t dims_at;            // shape then stride in the Block's dims
  int16_t ndim;
  int16_t dtype;
  int64_t offset;
  int64_t row;                // global row over this block's buffers; -1 for an alias
};

PyObject* int_tuple(const int64_t* v, int n) {
  PyObject* t = PyTuple_New(n);
  for (int i = 0; i < n; ++i) PyTuple_SET_ITEM(t, i, PyLong_FromLongLong(v[i]));
  return t;
}

// Records and their stats buffers, handed from the model's thread to the writer's.
struct Block {
  std::vector<Rec> recs;
  std::vector<int64_t> dims;
  std::vector<at::Tensor> buffers;
  std::vector<std::vector<int64_t>> numels;
  Strings* strings;

  int64_t size() const { return (int64_t)recs.size(); }

  // tuples (record id, source, shape, stride, storage_offset, dtype, row, alias id, device)
  py::list records() const {
    py::list out(recs.size());
    PyObject* empty = PyUnicode_FromString("");
    for (size_t i = 0; i < recs.size(); ++i) {
      const Rec& r = recs[i];
      auto s = [&](int32_t id) {
        PyObject* o = id < 0 ? empty : strings->get(id);
        Py_INCREF(o);
        return o;
      };
      PyObject* rid = PyTuple_Pack(4, strings->get(r.module), strings->get(r.direction), py::int_(r.call).ptr(),
                                   strings->get(r.slot));
      PyObject* alias = Py_None;
      if (r.alias_module >= 0) {
        alias = PyTuple_Pack(4, strings->get(r.alias_module), strings->get(r.alias_direction),
                             py::int_(r.alias_call).ptr(), strings->get(r.alias_slot));
      } else {
        Py_INCREF(Py_None);
      }
      PyObject* dtype = (PyObject*)torch::getTHPDtype((at::ScalarType)r.dtype);
      Py_INCREF(dtype);
      PyObject* tup = PyTuple_New(9);
      PyTuple_SET_ITEM(tup, 0, rid);
      PyTuple_SET_ITEM(tup, 1, s(r.source));
      PyTuple_SET_ITEM(tup, 2, int_tuple(&dims[r.dims_at], r.ndim));
      PyTuple_SET_ITEM(tup, 3, int_tuple(&dims[r.dims_at + r.ndim], r.ndim));
      PyTuple_SET_ITEM(tup, 4, PyLong_FromLongLong(r.offset));
      PyTuple_SET_ITEM(tup, 5, dtype);
      PyTuple_SET_ITEM(tup, 6, PyLong_FromLongLong(r.row));
      PyTuple_SET_ITEM(tup, 7, alias);
      PyTuple_SET_ITEM(tup, 8, s(r.device));
      PyList_SET_ITEM(out.ptr(), i, tup);
    }
    Py_DECREF(empty);
    return out;
  }

  // [(raw buffer, [numel of each row's tensor]), ...] for fused_stats.copy_to_host
  py::list buffers_list() const {
    py::list out;
    for (size_t i = 0; i < buffers.size(); ++i) {
      py::list numel;
      for (auto n : numels[i]) numel.append(n);
      out.append(py::make_tuple(buffers[i], numel));
    }
    return out;
  }
};

struct Seen {
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  uint32_t version;
  int32_t module, direction, call, slot;
};

struct Key {
  uintptr_t ptr;
  int64_t numel;
  int dtype;  // -1: keyed by TensorImpl address (non-contiguous tensors)
  bool operator==(const Key& o) const { return ptr == o.ptr && numel == o.numel && dtype == o.dtype; }
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    return std::hash<uintptr_t>()(k.ptr) ^ (std::hash<int64_t>()(k.numel) * 31) ^ (size_t)(k.dtype + 7);
  }
};

// A child slot: (parent slot, index) or (parent slot, dict key object).
struct SlotKey {
  int32_t parent;
  bool by_object;
  intptr_t value;
  bool operator==(const SlotKey& o) const {
    return parent == o.parent && by_object == o.by_object && value == o.value;
  }
};
struct SlotKeyHash {
  size_t operator()(const SlotKey& k) const {
    return std::hash<intptr_t>()(k.value) * 1000003u ^ (size_t)k.parent * 2 ^ (size_t)k.by_object;
  }
};

struct SourceKey {
  PyCodeObject* code;
  int lasti;
  bool operator==(const SourceKey& o) const { return code == o.code && lasti == o.lasti; }
};
struct SourceKeyHash {
  size_t operator()(const SourceKey& k) const { return std::hash<void*>()(k.code) ^ ((size_t)k.lasti * 1000003u); }
};

int launch_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    case at::kDouble: return 3;
    default: return -1;
  }
}

// What the Recorders of a process share, all keyed by objects that live as long as the model (code
// objects, types, dict keys: each kept alive by a reference taken here). is_skipped is always
// session.is_skipped_file, so its answers are shared too.
struct Tables {
  Strings strings;
  std::unordered_map<SlotKey, int32_t, SlotKeyHash> slots;
  std::unordered_map<std::string, int32_t> slots_by_text;
  std::unordered_map<SourceKey, int32_t, SourceKeyHash> sources;
  std::unordered_map<PyCodeObject*, bool> skip;
  std::unordered_map<PyTypeObject*, bool> mapping_like;
  std::unordered_map<int, int32_t> devices;
};

Tables& tables() {
  static Tables* t = new Tables();  // never freed: see Strings
  return *t;
}

// Raised as a Python exception by the callers (pybind11 or Probed's vectorcall).
struct PythonError {};

// The source line ('file.py:LINE in func') of the innermost Python frame whose code is not skipped
// (torch, tensordiff's probes) as a string id of tables().strings, or -1. Cached per (code object,
// instruction): a call site costs one frame walk and its string is made once.
int32_t source_string_id(PyObject* is_skipped, int max_depth = 64) {
  Tables& tab = tables();
  PyFrameObject* frame = PyEval_GetFrame();  // borrowed
  Py_XINCREF(frame);
  for (int i = 0; frame != nullptr && i < max_depth; ++i) {
    PyCodeObject* code = PyFrame_GetCode(frame);  // new reference
    auto it = tab.skip.find(code);
    bool skip;
    if (it == tab.skip.end()) {
      PyObject* res = PyObject_CallOneArg(is_skipped, code->co_filename);
      if (res == nullptr) {
        Py_DECREF(code);
        Py_DECREF(frame);
        throw PythonError();
      }
      skip = PyObject_IsTrue(res) == 1;
      Py_DECREF(res);
      Py_INCREF(code);  // the key stays alive: its address must not be reused
      tab.skip.emplace(code, skip);
    } else {
      skip = it->second;
    }
    if (!skip) {
#if PY_VERSION_HEX >= 0x030B0000
      SourceKey key{code, PyFrame_GetLasti(frame)};
#else
      SourceKey key{code, frame->f_lasti};
#endif
      auto hit = tab.sources.find(key);
      int32_t id;
      if (hit != tab.sources.end()) {
        id = hit->second;
      } else {
        PyObject* text = PyUnicode_FromFormat("%U:%d in %U", code->co_filename, PyFrame_GetLineNumber(frame),
                                              code->co_name);
        if (text == nullptr) {
          Py_DECREF(code);
          Py_DECREF(frame);
          throw PythonError();
        }
        id = tab.strings.add_new(text);
        Py_INCREF(code);
        tab.sources.emplace(key, id);
      }
      Py_DECREF(code);
      Py_DECREF(frame);
      return id;
    }
    Py_DECREF(code);
    PyFrameObject* back = PyFrame_GetBack(frame);  // new reference
    Py_DECREF(frame);
    frame = back;
  }
  Py_XDECREF(frame);
  return -1;
}

class Recorder {
 public:
  // accept_cpu: tests only (no launcher; rows are assigned, stats stay empty).
  Recorder(int64_t launch_fn, int64_t capacity, py::object flatten, bool accept_cpu)
      : launch_(reinterpret_cast<LaunchFn>(launch_fn)), capacity_(capacity), flatten_(std::move(flatten)),
        accept_cpu_(accept_cpu) {
    py::str input("input"), output("output"), forward("forward");
    input_ = strings_->intern(input.ptr());
    output_ = strings_->intern(output.ptr());
    forward_ = strings_->intern(forward.ptr());
    reserve();
  }
  struct Ctx {
    int32_t module, direction, call, source;
    PyObject* others = nullptr;  // new list of (slot, tensor) of tensors not taken, or null
  };

  // From Python (the hook path of modules with their own hooks): records every CUDA tensor in obj;
  // slots are prefix.i / prefix.key (a bare tensor: prefix.0). Returns the (slot, tensor) pairs of
  // other tensors, for the general path, or None.
  py::object record(py::handle obj, py::str module, py::str direction, int64_t call, py::str prefix,
                    py::str source, bool bare_tensor_is_tuple) {
    Ctx ctx{strings_->intern(module.ptr()), strings_->intern(direction.ptr()), (int32_t)call,
            PyUnicode_GET_LENGTH(source.ptr()) ? strings_->intern(source.ptr()) : -1};
    try {
      record_ids(obj.ptr(), strings_->intern(prefix.ptr()), bare_tensor_is_tuple, ctx);
    } catch (...) {
      Py_XDECREF(ctx.others);
      if (PyErr_Occurred()) throw py::error_already_set();  // a PythonError
      throw;
    }
    return ctx.others ? py::reinterpret_steal<py::object>(ctx.others) : py::none();
  }

  void record_ids(PyObject* obj, int32_t slot, bool bare_tensor_is_tuple, Ctx& ctx) {
    if (bare_tensor_is_tuple && THPVariable_Check(obj)) {
      add(obj, child_slot(slot, false, 0), ctx);
    } else {
      walk(obj, slot, 0, ctx);
    }
  }

  // Records the positional and keyword arguments of a vectorcall as "input.<i>" / "input.<name>".
  void record_call_args(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, Ctx& ctx) {
    for (Py_ssize_t i = 0; i < nargs; ++i) walk(args[i], child_slot(input_, false, i), 1, ctx);
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; ++i)
      walk(args[nargs + i], child_slot(input_, true, (intptr_t)PyTuple_GET_ITEM(kwnames, i)), 1, ctx);
  }

  int64_t pending() const { return (int64_t)records_.size(); }

  // Nesting of module calls (the C++ wrappers and the Python hook path share it): enter() says
  // whether this call is a root forward.
  bool enter() { return depth_++ == 0; }
  void leave() { if (depth_ > 0) --depth_; }

  // The source line ('file.py:LINE in func') of the innermost Python frame whose code is not skipped
  // (torch, tensordiff's probes) as a string id. Cached per (code object, instruction): a call site
  // costs one frame walk and its string is made once.
  int32_t source_id(PyObject* is_skipped) { return source_string_id(is_skipped); }

  PyObject* string(int32_t id) const { return strings_->get(id); }
  int32_t intern(PyObject* s) { return strings_->intern(s); }
  int32_t forward_id() const { return forward_; }
  int32_t output_id() const { return output_; }

  void forget() { seen_.clear(); }

  // Room for a forward's records up front: growing these while the model runs costs reallocations
  // and copies on the model's thread.
  void reserve() {
    records_.clear();
    dims_.clear();
    records_.reserve(capacity_);
    dims_.reserve(capacity_ * 8);
    seen_.reserve(capacity_);
  }

  // Everything since the last detach(), moved out in O(1).
  Block detach() {
    Block b{std::move(records_), std::move(dims_), std::move(buffers_), std::move(numels_), strings_};
    reserve();
    buffers_.clear();
    numels_.clear();
    rows_before_ = 0;
    return b;
  }

 private:
  int32_t child_slot(int32_t parent, bool by_object, intptr_t value) {
    SlotKey key{parent, by_object, value};
    auto it = slots_.find(key);
    if (it != slots_.end()) return it->second;
    PyObject* name;
    if (!by_object) {
      name = PyUnicode_FromFormat("%U.%zd", strings_->get(parent), (Py_ssize_t)value);
    } else {
      name = PyUnicode_FromFormat("%U.%S", strings_->get(parent), (PyObject*)value);
      Py_INCREF((PyObject*)value);  // the key object stays alive: its address must not be reused
    }
    if (name == nullptr) throw PythonError();
    int32_t id = strings_->add_new(name);
    slots_.emplace(key, id);
    return id;
  }

  // A slot named by Python (flatten_tensors), one id per distinct text.
  int32_t slot_by_text(PyObject* name) {
    Py_ssize_t n;
    const char* text = PyUnicode_Check(name) ? PyUnicode_AsUTF8AndSize(name, &n) : nullptr;
    if (text == nullptr) throw PythonError();
    std::string key(text, n);
    auto it = slots_by_text_.find(key);
    if (it != slots_by_text_.end()) return it->second;
    int32_t id = strings_->add_new(Py_NewRef(name));
    slots_by_text_.emplace(std::move(key), id);
    return id;
  }

  void walk(PyObject* o, int32_t slot, int depth, Ctx& ctx) {
    if (THPVariable_Check(o)) {
      add(o, slot, ctx);
      return;
    }
    if (o == Py_None || PyBool_Check(o) || PyLong_Check(o) || PyFloat_Check(o) || PyUnicode_Check(o) || depth > 4)
      return;
    if (PyTuple_Check(o) || PyList_Check(o)) {
      for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(o); ++i) {
        PyObject* item = Py_NewRef(PySequence_Fast_GET_ITEM(o, i));  // a list may change under a callback
        try {
          walk(item, child_slot(slot, false, i), depth + 1, ctx);
        } catch (...) {
          Py_DECREF(item);
          throw;
        }
        Py_DECREF(item);
      }
      return;
    }
    if (PyDict_Check(o)) {
      PyObject *k, *v;
      Py_ssize_t pos = 0;
      while (PyDict_Next(o, &pos, &k, &v)) walk(v, child_slot(slot, true, (intptr_t)k), depth + 1, ctx);
      return;
    }
    // Anything else: Python's flatten_tensors decides, as on the slow path, unless the type has no
    // items() / keys(), where it never finds a tensor (a KV cache object passed to every layer).
    PyTypeObject* type = Py_TYPE(o);
    auto known = mapping_like_.find(type);
    if (known == mapping_like_.end()) {
      bool like = PyObject_HasAttrString((PyObject*)type, "items") && PyObject_HasAttrString((PyObject*)type, "keys");
      Py_INCREF(type);
      known = mapping_like_.emplace(type, like).first;
    }
    if (!known->second) return;
    PyObject* pairs = PyObject_CallFunction(flatten_.ptr(), "OOi", o, strings_->get(slot), depth);
    PyObject* list = pairs ? PySequence_List(pairs) : nullptr;
    Py_XDECREF(pairs);
    if (list == nullptr) throw PythonError();
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
      PyObject* p = PyList_GET_ITEM(list, i);
      if (PyTuple_Check(p) && PyTuple_GET_SIZE(p) == 2 && THPVariable_Check(PyTuple_GET_ITEM(p, 1))) {
        add(PyTuple_GET_ITEM(p, 1), slot_by_text(PyTuple_GET_ITEM(p, 0)), ctx);
      }
    }
    Py_DECREF(list);
  }

  int32_t device_id(const at::Device& d) {
    int key = (int)d.type() * 1024 + d.index() + 1;
    auto it = devices_.find(key);
    if (it != devices_.end()) return it->second;
    int32_t id = strings_->add_new(PyUnicode_FromString(d.str().c_str()));
    devices_.emplace(key, id);
    return id;
  }

  void add(PyObject* obj, int32_t slot, Ctx& ctx) {
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!(t.is_cuda() || accept_cpu_) || t.layout() != at::kStrided) {
      if (ctx.others == nullptr && (ctx.others = PyList_New(0)) == nullptr) throw PythonError();
      PyObject* pair = PyTuple_Pack(2, strings_->get(slot), obj);
      int err = pair ? PyList_Append(ctx.others, pair) : -1;
      Py_XDECREF(pair);
      if (err) throw PythonError();
      return;
    }
    c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    bool contiguous = impl->is_contiguous();
    Key key = contiguous ? Key{(uintptr_t)t.data_ptr(), t.numel(), (int)t.scalar_type()}
                         : Key{(uintptr_t)impl, 0, -1};
    uint32_t version = 0;
    bool versioned = true;
    try {
      version = impl->version_counter().current_version();
    } catch (const c10::Error&) {
      versioned = false;  // inference tensors have no version counter: never aliased
    }
    Rec r;
    r.module = ctx.module;
    r.direction = ctx.direction;
    r.call = ctx.call;
    r.slot = slot;
    r.source = ctx.source;
    r.device = device_id(t.device());
    r.dtype = (int16_t)t.scalar_type();
    r.offset = t.storage_offset();
    auto sizes = t.sizes();
    auto strides = t.strides();
    r.ndim = (int16_t)sizes.size();
    r.dims_at = (int32_t)dims_.size();
    dims_.insert(dims_.end(), sizes.begin(), sizes.end());
    dims_.insert(dims_.end(), strides.begin(), strides.end());
    auto it = versioned ? seen_.find(key) : seen_.end();
    if (it != seen_.end() && it->second.version == version && !it->second.impl.expired()) {
      r.row = -1;
      r.alias_module = it->second.module;
      r.alias_direction = it->second.direction;
      r.alias_call = it->second.call;
      r.alias_slot = it->second.slot;
      records_.push_back(r);
      return;
    }
    r.row = launch(t);
    if (versioned) {
      seen_.insert_or_assign(key, Seen{c10::weak_intrusive_ptr<c10::TensorImpl>(
                                          c10::intrusive_ptr<c10::TensorImpl>::reclaim_copy(impl)),
                                      version, ctx.module, ctx.direction, ctx.call, slot});
    }
    records_.push_back(r);
  }

  int64_t launch(const at::Tensor& t0) {
    if (buffers_.empty() || (int64_t)numels_.back().size() >= capacity_ || buffers_.back().device() != t0.device())
      new_buffer(t0.device());
    at::Tensor t = t0;
    if (launch_code(t.scalar_type()) < 0) t = t.is_complex() ? t.abs() : t.to(at::kFloat);
    if (!t.is_contiguous()) t = t.contiguous();  // stream-ordered allocator: safe to free after launch
    int64_t row = (int64_t)numels_.back().size();
    int64_t n = t.numel();
    if (n > 0 && launch_ != nullptr && t.is_cuda()) {
      // the tensor's device made current (a model split over GPUs runs with another one current), and
      // the current stream of that device, as torch.cuda.current_stream(device) would give
      c10::DeviceGuard guard(t.device());
      void* stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device()).native_handle();
      PART_START(t0);
      int err = launch_(t.data_ptr(), n, launch_code(t.scalar_type()), row,
                        (char*)buffers_.back().data_ptr(), capacity_, stream);
      PART_ADD(3, t0);
      PART_COUNT(5);
      TORCH_CHECK(err == 0, "fused stats kernel launch failed (cudaError ", err, ")");
    }
    numels_.back().push_back(n);
    return rows_before_ + row;
  }

  void new_buffer(const at::Device& device) {
    if (!buffers_.empty()) rows_before_ += (int64_t)numels_.back().size();
    // Layout of fused_stats.cu: float {min, max} x capacity, double {sum, sum|x|, sum x^2}, int64 counts;
    // initialised once per device, then each buffer is one copy of that (one launch instead of three).
    at::Tensor& initial = initial_[device.str()];
    if (!initial.defined()) {
      initial = at::zeros({capacity_ * 56}, at::TensorOptions().dtype(at::kByte).device(device));
      at::Tensor mm = initial.narrow(0, 0, capacity_ * 8).view(at::kFloat).view({capacity_, 2});
      mm.select(1, 0).fill_(INFINITY);
      mm.select(1, 1).fill_(-INFINITY);
    }
    buffers_.push_back(initial.clone());
    numels_.emplace_back();
  }

  LaunchFn launch_;
  int64_t capacity_;
  py::object flatten_;
  bool accept_cpu_;
  Tables& tables_ = tables();
  Strings* strings_ = &tables_.strings;
  int32_t input_, output_, forward_;
  std::vector<Rec> records_;
  std::vector<int64_t> dims_;
  std::vector<at::Tensor> buffers_;
  std::vector<std::vector<int64_t>> numels_;
  std::unordered_map<std::string, at::Tensor> initial_;  // device -> a buffer's initial bytes
  int64_t rows_before_ = 0;
  std::unordered_map<Key, Seen, KeyHash> seen_;
  std::unordered_map<SlotKey, int32_t, SlotKeyHash>& slots_ = tables_.slots;
  std::unordered_map<std::string, int32_t>& slots_by_text_ = tables_.slots_by_text;
  std::unordered_map<SourceKey, int32_t, SourceKeyHash>& sources_ = tables_.sources;
  std::unordered_map<PyCodeObject*, bool>& skip_ = tables_.skip;
  std::unordered_map<PyTypeObject*, bool>& mapping_like_ = tables_.mapping_like;
  std::unordered_map<int, int32_t>& devices_ = tables_.devices;
  int64_t depth_ = 0;
};

// ---- Probed: a module's forward, probed ------------------------------------------------------
// A plain CPython type with vectorcall: called by Module._call_impl in place of the bound forward,
// it passes the caller's argument array on unchanged (pybind11's py::args / py::kwargs would build a
// tuple and a dict per call, twice). Instances have a __dict__ (for __wrapped__, __name__, ...).
struct ProbedObject {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  PyObject* dict;
  PyObject* forward;
  PyObject* name;
  PyObject* recorder;  // the pybind11 Recorder object, kept alive
  PyObject* on_begin;
  PyObject* on_end;
  PyObject* emit_other;
  PyObject* is_skipped;
  Recorder* rec;
  int64_t calls;
  int32_t module;
  bool wanted;
};

// Hands tensors the recorder did not take (not CUDA) to Python: emit_other(name, call, slot, source, t).
bool emit_others(ProbedObject* self, PyObject* others, int64_t call, int32_t source) {
  if (others == nullptr) return true;
  bool ok = true;
  PyObject* src = source < 0 ? PyUnicode_FromString("") : Py_NewRef(self->rec->string(source));
  for (Py_ssize_t i = 0; ok && i < PyList_GET_SIZE(others); ++i) {
    PyObject* pair = PyList_GET_ITEM(others, i);
    PyObject* res = PyObject_CallFunction(self->emit_other, "OLOOO", self->name, (long long)call,
                                          PyTuple_GET_ITEM(pair, 0), src, PyTuple_GET_ITEM(pair, 1));
    ok = res != nullptr;
    Py_XDECREF(res);
  }
  Py_DECREF(src);
  Py_DECREF(others);
  return ok;
}

// Runs the root's on_end keeping a pending exception (what was captured before an error lands).
bool call_on_end(ProbedObject* self, bool failing) {
  PyObject *type = nullptr, *value = nullptr, *tb = nullptr;
  if (failing) PyErr_Fetch(&type, &value, &tb);
  PyObject* res = PyObject_CallNoArgs(self->on_end);
  if (failing) {
    if (res == nullptr) PyErr_Clear();
    PyErr_Restore(type, value, tb);
  }
  Py_XDECREF(res);
  return res != nullptr;
}

bool set_error_from_cpp() {
  try {
    throw;
  } catch (PythonError&) {
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {  // nothing may leave a C function called by CPython
    PyErr_SetString(PyExc_RuntimeError, "tensordiff fast records: unknown C++ exception");
  }
  return false;
}

// Runs `work` (records into ctx) and hands the tensors it did not take to Python; false with a Python
// error set when either failed.
template <typename Work>
bool record_then_emit(ProbedObject* self, int64_t call, Work work) {
  Recorder::Ctx ctx{self->module, self->rec->forward_id(), (int32_t)call, -1};
  try {
    work(ctx);
  } catch (...) {
    Py_XDECREF(ctx.others);
    return set_error_from_cpp();
  }
  return emit_others(self, ctx.others, call, ctx.source);
}

PyObject* probed_vectorcall(PyObject* callable, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  auto* self = reinterpret_cast<ProbedObject*>(callable);
  Recorder* rec = self->rec;
  int64_t call = self->calls++;
  bool root = rec->enter();
  if (root) {
    PyObject* res = PyObject_CallNoArgs(self->on_begin);
    if (res == nullptr) {
      rec->leave();
      return nullptr;
    }
    Py_DECREF(res);
  }
  if (self->wanted && !record_then_emit(self, call, [&](Recorder::Ctx& ctx) {
        PART_START(t0);
        ctx.source = rec->source_id(self->is_skipped);
        PART_ADD(0, t0);
        PART_START(t1);
        rec->record_call_args(args, PyVectorcall_NARGS(nargsf), kwnames, ctx);
        PART_ADD(1, t1);
        PART_COUNT(4);
      })) {
    rec->leave();
    if (root) call_on_end(self, true);
    return nullptr;
  }
  PyObject* out = PyObject_Vectorcall(self->forward, args, nargsf, kwnames);
  rec->leave();
  bool ok = out != nullptr;
  if (ok && self->wanted) {
    ok = record_then_emit(self, call, [&](Recorder::Ctx& ctx) {  // outputs carry no source line
      PART_START(t0);
      rec->record_ids(out, rec->output_id(), true, ctx);
      PART_ADD(2, t0);
    });
  }
  if (root) ok = call_on_end(self, !ok) && ok;
  if (!ok) {
    Py_XDECREF(out);
    return nullptr;
  }
  return out;
}

int probed_traverse(PyObject* o, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<ProbedObject*>(o);
  Py_VISIT(self->dict);
  Py_VISIT(self->forward);
  Py_VISIT(self->name);
  Py_VISIT(self->recorder);
  Py_VISIT(self->on_begin);
  Py_VISIT(self->on_end);
  Py_VISIT(self->emit_other);
  Py_VISIT(self->is_skipped);
  return 0;
}

int probed_clear(PyObject* o) {
  auto* self = reinterpret_cast<ProbedObject*>(o);
  Py_CLEAR(self->dict);
  Py_CLEAR(self->forward);
  Py_CLEAR(self->name);
  self->rec = nullptr;
  Py_CLEAR(self->recorder);
  Py_CLEAR(self->on_begin);
  Py_CLEAR(self->on_end);
  Py_CLEAR(self->emit_other);
  Py_CLEAR(self->is_skipped);
  return 0;
}

void probed_dealloc(PyObject* o) {
  PyObject_GC_UnTrack(o);
  probed_clear(o);
  Py_TYPE(o)->tp_free(o);
}

// Probed(forward, name, wanted, recorder, on_begin, on_end, emit_other, is_skipped)
PyObject* probed_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  PyObject *forward, *name, *recorder, *on_begin, *on_end, *emit_other, *is_skipped;
  int wanted;
  if (!PyArg_ParseTuple(args, "OUpOOOOO:Probed", &forward, &name, &wanted, &recorder, &on_begin, &on_end,
                        &emit_other, &is_skipped))
    return nullptr;
  Recorder* rec;
  try {
    rec = py::cast<Recorder*>(py::handle(recorder));
  } catch (...) {
    PyErr_SetString(PyExc_TypeError, "Probed: recorder must be a fast_records.Recorder");
    return nullptr;
  }
  auto* self = reinterpret_cast<ProbedObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  self->vectorcall = probed_vectorcall;
  self->dict = nullptr;
  self->forward = Py_NewRef(forward);
  self->name = Py_NewRef(name);
  self->recorder = Py_NewRef(recorder);
  self->on_begin = Py_NewRef(on_begin);
  self->on_end = Py_NewRef(on_end);
  self->emit_other = Py_NewRef(emit_other);
  self->is_skipped = Py_NewRef(is_skipped);
  self->rec = rec;
  self->calls = 0;
  self->module = rec->intern(name);
  self->wanted = wanted != 0;
  return reinterpret_cast<PyObject*>(self);
}

PyGetSetDef probed_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, nullptr, nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyTypeObject ProbedType = {PyVarObject_HEAD_INIT(nullptr, 0)};

bool init_probed_type(PyObject* module) {
  ProbedType.tp_name = "tensordiff_fast_records.Probed";
  ProbedType.tp_basicsize = sizeof(ProbedObject);
  ProbedType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL;
  ProbedType.tp_doc = "A module's forward with fast module-level records (fast_records.cpp).";
  ProbedType.tp_new = probed_new;
  ProbedType.tp_dealloc = probed_dealloc;
  ProbedType.tp_traverse = probed_traverse;
  ProbedType.tp_clear = probed_clear;
  ProbedType.tp_call = PyVectorcall_Call;
  ProbedType.tp_vectorcall_offset = offsetof(ProbedObject, vectorcall);
  ProbedType.tp_dictoffset = offsetof(ProbedObject, dict);
  ProbedType.tp_getset = probed_getset;
  if (PyType_Ready(&ProbedType) < 0) return false;
  Py_INCREF(&ProbedType);
  return PyModule_AddObject(module, "Probed", reinterpret_cast<PyObject*>(&ProbedType)) == 0;
}


// ---- CPU records without Python objects per tensor (probes/session.py CaptureSession.emit) ------
//
// An op-level capture of a CPU model makes about three records per op. In Python each cost ~30 us
// (identity table, layout, a native stats pass through ctypes, a checksum to confirm an alias),
// three times the op's own cost in a small model. CpuRecords does the same work for a record that
// keeps only stats: it recognises a tensor captured before and unchanged (same TensorImpl and
// version counter, and the same checksum: a kernel writing through a raw data_ptr() does not move
// the counter), or a view op's output holding its input's elements; otherwise it runs the native
// stats pass (cpu_stats.c, reached through its address). A record reaches the writer's batch with
// its stats row as 72 bytes (an alias: its original's), and its index row as a dict or, made here,
// as JSON text: the writer's thread only numbers the rows. Only records of this table are aliased
// here (the session's Python path keeps its own), so an original here never has data saved.

using CpuStatsFn = int (*)(const void*, int64_t, int, double*);
using ChecksumFn = uint64_t (*)(const void*, int64_t, int);

struct CpuSeen {
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  uint32_t version;
  PyObject* key;    // owned
  PyObject* stats;  // owned: the record's stats row, 9 float64 as 72 bytes
  uint64_t checksum;
};

int cpu_stats_code(at::ScalarType t) {  // cpu_stats.py _DTYPE_CODE
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kBFloat16: return 2;
    case at::kHalf: return 3;
    default: return -1;
  }
}

// cpu_stats.dense: the elements fill [data_ptr, data_ptr + nbytes) in some order
bool dense(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

struct Names {  // interned attribute names and record keys
  PyObject *busy, *scopes, *op_counts, *direction, *drilling, *uninit, *batch, *batch_since, *error, *hand_over, *batch_limit,
      *kind, *module, *scope, *call, *op, *op_index, *source, *drill, *in, *out, *empty, *hash;
  Names() {
    auto s = [](const char* t) { return PyUnicode_InternFromString(t); };
    busy = s("busy"), scopes = s("scopes"), op_counts = s("op_counts"), direction = s("direction");
    drilling = s("drilling"), uninit = s("_uninit"), batch = s("_batch"), batch_since = s("_batch_since");
    error = s("_error"), hand_over = s("hand_over"), batch_limit = s("batch_limit"), kind = s("kind"), module = s("module"), scope = s("scope");
    call = s("call"), op = s("op"), op_index = s("op_index"), source = s("source"), drill = s("drill");
    in = s("in"), out = s("out"), empty = s(""), hash = s("#");
  }
};

Names& names() {
  static Names* n = new Names();  // never freed, as tables()
  return *n;
}

double monotonic_seconds() {  // time.monotonic()'s clock
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

py::object attr(PyObject* obj, PyObject* name) {
  PyObject* value = PyObject_GetAttr(obj, name);
  if (value == nullptr) throw PythonError();
  return py::reinterpret_steal<py::object>(value);
}

py::object check(PyObject* value) {  // a new reference, or the pending Python error
  if (value == nullptr) throw PythonError();
  return py::reinterpret_steal<py::object>(value);
}

class CpuRecords {
 public:
  CpuRecords(int64_t stats_fn, int64_t checksum_fn)
      : stats_(reinterpret_cast<CpuStatsFn>(stats_fn)), checksum_(reinterpret_cast<ChecksumFn>(checksum_fn)) {
    minus_one_ = PyLong_FromLong(-1);
    minus_two_ = PyLong_FromLong(-2);
    k_key_ = PyUnicode_InternFromString("key");
    k_slot_ = PyUnicode_InternFromString("slot");
    k_alias_ = PyUnicode_InternFromString("alias_of");
    k_stats_only_ = PyUnicode_InternFromString("stats_only");
    k_shape_ = PyUnicode_InternFromString("shape");
    k_dtype_ = PyUnicode_InternFromString("dtype");
    k_device_ = PyUnicode_InternFromString("device");
    k_stride_ = PyUnicode_InternFromString("stride");
    k_offset_ = PyUnicode_InternFromString("storage_offset");
    k_contiguous_ = PyUnicode_InternFromString("contiguous");
    cpu_ = PyUnicode_InternFromString("cpu");
  }
  ~CpuRecords() {
    forget();
    Py_XDECREF(writer_);
    for (auto& kv : slot_names_) {
      Py_DECREF(kv.second);
      Py_DECREF(kv.first.first);
    }
    for (PyObject* o : {minus_one_, minus_two_, k_key_, k_slot_, k_alias_, k_stats_only_, k_shape_, k_dtype_, k_device_, k_stride_, k_offset_,
                        k_contiguous_, cpu_})
      Py_XDECREF(o);
    for (auto& kv : dtype_names_) Py_XDECREF(kv.second);
  }
  CpuRecords(const CpuRecords&) = delete;
  CpuRecords& operator=(const CpuRecords&) = delete;

  // One record of a tensor whose data is not kept: when this path handles it (takes()), its layout
  // (and alias) go into `record` and (record, stats row as 72 bytes, -1) is appended to `batch`, the
  // writer's list (TraceWriter.native_batch); returns false otherwise. With `text`, the
  // row goes to the writer as JSON text, as emit_op's (where the record's values are all ones the
  // encoder writes).
  bool emit(py::handle record, py::handle tensor, py::handle same_as, py::handle batch, bool text = false) {
    if (!takes(tensor.ptr())) return false;
    PyObject* key = PyDict_GetItemWithError(record.ptr(), k_key_);  // borrowed
    if (key == nullptr) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyError, "key");
      throw py::error_already_set();
    }
    py::object keep_key = py::reinterpret_borrow<py::object>(key);
    std::string head;
    if (text && !json_dict_fields(head, record.ptr())) text = false;
    Outcome o;
    if (!classify(tensor.ptr(), same_as.ptr(), key, o)) return false;
    py::object stats = py::reinterpret_steal<py::object>(o.stats);
    const at::Tensor& t = THPVariable_Unpack(tensor.ptr());
    if (text) {
      append_text_row(batch.ptr(), head, key, o, t, stats.release().ptr());
    } else {
      to_dict(record.ptr(), o, t);
      append(batch.ptr(), record.ptr(), stats.release().ptr(), minus_one_);
    }
    ++count_;
    return true;
  }

  // A module record (schema.module_record's fields) straight into the attached writer's batch as
  // JSON text: session.emit_module's work for a tensor takes() accepts (false otherwise).
  bool emit_module(py::handle module, py::handle direction, int64_t call, py::handle slot, py::handle source,
                   py::handle tensor) {
    if (writer_ == nullptr) throw std::logic_error("emit_module: no writer attached");
    if (!takes(tensor.ptr())) return false;
    py::object scope = py::reinterpret_steal<py::object>(
        PyUnicode_FromFormat("%U/%U#%lld", module.ptr(), direction.ptr(), (long long)call));
    if (!scope) throw py::error_already_set();
    py::object key = py::reinterpret_steal<py::object>(PyUnicode_FromFormat("%U/%U", scope.ptr(), slot.ptr()));
    if (!key) throw py::error_already_set();
    std::string row = "{\"key\":";
    json_str(row, key.ptr());
    row += ",\"kind\":\"module\",\"direction\":";
    json_str(row, direction.ptr());
    row += ",\"module\":";
    json_str(row, module.ptr());
    row += ",\"call\":" + std::to_string(call) + ",\"scope\":";
    json_str(row, scope.ptr());
    row += ",\"op\":\"\",\"op_index\":-1,\"slot\":";
    json_str(row, slot.ptr());
    row += ",\"source\":";
    json_str(row, source.ptr());
    Outcome o;
    if (!classify(tensor.ptr(), Py_None, key.ptr(), o)) return false;
    py::object stats = py::reinterpret_steal<py::object>(o.stats);
    py::object batch = writer_batch();
    append_text_row(batch.ptr(), row, key.ptr(), o, THPVariable_Unpack(tensor.ptr()), stats.release().ptr());
    ++count_;
    writer_added(batch.ptr());
    return true;
  }

  // The TraceWriter (with a thread) that emit_module and the op handler append to.
  void attach(py::handle writer) {
    Py_XDECREF(writer_);
    writer_ = Py_NewRef(writer.ptr());
  }

  // writer._batch, its age stamped when it is empty (TraceWriter.native_batch)
  py::object writer_batch() {
    if (writer_ == nullptr) throw std::logic_error("CpuRecords: no writer attached (closed?)");
    Names& n = names();
    py::object batch = attr(writer_, n.batch);
    if (!PyList_Check(batch.ptr())) throw std::runtime_error("CpuRecords: writer._batch is not a list");
    if (attr(writer_, n.error).ptr() != Py_None) {  // raised where the writer says so
      check(PyObject_CallMethod(writer_, "native_batch", nullptr));
      throw std::runtime_error("CpuRecords: the writer failed");
    }
    if (PyList_GET_SIZE(batch.ptr()) == 0) {
      py::object now = check(PyFloat_FromDouble(monotonic_seconds()));
      if (PyObject_SetAttr(writer_, n.batch_since, now.ptr())) throw PythonError();
    }
    return batch;
  }

  // TraceWriter.native_added: hands the batch over when full or old
  void writer_added(PyObject* batch) {
    Names& n = names();
    long limit = PyLong_AsLong(attr(writer_, n.batch_limit).ptr());
    if (limit == -1 && PyErr_Occurred()) throw PythonError();
    bool full = PyList_GET_SIZE(batch) >= limit;
    if (!full) {
      double since = PyFloat_AsDouble(attr(writer_, n.batch_since).ptr());
      if (since == -1.0 && PyErr_Occurred()) throw PythonError();
      full = monotonic_seconds() - since > 0.1;
    }
    if (full) check(PyObject_CallMethodNoArgs(writer_, n.hand_over));
  }

  // The records of one op's tensors from index `start` on (session.emit_op): each a copy of `base`
  // with key "<prefix>/<kind>.<i>" and slot "<kind>.<i>", emitted as emit() does (`same_as` applies
  // to the first). Stops at the first tensor this path does not take and returns its index (the
  // caller records it and calls again after it, which keeps the records in order); -1 when done.
  // With `text`, the writer gets each row as JSON text instead of a dict: ((the index row's text up to
  // its last field, key), stats, -2) (TraceWriter._write_native_text), where `base` holds only what
  // the text encoder writes (str, int, bool, None).
  int64_t emit_op(py::handle base, py::handle prefix, py::handle kind, py::handle tensors, int64_t start,
                  py::handle same_as, py::handle batch, bool text = false) {
    std::string head;
    if (text && !json_dict_fields(head, base.ptr())) text = false;  // a value the encoder does not write
    return emit_op_with(base.ptr(), text ? &head : nullptr, prefix.ptr(), kind.ptr(), tensors.ptr(), start,
                        same_as.ptr(), batch.ptr());
  }

  // emit_op with the base's text made once (`head`: JSON text of `base` without its closing brace;
  // null: rows as dicts)
  int64_t emit_op_with(PyObject* base, const std::string* head, PyObject* prefix, PyObject* kind, PyObject* seq,
                       int64_t start, PyObject* same_as, PyObject* batch) {
    if (!PyList_Check(seq)) throw py::type_error("emit_op: tensors must be a list");
    for (Py_ssize_t i = start; i < PyList_GET_SIZE(seq); ++i) {
      PyObject* t = PyList_GET_ITEM(seq, i);
      if (!takes(t)) return i;
      PyObject* slot = slot_name(kind, i);
      py::object key = py::reinterpret_steal<py::object>(PyUnicode_FromFormat("%U/%U", prefix, slot));
      if (!key) throw py::error_already_set();
      Outcome o;
      if (!classify(t, i == 0 ? same_as : Py_None, key.ptr(), o))
        throw std::logic_error("emit_op: a tensor takes() accepted was refused");
      py::object stats = py::reinterpret_steal<py::object>(o.stats);
      const at::Tensor& tensor = THPVariable_Unpack(t);
      if (head != nullptr) {
        std::string row;
        row.reserve(head->size() + 2 * (size_t)PyUnicode_GET_LENGTH(key.ptr()) + 200);
        row += *head;
        row += ",\"key\":";
        json_str(row, key.ptr());
        row += ",\"slot\":";
        json_str(row, slot);
        append_text_row(batch, row, key.ptr(), o, tensor, stats.release().ptr());
      } else {
        py::object rec = py::reinterpret_steal<py::object>(PyDict_Copy(base));
        if (!rec || PyDict_SetItem(rec.ptr(), k_key_, key.ptr()) || PyDict_SetItem(rec.ptr(), k_slot_, slot))
          throw py::error_already_set();
        to_dict(rec.ptr(), o, tensor);
        append(batch, rec.ptr(), stats.release().ptr(), minus_one_);
      }
      ++count_;
    }
    return -1;
  }

  // Forget tensor identities (the session's capture is over).
  void forget() {
    for (auto& kv : seen_) {
      Py_DECREF(kv.second.key);
      Py_DECREF(kv.second.stats);
    }
    seen_.clear();
  }

  // The capture is over: its tensor identities are forgotten and the writer let go. (The writer
  // refers back to the session, which holds this object: a cycle through C++ that Python's garbage
  // collector cannot see, so without this every capture's writer, file handles and table stayed.)
  void close() {
    forget();
    Py_CLEAR(writer_);
  }

  int64_t size() const { return (int64_t)seen_.size(); }

  // Records made here since construction (the session's record count adds them).
  int64_t count() const { return count_; }

 private:
  // The tensors this path records: CPU, strided, not empty, not a Python tensor subclass with its own
  // dispatch, of a float dtype cpu_stats.c reads, or integers and booleans (their stats from a
  // float64 copy, as snapshot._stats_on), views with gaps included (a contiguous copy first, as
  // cpu_stats._native). The copies run with Python dispatch off (no_python_dispatch): our own work,
  // which no dispatch mode (the op probe, a buffer guard) may see as the model's.
  static bool takes(PyObject* tensor) {
    if (!THPVariable_Check(tensor)) return false;
    const at::Tensor& t = THPVariable_Unpack(tensor);
    if (!t.is_cpu() || t.layout() != at::kStrided || t.numel() == 0 || t.key_set().has(c10::DispatchKey::Python))
      return false;
    return cpu_stats_code(t.scalar_type()) >= 0 || at::isIntegralType(t.scalar_type(), /*includeBool=*/true);
  }

  static c10::DispatchKeySet python_keys() {
    return c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot});
  }

  // What a record of `tensor` is: an alias of a record made before (`alias`, borrowed from the
  // table; `stats_only` where its elements are in another order), or new stats; `stats`: a new
  // reference to the stats row as 72 bytes (an alias: its original's). False where this path does
  // not take the tensor. `key`: the record's key, remembered for later aliases.
  struct Outcome {
    PyObject* alias = nullptr;
    bool stats_only = false;
    PyObject* stats = nullptr;
  };

  bool classify(PyObject* tensor, PyObject* same_as, PyObject* key, Outcome& o) {
    if (!takes(tensor)) return false;
    const at::Tensor& t = THPVariable_Unpack(tensor);
    int code = cpu_stats_code(t.scalar_type());
    c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    bool versioned = true;
    uint32_t version = 0;
    try {
      version = impl->version_counter().current_version();
    } catch (const c10::Error&) {
      versioned = false;  // an inference tensor has no version counter: never an alias
    }
    if (versioned) {
      // captured before and unchanged since (session._already_captured)
      auto it = seen_.find(impl);
      if (it != seen_.end() && it->second.version == version && !it->second.impl.expired() &&
          checksum(t) == it->second.checksum) {
        o.alias = it->second.key;
        o.stats = Py_NewRef(it->second.stats);
        return true;
      }
      // a view op's output holding exactly its input's elements (session._same_elements_as)
      if (same_as != Py_None && THPVariable_Check(same_as)) {
        const at::Tensor& base = THPVariable_Unpack(same_as);
        auto b = seen_.find(base.unsafeGetTensorImpl());
        if (b != seen_.end() && !b->second.impl.expired() && base_version(base) == (int64_t)b->second.version &&
            base.scalar_type() == t.scalar_type() && base.numel() == t.numel() && base.data_ptr() == t.data_ptr() &&
            base.layout() == at::kStrided && dense(base) && dense(t)) {
          o.stats_only = !(t.is_contiguous() && base.is_contiguous());  // the original's bytes are not in this order
          PyObject* original = b->second.key;  // (remember() may rehash the table under b)
          PyObject* stats = b->second.stats;
          remember(impl, version, original, stats, b->second.checksum);
          o.alias = original;  // (the table holds a reference for as long as this capture)
          o.stats = Py_NewRef(stats);
          return true;
        }
      }
    }
    double out[10];
    uint64_t sum;
    if (code >= 0 && dense(t)) {  // one pass: stats and checksum
      if (stats_(t.data_ptr(), t.numel(), code, out) != 0) return false;
      std::memcpy(&sum, out + 9, 8);
    } else {
      c10::impl::ExcludeDispatchKeyGuard no_python_dispatch(python_keys());
      at::Tensor elements = dense(t) ? t : t.contiguous();
      at::Tensor values = code >= 0 ? elements : elements.to(at::kDouble);
      if (stats_(values.data_ptr(), values.numel(), code >= 0 ? code : 1, out) != 0) return false;
      sum = checksum(elements);  // of the tensor's own bytes, as session._fingerprint
    }
    o.stats = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out), 9 * sizeof(double));
    if (o.stats == nullptr) throw py::error_already_set();
    if (versioned) remember(impl, version, key, o.stats, sum);
    return true;
  }

  // ((row text so far + the outcome and layout, key), stats, -2) into the batch; steals `stats`
  void append_text_row(PyObject* batch, std::string& row, PyObject* key, const Outcome& o, const at::Tensor& t,
                       PyObject* stats) {
    py::object keep_stats = py::reinterpret_steal<py::object>(stats);
    if (o.stats_only) row += ",\"stats_only\":true";
    if (o.alias != nullptr) {
      row += ",\"alias_of\":";
      json_str(row, o.alias);
    }
    json_layout(row, t);
    py::object row_text = py::reinterpret_steal<py::object>(text_object(row));
    if (!row_text) throw py::error_already_set();
    PyObject* payload = PyTuple_Pack(2, row_text.ptr(), key);
    if (payload == nullptr) throw py::error_already_set();
    append(batch, payload, keep_stats.release().ptr(), minus_two_);
    Py_DECREF(payload);
  }

  // A str of UTF-8 text: ASCII (the usual row) copied into a compact string without decoding
  static PyObject* text_object(const std::string& text) {
    bool ascii = true;
    for (unsigned char c : text) ascii &= c < 0x80;
    if (!ascii) return PyUnicode_FromStringAndSize(text.data(), (Py_ssize_t)text.size());
    PyObject* out = PyUnicode_New((Py_ssize_t)text.size(), 127);
    if (out != nullptr) std::memcpy(PyUnicode_1BYTE_DATA(out), text.data(), text.size());
    return out;
  }

  // The outcome and layout into a record dict, in the Python path's field order
  void to_dict(PyObject* rec, const Outcome& o, const at::Tensor& t) {
    if (o.stats_only && PyDict_SetItem(rec, k_stats_only_, Py_True)) throw py::error_already_set();
    if (o.alias != nullptr && PyDict_SetItem(rec, k_alias_, o.alias)) throw py::error_already_set();
    set_layout(rec, t);
  }

 public:
  // ---- JSON text of index rows (trace.row_text's, compact) ----
  static void json_str(std::string& out, PyObject* s) {
    Py_ssize_t n;
    const char* u = PyUnicode_AsUTF8AndSize(s, &n);
    if (u == nullptr) throw py::error_already_set();
    out += '"';
    Py_ssize_t plain = 0;  // the common case: nothing to escape, appended whole
    while (plain < n && (unsigned char)u[plain] >= 0x20 && u[plain] != '"' && u[plain] != '\\') ++plain;
    out.append(u, (size_t)plain);
    for (Py_ssize_t i = plain; i < n; ++i) {
      unsigned char c = (unsigned char)u[i];
      if (c == '"' || c == '\\') {
        out += '\\';
        out += (char)c;
      } else if (c < 0x20) {
        char esc[8];
        snprintf(esc, sizeof esc, "\\u%04x", c);
        out += esc;
      } else {
        out += (char)c;
      }
    }
    out += '"';
  }

  // A value as JSON, where it is a str, bool, int or None (false otherwise: the caller uses dicts).
  static bool json_value(std::string& out, PyObject* v) {
    if (v == Py_None) {
      out += "null";
    } else if (v == Py_True) {
      out += "true";
    } else if (v == Py_False) {
      out += "false";
    } else if (PyUnicode_CheckExact(v)) {
      if (PyUnicode_AsUTF8AndSize(v, nullptr) == nullptr) {  // (a lone surrogate)
        PyErr_Clear();
        return false;
      }
      json_str(out, v);
    } else if (PyLong_CheckExact(v)) {
      int overflow = 0;
      long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
      if (overflow || (x == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return false;
      }
      out += std::to_string(x);
    } else {
      return false;
    }
    return true;
  }

  // "{" and the dict's fields, without the closing brace
  static bool json_dict_fields(std::string& out, PyObject* d) {
    if (!PyDict_CheckExact(d)) return false;
    out += '{';
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    bool first = true;
    while (PyDict_Next(d, &pos, &k, &v)) {
      if (!PyUnicode_CheckExact(k)) return false;
      if (!first) out += ',';
      first = false;
      json_str(out, k);
      out += ':';
      if (!json_value(out, v)) return false;
    }
    return !first;  // (an empty base: no comma rules to keep; never the case)
  }

  void json_layout(std::string& out, const at::Tensor& t) {  // set_layout's fields
    auto ints = [&out](c10::IntArrayRef xs) {
      out += '[';
      for (size_t i = 0; i < xs.size(); ++i) {
        if (i) out += ',';
        out += std::to_string(xs[i]);
      }
      out += ']';
    };
    out += ",\"shape\":";
    ints(t.sizes());
    out += ",\"dtype\":";
    json_str(out, dtype_name(t.scalar_type()));
    out += ",\"device\":\"cpu\",\"stride\":";
    ints(t.strides());
    out += ",\"storage_offset\":" + std::to_string(t.storage_offset());
    out += t.is_contiguous() ? ",\"contiguous\":true" : ",\"contiguous\":false";
  }

 private:

  // Appends (record, stats item, marker) to the batch; steals the stats item.
  void append(PyObject* batch, PyObject* rec, PyObject* stats, PyObject* marker) {
    PyObject* triple = PyTuple_Pack(3, rec, stats, marker);
    Py_DECREF(stats);
    int err = triple ? PyList_Append(batch, triple) : -1;
    Py_XDECREF(triple);
    if (err) throw py::error_already_set();
  }

  PyObject* slot_name(PyObject* kind, Py_ssize_t i) {  // "in.0", made once
    auto key = std::make_pair(kind, i);
    auto it = slot_names_.find(key);
    if (it != slot_names_.end()) return it->second;
    PyObject* name = PyUnicode_FromFormat("%U.%zd", kind, i);
    if (name == nullptr) throw py::error_already_set();
    Py_INCREF(kind);  // the key's address must stay that string's
    slot_names_.emplace(key, name);
    return name;
  }

  static int64_t base_version(const at::Tensor& t) {
    try {
      return t.unsafeGetTensorImpl()->version_counter().current_version();
    } catch (const c10::Error&) {
      return -1;
    }
  }

  uint64_t checksum(const at::Tensor& t) const {  // cpu_stats.checksum (views with gaps: of a copy)
    if (!dense(t)) return strided_checksum(t);
    return checksum_(t.data_ptr(), t.numel(), (int)t.element_size());
  }

  // td_checksum of a view with gaps, read in place (its sums do not depend on the elements' order:
  // the value of td_checksum over a contiguous copy, without the copy)
  template <typename T, typename Acc>
  static void checksum_dims(const char* p, const int64_t* sizes, const int64_t* strides, int64_t dims, Acc mul, Acc& a,
                            Acc& b, Acc& c) {
    if (dims == 1) {
      const T* w = reinterpret_cast<const T*>(p);
      for (int64_t k = 0; k < sizes[0]; ++k) {
        Acc v = (Acc)w[k * strides[0]];
        a += v;
        b += v * mul;
        c ^= v;
      }
      return;
    }
    for (int64_t k = 0; k < sizes[0]; ++k)
      checksum_dims<T, Acc>(p + k * strides[0] * (int64_t)sizeof(T), sizes + 1, strides + 1, dims - 1, mul, a, b, c);
  }

  template <typename T, typename Acc>
  static uint64_t checksum_view(const at::Tensor& t, Acc mul) {
    Acc a = 0, b = 0, c = 0;
    if (t.dim() > 0)
      checksum_dims<T, Acc>(static_cast<const char*>(t.data_ptr()), t.sizes().data(), t.strides().data(), t.dim(), mul,
                            a, b, c);
    else
      checksum_dims<T, Acc>(static_cast<const char*>(t.data_ptr()), std::array<int64_t, 1>{1}.data(),
                            std::array<int64_t, 1>{1}.data(), 1, mul, a, b, c);
    uint64_t h = 1469598103934665603ull ^ (uint64_t)t.numel();
    h = (h ^ (uint64_t)a) * 1099511628211ull;
    h = (h ^ (uint64_t)b) * 1099511628211ull;
    return (h ^ (uint64_t)c) * 1099511628211ull;
  }

  uint64_t strided_checksum(const at::Tensor& t) const {
    switch (t.element_size()) {
      case 1: return checksum_view<uint8_t, uint32_t>(t, 0x9E3779B1u);
      case 2: return checksum_view<uint16_t, uint32_t>(t, 0x9E3779B1u);
      case 4: return checksum_view<uint32_t, uint32_t>(t, 0x9E3779B1u);
      case 8: return checksum_view<uint64_t, uint64_t>(t, 0x9E3779B97F4A7C15ull);
      default: {
        c10::impl::ExcludeDispatchKeyGuard no_python_dispatch(python_keys());
        return checksum(t.contiguous());
      }
    }
  }

  void remember(c10::TensorImpl* impl, uint32_t version, PyObject* key, PyObject* stats, uint64_t sum) {
    Py_INCREF(key);
    Py_INCREF(stats);
    auto weak = c10::weak_intrusive_ptr<c10::TensorImpl>(c10::intrusive_ptr<c10::TensorImpl>::reclaim_copy(impl));
    auto it = seen_.find(impl);
    if (it != seen_.end()) {
      Py_DECREF(it->second.key);
      Py_DECREF(it->second.stats);
      it->second = CpuSeen{std::move(weak), version, key, stats, sum};
    } else {
      seen_.emplace(impl, CpuSeen{std::move(weak), version, key, stats, sum});
    }
  }

  PyObject* dtype_name(at::ScalarType s) {  // snapshot.tensor_layout's "float32"
    auto it = dtype_names_.find((int)s);
    if (it != dtype_names_.end()) return it->second;
    PyObject* full = PyObject_Str((PyObject*)torch::getTHPDtype(s));
    if (full == nullptr) throw py::error_already_set();
    Py_ssize_t n = PyUnicode_GET_LENGTH(full);
    PyObject* name = n > 6 ? PyUnicode_Substring(full, 6, n) : Py_NewRef(full);  // drop "torch."
    Py_DECREF(full);
    if (name == nullptr) throw py::error_already_set();
    dtype_names_.emplace((int)s, name);
    return name;
  }

  // snapshot.tensor_layout's fields, into the record
  void set_layout(PyObject* rec, const at::Tensor& t) {
    auto sizes = t.sizes();
    auto strides = t.strides();
    PyObject* shape = PyList_New((Py_ssize_t)sizes.size());
    PyObject* stride = PyList_New((Py_ssize_t)strides.size());
    if (shape == nullptr || stride == nullptr) {
      Py_XDECREF(shape);
      Py_XDECREF(stride);
      throw py::error_already_set();
    }
    for (size_t i = 0; i < sizes.size(); ++i) {
      PyList_SET_ITEM(shape, i, PyLong_FromLongLong(sizes[i]));
      PyList_SET_ITEM(stride, i, PyLong_FromLongLong(strides[i]));
    }
    PyObject* offset = PyLong_FromLongLong(t.storage_offset());
    int err = PyDict_SetItem(rec, k_shape_, shape) | PyDict_SetItem(rec, k_dtype_, dtype_name(t.scalar_type())) |
              PyDict_SetItem(rec, k_device_, cpu_) | PyDict_SetItem(rec, k_stride_, stride) |
              PyDict_SetItem(rec, k_offset_, offset) |
              PyDict_SetItem(rec, k_contiguous_, t.is_contiguous() ? Py_True : Py_False);
    Py_DECREF(shape);
    Py_DECREF(stride);
    Py_XDECREF(offset);
    if (err) throw py::error_already_set();
  }

  int64_t count_ = 0;
  PyObject* writer_ = nullptr;  // attach()
  CpuStatsFn stats_;
  ChecksumFn checksum_;
  struct PairHash {
    size_t operator()(const std::pair<PyObject*, Py_ssize_t>& k) const {
      return std::hash<void*>()(k.first) ^ ((size_t)k.second * 1000003u);
    }
  };
  std::unordered_map<std::pair<PyObject*, Py_ssize_t>, PyObject*, PairHash> slot_names_;
  PyObject *minus_one_, *minus_two_;
  std::unordered_map<c10::TensorImpl*, CpuSeen> seen_;
  std::unordered_map<int, PyObject*> dtype_names_;
  PyObject *k_key_, *k_slot_, *k_alias_, *k_stats_only_, *k_shape_, *k_dtype_, *k_device_, *k_stride_, *k_offset_,
      *k_contiguous_, *cpu_;
};


// ---- OpHandler: the op probe's dispatch handler, out of Python (probes/dispatch_ops.py) --------
//
// Bound as an OpProbe's __torch_dispatch__ when its records all go through CpuRecords (a CPU model,
// stats only, no replay, no crash breadcrumbs, a writer with a thread): the Python handler cost
// ~12 us per op around the op itself (naming, the module scope, the source line, the tensor list,
// two record calls), more than the small ops of a CPU forward. It does what OpProbe.__torch_dispatch__
// and OpRecorder do, in the same order and with the same fields, and hands every case it does not
// cover (an allocation that leaves memory uninitialised, a tensor CpuRecords does not take, no module
// scope, keyword calls) to the Python code: `fallback` (the probe's own handler) or `emit_rest`
// (session.emit_op from a given tensor on).

struct FuncInfo {
  PyObject* name;        // "aten::mm"
  PyObject* short_name;  // "mm"
  PyObject* op;          // what runs it: func._op (OpOverload.__call__ only forwards to it), or func
  bool is_view, ignored, uninit;
};

struct OpHandlerObject {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  PyObject* session;
  PyObject* writer;
  PyObject* records_obj;  // the pybind11 CpuRecords, kept alive
  PyObject* call_of;      // the probe's dict: scope -> call number
  PyObject* fallback;     // the probe's Python handler: fallback(func, types, args, kwargs)
  PyObject* func_info;    // func -> (name, short name, is a view, ignored, allocates uninitialised)
  PyObject* output_tensors;
  PyObject* emit_rest;    // session.emit_op(base, prefix, kind, tensors, save_data, same_as, extra, start)
  PyObject* is_skipped;
  CpuRecords* records;
  std::unordered_map<PyObject*, FuncInfo>* infos;
};

const FuncInfo& func_info(OpHandlerObject* self, PyObject* func) {
  auto it = self->infos->find(func);
  if (it != self->infos->end()) return it->second;
  py::object info = check(PyObject_CallOneArg(self->func_info, func));
  if (!PyTuple_Check(info.ptr()) || PyTuple_GET_SIZE(info.ptr()) != 5)
    throw std::runtime_error("OpHandler: func_info must return a 5-tuple");
  PyObject* op = PyObject_GetAttrString(func, "_op");
  if (op == nullptr) {
    PyErr_Clear();
    op = Py_NewRef(func);
  }
  PyObject* t = info.ptr();
  FuncInfo fi{Py_NewRef(PyTuple_GET_ITEM(t, 0)), Py_NewRef(PyTuple_GET_ITEM(t, 1)), op,
              PyObject_IsTrue(PyTuple_GET_ITEM(t, 2)) == 1, PyObject_IsTrue(PyTuple_GET_ITEM(t, 3)) == 1,
              PyObject_IsTrue(PyTuple_GET_ITEM(t, 4)) == 1};
  Py_INCREF(func);  // the key stays alive (OpOverloads live as long as the process anyway)
  return self->infos->emplace(func, fi).first->second;
}

// dispatch_ops.op_tensors: tensor arguments in tree_flatten((args, kwargs)) order (one level of lists)
void add_tensors(PyObject* list, PyObject* a) {
  if (THPVariable_Check(a)) {
    if (PyList_Append(list, a)) throw PythonError();
  } else if (PyList_Check(a) || PyTuple_Check(a)) {
    PyObject* fast = PySequence_Fast(a, "");
    if (fast == nullptr) throw PythonError();
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(fast); ++j) {
      PyObject* b = PySequence_Fast_GET_ITEM(fast, j);
      if (THPVariable_Check(b) && PyList_Append(list, b)) {
        Py_DECREF(fast);
        throw PythonError();
      }
    }
    Py_DECREF(fast);
  }
}

// An op's record fields as a dict, made only when Python code needs them (OpProbe.__torch_dispatch__'s
// `base`, in its order); the values are borrowed from the handler's frame.
struct LazyBase {
  PyObject *direction, *module, *scope, *call, *op, *op_index, *source;
  bool drill;
  py::object dict;
  PyObject* get() {
    if (dict) return dict.ptr();
    Names& n = names();
    py::object d = check(PyDict_New());
    PyObject* b = d.ptr();
    if (PyDict_SetItem(b, n.kind, n.op) || PyDict_SetItem(b, n.direction, direction) ||
        PyDict_SetItem(b, n.module, module) || PyDict_SetItem(b, n.scope, scope) || PyDict_SetItem(b, n.call, call) ||
        PyDict_SetItem(b, n.op, op) || PyDict_SetItem(b, n.op_index, op_index) || PyDict_SetItem(b, n.source, source) ||
        (drill && PyDict_SetItem(b, n.drill, Py_True)))
      throw PythonError();
    dict = std::move(d);
    return dict.ptr();
  }
};

// The records of one op's tensors, as session.emit_op does on its native path: into the writer's
// batch (TraceWriter.native_batch / native_added), the rest by the session from the first tensor
// CpuRecords does not take. `head`: the op's fields as JSON text, made once for its records.
void emit_records(OpHandlerObject* self, LazyBase& base, const std::string& head, PyObject* prefix, PyObject* kind,
                  PyObject* tensors, PyObject* same_as) {
  CpuRecords* rec = self->records;
  py::object batch = rec->writer_batch();
  int64_t stop = rec->emit_op_with(Py_None, &head, prefix, kind, tensors, 0, same_as, batch.ptr());
  rec->writer_added(batch.ptr());
  if (stop >= 0) {
    py::object start = check(PyLong_FromLongLong(stop));
    PyObject* argv[] = {base.get(), prefix, kind, tensors, Py_None, same_as, Py_None, start.ptr()};
    check(PyObject_Vectorcall(self->emit_rest, argv, 8, nullptr));
  }
}

PyObject* call_fallback(OpHandlerObject* self, PyObject* func, PyObject* types, PyObject* args, PyObject* kwargs) {
  PyObject* argv[] = {func, types, args, kwargs};
  return PyObject_Vectorcall(self->fallback, argv, 4, nullptr);
}

// (mode, func, types, args, kwargs): called through a method bound to the probe
PyObject* op_handler_vectorcall(PyObject* callable, PyObject* const* argv, size_t nargsf, PyObject* kwnames) {
  auto* self = reinterpret_cast<OpHandlerObject*>(callable);
  Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  if (nargs < 1) {
    PyErr_SetString(PyExc_TypeError, "OpHandler: called without the mode");
    return nullptr;
  }
  if (kwnames != nullptr || nargs < 4 || nargs > 5 || !PyTuple_Check(argv[3]) ||
      (nargs == 5 && argv[4] != Py_None && !PyDict_Check(argv[4])))
    return PyObject_Vectorcall(self->fallback, argv + 1, nargs - 1, kwnames);
  PyObject *func = argv[1], *types = argv[2], *args = argv[3], *kwargs = nargs == 5 ? argv[4] : Py_None;
  PyObject* kw = kwargs != Py_None && PyDict_GET_SIZE(kwargs) ? kwargs : nullptr;
  Names& n = names();
  try {
    const FuncInfo& info = func_info(self, func);
    if (info.ignored || PyObject_IsTrue(attr(self->session, n.busy).ptr()) == 1)
      return PyObject_Call(info.op, args, kw);  // our own work, or an op never recorded
    py::object uninit = attr(self->session, n.uninit);
    py::object scopes = attr(self->session, n.scopes);
    if (info.uninit || !PyDict_Check(uninit.ptr()) || PyDict_GET_SIZE(uninit.ptr()) || !PyList_Check(scopes.ptr()) ||
        PyList_GET_SIZE(scopes.ptr()) == 0)
      return call_fallback(self, func, types, args, kwargs);
    PyObject* innermost = PyList_GET_ITEM(scopes.ptr(), PyList_GET_SIZE(scopes.ptr()) - 1);
    if (!PyTuple_Check(innermost) || PyTuple_GET_SIZE(innermost) != 2)
      return call_fallback(self, func, types, args, kwargs);
    py::object module = py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(innermost, 0));
    py::object scope = py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(innermost, 1));
    if (!PyUnicode_Check(scope.ptr())) return call_fallback(self, func, types, args, kwargs);
    // op index in the scope (session.op_counts) and the scope's call number (probe._call_of)
    py::object counts = attr(self->session, n.op_counts);
    if (!PyDict_Check(counts.ptr())) return call_fallback(self, func, types, args, kwargs);
    PyObject* seen = PyDict_GetItemWithError(counts.ptr(), scope.ptr());
    if (seen == nullptr && PyErr_Occurred()) throw PythonError();
    long long index = seen ? PyLong_AsLongLong(seen) : 0;
    if (index == -1 && PyErr_Occurred()) throw PythonError();
    PyObject* call = PyDict_GetItemWithError(self->call_of, scope.ptr());  // borrowed
    if (call == nullptr) {
      if (PyErr_Occurred()) throw PythonError();
      Py_ssize_t at = PyUnicode_FindChar(scope.ptr(), '#', 0, PyUnicode_GET_LENGTH(scope.ptr()), -1);
      if (at < 0) return call_fallback(self, func, types, args, kwargs);
      py::object digits = check(PyUnicode_Substring(scope.ptr(), at + 1, PyUnicode_GET_LENGTH(scope.ptr())));
      py::object number = check(PyLong_FromUnicodeObject(digits.ptr(), 10));
      if (PyDict_SetItem(self->call_of, scope.ptr(), number.ptr())) throw PythonError();
      call = number.ptr();  // (the dict holds it now)
    }
    py::object direction = attr(self->session, n.direction);
    bool drilling = PyObject_IsTrue(attr(self->session, n.drilling).ptr()) == 1;
    // 3 frames of the Python handler (it, torch's dynamo-disable wrapper and its caller) are not
    // walked here: the same 64-frame reach as source_lines.user_source_line from there
    int32_t source_id = source_string_id(self->is_skipped, 61);
    PyObject* source = source_id < 0 ? n.empty : tables().strings.get(source_id);
    // The record fields of OpProbe.__torch_dispatch__, in its order, as the JSON text that starts
    // each row; as a dict (`base`) only for the Python code that takes a tensor CpuRecords does not.
    // (A value the encoder does not write: the Python handler does the op, counted by it alone.)
    std::string head = "{\"kind\":\"op\"";
    auto field = [&head](const char* name, PyObject* value) {
      head += ",\"";
      head += name;
      head += "\":";
      return CpuRecords::json_value(head, value);
    };
    py::object op_index = check(PyLong_FromLongLong(index));
    if (!field("direction", direction.ptr()) || !field("module", module.ptr()) || !field("scope", scope.ptr()) ||
        !field("call", call) || !field("op", info.name) || !field("op_index", op_index.ptr()) ||
        !field("source", source))
      return call_fallback(self, func, types, args, kwargs);
    if (drilling) head += ",\"drill\":true";
    py::object next = check(PyLong_FromLongLong(index + 1));
    if (PyDict_SetItem(counts.ptr(), scope.ptr(), next.ptr())) throw PythonError();
    LazyBase base{direction.ptr(), module.ptr(), scope.ptr(), call, info.name, op_index.ptr(), source, drilling};
    char digits[32];
    snprintf(digits, sizeof digits, "%04lld", index);  // schema.op_prefix
    py::object prefix = check(PyUnicode_FromFormat("%U/op%s.%U", scope.ptr(), digits, info.short_name));
    // OpRecorder.on_op_start: the inputs before the op runs (an in-place op's old value)
    py::object tensors = check(PyList_New(0));
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args); ++i) add_tensors(tensors.ptr(), PyTuple_GET_ITEM(args, i));
    if (kw != nullptr) {
      Py_ssize_t pos = 0;
      PyObject *key, *value;
      while (PyDict_Next(kw, &pos, &key, &value)) add_tensors(tensors.ptr(), value);
    }
    if (PyList_GET_SIZE(tensors.ptr()))
      emit_records(self, base, head, prefix.ptr(), n.in, tensors.ptr(), Py_None);
    py::object out = check(PyObject_Call(info.op, args, kw));
    // OpRecorder.on_op: the outputs; a view's output may hold exactly its input's elements
    if (THPVariable_Check(out.ptr())) {
      PyObject* same_as = info.is_view && PyTuple_GET_SIZE(args) && THPVariable_Check(PyTuple_GET_ITEM(args, 0))
                              ? PyTuple_GET_ITEM(args, 0) : Py_None;
      py::object one = check(PyList_New(1));
      PyList_SET_ITEM(one.ptr(), 0, Py_NewRef(out.ptr()));
      emit_records(self, base, head, prefix.ptr(), n.out, one.ptr(), same_as);
    } else {
      py::object outs = check(PyObject_CallOneArg(self->output_tensors, out.ptr()));
      if (!PyList_Check(outs.ptr())) throw std::runtime_error("OpHandler: output_tensors must return a list");
      if (PyList_GET_SIZE(outs.ptr())) emit_records(self, base, head, prefix.ptr(), n.out, outs.ptr(), Py_None);
    }
    return out.release().ptr();
  } catch (...) {
    set_error_from_cpp();
    return nullptr;
  }
}

int op_handler_traverse(PyObject* o, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<OpHandlerObject*>(o);
  Py_VISIT(self->session);
  Py_VISIT(self->writer);
  Py_VISIT(self->records_obj);
  Py_VISIT(self->call_of);
  Py_VISIT(self->fallback);
  Py_VISIT(self->func_info);
  Py_VISIT(self->output_tensors);
  Py_VISIT(self->emit_rest);
  Py_VISIT(self->is_skipped);
  return 0;
}

int op_handler_clear(PyObject* o) {
  auto* self = reinterpret_cast<OpHandlerObject*>(o);
  self->records = nullptr;
  Py_CLEAR(self->session);
  Py_CLEAR(self->writer);
  Py_CLEAR(self->records_obj);
  Py_CLEAR(self->call_of);
  Py_CLEAR(self->fallback);
  Py_CLEAR(self->func_info);
  Py_CLEAR(self->output_tensors);
  Py_CLEAR(self->emit_rest);
  Py_CLEAR(self->is_skipped);
  return 0;
}

void op_handler_dealloc(PyObject* o) {
  PyObject_GC_UnTrack(o);
  op_handler_clear(o);
  auto* self = reinterpret_cast<OpHandlerObject*>(o);
  if (self->infos != nullptr) {
    for (auto& kv : *self->infos) {
      Py_DECREF(kv.first);
      Py_DECREF(kv.second.name);
      Py_DECREF(kv.second.short_name);
      Py_DECREF(kv.second.op);
    }
    delete self->infos;
    self->infos = nullptr;
  }
  Py_TYPE(o)->tp_free(o);
}

// OpHandler(session, writer, records, call_of, fallback, func_info, output_tensors, emit_rest, is_skipped)
PyObject* op_handler_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  PyObject *session, *writer, *records, *call_of, *fallback, *func_info_fn, *output_tensors, *emit_rest, *is_skipped;
  if (!PyArg_ParseTuple(args, "OOOO!OOOOO:OpHandler", &session, &writer, &records, &PyDict_Type, &call_of, &fallback,
                        &func_info_fn, &output_tensors, &emit_rest, &is_skipped))
    return nullptr;
  CpuRecords* rec;
  try {
    rec = py::cast<CpuRecords*>(py::handle(records));
  } catch (...) {
    PyErr_SetString(PyExc_TypeError, "OpHandler: records must be a fast_records.CpuRecords");
    return nullptr;
  }
  names();
  auto* self = reinterpret_cast<OpHandlerObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  self->vectorcall = op_handler_vectorcall;
  self->session = Py_NewRef(session);
  self->writer = Py_NewRef(writer);
  self->records_obj = Py_NewRef(records);
  self->call_of = Py_NewRef(call_of);
  self->fallback = Py_NewRef(fallback);
  self->func_info = Py_NewRef(func_info_fn);
  self->output_tensors = Py_NewRef(output_tensors);
  self->emit_rest = Py_NewRef(emit_rest);
  self->is_skipped = Py_NewRef(is_skipped);
  self->records = rec;
  self->infos = new std::unordered_map<PyObject*, FuncInfo>();
  try {
    rec->attach(py::handle(writer));
  } catch (...) {
    Py_DECREF(self);
    set_error_from_cpp();
    return nullptr;
  }
  return reinterpret_cast<PyObject*>(self);
}

PyTypeObject OpHandlerType = {PyVarObject_HEAD_INIT(nullptr, 0)};

bool init_op_handler_type(PyObject* module) {
  OpHandlerType.tp_name = "tensordiff_fast_records.OpHandler";
  OpHandlerType.tp_basicsize = sizeof(OpHandlerObject);
  OpHandlerType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL;
  OpHandlerType.tp_doc = "An op probe's dispatch handler over CpuRecords (fast_records.cpp).";
  OpHandlerType.tp_new = op_handler_new;
  OpHandlerType.tp_dealloc = op_handler_dealloc;
  OpHandlerType.tp_traverse = op_handler_traverse;
  OpHandlerType.tp_clear = op_handler_clear;
  OpHandlerType.tp_call = PyVectorcall_Call;
  OpHandlerType.tp_vectorcall_offset = offsetof(OpHandlerObject, vectorcall);
  if (PyType_Ready(&OpHandlerType) < 0) return false;
  Py_INCREF(&OpHandlerType);
  return PyModule_AddObject(module, "OpHandler", reinterpret_cast<PyObject*>(&OpHandlerType)) == 0;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef TENSORDIFF_PART_TIMES
  m.def("part_times", []() {
    py::list out;
    for (long long v : g_part) out.append(v);
    return out;
  });
#endif
  py::class_<Recorder>(m, "Recorder")
      .def(py::init<int64_t, int64_t, py::object, bool>())
      .def("record", &Recorder::record)
      .def("pending", &Recorder::pending)
      .def("forget", &Recorder::forget)
      .def("detach", &Recorder::detach)
      .def("enter", &Recorder::enter)
      .def("leave", &Recorder::leave);
  py::class_<CpuRecords>(m, "CpuRecords")
      .def(py::init<int64_t, int64_t>())
      .def("emit", &CpuRecords::emit)
      .def("emit_op", &CpuRecords::emit_op)
      .def("emit_module", &CpuRecords::emit_module)
      .def("attach", &CpuRecords::attach)
      .def("forget", &CpuRecords::forget)
      .def("close", &CpuRecords::close)
      .def_property_readonly("count", &CpuRecords::count)
      .def("__len__", &CpuRecords::size);
  py::class_<Block>(m, "Block")
      .def("__len__", &Block::size)
      .def("records", &Block::records)
      .def("buffers", &Block::buffers_list);
  if (!init_probed_type(m.ptr()) || !init_op_handler_type(m.ptr())) throw py::error_already_set();
}
