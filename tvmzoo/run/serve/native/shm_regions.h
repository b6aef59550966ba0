// System shared memory regions as the native fronts see them. shared_memory.py registers a region (it checks the
// key, opens the object O_NOFOLLOW, checks the bounds) and mirrors it here with the object's descriptor, which is
// dup'ed; unregistering removes the name. A request holds its regions (shared_ptr) until it is answered, so an
// unregister in between only takes the name away, as Python's deferred close does.
//
// Reads and writes are pread / pwrite after fstat, never a mapping: a client truncating its object makes them
// fall short (the front then hands the request to Python, which words the error), never SIGBUS.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <memory>
#include <cstring>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

namespace tvmzoo {

class ShmRegion {
 public:
  ShmRegion(int fd, int64_t offset, int64_t byte_size) : fd_(fd), offset_(offset), byte_size_(byte_size) {}
  ~ShmRegion() { ::close(fd_); }
  ShmRegion(const ShmRegion&) = delete;
  ShmRegion& operator=(const ShmRegion&) = delete;

  // A tensor of `span` bytes at `at` (its shared_memory_offset) lies inside the region (shared_memory.py's
  // acquire check).
  bool Inside(int64_t at, int64_t span) const {
    return at >= 0 && span >= 0 && at < byte_size_ && span <= byte_size_ - at;
  }

  // False when the object is now shorter than the bytes (truncated after registering).
  bool Read(int64_t at, int64_t n, void* dst) const {
    return Holds(at, n) && Whole(n, [&](int64_t done) {
      return ::pread(fd_, static_cast<char*>(dst) + done, n - done, offset_ + at + done);
    });
  }
  bool Write(int64_t at, const void* src, int64_t n) const {
    return Holds(at, n) && Whole(n, [&](int64_t done) {
      return ::pwrite(fd_, static_cast<const char*>(src) + done, n - done, offset_ + at + done);
    });
  }

 private:
  bool Holds(int64_t at, int64_t n) const {
    struct stat info;
    return ::fstat(fd_, &info) == 0 && offset_ + at + n <= info.st_size;
  }
  template <typename Io>
  static bool Whole(int64_t n, Io io) {
    for (int64_t done = 0; done < n;) {
      ssize_t got = io(done);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) return false;
      done += got;
    }
    return true;
  }

  int fd_;
  int64_t offset_, byte_size_;   // the region's place in its object
};

class ShmRegions {
 public:
  // "" when added; else why not (the descriptor cannot be duplicated).
  std::string Add(const std::string& name, int fd, int64_t offset, int64_t byte_size) {
    int own = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0)
      return "cannot duplicate the descriptor of shared memory region '" + name + "': " + std::strerror(errno);
    auto region = std::make_shared<const ShmRegion>(own, offset, byte_size);
    std::lock_guard<std::mutex> lock(mu_);
    by_name_[name] = std::move(region);
    return "";
  }
  void Remove(const std::string& name) {   // "": every region
    std::lock_guard<std::mutex> lock(mu_);
    if (name.empty()) by_name_.clear();
    else by_name_.erase(name);
  }
  // The region named `name` when a tensor of `span` bytes at `at` lies inside it, else null.
  std::shared_ptr<const ShmRegion> Find(std::string_view name, int64_t at, int64_t span) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = by_name_.find(std::string(name));
    return it == by_name_.end() || !it->second->Inside(at, span) ? nullptr : it->second;
  }

 private:
  mutable std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<const ShmRegion>> by_name_;
};

}  // namespace tvmzoo
