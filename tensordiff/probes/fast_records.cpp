// The per-record work of fast module-level GPU stats, out of Python.
//
// The forward wrappers (probes/module_hooks.py) hand each module call's args, kwargs and output to
// Recorder.record(). For every tensor inside (tuples, lists and dicts walked here; anything else is
// flattened by the Python callable given at construction) it
//   * recognises data captured before and unchanged since (same TensorImpl, or a contiguous view of
//     the same memory, with the same version counter, while the captured tensor is alive): an alias
//     record, nothing launched;
//   * otherwise launches the fused stats kernel (fused_stats.cu, through the function pointer of the
//     nvcc-built library) on the caller's stream into the next row of a device buffer.
// The Python version of this costs ~10-15 us per record on the lent H100's host; this ~1 us.
// take() hands the records (as tuples for TraceWriter.write_block) and the stats buffers to Python.
#include <torch/extension.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <string>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

using LaunchFn = int (*)(const void*, long long, int, long long, char*, long long, void*);

struct Record {
  py::object module, direction, source;
  int64_t call;
  std::string slot;
  std::vector<int64_t> shape, stride;
  int64_t offset;
  at::ScalarType dtype;
  std::string device;
  int64_t row;    // global row over this block's buffers; -1 for an alias
  bool is_alias = false;  // then alias_* name the original record
  py::object alias_module, alias_direction;
  int64_t alias_call = 0;
  std::string alias_slot;
};

// Records and their stats buffers, handed from the model's thread to the writer's.
struct Block {
  std::vector<Record> recs;
  std::vector<at::Tensor> buffers;
  std::vector<std::vector<int64_t>> numels;

  int64_t size() const { return (int64_t)recs.size(); }

  // tuples for TraceWriter.write_block
  py::list records() const {
    py::list out;
    for (auto& r : recs) {
      py::tuple shape(r.shape.size()), stride(r.stride.size());
      for (size_t i = 0; i < r.shape.size(); ++i) shape[i] = r.shape[i];
      for (size_t i = 0; i < r.stride.size(); ++i) stride[i] = r.stride[i];
      py::object dtype = py::reinterpret_borrow<py::object>((PyObject*)torch::getTHPDtype(r.dtype));
      py::tuple rid = py::make_tuple(r.module, r.direction, r.call, r.slot);
      py::object alias = r.is_alias ? (py::object)py::make_tuple(r.alias_module, r.alias_direction, r.alias_call,
                                                                 r.alias_slot)
                                    : py::none();
      out.append(py::make_tuple(rid, r.source, shape, stride, r.offset, dtype, r.row, alias, r.device));
    }
    return out;
  }

  // [(raw buffer, rows, numels), ...]
  py::list buffers_list() const {
    py::list out;
    for (size_t i = 0; i < buffers.size(); ++i) {
      py::list numel;
      for (auto n : numels[i]) numel.append(n);
      out.append(py::make_tuple(buffers[i], (int64_t)numels[i].size(), numel));
    }
    return out;
  }
};

struct Seen {
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  uint32_t version;
  py::object module, direction;  // the original record's id, turned into a tuple only at take()
  int64_t call;
  std::string slot;
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

int launch_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    case at::kDouble: return 3;
    default: return -1;
  }
}

class Recorder {
 public:
  // accept_cpu: tests only (no launcher; rows are assigned, stats stay empty).
  Recorder(int64_t launch_fn, int64_t capacity, py::object flatten, bool accept_cpu)
      : launch_(reinterpret_cast<LaunchFn>(launch_fn)), capacity_(capacity), flatten_(std::move(flatten)),
        accept_cpu_(accept_cpu) {}

  // Records every CUDA tensor in obj; slots are prefix.i / prefix.key (a bare tensor: prefix.0).
  // Returns the (slot, tensor) pairs of other tensors, for the general path.
  py::object record(py::handle obj, py::object module, py::object direction, int64_t call,
                    const std::string& prefix, py::object source, bool bare_tensor_is_tuple) {
    Ctx ctx{module, direction, call, source, py::none()};
    if (bare_tensor_is_tuple && THPVariable_Check(obj.ptr())) {
      add(obj.ptr(), prefix + ".0", ctx);
    } else {
      walk(obj, prefix, 0, ctx);
    }
    return ctx.others;  // None, or a list: no Python allocation in the common case
  }

  int64_t pending() const { return (int64_t)records_.size(); }

  // Nesting of module calls (the C++ wrappers and the Python hook path share it): enter() says
  // whether this call is a root forward.
  bool enter() { return depth_++ == 0; }
  void leave() { if (depth_ > 0) --depth_; }

  // 'file.py:LINE in func' of the innermost Python frame whose file is not skipped (torch, tensordiff's
  // probes): what user_source_line() gives, without materialising Python frames one by one in Python.
  py::object source_line(py::object is_skipped) {
    PyFrameObject* frame = PyEval_GetFrame();  // borrowed
    Py_XINCREF(frame);
    for (int i = 0; frame != nullptr && i < 64; ++i) {
      PyCodeObject* code = PyFrame_GetCode(frame);
      PyObject* fname = code->co_filename;
      auto it = skip_.find(fname);
      bool skip;
      if (it == skip_.end()) {
        skip = is_skipped(py::handle(fname)).cast<bool>();
        Py_INCREF(fname);  // keep the key alive: its address must not be reused
        skip_.emplace(fname, skip);
      } else {
        skip = it->second;
      }
      if (!skip) {
        PyObject* out = PyUnicode_FromFormat("%U:%d in %U", fname, PyFrame_GetLineNumber(frame), code->co_name);
        Py_DECREF(code);
        Py_DECREF(frame);
        return py::reinterpret_steal<py::object>(out);
      }
      Py_DECREF(code);
      PyFrameObject* back = PyFrame_GetBack(frame);  // new reference
      Py_DECREF(frame);
      frame = back;
    }
    Py_XDECREF(frame);
    return py::str("");
  }

  void forget() { seen_.clear(); }

  // Everything since the last detach(), moved out in O(1): the conversion to Python objects is left to
  // the trace writer's thread, after the forward (Block.records()).
  Block detach() {
    Block b{std::move(records_), std::move(buffers_), std::move(numels_)};
    records_.clear();
    buffers_.clear();
    numels_.clear();
    rows_before_ = 0;
    return b;
  }

  // (records as tuples, [(raw buffer, rows, numels), ...]) of everything since the last take().
  py::tuple take() {
    Block b = detach();
    return py::make_tuple(b.records(), b.buffers_list());
  }

 private:
  struct Ctx {
    py::object module, direction;
    int64_t call;
    py::object source;
    py::object others;
  };

  void walk(py::handle obj, const std::string& slot, int depth, Ctx& ctx) {
    PyObject* o = obj.ptr();
    if (THPVariable_Check(o)) {
      add(o, slot, ctx);
      return;
    }
    if (o == Py_None || PyBool_Check(o) || PyLong_Check(o) || PyFloat_Check(o) || PyUnicode_Check(o) || depth > 4)
      return;
    if (PyTuple_Check(o) || PyList_Check(o)) {
      Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
      PyObject** items = PySequence_Fast_ITEMS(o);
      for (Py_ssize_t i = 0; i < n; ++i) walk(items[i], slot + "." + std::to_string(i), depth + 1, ctx);
      return;
    }
    if (PyDict_Check(o)) {
      PyObject *k, *v;
      Py_ssize_t pos = 0;
      while (PyDict_Next(o, &pos, &k, &v)) {
        py::str name(py::handle(k).cast<py::object>());
        walk(v, slot + "." + name.cast<std::string>(), depth + 1, ctx);
      }
      return;
    }
    // Anything else (a cache object, a dataclass): Python's flatten_tensors decides, as on the slow path.
    py::iterable pairs = flatten_(obj, slot, depth);
    for (py::handle pair : pairs) {
      py::tuple p = py::reinterpret_borrow<py::tuple>(pair);
      PyObject* t = p[1].ptr();
      if (THPVariable_Check(t)) add(t, p[0].cast<std::string>(), ctx);
    }
  }

  void add(PyObject* obj, const std::string& slot, Ctx& ctx) {
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!(t.is_cuda() || accept_cpu_) || t.layout() != at::kStrided) {
      if (ctx.others.is_none()) ctx.others = py::list();
      ctx.others.cast<py::list>().append(py::make_tuple(slot, py::handle(obj)));
      return;
    }
    c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    bool contiguous = t.is_contiguous();
    Key key = contiguous ? Key{(uintptr_t)t.data_ptr(), t.numel(), (int)t.scalar_type()}
                         : Key{(uintptr_t)impl, 0, -1};
    uint32_t version = 0;
    bool versioned = true;
    try {
      version = impl->version_counter().current_version();
    } catch (const c10::Error&) {
      versioned = false;  // inference tensors have no version counter: never aliased
    }
    Record r;
    r.module = ctx.module;
    r.direction = ctx.direction;
    r.call = ctx.call;
    r.source = ctx.source;
    r.slot = slot;
    r.shape = t.sizes().vec();
    r.stride = t.strides().vec();
    r.offset = t.storage_offset();
    r.dtype = t.scalar_type();
    r.device = t.device().str();
    auto it = versioned ? seen_.find(key) : seen_.end();
    if (it != seen_.end() && it->second.version == version && !it->second.impl.expired()) {
      r.row = -1;
      r.is_alias = true;
      r.alias_module = it->second.module;
      r.alias_direction = it->second.direction;
      r.alias_call = it->second.call;
      r.alias_slot = it->second.slot;
      records_.push_back(std::move(r));
      return;
    }
    r.row = launch(t);
    if (versioned) {
      seen_.insert_or_assign(key, Seen{c10::weak_intrusive_ptr<c10::TensorImpl>(
                                          c10::intrusive_ptr<c10::TensorImpl>::reclaim_copy(impl)),
                                      version, ctx.module, ctx.direction, ctx.call, slot});
    }
    records_.push_back(std::move(r));
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
      // the current stream of the tensor's device, as torch.cuda.current_stream(device) would give
      void* stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device()).native_handle();
      int err = launch_(t.data_ptr(), n, launch_code(t.scalar_type()), row,
                        (char*)buffers_.back().data_ptr(), capacity_, stream);
      TORCH_CHECK(err == 0, "fused stats kernel launch failed (cudaError ", err, ")");
    }
    numels_.back().push_back(n);
    return rows_before_ + row;
  }

  void new_buffer(const at::Device& device) {
    if (!buffers_.empty()) rows_before_ += (int64_t)numels_.back().size();
    // Layout of fused_stats.cu: float {min, max} x capacity, double {sum, sum|x|, sum x^2}, int64 counts.
    at::Tensor raw = at::zeros({capacity_ * 56}, at::TensorOptions().dtype(at::kByte).device(device));
    at::Tensor mm = raw.narrow(0, 0, capacity_ * 8).view(at::kFloat).view({capacity_, 2});
    mm.select(1, 0).fill_(INFINITY);
    mm.select(1, 1).fill_(-INFINITY);
    buffers_.push_back(raw);
    numels_.emplace_back();
  }

  LaunchFn launch_;
  int64_t capacity_;
  py::object flatten_;
  bool accept_cpu_;
  std::vector<Record> records_;
  std::vector<at::Tensor> buffers_;
  std::vector<std::vector<int64_t>> numels_;
  int64_t rows_before_ = 0;
  std::unordered_map<Key, Seen, KeyHash> seen_;
  int64_t depth_ = 0;
  std::unordered_map<PyObject*, bool> skip_;
};

// A module's forward, probed: what ModuleProbe's Python wrapper does (call count, root forward
// begin / end, source line, records of args / kwargs / output) in one C++ call per module call.
class Probed {
 public:
  Probed(py::object forward, py::object name, bool wanted, py::object recorder, py::object on_begin,
         py::object on_end, py::object emit_other, py::object is_skipped)
      : forward_(std::move(forward)), name_(std::move(name)), wanted_(wanted), recorder_(std::move(recorder)),
        rec_(recorder_.cast<Recorder*>()), on_begin_(std::move(on_begin)), on_end_(std::move(on_end)),
        emit_other_(std::move(emit_other)), is_skipped_(std::move(is_skipped)),
        forward_str_(py::str("forward")), empty_(py::str("")) {}

  py::object call(py::args args, py::kwargs kwargs) {
    int64_t call = calls_++;
    bool root = rec_->enter();
    if (root) on_begin_();
    if (wanted_) {
      py::object src = rec_->source_line(is_skipped_);
      others(rec_->record(args, name_, forward_str_, call, "input", src, false), call, src);
      if (PyDict_GET_SIZE(kwargs.ptr()) > 0)
        others(rec_->record(kwargs, name_, forward_str_, call, "input", src, false), call, src);
    }
    py::object out;
    try {
      out = forward_(*args, **kwargs);
    } catch (...) {
      rec_->leave();
      if (root) on_end_();  // what was captured before the error still lands
      throw;
    }
    rec_->leave();
    if (wanted_) others(rec_->record(out, name_, forward_str_, call, "output", empty_, true), call, empty_);
    if (root) on_end_();
    return out;
  }

 private:
  void others(py::object pairs, int64_t call, py::object& src) {
    if (pairs.is_none()) return;
    for (py::handle pair : pairs) {
      py::tuple p = py::reinterpret_borrow<py::tuple>(pair);
      emit_other_(name_, call, p[0], src, p[1]);
    }
  }

  py::object forward_, name_;
  bool wanted_;
  py::object recorder_;
  Recorder* rec_;
  py::object on_begin_, on_end_, emit_other_, is_skipped_, forward_str_, empty_;
  int64_t calls_ = 0;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Recorder>(m, "Recorder")
      .def(py::init<int64_t, int64_t, py::object, bool>())
      .def("record", &Recorder::record)
      .def("pending", &Recorder::pending)
      .def("forget", &Recorder::forget)
      .def("take", &Recorder::take)
      .def("detach", &Recorder::detach)
      .def("enter", &Recorder::enter)
      .def("leave", &Recorder::leave);
  py::class_<Probed>(m, "Probed", py::dynamic_attr())
      .def(py::init<py::object, py::object, bool, py::object, py::object, py::object, py::object, py::object>())
      .def("__call__", &Probed::call);
  py::class_<Block>(m, "Block")
      .def("__len__", &Block::size)
      .def("records", &Block::records)
      .def("buffers", &Block::buffers_list);
}
