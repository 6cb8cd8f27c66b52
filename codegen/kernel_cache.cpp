// The on-disk kernel cache: one file per key, written to a temp file and renamed into place so
// readers in any process see a whole file or none; read without locks and verified (magic,
// version, stored key, sizes, CRC32 of the payload); kept under a byte cap by evicting the least
// recently used files, recency being the file's mtime, which every hit refreshes. Only a directory
// no one else can write is used, and only regular files in it are read (no symlinks, no FIFOs).
#include "codegen/kernel_cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <mutex>
#include <random>
#include <vector>

#include "codegen/atomic_file.h"
#include "codegen/versions.h"
#include "kiln/options.h"

namespace kiln {
namespace {

// File layout (integers little-endian):
//   0  char[8]  magic "KILNKBIN"
//   8  u32      format version
//  12  u32      CRC32 of the payload
//  16  u64      key text length K
//  24  u64      payload length P
//  32  K bytes  key text (KernelCacheKey::text())
//  32+K P bytes payload
// The file's size must be exactly 32 + K + P; anything else is truncated or foreign.
constexpr char kMagic[8] = {'K', 'I', 'L', 'N', 'K', 'B', 'I', 'N'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kHeaderSize = 32;
constexpr size_t kHashHexLength = 32;
// A temp file this old was left by a process that died between write and rename.
constexpr time_t kStaleTempSeconds = 3600;

void putLittleEndian(char* out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out[i] = static_cast<char>((value >> (8 * i)) & 0xff);
}

uint64_t getLittleEndian(const char* in, int bytes) {
  uint64_t value = 0;
  for (int i = 0; i < bytes; ++i) {
    value |= static_cast<uint64_t>(static_cast<unsigned char>(in[i])) << (8 * i);
  }
  return value;
}

uint32_t payloadChecksum(const std::string& payload) {
  return static_cast<uint32_t>(crc32_z(
      crc32_z(0, nullptr, 0), reinterpret_cast<const Bytef*>(payload.data()), payload.size()));
}

bool isHexDigit(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

bool startsWithHash(const std::string& name) {
  if (name.size() < kHashHexLength) return false;
  return std::all_of(name.begin(), name.begin() + kHashHexLength, isHexDigit);
}

bool endsWith(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// HASH.kbin: a cache file. HASH.kbin.PID.SALT.N.tmp: one being written. Nothing else is ours.
bool isCacheFileName(const std::string& name) {
  return name.size() == kHashHexLength + std::strlen(KernelCache::kFileExtension) &&
         startsWithHash(name) && endsWith(name, KernelCache::kFileExtension);
}

bool isTempFileName(const std::string& name) {
  const std::string prefix_tail = std::string(KernelCache::kFileExtension) + ".";
  return startsWithHash(name) &&
         name.compare(kHashHexLength, prefix_tail.size(), prefix_tail) == 0 &&
         endsWith(name, ".tmp");
}

// Reads exactly `size` bytes at `offset`; false on a short read (the file shrank) or an error.
bool readFully(int fd, char* out, size_t size, off_t offset) {
  while (size > 0) {
    ssize_t n = pread(fd, out, size, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    out += n;
    size -= static_cast<size_t>(n);
    offset += n;
  }
  return true;
}

struct FileDescriptor {
  int fd = -1;
  explicit FileDescriptor(int descriptor) : fd(descriptor) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd >= 0) close(fd);
  }
};

struct DirectoryEntry {
  std::string name;
  int64_t bytes;
  timespec mtime;
};

// The cache's own files in `dir`, with sizes and mtimes. Removes temp files older than
// kStaleTempSeconds on the way when `remove_stale_temps`; files that vanish meanwhile (another
// process evicted them) are skipped. A directory that cannot be opened lists nothing and sets
// `*open_errno` (when given) to why.
std::vector<DirectoryEntry> listCacheFiles(const std::string& dir, bool remove_stale_temps,
                                           int* open_errno = nullptr) {
  std::vector<DirectoryEntry> entries;
  DIR* handle = opendir(dir.c_str());
  if (open_errno) *open_errno = handle ? 0 : errno;
  if (!handle) return entries;
  const time_t now = std::time(nullptr);
  while (dirent* entry = readdir(handle)) {
    const std::string name = entry->d_name;
    const bool cache_file = isCacheFileName(name);
    if (!cache_file && !(remove_stale_temps && isTempFileName(name))) continue;
    struct stat st;
    if (fstatat(dirfd(handle), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISREG(st.st_mode)) {
      continue;
    }
    if (cache_file) {
      entries.push_back({name, static_cast<int64_t>(st.st_size), st.st_mtim});
    } else if (now - st.st_mtim.tv_sec > kStaleTempSeconds) {
      unlinkat(dirfd(handle), name.c_str(), 0);
    }
  }
  closedir(handle);
  return entries;
}

bool olderThan(const timespec& a, const timespec& b) {
  return a.tv_sec != b.tv_sec ? a.tv_sec < b.tv_sec : a.tv_nsec < b.tv_nsec;
}

}  // namespace

KernelCacheKey::KernelCacheKey() : kiln_version(kilnVersion()) {}

std::string KernelCacheKey::text() const {
  std::string out;
  auto field = [&out](const char* name, const std::string& value) {
    out += name;
    out += ' ';
    out += std::to_string(value.size());
    out += '\n';
    out += value;
    out += '\n';
  };
  field("kiln", kiln_version);
  field("compiler", compiler);
  field("arch", arch);
  field("options", options);
  field("specialization", specialization);
  field("ir", ir);
  field("source", source);
  return out;
}

std::string KernelCacheKey::hashHex() const { return fnv1a128Hex(text()); }

std::string fnv1a128Hex(const std::string& bytes) {
  using uint128 = unsigned __int128;
  const uint128 prime = (static_cast<uint128>(1) << 88) + 0x13b;
  uint128 hash = (static_cast<uint128>(0x6c62272e07bb0142ULL) << 64) | 0x62b821756295c58dULL;
  for (unsigned char byte : bytes) {
    hash ^= byte;
    hash *= prime;
  }
  static const char digits[] = "0123456789abcdef";
  std::string hex(kHashHexLength, '0');
  for (size_t i = 0; i < kHashHexLength; ++i) {
    hex[kHashHexLength - 1 - i] = digits[static_cast<unsigned>(hash & 0xf)];
    hash >>= 4;
  }
  return hex;
}

KernelCache::KernelCache(std::string dir, int64_t max_bytes)
    : dir_(std::move(dir)), max_bytes_(max_bytes) {
  std::string error = ensureDirectory();
  if (!error.empty()) {
    warnUnwritable(error);
  } else if (std::string unsafe = unsafeDirectoryReason(); !unsafe.empty()) {
    refuseDirectory(unsafe);
  }
}

KernelCache& KernelCache::global() {
  // Never destroyed: compiles may still store from other threads while statics are torn down.
  static KernelCache* cache = [] {
    const Options& options = Options::global();
    // The cache is where KILN_CACHE_MAX_MB is used, so a rejected value is reported here, once.
    for (const std::string& problem : options.problems) {
      log(LogLevel::kWarning, "ignoring " + problem + "; the default applies");
    }
    return new KernelCache(options.cache_dir, options.cache_max_mb << 20);
  }();
  return *cache;
}

std::string KernelCache::pathFor(const std::string& hash_hex) const {
  return dir_ + "/" + hash_hex + kFileExtension;
}

std::string KernelCache::ensureDirectory() const {
  if (dir_.empty()) return "the cache directory is empty (set KILN_CACHE_DIR)";
  struct stat st;
  if (stat(dir_.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) return "";
  // Each missing component is made 0700: compiled code is loaded and run, so nobody else may
  // plant files where this user's processes read them.
  for (size_t slash = dir_.find('/', 1);; slash = dir_.find('/', slash + 1)) {
    const std::string prefix = dir_.substr(0, slash);
    if (mkdir(prefix.c_str(), 0700) != 0 && errno != EEXIST) {
      return "cannot create " + prefix + ": " + std::strerror(errno);
    }
    if (slash == std::string::npos) break;
  }
  if (stat(dir_.c_str(), &st) != 0) return "cannot use " + dir_ + ": " + std::strerror(errno);
  if (!S_ISDIR(st.st_mode)) return dir_ + " is not a directory";
  return "";
}

std::string KernelCache::unsafeDirectoryReason() const {
  struct stat st;
  if (stat(dir_.c_str(), &st) != 0) return "";  // missing: ensureDirectory() makes it 0700
  if (st.st_uid != geteuid()) {
    return dir_ + " belongs to uid " + std::to_string(st.st_uid) + ", not to this user (uid " +
           std::to_string(geteuid()) + ")";
  }
  if (st.st_mode & (S_IWGRP | S_IWOTH)) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return dir_ + " is writable by others (mode " + mode + "; chmod 700 it)";
  }
  return "";
}

void KernelCache::refuseDirectory(const std::string& reason) {
  refused_.store(true);
  if (warned_.exchange(true)) return;
  log(LogLevel::kWarning, "kernel cache: refusing " + reason +
                              ": it would hold code kiln loads and runs; kernels are compiled "
                              "in memory only (this warning is not repeated)");
}

void KernelCache::warnUnwritable(const std::string& reason) {
  if (warned_.exchange(true)) return;
  log(LogLevel::kWarning,
      "kernel cache: " + reason +
          "; compiled kernels are not kept on disk (this warning is not repeated)");
}

void KernelCache::rejectFile(const std::string& path, const std::string& reason) {
  // Left in place, not deleted: another process may have just renamed a good file over it, and
  // the next store of this key replaces it anyway.
  corrupt_.fetch_add(1, std::memory_order_relaxed);
  log(LogLevel::kInfo,
      "kernel cache: ignoring " + path + " (" + reason + "); the next store rewrites it");
}

std::optional<std::string> KernelCache::load(const KernelCacheKey& key) {
  auto miss = [this]() -> std::optional<std::string> {
    misses_.fetch_add(1, std::memory_order_relaxed);
    return std::nullopt;
  };
  if (refused_.load()) return miss();
  const std::string key_text = key.text();
  const std::string path = pathFor(fnv1a128Hex(key_text));
  // O_NOFOLLOW: a symlink at the name is not ours (stores rename regular files into place).
  // O_NONBLOCK: opening a FIFO planted at the name would otherwise wait for a writer forever;
  // on a regular file it changes nothing.
  FileDescriptor file(open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK));
  if (file.fd < 0) {
    if (errno == ELOOP) rejectFile(path, "a symbolic link; not followed");
    return miss();
  }
  struct stat st;
  if (fstat(file.fd, &st) != 0) return miss();
  if (!S_ISREG(st.st_mode)) {
    rejectFile(path, "not a regular file");
    return miss();
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);

  char header[kHeaderSize];
  if (file_size < kHeaderSize || !readFully(file.fd, header, kHeaderSize, 0)) {
    rejectFile(path, "shorter than its header");
    return miss();
  }
  if (std::memcmp(header, kMagic, sizeof(kMagic)) != 0) {
    rejectFile(path, "not a kiln cache file");
    return miss();
  }
  if (getLittleEndian(header + 8, 4) != kFormatVersion) {
    rejectFile(path, "format version " + std::to_string(getLittleEndian(header + 8, 4)) +
                         ", expected " + std::to_string(kFormatVersion));
    return miss();
  }
  const uint32_t checksum = static_cast<uint32_t>(getLittleEndian(header + 12, 4));
  const uint64_t key_size = getLittleEndian(header + 16, 8);
  const uint64_t payload_size = getLittleEndian(header + 24, 8);
  // Written so that no sum can overflow, whatever a foreign header holds.
  if (key_size > file_size - kHeaderSize || payload_size != file_size - kHeaderSize - key_size) {
    rejectFile(path,
               "size " + std::to_string(file_size) + " does not match its header (truncated?)");
    return miss();
  }
  std::string stored_key(key_size, '\0');
  if (!readFully(file.fd, stored_key.data(), key_size, kHeaderSize)) {
    rejectFile(path, "truncated key");
    return miss();
  }
  if (stored_key != key_text) {
    rejectFile(path, "holds another key (hash collision or foreign file)");
    return miss();
  }
  std::string payload(payload_size, '\0');
  if (!readFully(file.fd, payload.data(), payload_size,
                 static_cast<off_t>(kHeaderSize + key_size))) {
    rejectFile(path, "truncated payload");
    return miss();
  }
  if (payloadChecksum(payload) != checksum) {
    rejectFile(path, "payload checksum mismatch");
    return miss();
  }
  // The mtime is the recency eviction goes by. Failure (a read-only file) only ages the entry.
  futimens(file.fd, nullptr);
  hits_.fetch_add(1, std::memory_order_relaxed);
  return payload;
}

bool KernelCache::store(const KernelCacheKey& key, const std::string& payload) {
  if (refused_.load()) return false;
  const std::string key_text = key.text();
  const std::string hash_hex = fnv1a128Hex(key_text);
  const uint64_t file_size = kHeaderSize + key_text.size() + payload.size();
  if (static_cast<int64_t>(file_size) > max_bytes_) {
    log(LogLevel::kInfo, "kernel cache: not storing " + hash_hex + ": " +
                             std::to_string(file_size) + " bytes exceed the cache's " +
                             std::to_string(max_bytes_));
    return false;
  }
  // A directory removed while the process runs is made again.
  std::string error = ensureDirectory();
  if (!error.empty()) {
    warnUnwritable(error);
    return false;
  }
  if (std::string unsafe = unsafeDirectoryReason(); !unsafe.empty()) {
    refuseDirectory(unsafe);
    return false;
  }

  // The temp name is unique per process (pid, and a random salt for processes in other pid
  // namespaces sharing the directory) and per store (counter); O_EXCL catches the rest.
  static const uint64_t process_salt = std::random_device{}();
  const std::string final_path = pathFor(hash_hex);
  auto temp_name = [&](int) {
    return final_path + "." + std::to_string(getpid()) + "." + std::to_string(process_salt) + "." +
           std::to_string(temp_counter_.fetch_add(1, std::memory_order_relaxed)) + ".tmp";
  };

  char header[kHeaderSize];
  std::memcpy(header, kMagic, sizeof(kMagic));
  putLittleEndian(header + 8, kFormatVersion, 4);
  putLittleEndian(header + 12, payloadChecksum(payload), 4);
  putLittleEndian(header + 16, key_text.size(), 8);
  putLittleEndian(header + 24, payload.size(), 8);
  // No fsync: a file cut short by a crash fails its size or checksum check and is rewritten, so
  // durability is not worth a disk flush per kernel.
  ReplaceResult written = writeTempAndRename(final_path, temp_name, 4,
                                             {std::string_view(header, kHeaderSize), key_text, payload},
                                             /*sync=*/false, 0600);
  if (written.failed_at == ReplaceResult::kCreate) {
    warnUnwritable("cannot create a file in " + dir_ + ": " + std::strerror(written.error));
    return false;
  }
  if (!written) {
    warnUnwritable("cannot write " + final_path + ": " + std::strerror(written.error));
    return false;
  }
  stores_.fetch_add(1, std::memory_order_relaxed);
  evictToFit(hash_hex + kFileExtension);
  return true;
}

void KernelCache::evictToFit(const std::string& keep_name) {
  // One scan at a time per object; other processes may scan at once, which costs only a few
  // unlink() calls that find the file already gone. Loads never take this lock.
  std::lock_guard<std::mutex> lock(eviction_mutex_);
  std::vector<DirectoryEntry> entries = listCacheFiles(dir_, /*remove_stale_temps=*/true);
  int64_t total = 0;
  for (const DirectoryEntry& entry : entries) total += entry.bytes;
  if (total <= max_bytes_) return;
  std::sort(entries.begin(), entries.end(), [](const DirectoryEntry& a, const DirectoryEntry& b) {
    return olderThan(a.mtime, b.mtime);
  });
  for (const DirectoryEntry& entry : entries) {
    if (total <= max_bytes_) break;
    if (entry.name == keep_name) continue;
    const std::string path = dir_ + "/" + entry.name;
    if (unlink(path.c_str()) == 0) {
      evictions_.fetch_add(1, std::memory_order_relaxed);
      log(LogLevel::kDebug, "kernel cache: evicted " + path);
    }
    // Gone either way: evicted here or by another process.
    total -= entry.bytes;
  }
}

KernelCache::Info KernelCache::info() const {
  Info info;
  info.dir = dir_;
  info.max_bytes = max_bytes_;
  for (const DirectoryEntry& entry : listCacheFiles(dir_, /*remove_stale_temps=*/false)) {
    ++info.files;
    info.bytes += entry.bytes;
  }
  return info;
}

KernelCache::ClearResult KernelCache::clear() {
  ClearResult result;
  int open_errno = 0;
  const std::vector<DirectoryEntry> entries =
      listCacheFiles(dir_, /*remove_stale_temps=*/true, &open_errno);
  if (open_errno != 0 && open_errno != ENOENT) {
    result.error = "cannot read " + dir_ + ": " + std::strerror(open_errno);
  }
  for (const DirectoryEntry& entry : entries) {
    const std::string path = dir_ + "/" + entry.name;
    if (unlink(path.c_str()) == 0) {
      ++result.removed;
    } else if (errno != ENOENT) {  // ENOENT: another process evicted it meanwhile
      ++result.left;
      if (result.error.empty()) {
        result.error = "cannot remove " + path + ": " + std::strerror(errno);
      }
    }
  }
  return result;
}

KernelCache::Stats KernelCache::stats() const {
  Stats stats;
  stats.hits = hits_.load(std::memory_order_relaxed);
  stats.misses = misses_.load(std::memory_order_relaxed);
  stats.stores = stores_.load(std::memory_order_relaxed);
  stats.corrupt = corrupt_.load(std::memory_order_relaxed);
  stats.evictions = evictions_.load(std::memory_order_relaxed);
  return stats;
}

}  // namespace kiln
