// jsdl native kernels: work spread over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jsdl {

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> busy{0};
  std::mutex mu;
  std::condition_variable cv;
};

// How many threads a call of about `work` element operations should use: the pool's threads plus
// the caller, at most max_threads, one for small calls (waking a thread costs more than they do).
inline int64_t Threads(xla::ffi::ThreadPool& pool, int64_t max_threads, int64_t work) {
  if (work < (int64_t{1} << 15)) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(max_threads, pool.num_threads() + 1));
}

// Runs work(item) for item in [0, items) on the calling thread and up to threads - 1 pool threads.
// The caller waits only for items that a thread has started, never for a task still queued, so a
// busy or single-threaded pool (or a caller that is itself a pool thread) cannot deadlock it.
// Tasks that start late find no item left and touch only the shared Progress.
template <typename Work>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t threads, int64_t items, Work work) {
  auto progress = std::make_shared<Progress>();
  auto run = [items, work](Progress* p) {
    for (;;) {
      p->busy.fetch_add(1);
      int64_t item = p->next.fetch_add(1);
      if (item < items) work(item);
      if (p->busy.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(p->mu);
        p->cv.notify_all();
      }
      if (item >= items) return;
    }
  };
  for (int64_t t = 1; t < std::min(threads, items); ++t) pool.Schedule([progress, run]() { run(progress.get()); });
  run(progress.get());
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->cv.wait(lock, [&] { return progress->busy.load() == 0; });
}

}  // namespace jsdl
