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
#include <cmath>
#include <cstring>
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
  int32_t source_id(PyObject* is_skipped) {
    PyFrameObject* frame = PyEval_GetFrame();  // borrowed
    Py_XINCREF(frame);
    for (int i = 0; frame != nullptr && i < 64; ++i) {
      PyCodeObject* code = PyFrame_GetCode(frame);  // new reference
      auto it = skip_.find(code);
      bool skip;
      if (it == skip_.end()) {
        PyObject* res = PyObject_CallOneArg(is_skipped, code->co_filename);
        if (res == nullptr) {
          Py_DECREF(code);
          Py_DECREF(frame);
          throw PythonError();
        }
        skip = PyObject_IsTrue(res) == 1;
        Py_DECREF(res);
        Py_INCREF(code);  // the key stays alive: its address must not be reused
        skip_.emplace(code, skip);
      } else {
        skip = it->second;
      }
      if (!skip) {
#if PY_VERSION_HEX >= 0x030B0000
        SourceKey key{code, PyFrame_GetLasti(frame)};
#else
        SourceKey key{code, frame->f_lasti};
#endif
        auto hit = sources_.find(key);
        int32_t id;
        if (hit != sources_.end()) {
          id = hit->second;
        } else {
          id = strings_->add_new(PyUnicode_FromFormat("%U:%d in %U", code->co_filename,
                                                      PyFrame_GetLineNumber(frame), code->co_name));
          Py_INCREF(code);
          sources_.emplace(key, id);
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
// stats pass (cpu_stats.c, reached through its address) into a row of a float64 chunk the session
// owns. The layout and the alias go into the caller's record dict; the session hands the record to
// the writer with its chunk row.

using CpuStatsFn = int (*)(const void*, int64_t, int, double*);
using ChecksumFn = uint64_t (*)(const void*, int64_t, int);

struct CpuSeen {
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  uint32_t version;
  PyObject* key;  // owned
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

class CpuRecords {
 public:
  CpuRecords(int64_t stats_fn, int64_t checksum_fn, py::object new_chunk)
      : stats_(reinterpret_cast<CpuStatsFn>(stats_fn)), checksum_(reinterpret_cast<ChecksumFn>(checksum_fn)),
        new_chunk_(std::move(new_chunk)) {
    minus_one_ = PyLong_FromLong(-1);
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
    for (auto& kv : slot_names_) {
      Py_DECREF(kv.second);
      Py_DECREF(kv.first.first);
    }
    for (PyObject* o : {minus_one_, k_key_, k_slot_, k_alias_, k_stats_only_, k_shape_, k_dtype_, k_device_, k_stride_, k_offset_,
                        k_contiguous_, cpu_})
      Py_XDECREF(o);
    for (auto& kv : dtype_names_) Py_XDECREF(kv.second);
  }
  CpuRecords(const CpuRecords&) = delete;
  CpuRecords& operator=(const CpuRecords&) = delete;

  // One record of a tensor whose data is not kept: when this path handles it (a dense CPU float
  // tensor), its layout (and alias) go into `record` and (record, (chunk, row) or None for an alias,
  // -1) is appended to `batch`, the writer's list (TraceWriter.native_batch); returns false otherwise.
  bool emit(py::handle record, py::handle tensor, py::handle same_as, py::handle batch) {
    PyObject* stats = emit_one(record.ptr(), tensor.ptr(), same_as.ptr());
    if (stats == nullptr) return false;
    append(batch.ptr(), record.ptr(), stats);
    return true;
  }

  // The records of one op's tensors from index `start` on (session.emit_op): each a copy of `base`
  // with key "<prefix>/<kind>.<i>" and slot "<kind>.<i>", emitted as emit() does (`same_as` applies
  // to the first). Stops at the first tensor this path does not take and returns its index (the
  // caller records it and calls again after it, which keeps the records in order); -1 when done.
  int64_t emit_op(py::handle base, py::handle prefix, py::handle kind, py::handle tensors, int64_t start,
                  py::handle same_as, py::handle batch) {
    PyObject* seq = tensors.ptr();
    if (!PyList_Check(seq)) throw py::type_error("emit_op: tensors must be a list");
    for (Py_ssize_t i = start; i < PyList_GET_SIZE(seq); ++i) {
      PyObject* t = PyList_GET_ITEM(seq, i);
      if (!takes(t)) return i;
      PyObject* slot = slot_name(kind.ptr(), i);
      PyObject* rec = PyDict_Copy(base.ptr());
      PyObject* key = rec ? PyUnicode_FromFormat("%U/%U", prefix.ptr(), slot) : nullptr;
      if (key == nullptr || PyDict_SetItem(rec, k_key_, key) || PyDict_SetItem(rec, k_slot_, slot)) {
        Py_XDECREF(key);
        Py_XDECREF(rec);
        throw py::error_already_set();
      }
      Py_DECREF(key);
      try {
        PyObject* stats = emit_one(rec, t, i == 0 ? same_as.ptr() : Py_None);
        if (stats == nullptr) throw std::logic_error("emit_op: a tensor takes() accepted was refused");
        append(batch.ptr(), rec, stats);
      } catch (...) {
        Py_DECREF(rec);
        throw;
      }
      Py_DECREF(rec);
    }
    return -1;
  }

  // Forget tensor identities (the session's capture is over).
  void forget() {
    for (auto& kv : seen_) Py_DECREF(kv.second.key);
    seen_.clear();
  }

  int64_t size() const { return (int64_t)seen_.size(); }

 private:
  // emit()'s work: the stats item for the writer (a new reference: (chunk, row), or None for an
  // alias), or nullptr where this path does not take the tensor.
  // A dense CPU float tensor: the tensors this path records.
  static bool takes(PyObject* tensor) {
    if (!THPVariable_Check(tensor)) return false;
    const at::Tensor& t = THPVariable_Unpack(tensor);
    return t.is_cpu() && t.layout() == at::kStrided && t.numel() > 0 && cpu_stats_code(t.scalar_type()) >= 0 &&
           dense(t);
  }

  PyObject* emit_one(PyObject* rec, PyObject* tensor, PyObject* same_as) {
    if (!takes(tensor)) return nullptr;
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
        if (PyDict_SetItem(rec, k_alias_, it->second.key)) throw py::error_already_set();
        set_layout(rec, t);
        Py_RETURN_NONE;
      }
      // a view op's output holding exactly its input's elements (session._same_elements_as)
      if (same_as != Py_None && THPVariable_Check(same_as)) {
        const at::Tensor& base = THPVariable_Unpack(same_as);
        auto b = seen_.find(base.unsafeGetTensorImpl());
        if (b != seen_.end() && !b->second.impl.expired() && base_version(base) == (int64_t)b->second.version &&
            base.scalar_type() == t.scalar_type() && base.numel() == t.numel() && base.data_ptr() == t.data_ptr() &&
            base.layout() == at::kStrided && dense(base)) {
          if (!(t.is_contiguous() && base.is_contiguous()) && PyDict_SetItem(rec, k_stats_only_, Py_True))
            throw py::error_already_set();  // the original's bytes are not in this order
          if (PyDict_SetItem(rec, k_alias_, b->second.key)) throw py::error_already_set();
          PyObject* key = b->second.key;  // (remember() may rehash the table under b)
          remember(impl, version, key, b->second.checksum);
          set_layout(rec, t);
          Py_RETURN_NONE;
        }
      }
    }
    if (next_ >= rows_) new_chunk();
    double* out = chunk_ + 10 * next_;
    if (stats_(t.data_ptr(), t.numel(), code, out) != 0) return nullptr;
    uint64_t sum;
    std::memcpy(&sum, out + 9, 8);
    if (versioned) {
      PyObject* key = PyDict_GetItemWithError(rec, k_key_);  // borrowed
      if (key == nullptr) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyError, "key");
        throw py::error_already_set();
      }
      remember(impl, version, key, sum);
    }
    set_layout(rec, t);
    PyObject* row = PyLong_FromLongLong(next_++);
    PyObject* item = row ? PyTuple_Pack(2, chunk_obj_.ptr(), row) : nullptr;
    Py_XDECREF(row);
    if (item == nullptr) throw py::error_already_set();
    return item;
  }

  // Appends (record, stats item, -1) to the batch; steals the stats item.
  void append(PyObject* batch, PyObject* rec, PyObject* stats) {
    PyObject* triple = PyTuple_Pack(3, rec, stats, minus_one_);
    Py_DECREF(stats);
    int err = triple ? PyList_Append(batch, triple) : -1;
    Py_XDECREF(triple);
    if (err) throw py::error_already_set();
  }

  // A fresh float64 [rows, 10] chunk from Python (never reused: queued records point into it).
  void new_chunk() {
    py::object chunk = new_chunk_();
    Py_buffer view;
    if (PyObject_GetBuffer(chunk.ptr(), &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
    chunk_ = static_cast<double*>(view.buf);
    rows_ = view.len / (10 * (Py_ssize_t)sizeof(double));
    PyBuffer_Release(&view);  // chunk_obj_ keeps the memory
    chunk_obj_ = std::move(chunk);
    next_ = 0;
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

  uint64_t checksum(const at::Tensor& t) const {  // cpu_stats.checksum of a dense tensor
    return checksum_(t.data_ptr(), t.numel(), (int)t.element_size());
  }

  void remember(c10::TensorImpl* impl, uint32_t version, PyObject* key, uint64_t sum) {
    Py_INCREF(key);
    auto weak = c10::weak_intrusive_ptr<c10::TensorImpl>(c10::intrusive_ptr<c10::TensorImpl>::reclaim_copy(impl));
    auto it = seen_.find(impl);
    if (it != seen_.end()) {
      Py_DECREF(it->second.key);
      it->second = CpuSeen{std::move(weak), version, key, sum};
    } else {
      seen_.emplace(impl, CpuSeen{std::move(weak), version, key, sum});
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

  CpuStatsFn stats_;
  ChecksumFn checksum_;
  py::object new_chunk_;
  py::object chunk_obj_;
  double* chunk_ = nullptr;
  int64_t rows_ = 0, next_ = 0;
  struct PairHash {
    size_t operator()(const std::pair<PyObject*, Py_ssize_t>& k) const {
      return std::hash<void*>()(k.first) ^ ((size_t)k.second * 1000003u);
    }
  };
  std::unordered_map<std::pair<PyObject*, Py_ssize_t>, PyObject*, PairHash> slot_names_;
  PyObject* minus_one_;
  std::unordered_map<c10::TensorImpl*, CpuSeen> seen_;
  std::unordered_map<int, PyObject*> dtype_names_;
  PyObject *k_key_, *k_slot_, *k_alias_, *k_stats_only_, *k_shape_, *k_dtype_, *k_device_, *k_stride_, *k_offset_,
      *k_contiguous_, *cpu_;
};

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
      .def(py::init<int64_t, int64_t, py::object>())
      .def("emit", &CpuRecords::emit)
      .def("emit_op", &CpuRecords::emit_op)
      .def("forget", &CpuRecords::forget)
      .def("__len__", &CpuRecords::size);
  py::class_<Block>(m, "Block")
      .def("__len__", &Block::size)
      .def("records", &Block::records)
      .def("buffers", &Block::buffers_list);
  if (!init_probed_type(m.ptr())) throw py::error_already_set();
}
