// Stats of one tensor in one kernel launch, accumulated into row `row` of three device buffers:
//   minmax float[.,2] (finite min, max), sums double[.,3] (sum, sum |x|, sum x^2 over finite values),
//   counts uint64[.,3] (NaN, Inf, exact zeros).
// Called through ctypes with raw pointers and the caller's stream: no torch headers, so it compiles
// in seconds with nvcc alone, and a launch costs a few microseconds of CPU (see fused_stats.py).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <dlfcn.h>
#include <math.h>
#include <stdlib.h>

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load_f(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f(const double* p, long long i) { return (float)p[i]; }
__device__ __forceinline__ float load_f(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }

// Float min/max through integer atomics: non-negative floats order like signed ints, negative floats
// order inversely to unsigned ints. -0.0 is folded into +0.0 first.
__device__ void atomic_min_f(float* addr, float v) {
  v += 0.0f;
  if (v >= 0.0f) atomicMin((int*)addr, __float_as_int(v));
  else atomicMax((unsigned int*)addr, __float_as_uint(v));
}
__device__ void atomic_max_f(float* addr, float v) {
  v += 0.0f;
  if (v >= 0.0f) atomicMax((int*)addr, __float_as_int(v));
  else atomicMin((unsigned int*)addr, __float_as_uint(v));
}

struct Acc {
  float vmin = INFINITY, vmax = -INFINITY, s = 0.f, sa = 0.f, sq = 0.f;
  unsigned int nan = 0, inf = 0, zero = 0;
  __device__ __forceinline__ void add(float v) {
    if (isnan(v)) { nan++; return; }
    if (isinf(v)) { inf++; return; }
    vmin = fminf(vmin, v);
    vmax = fmaxf(vmax, v);
    s += v;
    sa += fabsf(v);
    sq += v * v;
    zero += (v == 0.f);
  }
};

// 16-byte vector loads when the data is 16-byte aligned (H100: ~3x the bandwidth of scalar loads).
template <typename T>
__device__ __forceinline__ void add_vec(Acc& a, const uint4& raw) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < (int)(16 / sizeof(T)); ++k) a.add(load_f(e, k));
}

template <typename T>
__global__ void stats_kernel(const T* x, long long n, float* minmax, double* sums,
                             unsigned long long* counts) {
  Acc a;
  long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long stride = (long long)gridDim.x * blockDim.x;
  constexpr int kVec = 16 / sizeof(T);
  long long head = 0;
  if (((unsigned long long)x & 15) == 0) {
    long long nvec = n / kVec;
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    for (long long i = tid; i < nvec; i += stride) add_vec<T>(a, xv[i]);
    head = nvec * kVec;
  }
  for (long long i = head + tid; i < n; i += stride) a.add(load_f(x, i));
  float vmin = a.vmin, vmax = a.vmax, s = a.s, sa = a.sa, sq = a.sq;
  unsigned int nan = a.nan, inf = a.inf, zero = a.zero;
  // Warp, then block reduction; one set of atomics per block.
  for (int off = 16; off > 0; off >>= 1) {
    vmin = fminf(vmin, __shfl_down_sync(0xffffffff, vmin, off));
    vmax = fmaxf(vmax, __shfl_down_sync(0xffffffff, vmax, off));
    s += __shfl_down_sync(0xffffffff, s, off);
    sa += __shfl_down_sync(0xffffffff, sa, off);
    sq += __shfl_down_sync(0xffffffff, sq, off);
    nan += __shfl_down_sync(0xffffffff, nan, off);
    inf += __shfl_down_sync(0xffffffff, inf, off);
    zero += __shfl_down_sync(0xffffffff, zero, off);
  }
  __shared__ float f_sh[kThreads / 32][5];
  __shared__ unsigned int u_sh[kThreads / 32][3];
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    f_sh[warp][0] = vmin; f_sh[warp][1] = vmax; f_sh[warp][2] = s; f_sh[warp][3] = sa; f_sh[warp][4] = sq;
    u_sh[warp][0] = nan; u_sh[warp][1] = inf; u_sh[warp][2] = zero;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double ds = 0, dsa = 0, dsq = 0;
    unsigned long long cn = 0, ci = 0, cz = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      vmin = fminf(vmin, f_sh[w][0]);
      vmax = fmaxf(vmax, f_sh[w][1]);
      ds += f_sh[w][2]; dsa += f_sh[w][3]; dsq += f_sh[w][4];
      cn += u_sh[w][0]; ci += u_sh[w][1]; cz += u_sh[w][2];
    }
    if (vmin <= vmax) {  // at least one finite value in this block
      atomic_min_f(minmax, vmin);
      atomic_max_f(minmax + 1, vmax);
    }
    atomicAdd(sums, ds);
    atomicAdd(sums + 1, dsa);
    atomicAdd(sums + 2, dsq);
    if (cn) atomicAdd(counts, cn);
    if (ci) atomicAdd(counts + 1, ci);
    if (cz) atomicAdd(counts + 2, cz);
  }
}

// The driver's cuLaunchKernel, called directly with the kernel's CUfunction: the runtime's launch
// (<<<>>>) looks the function up and checks its context on every call, which measured ~5.4 us of
// CPU per launch in a traced forward on the lent H100's host. Resolved from the libcuda torch has
// loaded; without it (or with TENSORDIFF_STATS_LAUNCH=runtime) the runtime path is used.
typedef int (*LaunchKernelFn)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                              void*, void**, void**);
LaunchKernelFn driver_launch() {
  static LaunchKernelFn fn = [] {
    const char* mode = getenv("TENSORDIFF_STATS_LAUNCH");
    if (mode != nullptr && mode[0] == 'r') return (LaunchKernelFn) nullptr;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    return lib ? (LaunchKernelFn)dlsym(lib, "cuLaunchKernel") : (LaunchKernelFn) nullptr;
  }();
  return fn;
}

template <typename T>
int launch(const void* x, long long n, long long row, float* minmax, double* sums,
           unsigned long long* counts, cudaStream_t stream, int max_blocks, int dev) {
  long long blocks = (n + kThreads * 32 - 1) / (kThreads * 32);  // >= 32 elements per thread
  if (blocks > max_blocks) blocks = max_blocks;
  float* mm = minmax + 2 * row;
  double* sm = sums + 3 * row;
  unsigned long long* ct = counts + 3 * row;
  LaunchKernelFn drv = driver_launch();
  if (drv != nullptr && dev >= 0 && dev < 64) {
    // A CUfunction belongs to one device's context: one per device (and per T).
    static cudaFunction_t fns[64] = {nullptr};
    cudaFunction_t& fn = fns[dev];
    if (fn == nullptr && cudaGetFuncBySymbol(&fn, (const void*)stats_kernel<T>) != cudaSuccess) fn = nullptr;
    if (fn != nullptr) {
      const T* xp = (const T*)x;
      void* params[] = {&xp, &n, &mm, &sm, &ct};
      return drv(fn, (unsigned)blocks, 1, 1, kThreads, 1, 1, 0, stream, params, nullptr);
    }
  }
  stats_kernel<T><<<(unsigned)blocks, kThreads, 0, stream>>>((const T*)x, n, mm, sm, ct);
  return (int)cudaGetLastError();
}

}  // namespace

// Grid size cap of the current device: 4 blocks per SM (893 GB/s on the H100; 16 per SM: 795).
// Per device, as a host may mix GPUs with different SM counts.
static int max_blocks_of(int dev) {
  static int blocks[64] = {0};
  if (dev < 0 || dev >= 64) return 528;
  if (blocks[dev] == 0) {
    int sms = 0;
    blocks[dev] = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && sms > 0
                      ? 4 * sms : 528;
  }
  return blocks[dev];
}

// One buffer of `capacity` rows: [capacity] x {float min, max} then [capacity] x {double sum, sum |x|,
// sum x^2} then [capacity] x {uint64 nan, inf, zero}. Fewer ctypes arguments: each costs ~0.2 us.
// The caller makes the tensor's device current (as torch's own ops do) and passes its stream.

// dtype: 0 float32, 1 float16, 2 bfloat16, 3 float64. Returns a cudaError_t (0: launched).
extern "C" int td_stats_launch(const void* x, long long n, int dtype, long long row, char* buffer,
                               long long capacity, void* stream) {
  if (n <= 0) return 0;
  float* mm = (float*)buffer;
  double* sm = (double*)(buffer + capacity * 2 * sizeof(float));
  unsigned long long* ct = (unsigned long long*)(buffer + capacity * (2 * sizeof(float) + 3 * sizeof(double)));
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = -1;
  int max_blocks = max_blocks_of(dev);
  cudaStream_t st = (cudaStream_t)stream;
  switch (dtype) {
    case 0: return launch<float>(x, n, row, mm, sm, ct, st, max_blocks, dev);
    case 1: return launch<__half>(x, n, row, mm, sm, ct, st, max_blocks, dev);
    case 2: return launch<__nv_bfloat16>(x, n, row, mm, sm, ct, st, max_blocks, dev);
    case 3: return launch<double>(x, n, row, mm, sm, ct, st, max_blocks, dev);
    default: return -1;
  }
}

// ---- One target tensor against the reference's, in one launch (observers/live_compare.py) --------
// Row `row` of a pair buffer: double[cap, 5] {sum d^2, sum r^2, sum t^2, sum r*t, sum |d|} over the
// elements finite on both sides, then uint64[cap] non-finite mismatches (NaN or Inf on one side only,
// or unequal infinities), then float[cap] max |d| (atomics on non-negative floats as ints).
namespace {

template <typename T, typename R>
__global__ void pair_kernel(const T* t, const R* r, long long n, double* sums, unsigned long long* bad,
                            float* maxabs) {
  float sd = 0.f, sr = 0.f, st = 0.f, dot = 0.f, sa = 0.f, mx = 0.f;
  unsigned int nb = 0;
  long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = tid; i < n; i += stride) {
    float a = load_f(t, i), b = load_f(r, i);
    if (isfinite(a) && isfinite(b)) {
      float d = a - b;
      sd += d * d; sr += b * b; st += a * a; dot += a * b; sa += fabsf(d); mx = fmaxf(mx, fabsf(d));
    } else if (!(isnan(a) && isnan(b)) && !(a == b)) {
      nb++;
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    sd += __shfl_down_sync(0xffffffff, sd, off);
    sr += __shfl_down_sync(0xffffffff, sr, off);
    st += __shfl_down_sync(0xffffffff, st, off);
    dot += __shfl_down_sync(0xffffffff, dot, off);
    sa += __shfl_down_sync(0xffffffff, sa, off);
    mx = fmaxf(mx, __shfl_down_sync(0xffffffff, mx, off));
    nb += __shfl_down_sync(0xffffffff, nb, off);
  }
  __shared__ float f_sh[kThreads / 32][6];
  __shared__ unsigned int u_sh[kThreads / 32];
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    f_sh[warp][0] = sd; f_sh[warp][1] = sr; f_sh[warp][2] = st; f_sh[warp][3] = dot; f_sh[warp][4] = sa;
    f_sh[warp][5] = mx; u_sh[warp] = nb;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double acc[5] = {0, 0, 0, 0, 0};
    unsigned long long cb = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      for (int k = 0; k < 5; ++k) acc[k] += f_sh[w][k];
      mx = fmaxf(mx, f_sh[w][5]);
      cb += u_sh[w];
    }
    for (int k = 0; k < 5; ++k) atomicAdd(sums + k, acc[k]);
    if (cb) atomicAdd(bad, cb);
    atomicMax((int*)maxabs, __float_as_int(mx));
  }
}

template <typename T, typename R>
int launch_pair(const void* t, const void* r, long long n, double* sums, unsigned long long* bad, float* mx,
                cudaStream_t stream, int max_blocks) {
  long long blocks = (n + kThreads * 32 - 1) / (kThreads * 32);
  if (blocks > max_blocks) blocks = max_blocks;
  pair_kernel<T, R><<<(unsigned)blocks, kThreads, 0, stream>>>((const T*)t, (const R*)r, n, sums, bad, mx);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_pair_ref(const void* t, const void* r, int ref_dtype, long long n, double* sums,
                    unsigned long long* bad, float* mx, cudaStream_t stream, int max_blocks) {
  switch (ref_dtype) {
    case 0: return launch_pair<T, float>(t, r, n, sums, bad, mx, stream, max_blocks);
    case 1: return launch_pair<T, __half>(t, r, n, sums, bad, mx, stream, max_blocks);
    case 2: return launch_pair<T, __nv_bfloat16>(t, r, n, sums, bad, mx, stream, max_blocks);
    case 3: return launch_pair<T, double>(t, r, n, sums, bad, mx, stream, max_blocks);
    default: return -1;
  }
}

}  // namespace

// Buffer of `capacity` rows laid out as above (52 bytes per row). dtypes as td_stats_launch.
extern "C" int td_pair_launch(const void* t, int dtype, const void* r, int ref_dtype, long long n, long long row,
                              char* buffer, long long capacity, void* stream) {
  if (n <= 0) return 0;
  double* sums = (double*)buffer + 5 * row;
  unsigned long long* bad = (unsigned long long*)(buffer + capacity * 5 * sizeof(double)) + row;
  float* mx = (float*)(buffer + capacity * 6 * sizeof(double)) + row;
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = -1;
  int max_blocks = max_blocks_of(dev);
  cudaStream_t st = (cudaStream_t)stream;
  switch (dtype) {
    case 0: return launch_pair_ref<float>(t, r, ref_dtype, n, sums, bad, mx, st, max_blocks);
    case 1: return launch_pair_ref<__half>(t, r, ref_dtype, n, sums, bad, mx, st, max_blocks);
    case 2: return launch_pair_ref<__nv_bfloat16>(t, r, ref_dtype, n, sums, bad, mx, st, max_blocks);
    case 3: return launch_pair_ref<double>(t, r, ref_dtype, n, sums, bad, mx, st, max_blocks);
    default: return -1;
  }
}
