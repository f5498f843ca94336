// Process-wide runtime settings of our executables: how many CPU threads LibTorch uses.
//
//   int main() {
//     fairdiff::configure_threads(options.threads);   // 0 = every CPU this process may use
//     fairdiff::configure_allocator();                // reuse freed memory (page faults are slow)
//     spdlog::info("{}", fairdiff::thread_summary());  // "2 threads (OpenMP 2, OpenBLAS 2) of 2 CPUs"
//     ...
//   }
//
// Why this exists: LibTorch sizes its intra-op pool to the number of *physical cores*
// that libcpuinfo reports. On virtual machines whose CPUID describes one core with
// several hyper-threads (this project's 2-vCPU build machine: cpuinfo says 1 core,
// 2 processors, while Linux sees 2 cores) that is 1, so every oneDNN convolution and
// every ATen kernel (norms, softmax, SiLU, copies) runs on one thread; only the GEMMs
// are parallel, because OpenBLAS keeps its own pthread pool sized to all CPUs.
// Call configure_threads once, at start-up, before the first tensor operation.
//
// Torch-free header: the CLI includes it.
#pragma once

#include <string>

namespace fairdiff {

// Sets LibTorch's intra-op threads (the OpenMP pool, which oneDNN also uses) and, when
// the BLAS is OpenBLAS, its pthread pool to `requested` threads. 0 means: the value of
// OMP_NUM_THREADS (or MKL_NUM_THREADS) when the environment sets one, else the number of
// CPUs in this process's affinity mask (what `taskset`, cgroups cpusets and SLURM grant).
// A negative value is a BadInput error.
void configure_threads(int requested);

// The thread settings in one line, for logs and benchmark reports:
// "2 threads (OpenMP 2, OpenBLAS 2) of 2 CPUs".
std::string thread_summary();

// CPUs this process may run on (sched_getaffinity; std::thread::hardware_concurrency as fallback).
int available_cpus();

// Makes glibc's malloc keep the memory LibTorch frees for reuse instead of handing it back
// to the kernel: blocks above 32 MiB are otherwise mmap'ed and munmap'ed on every use, and
// freed heap tops trimmed, so every activation and every oneDNN weight reorder faults its
// pages in again. On this project's build VM a page fault costs ~25 us (a 256 MiB
// allocate-and-fill took 1.8 s instead of 0.02 s), which made a UNet step mostly kernel
// time. Returns false, changing nothing, when the environment already tunes malloc
// (GLIBC_TUNABLES=glibc.malloc..., MALLOC_*_). Call at start-up, before large allocations;
// the resident memory then stays at its high-water mark.
bool configure_allocator();

}  // namespace fairdiff
