// Process-wide runtime settings of our executables: how many CPU threads LibTorch uses,
// and whether freed memory is kept for reuse.
//
//   int main() {
//     fairdiff::configure_threads(options.threads);   // 0 = every CPU this process may use
//     fairdiff::configure_allocator();                // reuse freed memory (page faults are slow)
//     spdlog::info("{}", fairdiff::thread_summary());  // "2 threads (OpenMP 2, OpenBLAS 2 in its own pthread pool) of 2 CPUs"
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
// More threads only pay when the cores are free. libgomp's idle workers spin at barriers
// (OMP_WAIT_POLICY unset = spin a while), which next to OpenBLAS's pool or other busy
// processes takes the cores from the threads doing the work: on the build VM under load,
// 2 threads made the UNet step 2x and the text encoder 5x slower than 1, and equal to 1
// with OMP_WAIT_POLICY=PASSIVE. libgomp reads that variable when it loads, before main,
// so it can only come from the environment (scripts/bench sets it).
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
// "2 threads (OpenMP 2, OpenBLAS 2 in its own pthread pool) of 2 CPUs".
std::string thread_summary();

// How many threads an at::parallel_for of this library runs on: at::get_num_threads() (or
// fewer for tiny ranges), and 1 if the library was compiled without OpenMP. ATen's parallel_for
// is an OpenMP region in its headers, so it runs on the threads of the code that includes
// it: until the third session of issue 15 ours was built without -fopenmp and ran serially.
int library_parallel_threads();

// CPUs this process may run on (sched_getaffinity; std::thread::hardware_concurrency as fallback).
int available_cpus();

// Makes glibc's malloc keep the memory LibTorch frees for reuse instead of handing it back
// to the kernel: blocks above 32 MiB are otherwise mmap'ed and munmap'ed on every use, and
// freed heap tops trimmed, so every activation and every oneDNN weight reorder faults its
// pages in again. On this project's build VM a page fault costs ~7-25 us: an SD 1.5 UNet step
// at 256x256 took 645,000 faults (2.5 GiB) and 22-26 s with glibc's defaults, 0 faults and
// 6.9 s with this (1 thread, same load). Returns false, changing nothing, when the
// environment already tunes malloc (GLIBC_TUNABLES=glibc.malloc..., MALLOC_*). Call at
// start-up, before large allocations; the resident memory then stays at its high-water mark.
// First touches still fault once per page: with huge_page_arena, blocks of 1 MiB and more
// (the activations) come from a region on 2 MiB transparent huge pages (arena.h), which
// fault 512 times less often; glibc itself can ask for them only from the environment
// (GLIBC_TUNABLES=glibc.malloc.hugetlb=1 made the first touch of 1 GiB take 0.14 s instead
// of 6-7 s here).
bool configure_allocator(bool huge_page_arena = true);

// Hands the heap's free memory back to the kernel (glibc malloc_trim: free pages anywhere
// in the heap, not only at its top). configure_allocator keeps freed memory for reuse,
// which is right inside a denoising loop (the same sizes every step) but adds up across
// phases: the VAE's freed 512x512 feature maps would stay resident through the next
// image's UNet steps. StableDiffusionModel::use calls this when the running component
// changes; the next phase faults its working set in once (measured here ~2.6 us a 4 KiB
// page; the huge-page arena's blocks fault a 2 MiB page at a time).
void release_free_memory();

// Whether the CPU computes in bfloat16 natively: AVX512-BF16 dot products or AMX bf16 tiles
// (cpuid, checked once). Without either, LibTorch 1.13 runs bf16 convolutions and matmuls in
// its own reference kernels, many times slower than fp32 (README, Performance).
bool cpu_has_native_bf16();

// Seconds since this process started (the kernel's start time, /proc/self/stat; 10 ms
// resolution): start-up includes the dynamic loader and LibTorch's static initialisers,
// which no clock started in main sees. -1 where unknown.
double process_seconds();

}  // namespace fairdiff
