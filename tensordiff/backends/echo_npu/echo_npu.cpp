// echo_npu: a PrivateUse1 device whose "chip" is host memory, built like a real NPU port:
// an allocator, a device guard, hooks, a handful of native kernels and a boxed CPU fallback.
// Fault modes reproduce bugs such ports really had (see tensordiff/backends/echo_npu/__init__.py).
// The headers it uses, not <torch/extension.h> (all of torch's C++ API): the first build took 49 s
// with it and 20 s without on a 2-core VM.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <ATen/EmptyTensor.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/view_native.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

enum Fault { NONE = 0, NONCONTIG_COPY = 1, ALLOC_ROUND_UP = 2, INPLACE_FALLBACK = 3 };
std::atomic<int> g_fault{NONE};
std::mutex g_count_mutex;
std::map<std::string, int64_t> g_native_counts, g_fallback_counts;

void count(std::map<std::string, int64_t>& table, const std::string& name) {
  std::lock_guard<std::mutex> lock(g_count_mutex);
  table[name] += 1;
}

const c10::Device kDevice(c10::DeviceType::PrivateUse1, 0);

// ---- allocator --------------------------------------------------------------------------------
// With alloc-round-up, sizes are rounded up to 64 bytes and the block handed out is shifted past a
// header the deleter does not know about: free() then receives a pointer malloc never returned.
//
// Guard mode (tensordiff --guard): every block gets red zones before and after it and fresh memory a
// recognisable NaN payload; the allocator remembers what malloc returned for each block it handed out.
// A block whose pointer is not where its allocation starts, or whose size differs from the request, is
// an event at once (the op that allocated it is named by the Python side, which drains the events
// after each op); red zones are checked at free and on request; free() is always given malloc's own
// pointer, so the process lives to report instead of aborting inside glibc.
void echo_free(void* ptr) { std::free(ptr); }

constexpr size_t kRedZone = 64;
constexpr unsigned char kRedByte = 0xFD;
constexpr uint32_t kPoison = 0x7FC0DEADu;  // a float32 quiet NaN with a payload one can grep for

struct GuardBlock {
  char* base;         // what malloc returned
  size_t requested;   // what the caller asked for
  size_t accounted;   // what the allocator handed out
  size_t front;       // bytes between base and the pointer handed out
  uint64_t id;
};
std::atomic<bool> g_guard{false};
std::mutex g_guard_mutex;
std::map<void*, GuardBlock> g_guard_live;
std::vector<std::string> g_guard_events;
uint64_t g_guard_next_id = 0;

void guard_event(const std::string& text) { g_guard_events.push_back(text); }  // g_guard_mutex held

bool red_zone_intact(const char* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (static_cast<unsigned char>(p[i]) != kRedByte) return false;
  return true;
}

std::string describe_block(void* user, const GuardBlock& b) {
  return "block #" + std::to_string(b.id) + " at " + std::to_string(reinterpret_cast<uintptr_t>(user)) +
         " (" + std::to_string(b.requested) + " bytes asked, " + std::to_string(b.accounted) + " handed out)";
}

void check_block(void* user, const GuardBlock& b, const char* when) {  // g_guard_mutex held
  const char* u = static_cast<const char*>(user);
  if (!red_zone_intact(u - kRedZone, kRedZone))
    guard_event(std::string("red zone before ") + describe_block(user, b) + " overwritten (" + when + ")");
  if (!red_zone_intact(u + b.requested, b.accounted - b.requested + kRedZone))
    guard_event(std::string("write past the end of ") + describe_block(user, b) + ": red zone after it overwritten (" +
                when + ")");
}

void guard_free(void* ptr) {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(g_guard_mutex);
  auto it = g_guard_live.find(ptr);
  if (it == g_guard_live.end()) {
    guard_event("free of a pointer this allocator never handed out: " + std::to_string(reinterpret_cast<uintptr_t>(ptr)) +
                " (not freed: glibc would abort)");
    return;
  }
  check_block(ptr, it->second, "at free");
  std::free(it->second.base);  // malloc's own pointer, whatever was handed out
  g_guard_live.erase(it);
}

c10::DataPtr guarded_allocate(size_t nbytes, bool round_up) {
  size_t accounted = round_up ? (nbytes + 63) / 64 * 64 : nbytes;
  size_t header = round_up ? 8 : 0;  // the faulty allocator's bookkeeping header
  size_t total = header + kRedZone + accounted + kRedZone;
  char* base = static_cast<char*>(std::malloc(total));
  std::memset(base, kRedByte, total);
  char* user = base + header + kRedZone;
  for (size_t i = 0; i + 4 <= nbytes; i += 4) std::memcpy(user + i, &kPoison, 4);
  std::lock_guard<std::mutex> lock(g_guard_mutex);
  GuardBlock block{base, nbytes, accounted, header + kRedZone, g_guard_next_id++};
  g_guard_live[user] = block;
  if (accounted != nbytes || header != 0)
    guard_event("allocator size mismatch: " + describe_block(user, block) + "; the pointer handed out is " +
                std::to_string(header) + " bytes past the start of its allocation, so free() of it would abort " +
                "(free(): invalid pointer)");
  return {user, user, &guard_free, kDevice};
}

struct EchoAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &echo_free, kDevice};
    bool round_up = g_fault.load() == ALLOC_ROUND_UP && nbytes % 64 != 0;
    if (g_guard.load()) return guarded_allocate(nbytes, round_up);
    if (round_up) {
      size_t rounded = (nbytes + 63) / 64 * 64;
      char* base = static_cast<char*>(std::malloc(rounded + 64));
      void* user = base + 8;  // bookkeeping header; the deleter below is not told about it
      return {user, user, &echo_free, kDevice};
    }
    void* p = std::malloc(nbytes);
    return {p, p, &echo_free, kDevice};
  }
  c10::DeleterFnPtr raw_deleter() const override { return g_guard.load() ? &guard_free : &echo_free; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};
EchoAllocator g_allocator;

// ---- device guard and hooks -------------------------------------------------------------------
struct EchoGuardImpl final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return c10::DeviceType::PrivateUse1; }
  c10::Device exchangeDevice(c10::Device) const override { return kDevice; }
  c10::Device getDevice() const override { return kDevice; }
  void setDevice(c10::Device) const override {}
  void uncheckedSetDevice(c10::Device) const noexcept override {}
  c10::Stream getStream(c10::Device d) const override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream exchangeStream(c10::Stream s) const override { return s; }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
  void record(void**, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
};
C10_REGISTER_GUARD_IMPL(PrivateUse1, EchoGuardImpl);

struct EchoHooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  at::Device getDeviceFromPtr(void*) const override { return kDevice; }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex) const override {
    return at::detail::getDefaultCPUGenerator();
  }
  c10::Allocator* getPinnedMemoryAllocator() const override { return c10::GetCPUAllocator(); }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override {
    auto old = storage.nbytes();
    auto fresh = g_allocator.allocate(newsize);
    if (old && newsize) std::memcpy(fresh.get(), storage.data(), std::min(old, newsize));
    const_cast<c10::Storage&>(storage).set_data_ptr_noswap(std::move(fresh));
    const_cast<c10::Storage&>(storage).set_nbytes(newsize);
  }
};

// A CPU tensor over the same memory as a device tensor (the "device" is host memory).
at::Tensor host_alias(const at::Tensor& t) {
  auto opts = at::TensorOptions().dtype(t.scalar_type()).device(at::kCPU);
  return at::from_blob(t.data_ptr(), t.sizes(), t.strides(), opts);
}

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<at::ScalarType> dtype,
                               std::optional<at::Layout>, std::optional<at::Device>, std::optional<bool>,
                               std::optional<at::MemoryFormat> memory_format) {
  count(g_native_counts, "aten::empty.memory_format");
  return at::detail::empty_generic(size, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<at::ScalarType> dtype,
                         std::optional<at::Layout>, std::optional<at::Device>, std::optional<bool>) {
  count(g_native_counts, "aten::empty_strided");
  return at::detail::empty_strided_generic(size, stride, &g_allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           c10::dtype_or_default(dtype));
}

at::Tensor as_strided(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride,
                      std::optional<int64_t> offset) {
  count(g_native_counts, "aten::as_strided");
  return at::native::as_strided_tensorimpl(self, size, stride, offset);
}

at::Tensor view(const at::Tensor& self, c10::IntArrayRef size) {
  count(g_native_counts, "aten::view");
  return at::native::view(self, size);
}

at::Tensor reshape_alias(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride) {
  count(g_native_counts, "aten::_reshape_alias");
  return at::native::_reshape_alias(self, size, stride);
}

const at::Tensor& resize_(const at::Tensor& self, c10::IntArrayRef size,
                          std::optional<at::MemoryFormat>) {
  count(g_native_counts, "aten::resize_");
  int64_t numel = 1;
  for (auto s : size) numel *= s;
  size_t needed = (numel + self.storage_offset()) * self.element_size();
  auto storage = self.storage();
  if (storage.nbytes() < needed) {
    auto fresh = g_allocator.allocate(needed);
    if (storage.nbytes()) std::memcpy(fresh.get(), storage.data(), storage.nbytes());
    storage.set_data_ptr_noswap(std::move(fresh));
    storage.set_nbytes(needed);
  }
  self.unsafeGetTensorImpl()->set_sizes_contiguous(size);
  return self;
}

at::Tensor& set_storage(at::Tensor& self, c10::Storage source, int64_t offset, c10::IntArrayRef size,
                        c10::IntArrayRef stride) {
  count(g_native_counts, "aten::set_.source_Storage_storage_offset");
  self.unsafeGetTensorImpl()->set_storage_keep_dtype(std::move(source));
  self.unsafeGetTensorImpl()->set_sizes_and_strides(size, stride, offset);
  return self;
}

at::Tensor& set_source_storage(at::Tensor& self, c10::Storage source) {
  int64_t n = static_cast<int64_t>(source.nbytes() / self.element_size());
  return set_storage(self, std::move(source), 0, {n}, {1});
}

// Host <-> device and device <-> device copies. With noncontig-copy, the device side is read or
// written in memory order, ignoring its strides: a transposed or sliced tensor arrives scrambled.
// The buggy copy walks memory in order from the view's first element. An expanded view (stride 0,
// e.g. repeat_kv's KV heads) has more elements than its storage holds: past the storage's end the
// simulator reads zeros and drops writes instead of touching memory it does not own, which also
// makes the fault's reports the same from run to run.
int64_t elements_left(const at::Tensor& t) {
  int64_t left = static_cast<int64_t>(t.storage().nbytes() / t.element_size()) - t.storage_offset();
  return std::max<int64_t>(0, std::min<int64_t>(left, t.numel()));
}

at::Tensor memory_order_read(const at::Tensor& t) {
  auto opts = at::TensorOptions().dtype(t.scalar_type()).device(at::kCPU);
  at::Tensor flat = at::zeros({t.numel()}, opts);
  int64_t n = elements_left(t);
  if (n > 0) flat.narrow(0, 0, n).copy_(at::from_blob(t.data_ptr(), {n}, opts));
  return flat.view(t.sizes());
}

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool) {
  count(g_native_counts, "aten::_copy_from");
  bool bug = g_fault.load() == NONCONTIG_COPY;
  bool self_dev = self.device().type() == c10::DeviceType::PrivateUse1;
  bool dst_dev = dst.device().type() == c10::DeviceType::PrivateUse1;
  at::Tensor src_host = !self_dev ? self : bug && !self.is_contiguous() ? memory_order_read(self) : host_alias(self);
  if (dst_dev && bug && !dst.is_contiguous()) {
    int64_t n = elements_left(dst);
    auto opts = at::TensorOptions().dtype(dst.scalar_type()).device(at::kCPU);
    if (n > 0)
      at::from_blob(dst.data_ptr(), {n}, opts).copy_(src_host.expand(dst.sizes()).reshape(-1).narrow(0, 0, n));
    return dst;
  }
  at::Tensor dst_host = dst_dev ? host_alias(dst) : dst;
  dst_host.copy_(src_host);
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  count(g_native_counts, "aten::_copy_from_and_resize");
  if (dst.sizes() != self.sizes()) {
    resize_(dst, self.sizes(), std::nullopt);
  }
  return copy_from(self, dst, false);
}

at::Tensor& fill_scalar(at::Tensor& self, const at::Scalar& value) {
  count(g_native_counts, "aten::fill_.Scalar");
  host_alias(self).fill_(value);
  return self;
}

at::Tensor to_device(const at::Tensor& host) {
  at::Tensor out(at::detail::empty_generic(host.sizes(), &g_allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           host.scalar_type(), std::nullopt));
  host_alias(out).copy_(host);
  return out;
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  count(g_native_counts, "aten::mm");
  return to_device(at::mm(host_alias(a), host_alias(b)));
}

at::Tensor bmm(const at::Tensor& a, const at::Tensor& b) {
  count(g_native_counts, "aten::bmm");
  return to_device(at::bmm(host_alias(a), host_alias(b)));
}

at::Tensor addmm(const at::Tensor& self, const at::Tensor& a, const at::Tensor& b, const at::Scalar& beta,
                 const at::Scalar& alpha) {
  count(g_native_counts, "aten::addmm");
  return to_device(at::addmm(host_alias(self), host_alias(a), host_alias(b), beta, alpha));
}

at::Tensor add(const at::Tensor& self, const at::Tensor& other, const at::Scalar& alpha) {
  count(g_native_counts, "aten::add.Tensor");
  auto other_host = other.device().type() == c10::DeviceType::PrivateUse1 ? host_alias(other) : other;
  return to_device(at::add(host_alias(self), other_host, alpha));
}

// Native histc for every dtype, as accelerator ports have it: transformers' grouped-mm MoE path counts
// tokens per expert with histc on int32 whenever the device is not the CPU, and the CPU kernel (which
// the boxed fallback would call) takes floating types only. Counted in float64 (exact for counts and
// integer bin edges), returned in the input's dtype as CUDA does.
at::Tensor histc(const at::Tensor& self, int64_t bins, const at::Scalar& min, const at::Scalar& max) {
  count(g_native_counts, "aten::histc");
  at::Tensor host = host_alias(self);
  at::Tensor counts = at::histc(host.is_floating_point() ? host : host.to(at::kDouble), bins, min, max);
  return to_device(counts.to(self.scalar_type()));
}

void echo_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack);

at::Tensor& masked_fill_scalar(at::Tensor& self, const at::Tensor& mask, const at::Scalar& value) {
  if (g_fault.load() == INPLACE_FALLBACK) {  // the port sends it to the (buggy) fallback path
    count(g_fallback_counts, "aten::masked_fill_.Scalar");
    auto tmp = host_alias(self).clone();  // written into a temporary, never back to the device
    tmp.masked_fill_(host_alias(mask), value);
    return self;
  }
  count(g_native_counts, "aten::masked_fill_.Scalar");
  host_alias(self).masked_fill_(host_alias(mask), value);
  return self;
}

bool mutates_first_argument(const c10::OperatorHandle& op) {
  const auto& args = op.schema().arguments();
  return !args.empty() && args[0].alias_info() && args[0].alias_info()->isWrite();
}

void echo_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  count(g_fallback_counts, op.schema().operator_name().name +
                               (op.schema().overload_name().empty() ? "" : "." + op.schema().overload_name()));
  if (g_fault.load() == INPLACE_FALLBACK && mutates_first_argument(op)) {
    // The bug: run the in-place op on a copy and never write the result back to the device tensor.
    size_t n = op.schema().arguments().size();
    auto& self_ivalue = (*stack)[stack->size() - n];
    at::Tensor original = self_ivalue.toTensor();
    self_ivalue = original.clone();
    at::native::cpu_fallback(op, stack);
    stack->back() = original;
    return;
  }
  at::native::cpu_fallback(op, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("as_strided", as_strided);
  m.impl("view", view);
  m.impl("_reshape_alias", reshape_alias);
  m.impl("resize_", resize_);
  m.impl("_copy_from", copy_from);
  m.impl("set_.source_Storage_storage_offset", set_storage);
  m.impl("set_.source_Storage", set_source_storage);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("fill_.Scalar", fill_scalar);
  m.impl("mm", mm);
  m.impl("bmm", bmm);
  m.impl("addmm", addmm);
  m.impl("add.Tensor", add);
  m.impl("masked_fill_.Scalar", masked_fill_scalar);
  m.impl("histc", histc);
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&echo_fallback>());
}

void set_fault(int64_t fault) { g_fault.store(static_cast<int>(fault)); }

std::map<std::string, int64_t> native_counts() {
  std::lock_guard<std::mutex> lock(g_count_mutex);
  return g_native_counts;
}

std::map<std::string, int64_t> fallback_counts() {
  std::lock_guard<std::mutex> lock(g_count_mutex);
  return g_fallback_counts;
}

void reset_counts() {
  std::lock_guard<std::mutex> lock(g_count_mutex);
  g_native_counts.clear();
  g_fallback_counts.clear();
}

void register_hooks() {
  static bool done = false;
  if (!done) {
    at::RegisterPrivateUse1HooksInterface(new EchoHooks());
    done = true;
  }
}

void set_guard(bool on) { g_guard.store(on); }

// Events since the last call; with ``check``, every live block's red zones are checked first.
std::vector<std::string> guard_events(bool check) {
  std::lock_guard<std::mutex> lock(g_guard_mutex);
  if (check)
    for (auto& kv : g_guard_live) check_block(kv.first, kv.second, "at an op boundary");
  std::vector<std::string> out;
  out.swap(g_guard_events);
  return out;
}

int64_t guard_live_blocks() {
  std::lock_guard<std::mutex> lock(g_guard_mutex);
  return static_cast<int64_t>(g_guard_live.size());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_guard", &set_guard);
  m.def("guard_events", &guard_events);
  m.def("guard_live_blocks", &guard_live_blocks);
  m.def("set_fault", &set_fault);
  m.def("native_counts", &native_counts);
  m.def("fallback_counts", &fallback_counts);
  m.def("reset_counts", &reset_counts);
  m.def("register_hooks", &register_hooks);
}
