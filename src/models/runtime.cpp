#include "runtime.h"

#include <ATen/Parallel.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <malloc.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>

#include "arena.h"
#include "fairdiff/error.h"

namespace fairdiff {
namespace {

// OpenBLAS's thread controls, looked up at run time: Debian's LibTorch calls whatever
// libblas.so.3 the alternatives system picked (OpenBLAS, BLIS, the reference BLAS), so
// they may be absent. Null when the loaded BLAS is not OpenBLAS.
using GetThreads = int (*)();
using SetThreads = void (*)(int);

GetThreads openblas_get() { return reinterpret_cast<GetThreads>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads")); }
SetThreads openblas_set() { return reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")); }
// "OpenBLAS 0.3.21 ... USE_OPENMP ...": the OpenMP build shares LibTorch's thread pool.
const char* openblas_config() {
  using GetConfig = char* (*)();
  auto get = reinterpret_cast<GetConfig>(dlsym(RTLD_DEFAULT, "openblas_get_config"));
  return get ? get() : "";
}
// "Haswell", "SkylakeX", "Cooperlake", ...: the kernels OpenBLAS chose for this CPU at load
// (by its family and model, or OPENBLAS_CORETYPE). Its Haswell kernels are AVX2 only: on
// an AVX-512 CPU they reach half the FMA peak at most.
const char* openblas_core() {
  using GetCore = char* (*)();
  auto get = reinterpret_cast<GetCore>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  return get ? get() : "";
}

// OpenBLAS's pthread pool after each call: its workers spin for THREAD_TIMEOUT cycles (2^28
// by default, a tenth of a second) before they sleep. Between two BLAS calls that is cheap;
// before the next oneDNN convolution or our own OpenMP loop it takes a core from them: on
// the 2-vCPU Zen 5 VM, the convolution after a time-embedding projection ran at half
// speed (49 against 31 ms), and the UNet step's convolutions took 2.45 s against 2.05 s
// (README "Performance"). The pool reads OPENBLAS_THREAD_TIMEOUT (2^value cycles, 4-30)
// when it starts, at load: unless the user set it, we set it to the least, re-read
// OpenBLAS's environment and restart its pool, which comes back at its next call.
constexpr const char* kOpenBlasThreadTimeout = "4";

void stop_openblas_spinning() {
  if (std::getenv("OPENBLAS_THREAD_TIMEOUT") || std::getenv("GOTO_THREAD_TIMEOUT")) return;
  using Void = void (*)();
  using Int = int (*)();
  auto read_env = reinterpret_cast<Void>(dlsym(RTLD_DEFAULT, "openblas_read_env"));
  auto shutdown = reinterpret_cast<Int>(dlsym(RTLD_DEFAULT, "blas_thread_shutdown_"));
  if (!read_env || !shutdown || std::strstr(openblas_config(), "USE_OPENMP")) return;  // not the pthread pool
  setenv("OPENBLAS_THREAD_TIMEOUT", kOpenBlasThreadTimeout, 0);
  read_env();
  shutdown();
}

// A positive integer from the environment, else 0.
int env_threads(const char* name) {
  const char* value = std::getenv(name);
  if (!value) return 0;
  char* end = nullptr;
  const long n = std::strtol(value, &end, 10);
  return (end != value && *end == '\0' && n > 0 && n < 4096) ? static_cast<int>(n) : 0;
}

// Whether the user tunes glibc's malloc through the environment (GLIBC_TUNABLES, or the
// older MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_MAX_, MALLOC_ARENA_MAX, ...).
bool malloc_tuned_by_environment() {
  if (const char* t = std::getenv("GLIBC_TUNABLES"); t && std::strstr(t, "glibc.malloc.")) return true;
  for (char** e = environ; e && *e; ++e)
    if (std::strncmp(*e, "MALLOC_", 7) == 0) return true;
  return false;
}

}  // namespace

int available_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

void configure_threads(int requested) {
  if (requested < 0)
    throw_bad_input("--threads", "expected 0 (all CPUs) or a positive number of threads, found " +
                                     std::to_string(requested));
  int n = requested;
  if (n == 0) n = env_threads("OMP_NUM_THREADS");
  if (n == 0) n = env_threads("MKL_NUM_THREADS");
  // Not LibTorch's own default (physical cores by libcpuinfo, which counts 1 core on VMs
  // that expose their vCPUs as hyper-threads of one core): every CPU we may run on.
  if (n == 0) n = available_cpus();
  at::set_num_threads(n);  // omp_set_num_threads: ATen kernels and oneDNN
  // OpenBLAS (pthread build) sized its pool at load time from OPENBLAS_NUM_THREADS or all
  // CPUs; keep it equal so that --threads 1 means one core and the pools do not fight.
  if (SetThreads set = openblas_set()) set(n);
  // After set(): a pool grown by set() is stopped and started again whole.
  stop_openblas_spinning();
}

bool configure_allocator(bool huge_page_arena) {
  if (malloc_tuned_by_environment()) return false;
  // Serve every block from the heap (no per-block mmap/munmap) and never trim its top
  // below 2 GiB of free space (mallopt takes an int): freed tensors are reused in place.
  const bool heap = mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1;
  // Blocks of 1 MiB and more (the activations, oneDNN's buffers) from a region on huge pages.
  if (huge_page_arena) install_huge_page_arena();
  return heap;
}

void release_free_memory() {
  malloc_trim(0);
  release_arena_free_memory();
}

int library_parallel_threads() {
  std::atomic<uint64_t> seen{0};  // one bit per thread number (mod 64)
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) { seen |= uint64_t(1) << (at::get_thread_num() % 64); });
  return __builtin_popcountll(seen.load());
}

std::string thread_summary() {
  const int n = at::get_num_threads();
  std::string s = std::to_string(n) + (n == 1 ? " thread (" : " threads (");
#if AT_PARALLEL_OPENMP
  s += "OpenMP ";
#else
  s += "native pool ";
#endif
  s += std::to_string(n);
  // Said only when it goes wrong: a library built without OpenMP runs its own loops serially.
  if (const int ours = library_parallel_threads(); ours != n) s += ", fairdiff's own loops " + std::to_string(ours);
  if (GetThreads get = openblas_get())
    s += ", OpenBLAS " + std::to_string(get()) +
         (std::strstr(openblas_config(), "USE_OPENMP") ? " in the same pool" : " in its own pthread pool") +
         (*openblas_core() ? std::string(", ") + openblas_core() + " kernels" : std::string());
  s += ") of " + std::to_string(available_cpus()) + " CPUs";
  if (const char* wait = std::getenv("OMP_WAIT_POLICY")) s += ", OMP_WAIT_POLICY=" + std::string(wait);
  if (const char* core = std::getenv("OPENBLAS_CORETYPE")) s += ", OPENBLAS_CORETYPE=" + std::string(core);
  if (const char* t = std::getenv("OPENBLAS_THREAD_TIMEOUT")) s += ", OPENBLAS_THREAD_TIMEOUT=" + std::string(t);
  return s;
}

bool cpu_has_native_bf16() {
  static const bool yes = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool amx_bf16 = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx & (1u << 22)) != 0;
    __builtin_cpu_init();
    return amx_bf16 || __builtin_cpu_supports("avx512bf16");
  }();
  return yes;
}

double process_seconds() {
  std::ifstream in("/proc/self/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // Field 22 is the start time in clock ticks since boot; fields are counted after the
  // command name, which ends at the last ')' and may hold spaces.
  const size_t close = stat.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream fields(stat.substr(close + 2));
  std::string field;
  for (int i = 3; i <= 22 && fields >> field; ++i) {
  }
  timespec now{};
  if (field.empty() || clock_gettime(CLOCK_BOOTTIME, &now) != 0) return -1;
  const double started = std::strtod(field.c_str(), nullptr) / static_cast<double>(sysconf(_SC_CLK_TCK));
  return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec) - started;
}

}  // namespace fairdiff
