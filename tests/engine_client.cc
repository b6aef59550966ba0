// A C++ submitter of the native engine, as the HTTP pump is (tests/test_serve_native.py builds it with engine.cc):
// each row of `rows` its own request through tvmzoo::Engine::Submit, its output written by its Done.
#include "engine.h"

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

// Per row: "" (its outputs are in `out`), the engine's error, or "closed" (Submit refused it). `finite`: the rows
// are submitted as checked (Rows::finite), as the pump and the gRPC front do after their own check.
tvm::ffi::Array<tvm::ffi::String> SubmitRows(int64_t handle, tvm::ffi::TensorView rows, tvm::ffi::TensorView out,
                                             bool finite) {
  tvmzoo::Engine* engine = tvmzoo::EngineFromHandle(handle);
  if (engine == nullptr) return {"unknown handle"};
  int64_t n = rows.size(0), row_bytes = engine->row_bytes(), floats = engine->output_row_floats();
  std::vector<std::string> errors(n);
  std::mutex mu;
  std::condition_variable cv;
  int64_t pending = 0;
  for (int64_t i = 0; i < n; ++i) {
    std::shared_ptr<void> copy(std::aligned_alloc(64, (row_bytes + 63) / 64 * 64), std::free);
    std::memcpy(copy.get(), static_cast<const char*>(rows.data_ptr()) + i * row_bytes, row_bytes);
    tvmzoo::Rows request{copy.get(), 1, copy, finite};
    float* dst = static_cast<float*>(out.data_ptr()) + i * floats;
    {
      std::lock_guard<std::mutex> lock(mu);
      ++pending;
    }
    bool queued = engine->Submit(request, [&, i, dst, floats](const float* outputs, int64_t count, bool refused,
                                                              const std::string& error) {
      std::lock_guard<std::mutex> lock(mu);
      if (outputs != nullptr && count == 1) std::memcpy(dst, outputs, floats * sizeof(float));
      errors[i] = outputs != nullptr ? "" : (refused ? "refused: " : "failed: ") + error;
      if (--pending == 0) cv.notify_all();
    }, /*wake=*/false);   // a burst, as the pump submits one pass's requests
    if (!queued) {
      std::lock_guard<std::mutex> lock(mu);
      errors[i] = "closed";
      --pending;
    }
  }
  engine->Kick();
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return pending == 0; });
  tvm::ffi::Array<tvm::ffi::String> result;
  for (auto& e : errors) result.push_back(e);
  return result;
}

bool ChecksFinite32(int64_t handle) { return tvmzoo::EngineFromHandle(handle)->checks_finite32(); }

TVM_FFI_DLL_EXPORT_TYPED_FUNC(submit_rows, SubmitRows);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(checks_finite32, ChecksFinite32);
