// The on-disk kernel cache: compiled kernel binaries (cubin / PTX from NVRTC, ELF object code from
// LLVM) kept in $KILN_CACHE_DIR under a key that names everything that changes the binary, and
// shared by concurrent processes. obtainCudaKernel and obtainCpuKernel ask here before compiling
// and store here after. See docs/kernel-cache.md for the file format, concurrency and eviction rules.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>

namespace kiln {

// Note: every field changes the compiled binary, so every field enters the hash, and the full
// text is stored in the file and compared on load (a hash collision or a foreign file is a miss).
// `source` is what the generator made of the IR: a changed emitter or device helper at the same
// kiln version is a different key, never an old binary (Triton's key names its compiler too).
struct KernelCacheKey {
  std::string ir;              // the kernel IR text
  std::string source;          // the generated code the compiler is given (CUDA C++, LLVM IR)
  std::string specialization;  // dtypes, ranks, stride classes, alignment the kernel assumes
  std::string arch;            // target, e.g. "sm_90" or "x86_64-avx2"
  std::string compiler;        // compiler and its version, e.g. "nvrtc 12.4"
  std::string options;         // compile options, e.g. "-O3 --use_fast_math"
  std::string kiln_version;    // kilnVersion() unless a test says otherwise

  KernelCacheKey();

  // All fields, each length-prefixed, so no two different keys have the same text.
  std::string text() const;
  // 128-bit FNV-1a of text(), as 32 lowercase hex digits; the cache file's name.
  std::string hashHex() const;
};

// 128-bit FNV-1a (offset basis 0x6c62272e07bb014262b821756295c58d, prime 2^88 + 0x13b) of
// `bytes`, as 32 lowercase hex digits.
std::string fnv1a128Hex(const std::string& bytes);

class KernelCache {
 public:
  // Extension of the cache's own files; anything else in the directory is left alone.
  static constexpr const char* kFileExtension = ".kbin";

  // Uses (and creates, mode 0700 with missing parents) `dir`; keeps the files there under
  // `max_bytes` in total. A directory that cannot be created or written is warned about once;
  // the cache then misses on every load and fails every store, and kiln runs on. A directory
  // others may write to (group- or world-writable, or another user's) is refused the same way,
  // with one warning: its files are code this process would load and run.
  KernelCache(std::string dir, int64_t max_bytes);
  KernelCache(const KernelCache&) = delete;
  KernelCache& operator=(const KernelCache&) = delete;

  // The process-wide cache: Options::global().cache_dir, capped at cache_max_mb.
  static KernelCache& global();

  // The payload stored under `key`, or nullopt on a miss (no file, or a corrupt, truncated or
  // foreign one, or anything but a regular file: symlinks are not followed, and a FIFO does not
  // block). A hit marks the file recently used.
  std::optional<std::string> load(const KernelCacheKey& key);
  // Writes `payload` under `key` atomically (temp file + rename), then evicts the least recently
  // used files until the directory is under max_bytes. False when nothing was stored: an
  // unwritable directory, or a file larger than max_bytes by itself.
  bool store(const KernelCacheKey& key, const std::string& payload);

  struct Info {
    std::string dir;
    int64_t files = 0;
    int64_t bytes = 0;
    int64_t max_bytes = 0;
  };
  // What is on disk now (every process's files, not only this one's).
  Info info() const;
  struct ClearResult {
    int64_t removed = 0;  // cache files removed
    int64_t left = 0;     // cache files that could not be removed
    std::string error;    // empty, or the first failure: "cannot remove PATH: REASON"
  };
  // Removes the cache's files (and stale temp files). A directory that is missing holds nothing
  // to remove; one that cannot be read, or files that cannot be removed, are an error.
  ClearResult clear();

  // Counts for this cache object since it was made.
  struct Stats {
    int64_t hits = 0;
    int64_t misses = 0;
    int64_t stores = 0;
    int64_t corrupt = 0;    // files rejected on load: bad magic, version, key, size or checksum
    int64_t evictions = 0;  // files this object removed to stay under max_bytes
  };
  Stats stats() const;

  const std::string& dir() const { return dir_; }
  int64_t maxBytes() const { return max_bytes_; }

 private:
  std::string pathFor(const std::string& hash_hex) const;
  // Creates the directory when missing; an empty string on success, else the reason.
  std::string ensureDirectory() const;
  // Empty when only this user can write the directory, else why the cache refuses it.
  std::string unsafeDirectoryReason() const;
  void warnUnwritable(const std::string& reason);
  void refuseDirectory(const std::string& reason);
  void rejectFile(const std::string& path, const std::string& reason);
  void evictToFit(const std::string& keep_name);

  const std::string dir_;
  const int64_t max_bytes_;
  std::mutex eviction_mutex_;
  std::atomic<bool> warned_{false};
  std::atomic<bool> refused_{false};  // an unsafe directory: no loads, no stores
  std::atomic<int64_t> hits_{0}, misses_{0}, stores_{0}, corrupt_{0}, evictions_{0};
  std::atomic<uint64_t> temp_counter_{0};
};

}  // namespace kiln
