// OpenMP helpers and per-thread scratch, shared by the kernel sources (compiled for the default
// target: they hold no vector code).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastgpt::cpu {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Work (elements touched, or multiply-adds) per thread below which a parallel region costs more than it
// saves: forming and joining a team takes microseconds on idle cores, and up to a scheduler time slice
// when another process holds a core. ATen parallelises with the same grain (at::internal::GRAIN_SIZE),
// which is why a decode step's one-row LayerNorm must not open a region either.
constexpr int64_t kGrainSize = 32768;

// The number of threads for a region doing `work` units: 1 below two grains, else one per grain, at
// most every thread OpenMP has.
inline int threads_for(int64_t work) {
  if (work < 2 * kGrainSize) return 1;
  return static_cast<int>(std::min<int64_t>(max_threads(), work / kGrainSize));
}

// Runs region() once on each of `threads` OpenMP threads (thread_index() tells them apart), or once
// inline for one thread: libgomp forms a team and joins it at a barrier even for num_threads(1), a
// few microseconds that the tiny kernels of a decode step cannot afford. A worksharing loop
// (`omp for`) inside region splits over the team, or runs whole when inline.
template <typename Region>
void parallel_region(int threads, const Region& region) {
  if (threads <= 1) {
    region();
    return;
  }
#pragma omp parallel num_threads(threads)
  region();
}

// body(task) for every task in [0, tasks), split statically over `threads` threads (see parallel_region).
template <typename Body>
void parallel_for(int64_t tasks, int threads, const Body& body) {
  parallel_region(threads, [&] {
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) body(task);
  });
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Float32 (or T) scratch, 64-byte aligned, for every thread of the next parallel region: thread t uses
// elements [t * per_thread, (t + 1) * per_thread). Allocated before the region, so that running out of
// memory throws std::bad_alloc to the caller instead of terminating inside an OpenMP region.
template <typename T = float>
class ThreadScratch {
 public:
  // per_thread is rounded up to 16 elements (64 bytes or more), so every thread's part stays aligned.
  ThreadScratch(int threads, int64_t per_thread) : per_thread_(round_up(per_thread, 16)) {
    size_t bytes = static_cast<size_t>(threads) * static_cast<size_t>(per_thread_) * sizeof(T);
    data_ = static_cast<T*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
    if (data_ == nullptr) throw std::bad_alloc();
  }
  ~ThreadScratch() { std::free(data_); }
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;

  T* for_thread(int thread) const { return data_ + thread * per_thread_; }

 private:
  int64_t per_thread_;
  T* data_;
};

}  // namespace fastgpt::cpu
