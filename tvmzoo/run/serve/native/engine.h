// The native engine's C++ interface: what the HTTP pump (pump.cc) needs of a model's dynamic batcher
// (engine.cc). One Engine per served model; it owns the model instances' threads.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace tvmzoo {

// One request's rows: `rows` x Engine::row_bytes() bytes at `data`, 64-byte aligned (a batch-1 build runs
// them in place). `owner` keeps `data` alive until the request's Done has returned.
struct Rows {
  void* data = nullptr;
  int64_t rows = 0;
  std::shared_ptr<void> owner;
  bool finite = false;   // the submitter found every value finite (finite.h): the engine does not read them again
  // Instead of `data`, for rows that are always staged (fewer than the build's fixed batch): the engine calls it
  // to write them into its batch buffer at `dst`, saving the submitter's own copy of them. It returns whether every
  // value is finite (the submitter's check, finite.h; the engine reads them again only when not).
  std::function<bool(void* dst)> fill;
};

// Called exactly once per submitted request, on the instance thread that ran it. Success: `error` is empty
// and `outputs` holds rows x Engine::output_row_floats() float32 values, valid only during the call.
// Refused or failed: `outputs` is null and `error` says why (a non-finite input: `refused` is true).
using Done = std::function<void(const float* outputs, int64_t rows, bool refused, const std::string& error)>;

class Engine {
 public:
  virtual ~Engine() = default;
  // Queue a request. Returns false (Done is not called) when the engine is closed (draining). `wake` false
  // queues it unannounced: a caller submitting a burst (one pass over its ready connections) calls Kick once
  // after it, so a batch build gathers the burst into one batch instead of running its first request alone.
  virtual bool Submit(Rows rows, Done done, bool wake) = 0;
  virtual void Kick() = 0;
  virtual int64_t row_bytes() const = 0;           // bytes of one input row
  // Whether the engine refuses non-finite float32 inputs: a submitter checks what it copied (AllFinite32) and
  // marks the rows finite, or hands a request with NaN / Inf to Python, which refuses it with the message.
  virtual bool checks_finite32() const = 0;
  virtual int64_t output_row_floats() const = 0;   // float32 values of one output row
  virtual int64_t fixed_batch() const = 0;         // the build's batch (0: it takes any); fewer rows are staged
};

// The Engine behind a handle returned to Python by the engine's create function (nullptr: unknown handle).
Engine* EngineFromHandle(int64_t handle);

}  // namespace tvmzoo
