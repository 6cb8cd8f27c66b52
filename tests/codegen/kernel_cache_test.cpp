// The on-disk kernel cache, each test in a fresh temp directory: round trips, the key (generated
// source included), files that are corrupt, truncated, foreign, symlinks or FIFOs, the 0700
// directory and directories others can write, LRU eviction, an unwritable directory, clear and its
// failures, and threads and processes sharing one directory.
#include "codegen/kernel_cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "codegen/cuda_emitter.h"
#include "tests/codegen/temp_dir.h"

namespace kiln {
namespace {

KernelCacheKey makeKey(int index) {
  KernelCacheKey key;
  key.ir = "kernel k" + std::to_string(index) + "(f32[?,?] x) { y = exp(x) }";
  key.specialization = "f32 rank2 contiguous align16";
  key.arch = "sm_90";
  key.compiler = "nvrtc 12.4";
  key.options = "-O3";
  return key;
}

std::string randomPayload(size_t size, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string payload(size, '\0');
  for (char& c : payload) c = static_cast<char>(rng() & 0xff);
  return payload;
}

std::string cachePath(const KernelCache& cache, const KernelCacheKey& key) {
  return cache.dir() + "/" + key.hashHex() + KernelCache::kFileExtension;
}

void writeFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  ASSERT_TRUE(out.good()) << path;
}

bool exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

void setMtime(const std::string& path, time_t seconds) {
  timespec times[2] = {{seconds, 0}, {seconds, 0}};
  ASSERT_EQ(utimensat(AT_FDCWD, path.c_str(), times, 0), 0) << path;
}

time_t mtimeOf(const std::string& path) {
  struct stat st;
  EXPECT_EQ(stat(path.c_str(), &st), 0) << path;
  return st.st_mtim.tv_sec;
}

std::vector<std::string> fileNames(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* handle = opendir(dir.c_str())) {
    while (dirent* entry = readdir(handle)) names.push_back(entry->d_name);
    closedir(handle);
  }
  return names;
}

int countOccurrences(const std::string& text, const std::string& needle) {
  int count = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1))
    ++count;
  return count;
}

constexpr int64_t kLarge = int64_t{1} << 30;

TEST(KernelCacheKey, Fnv1a128TestVectors) {
  EXPECT_EQ(fnv1a128Hex(""), "6c62272e07bb014262b821756295c58d");
  EXPECT_EQ(fnv1a128Hex("a"), "d228cb696f1a8caf78912b704e4a8964");
  EXPECT_EQ(fnv1a128Hex("foobar"), "343e1662793c64bf6f0d3597ba446f18");
}

TEST(KernelCacheKey, EveryFieldChangesTheHash) {
  const KernelCacheKey base = makeKey(0);
  EXPECT_EQ(base.hashHex(), makeKey(0).hashHex());
  EXPECT_EQ(base.hashHex().size(), 32u);
  std::vector<std::string KernelCacheKey::*> fields = {
      &KernelCacheKey::ir,          &KernelCacheKey::source,   &KernelCacheKey::specialization,
      &KernelCacheKey::arch,        &KernelCacheKey::compiler, &KernelCacheKey::options,
      &KernelCacheKey::kiln_version};
  for (auto field : fields) {
    KernelCacheKey changed = base;
    changed.*field += "!";
    EXPECT_NE(changed.text(), base.text());
    EXPECT_NE(changed.hashHex(), base.hashHex());
  }
  // Length prefixes: moving text from one field into its neighbour is a different key.
  KernelCacheKey a, b;
  a.ir = "x";
  b.specialization = "x";
  EXPECT_NE(a.text(), b.text());
  EXPECT_FALSE(KernelCacheKey().kiln_version.empty());
}

TEST(KernelCache, StoreLoadRoundTrip) {
  TempDir temp;
  KernelCache cache(temp.path(), kLarge);
  const std::string with_nuls("\0cubin\0\0data\xff\0", 14);
  const std::string empty;
  const std::string large = randomPayload(5 << 20, 1);
  ASSERT_TRUE(cache.store(makeKey(0), with_nuls));
  ASSERT_TRUE(cache.store(makeKey(1), empty));
  ASSERT_TRUE(cache.store(makeKey(2), large));
  EXPECT_TRUE(exists(cachePath(cache, makeKey(0))));

  std::optional<std::string> loaded = cache.load(makeKey(0));
  ASSERT_TRUE(loaded.has_value());
  EXPECT_EQ(*loaded, with_nuls);
  loaded = cache.load(makeKey(1));
  ASSERT_TRUE(loaded.has_value());
  EXPECT_EQ(*loaded, empty);
  loaded = cache.load(makeKey(2));
  ASSERT_TRUE(loaded.has_value());
  EXPECT_TRUE(*loaded == large);
  EXPECT_FALSE(cache.load(makeKey(3)).has_value());

  KernelCache::Stats stats = cache.stats();
  EXPECT_EQ(stats.stores, 3);
  EXPECT_EQ(stats.hits, 3);
  EXPECT_EQ(stats.misses, 1);
  EXPECT_EQ(stats.corrupt, 0);
  KernelCache::Info info = cache.info();
  EXPECT_EQ(info.dir, temp.path());
  EXPECT_EQ(info.files, 3);
  EXPECT_GT(info.bytes, int64_t{5 << 20});
  EXPECT_EQ(info.max_bytes, kLarge);
}

TEST(KernelCache, StoreReplacesAnEarlierPayload) {
  TempDir temp;
  KernelCache cache(temp.path(), kLarge);
  ASSERT_TRUE(cache.store(makeKey(0), "first"));
  ASSERT_TRUE(cache.store(makeKey(0), "second"));
  EXPECT_EQ(cache.load(makeKey(0)).value_or(""), "second");
  EXPECT_EQ(cache.info().files, 1);
}

TEST(KernelCache, MissWhenAnyKeyFieldDiffers) {
  TempDir temp;
  KernelCache cache(temp.path(), kLarge);
  const KernelCacheKey base = makeKey(0);
  ASSERT_TRUE(cache.store(base, "payload"));
  for (auto field : {&KernelCacheKey::ir, &KernelCacheKey::source, &KernelCacheKey::specialization,
                     &KernelCacheKey::arch, &KernelCacheKey::compiler, &KernelCacheKey::options,
                     &KernelCacheKey::kiln_version}) {
    KernelCacheKey changed = base;
    changed.*field = "other";
    EXPECT_FALSE(cache.load(changed).has_value());
  }
  EXPECT_EQ(cache.stats().misses, 7);
  EXPECT_EQ(cache.stats().corrupt, 0);
  EXPECT_TRUE(cache.load(base).has_value());
}

// What obtainCudaKernel keys a CUDA kernel by: the same IR and specialization at the same kiln
// version, but source from a changed device helper (or emitter), must not find the old binary.
TEST(KernelCache, ChangedGeneratedSourceIsAMiss) {
  TempDir temp;
  KernelCache cache(temp.path(), kLarge);
  ir::Kernel kernel;
  kernel.name = "add";
  kernel.tensor_inputs = {ir::DType::kFloat32, ir::DType::kFloat32};
  kernel.outputs = {kernel.binary(ir::Op::kAdd, kernel.load(0), kernel.load(1))};
  const CudaSpecialization specialization{
      CudaSchedule::kLinear, 1, {Access::kContiguous, Access::kContiguous, Access::kContiguous}, false};
  KernelCacheKey key = makeKey(0);
  key.ir = ir::print(kernel);
  key.specialization = specialization.toString();
  key.source = emitCuda(kernel, specialization).source;
  ASSERT_EQ(key.source.rfind(cudaDeviceHelpers(), 0), 0u);
  ASSERT_TRUE(cache.store(key, "old binary"));

  KernelCacheKey new_helpers = key;
  new_helpers.source.insert(std::string(cudaDeviceHelpers()).size(), "// a fixed helper\n");
  KernelCacheKey new_emitter = key;
  new_emitter.source += "// a changed emitter\n";
  for (const KernelCacheKey& changed : {new_helpers, new_emitter}) {
    EXPECT_NE(changed.hashHex(), key.hashHex());
    EXPECT_FALSE(cache.load(changed).has_value());
    ASSERT_TRUE(cache.store(changed, "new binary"));
    EXPECT_EQ(cache.load(changed).value_or(""), "new binary");
  }
  EXPECT_EQ(cache.load(key).value_or(""), "old binary");
}

TEST(KernelCache, FreshCacheObjectOnTheSameDirectoryHits) {
  TempDir temp;
  const std::string payload = randomPayload(100000, 2);
  {
    KernelCache first(temp.path(), kLarge);
    ASSERT_TRUE(first.store(makeKey(7), payload));
  }
  KernelCache restarted(temp.path(), kLarge);
  std::optional<std::string> loaded = restarted.load(makeKey(7));
  ASSERT_TRUE(loaded.has_value());
  EXPECT_TRUE(*loaded == payload);
  EXPECT_EQ(restarted.stats().hits, 1);
}

TEST(KernelCache, CorruptPayloadIsAMissAndTheNextStoreRepairsIt) {
  TempDir temp;
  KernelCache cache(temp.path(), kLarge);
  const std::string payload = randomPayload(4096, 3);
  ASSERT_TRUE(cache.store(makeKey(0), payload));
  const std::string path = cachePath(cache, makeKey(0));
  std::string bytes = readFile(path);
  bytes[bytes.size() - 100] ^= 0x01;
  writeFile(path, bytes);

  EXPECT_FALSE(cache.load(makeKey(0)).has_value());
  EXPECT_EQ(cache.stats().corrupt, 1);
  EXPECT_EQ(cache.stats().misses, 1);
  ASSERT_TRUE(cache.store(makeKey(0), payload));
  EXPECT_TRUE(cache.load(makeKey(0)) == payload);
  EXPECT_EQ(cache.stats().corrupt, 1);
}

TEST(KernelCache, TruncatedFileIsAMiss) {
  TempDir temp;
  KernelCache cache(temp.path(), kLarge);
  const std::string payload = randomPayload(4096, 4);
  ASSERT_TRUE(cache.store(makeKey(0), payload));
  const std::string path = cachePath(cache, makeKey(0));
  const std::string whole = readFile(path);

  writeFile(path, whole.substr(0, 20));  // inside the header
  EXPECT_FALSE(cache.load(makeKey(0)).has_value());
  writeFile(path, whole.substr(0, whole.size() - 1000));  // inside the payload
  EXPECT_FALSE(cache.load(makeKey(0)).has_value());
  writeFile(path, "");
  EXPECT_FALSE(cache.load(makeKey(0)).has_value());
  writeFile(path, whole + "trailing");
  EXPECT_FALSE(cache.load(makeKey(0)).has_value());
  EXPECT_EQ(cache.stats().corrupt, 4);

  writeFile(path, whole);
  EXPECT_TRUE(cache.load(makeKey(0)) == payload);
}

TEST(KernelCache, ForeignFileIsAMiss) {
  TempDir temp;
  KernelCache cache(temp.path(), kLarge);
  const std::string path = cachePath(cache, makeKey(0));

  writeFile(path, randomPayload(5000, 5));
  EXPECT_FALSE(cache.load(makeKey(0)).has_value());
  EXPECT_EQ(cache.stats().corrupt, 1);

  // A valid file of another format version.
  ASSERT_TRUE(cache.store(makeKey(0), "payload"));
  std::string bytes = readFile(path);
  bytes[8] = 2;
  writeFile(path, bytes);
  EXPECT_FALSE(cache.load(makeKey(0)).has_value());
  EXPECT_EQ(cache.stats().corrupt, 2);

  // A valid file for another key under this key's name (what a hash collision looks like).
  ASSERT_TRUE(cache.store(makeKey(1), "other payload"));
  ASSERT_EQ(rename(cachePath(cache, makeKey(1)).c_str(), path.c_str()), 0);
  EXPECT_FALSE(cache.load(makeKey(0)).has_value());
  EXPECT_EQ(cache.stats().corrupt, 3);

  ASSERT_TRUE(cache.store(makeKey(0), "payload"));
  EXPECT_EQ(cache.load(makeKey(0)).value_or(""), "payload");
}

TEST(KernelCache, CreatesMissingDirectoriesWithMode0700) {
  TempDir temp;
  const std::string dir = temp.path() + "/a/b/cache";
  KernelCache cache(dir, kLarge);
  for (const std::string& path : {temp.path() + "/a", temp.path() + "/a/b", dir}) {
    struct stat st;
    ASSERT_EQ(stat(path.c_str(), &st), 0) << path;
    EXPECT_TRUE(S_ISDIR(st.st_mode)) << path;
    EXPECT_EQ(st.st_mode & 07777, 0700u) << path;
  }
  EXPECT_TRUE(cache.store(makeKey(0), "payload"));
  struct stat st;
  ASSERT_EQ(stat(cachePath(cache, makeKey(0)).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0077, 0u);
}

TEST(KernelCache, MakesTheDirectoryAgainWhenItIsRemoved) {
  TempDir temp;
  const std::string dir = temp.path() + "/cache";
  KernelCache cache(dir, kLarge);
  ASSERT_EQ(rmdir(dir.c_str()), 0);
  EXPECT_TRUE(cache.store(makeKey(0), "payload"));
  EXPECT_EQ(cache.load(makeKey(0)).value_or(""), "payload");
}

TEST(KernelCache, EvictsLeastRecentlyUsedFilesToStayUnderTheCap) {
  TempDir temp;
  // Every file here has the same size: same-length keys, same-length payloads.
  int64_t file_bytes = 0;
  {
    KernelCache probe(temp.path() + "/probe", kLarge);
    ASSERT_TRUE(probe.store(makeKey(0), randomPayload(4096, 0)));
    file_bytes = probe.info().bytes;
  }
  const int64_t cap = 3 * file_bytes + file_bytes / 2;
  KernelCache cache(temp.path() + "/cache", cap);
  // Not the cache's files: never counted, never evicted.
  writeFile(cache.dir() + "/notes.txt", randomPayload(10 * file_bytes, 9));
  writeFile(cache.dir() + "/mine.kbin", randomPayload(10 * file_bytes, 9));

  const time_t now = time(nullptr);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(cache.store(makeKey(i), randomPayload(4096, i)));
    setMtime(cachePath(cache, makeKey(i)), now - 300 + 100 * i);  // key 0 oldest
  }
  EXPECT_EQ(cache.stats().evictions, 0);
  EXPECT_EQ(cache.info().bytes, 3 * file_bytes);

  // A hit makes key 0 the most recently used; key 1 is now the oldest.
  ASSERT_TRUE(cache.load(makeKey(0)).has_value());
  EXPECT_GE(mtimeOf(cachePath(cache, makeKey(0))), now);

  ASSERT_TRUE(cache.store(makeKey(3), randomPayload(4096, 3)));
  EXPECT_TRUE(exists(cachePath(cache, makeKey(0))));
  EXPECT_FALSE(exists(cachePath(cache, makeKey(1))));
  EXPECT_TRUE(exists(cachePath(cache, makeKey(2))));
  EXPECT_TRUE(exists(cachePath(cache, makeKey(3))));
  EXPECT_EQ(cache.stats().evictions, 1);
  EXPECT_LE(cache.info().bytes, cap);

  // The file just written is never the one evicted, even when it looks oldest.
  for (int i : {0, 2, 3}) setMtime(cachePath(cache, makeKey(i)), now + 1000);
  ASSERT_TRUE(cache.store(makeKey(4), randomPayload(4096, 4)));
  EXPECT_TRUE(exists(cachePath(cache, makeKey(4))));
  EXPECT_EQ(cache.info().files, 3);
  EXPECT_LE(cache.info().bytes, cap);
  EXPECT_EQ(cache.stats().evictions, 2);

  EXPECT_TRUE(exists(cache.dir() + "/notes.txt"));
  EXPECT_TRUE(exists(cache.dir() + "/mine.kbin"));
}

TEST(KernelCache, RefusesAPayloadLargerThanTheCap) {
  TempDir temp;
  KernelCache cache(temp.path(), 1000);
  EXPECT_FALSE(cache.store(makeKey(0), randomPayload(2000, 0)));
  EXPECT_EQ(cache.info().files, 0);
  EXPECT_TRUE(cache.store(makeKey(0), "small"));
}

// An unusable directory: loads miss, stores fail, and the process hears about it exactly once.
void expectUnwritable(const std::string& dir) {
  testing::internal::CaptureStderr();
  {
    KernelCache cache(dir, kLarge);
    EXPECT_FALSE(cache.load(makeKey(0)).has_value());
    EXPECT_FALSE(cache.store(makeKey(0), "payload"));
    EXPECT_FALSE(cache.store(makeKey(1), "payload"));
    EXPECT_FALSE(cache.load(makeKey(0)).has_value());
    EXPECT_EQ(cache.stats().misses, 2);
    EXPECT_EQ(cache.stats().stores, 0);
  }
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(countOccurrences(err, "kiln warning:"), 1) << err;
  EXPECT_NE(err.find("kernel cache"), std::string::npos) << err;
}

TEST(KernelCache, ReadOnlyDirectory) {
  if (geteuid() == 0) GTEST_SKIP() << "root writes into a 0500 directory regardless of its mode";
  TempDir temp;
  const std::string dir = temp.path() + "/cache";
  ASSERT_EQ(mkdir(dir.c_str(), 0500), 0);
  expectUnwritable(dir);
  expectUnwritable(dir + "/missing/below");
}

TEST(KernelCache, DirectoryUnderARegularFile) {
  TempDir temp;
  writeFile(temp.path() + "/file", "not a directory");
  expectUnwritable(temp.path() + "/file/cache");
  expectUnwritable(temp.path() + "/file");
}

TEST(KernelCache, ThreadsShareOneCache) {
  TempDir temp;
  KernelCache cache(temp.path(), kLarge);
  constexpr int kThreads = 8, kIterations = 50, kSharedKeys = 4;
  std::atomic<int> wrong{0}, loads{0};
  auto payloadFor = [](int key) { return randomPayload(20000 + 1000 * key, key); };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const int own = 100 + t;
      for (int i = 0; i < kIterations; ++i) {
        for (int key : {i % kSharedKeys, own}) {
          std::optional<std::string> loaded = cache.load(makeKey(key));
          loads.fetch_add(1);
          if (loaded && *loaded != payloadFor(key)) wrong.fetch_add(1);
          if (!loaded && !cache.store(makeKey(key), payloadFor(key))) wrong.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(wrong.load(), 0);
  KernelCache::Stats stats = cache.stats();
  EXPECT_EQ(stats.hits + stats.misses, loads.load());
  EXPECT_EQ(stats.corrupt, 0);
  EXPECT_EQ(cache.info().files, kSharedKeys + kThreads);
  for (int key = 0; key < kSharedKeys; ++key)
    EXPECT_TRUE(cache.load(makeKey(key)) == payloadFor(key));
}

TEST(KernelCache, ProcessesShareOneDirectory) {
  TempDir temp;
  constexpr int kChildren = 3, kIterations = 40, kKeys = 8;
  auto payloadFor = [](int key) { return randomPayload(50000 + 20000 * key, 1000 + key); };
  // Room for about half the keys: evictions run in every process while others read.
  const int64_t cap = 4 * 150000;
  std::vector<pid_t> children;
  for (int c = 0; c < kChildren; ++c) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      // A separate process: its own cache object, no gtest assertions, an exit code for the parent.
      KernelCache cache(temp.path(), cap);
      int status = 0, hits = 0;
      for (int i = 0; i < kIterations; ++i) {
        for (int k = 0; k < kKeys; ++k) {
          const int key = (k + c + i) % kKeys;
          if (!cache.store(makeKey(key), payloadFor(key))) status = 1;
          std::optional<std::string> loaded = cache.load(makeKey((key + 1) % kKeys));
          if (loaded) {
            ++hits;
            if (*loaded != payloadFor((key + 1) % kKeys)) status = 2;
          }
        }
      }
      if (cache.stats().corrupt != 0) status = 3;
      if (hits == 0) status = 4;
      _exit(status);
    }
    children.push_back(pid);
  }
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status)) << "child " << pid << " did not exit normally";
    EXPECT_EQ(WEXITSTATUS(status), 0) << "child " << pid << " (1 store failed, 2 wrong payload, "
                                      << "3 corrupt file seen, 4 no hit)";
  }
  KernelCache cache(temp.path(), cap);
  ASSERT_TRUE(cache.store(makeKey(0), payloadFor(0)));
  EXPECT_LE(cache.info().bytes, cap);
  for (int key = 0; key < kKeys; ++key) {
    std::optional<std::string> loaded = cache.load(makeKey(key));
    if (loaded) {
      EXPECT_TRUE(*loaded == payloadFor(key)) << key;
    }
  }
  EXPECT_EQ(cache.stats().corrupt, 0);
  // Every temp file was renamed into place or removed.
  for (const std::string& name : fileNames(temp.path())) {
    EXPECT_EQ(name.find(".tmp"), std::string::npos) << name;
  }
}

TEST(KernelCache, ClearRemovesOnlyTheCacheFiles) {
  TempDir temp;
  KernelCache cache(temp.path(), kLarge);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(cache.store(makeKey(i), "payload"));
  const std::string hash = makeKey(9).hashHex();
  const std::string stale_temp = temp.path() + "/" + hash + ".kbin.123.456.0.tmp";
  const std::string fresh_temp = temp.path() + "/" + hash + ".kbin.123.456.1.tmp";
  writeFile(stale_temp, "left by a process that died");
  setMtime(stale_temp, time(nullptr) - 2 * 3600);
  writeFile(fresh_temp, "being written by another process");
  writeFile(temp.path() + "/notes.txt", "mine");
  writeFile(temp.path() + "/" + hash + ".kbinx", "mine");
  ASSERT_EQ(mkdir((temp.path() + "/" + makeKey(8).hashHex() + ".kbin").c_str(), 0700), 0);

  const KernelCache::ClearResult cleared = cache.clear();
  EXPECT_EQ(cleared.removed, 3);
  EXPECT_EQ(cleared.left, 0);
  EXPECT_EQ(cleared.error, "");
  EXPECT_EQ(cache.info().files, 0);
  EXPECT_FALSE(exists(stale_temp));
  EXPECT_TRUE(exists(fresh_temp));
  EXPECT_TRUE(exists(temp.path() + "/notes.txt"));
  EXPECT_TRUE(exists(temp.path() + "/" + hash + ".kbinx"));
  EXPECT_TRUE(exists(temp.path() + "/" + makeKey(8).hashHex() + ".kbin"));
  EXPECT_FALSE(cache.load(makeKey(0)).has_value());
}

// A symlink at a cache file's name, even to a valid cache file elsewhere, is not followed.
TEST(KernelCache, SymlinkedFileIsAMiss) {
  TempDir temp;
  const std::string outside = temp.path() + "/outside";
  ASSERT_EQ(mkdir(outside.c_str(), 0700), 0);
  KernelCache planted(outside, kLarge);
  ASSERT_TRUE(planted.store(makeKey(0), "planted binary"));
  const std::string target = cachePath(planted, makeKey(0));
  const std::string before = readFile(target);

  KernelCache cache(temp.path() + "/cache", kLarge);
  ASSERT_EQ(symlink(target.c_str(), cachePath(cache, makeKey(0)).c_str()), 0);
  EXPECT_FALSE(cache.load(makeKey(0)).has_value());
  EXPECT_EQ(cache.stats().misses, 1);
  EXPECT_EQ(cache.stats().corrupt, 1);
  // The next store replaces the link itself; the file it pointed at stays as it was.
  ASSERT_TRUE(cache.store(makeKey(0), "compiled here"));
  EXPECT_EQ(cache.load(makeKey(0)).value_or(""), "compiled here");
  EXPECT_TRUE(readFile(target) == before);
}

// A FIFO at a cache file's name: opening it for reading would wait for a writer forever. The load
// runs in a child process so that a hang fails the test instead of stopping it.
TEST(KernelCache, FifoIsAMissAndDoesNotBlock) {
  TempDir temp;
  KernelCache cache(temp.path(), kLarge);
  ASSERT_EQ(mkfifo(cachePath(cache, makeKey(0)).c_str(), 0600), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    KernelCache child(temp.path(), kLarge);
    const bool missed = !child.load(makeKey(0)).has_value() && child.stats().corrupt == 1;
    _exit(missed ? 0 : 1);
  }
  int status = 0;
  pid_t done = 0;
  for (int waited_ms = 0; waited_ms < 20000 && done == 0; waited_ms += 10) {
    done = waitpid(pid, &status, WNOHANG);
    if (done == 0) usleep(10000);
  }
  if (done == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    FAIL() << "load() of a FIFO blocked for 20 s";
  }
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "a FIFO was not rejected as a miss";
}

// A directory others can write to may hold files planted by them: refused with one warning, and
// nothing is loaded from it or stored in it, valid files included.
void expectRefused(const std::string& dir, const std::string& why) {
  testing::internal::CaptureStderr();
  {
    KernelCache cache(dir, kLarge);
    EXPECT_FALSE(cache.load(makeKey(0)).has_value());
    EXPECT_FALSE(cache.store(makeKey(1), "payload"));
    EXPECT_FALSE(cache.load(makeKey(0)).has_value());
    EXPECT_EQ(cache.stats().misses, 2);
    EXPECT_EQ(cache.stats().stores, 0);
  }
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(countOccurrences(err, "kiln warning:"), 1) << err;
  EXPECT_NE(err.find("kernel cache: refusing " + dir), std::string::npos) << err;
  EXPECT_NE(err.find(why), std::string::npos) << err;
  EXPECT_FALSE(exists(dir + "/" + makeKey(1).hashHex() + KernelCache::kFileExtension));
}

TEST(KernelCache, RefusesADirectoryOthersCanWrite) {
  TempDir temp;
  const std::string dir = temp.path() + "/cache";
  {
    KernelCache cache(dir, kLarge);
    ASSERT_TRUE(cache.store(makeKey(0), "valid binary"));
  }
  ASSERT_EQ(chmod(dir.c_str(), 0777), 0);
  expectRefused(dir, "writable by others (mode 0777");
  ASSERT_EQ(chmod(dir.c_str(), 0770), 0);
  expectRefused(dir, "writable by others (mode 0770");
  // Another user's directory (only root can give one away to test it).
  ASSERT_EQ(chmod(dir.c_str(), 0700), 0);
  if (chown(dir.c_str(), geteuid() + 1, getegid()) == 0) {
    expectRefused(dir, "belongs to uid " + std::to_string(geteuid() + 1));
    ASSERT_EQ(chown(dir.c_str(), geteuid(), getegid()), 0);
  }
  // Once only this user can write it again, the same files are served.
  ASSERT_EQ(chmod(dir.c_str(), 0700), 0);
  KernelCache cache(dir, kLarge);
  EXPECT_EQ(cache.load(makeKey(0)).value_or(""), "valid binary");
}

TEST(KernelCache, ClearReportsADirectoryItCannotRead) {
  TempDir temp;
  writeFile(temp.path() + "/file", "not a directory");
  testing::internal::CaptureStderr();
  KernelCache cache(temp.path() + "/file", kLarge);
  testing::internal::GetCapturedStderr();
  const KernelCache::ClearResult cleared = cache.clear();
  EXPECT_EQ(cleared.removed, 0);
  EXPECT_EQ(cleared.error, "cannot read " + temp.path() + "/file: Not a directory");

  // A directory removed meanwhile holds nothing to clear: not an error.
  KernelCache gone(temp.path() + "/gone", kLarge);
  ASSERT_EQ(rmdir((temp.path() + "/gone").c_str()), 0);
  EXPECT_EQ(gone.clear().error, "");
}

// Files clear() cannot remove. Permission bits do not stop root, so the directory is made
// immutable (chattr +i), which stops everyone; skipped where the filesystem or the process cannot.
TEST(KernelCache, ClearReportsFilesItCannotRemove) {
  TempDir temp;
  KernelCache cache(temp.path(), kLarge);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(cache.store(makeKey(i), "payload"));
  int fd = open(temp.path().c_str(), O_RDONLY | O_DIRECTORY);
  ASSERT_GE(fd, 0);
  int flags = 0;
  if (ioctl(fd, FS_IOC_GETFLAGS, &flags) != 0) {
    close(fd);
    GTEST_SKIP() << "no inode flags here: " << std::strerror(errno);
  }
  const int immutable = flags | FS_IMMUTABLE_FL;
  if (ioctl(fd, FS_IOC_SETFLAGS, &immutable) != 0) {
    close(fd);
    GTEST_SKIP() << "cannot make a directory immutable here: " << std::strerror(errno);
  }
  const KernelCache::ClearResult cleared = cache.clear();
  ioctl(fd, FS_IOC_SETFLAGS, &flags);
  close(fd);
  EXPECT_EQ(cleared.removed, 0);
  EXPECT_EQ(cleared.left, 3);
  EXPECT_EQ(cleared.error.rfind("cannot remove " + temp.path() + "/", 0), 0u) << cleared.error;
  EXPECT_NE(cleared.error.find(": Operation not permitted"), std::string::npos) << cleared.error;
  EXPECT_EQ(cache.info().files, 3);
  EXPECT_EQ(cache.clear().removed, 3);
}

}  // namespace
}  // namespace kiln
