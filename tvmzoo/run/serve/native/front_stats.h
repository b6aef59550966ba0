// What a native front (the HTTP pump, the gRPC front) answered for one model: Python reads it at scrape time
// (metrics.native_counts, Metrics.count_elsewhere) and adds it to its own counts of the same series.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#include <tvm/ffi/container/array.h>

namespace tvmzoo {

inline int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct FrontStats {
  std::atomic<int64_t> success{0}, request_ns{0}, pending{0}, last_success_unix_ms{0};

  // A request answered, taken at `start_ns` (NowNs).
  void Answered(int64_t start_ns) {
    success.fetch_add(1);
    request_ns.fetch_add(NowNs() - start_ns);
    last_success_unix_ms.store(std::chrono::duration_cast<std::chrono::milliseconds>(
        std::chrono::system_clock::now().time_since_epoch()).count());
  }

  // success, summed request ns, pending, last success (unix ms): native_counts' order.
  tvm::ffi::Array<int64_t> Read() const {
    return {success.load(), request_ns.load(), pending.load(), last_success_unix_ms.load()};
  }
};

}  // namespace tvmzoo
