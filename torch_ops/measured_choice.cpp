#include "torch_ops/measured_choice.h"

#include <ATen/Parallel.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "codegen/fault_injection.h"
#include "codegen/kernel_cache.h"
#include "kiln/options.h"

namespace kiln {
namespace {

// A choice and what it rests on: each way's best time over every measurement so far, and how
// many processes measured it. A choice measured while something else loaded the machine can be
// wrong, so it is measured again by the next processes that meet it, each way keeping its best
// time across them, until kSettledAfter measurements agree on a machine state.
constexpr int kSettledAfter = 3;

struct ChoiceRecord {
  std::string choice;
  int measurements = 0;
  std::vector<std::pair<std::string, double>> best_ns;  // way, best time seen
  bool measured_here = false;                            // this process measured it already
  bool settled() const { return measurements >= kSettledAfter; }
};

std::mutex choices_mutex;
std::unordered_map<std::string, ChoiceRecord>& choices() {
  static auto* table = new std::unordered_map<std::string, ChoiceRecord>();
  return *table;
}
std::unordered_set<std::string>& measuring() {
  static auto* keys = new std::unordered_set<std::string>();
  return *keys;
}
std::string& forced() {
  static auto* choice = new std::string();
  return *choice;
}

std::string cpuModel() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(colon + 2);
    }
  }
  return "unknown cpu";
}

// The disk cache's directory, through an object of its own: choices are files beside the kernels
// (cache info counts them, cache clear removes them), but not kernels, so their loads and stores
// stay out of the kernel counts that `kiln run` and `kiln demo` report.
KernelCache& choiceCache() {
  static KernelCache* cache = new KernelCache(Options::global().cache_dir, Options::global().cache_max_mb << 20);
  return *cache;
}

KernelCacheKey diskKey(const std::string& key) {
  KernelCacheKey disk;
  disk.ir = "measured choice: " + key;
  disk.arch = hostSignature();
  disk.compiler = std::string("torch ") + TORCH_VERSION;
  return disk;
}

}  // namespace

int64_t powerOfTwoAtLeast(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

std::string hostSignature() {
  static const std::string model = cpuModel();
  return model + ", " + std::to_string(at::get_num_threads()) + " threads";
}

namespace {

// On disk: "kiln choice 2\n" then "choice NAME", "measurements N" and one "way NAME NS" per way,
// a line each. A file holding only a way's name (what kiln wrote before) is a choice measured
// once, with no times: measured again.
constexpr const char* kRecordMagic = "kiln choice 2";

std::string serialize(const ChoiceRecord& record) {
  std::ostringstream out;
  out << kRecordMagic << "\nchoice " << record.choice << "\nmeasurements " << record.measurements << "\n";
  for (const auto& [way, ns] : record.best_ns) out << "way " << way << " " << ns << "\n";
  return out.str();
}

std::optional<ChoiceRecord> parse(const std::string& text) {
  ChoiceRecord record;
  if (text.rfind(kRecordMagic, 0) != 0) {
    if (text.empty() || text.find_first_of(" \n") != std::string::npos) return std::nullopt;
    record.choice = text;
    record.measurements = 1;
    return record;
  }
  std::istringstream in(text.substr(std::strlen(kRecordMagic)));
  std::string field;
  while (in >> field) {
    if (field == "choice") {
      in >> record.choice;
    } else if (field == "measurements") {
      in >> record.measurements;
    } else if (field == "way") {
      std::string way;
      double ns = 0;
      in >> way >> ns;
      if (in && std::isfinite(ns) && ns >= 0) record.best_ns.emplace_back(way, ns);
    } else {
      return std::nullopt;
    }
    if (!in) return std::nullopt;
  }
  if (record.choice.empty() || record.measurements < 1) return std::nullopt;
  return record;
}

// What a call needs of the record for `key`: read from memory, else from the disk cache (kept in
// memory from then on) and then `read` under the lock, so that a call copies no more than it uses.
template <typename Read>
auto readRecord(const std::string& key, Read read) -> std::optional<decltype(read(ChoiceRecord()))> {
  {
    std::lock_guard<std::mutex> lock(choices_mutex);
    auto found = choices().find(key);
    if (found != choices().end()) return read(found->second);
  }
  std::optional<std::string> stored = choiceCache().load(diskKey(key));
  std::optional<ChoiceRecord> record = stored ? parse(*stored) : std::nullopt;
  if (!record) return std::nullopt;
  std::lock_guard<std::mutex> lock(choices_mutex);
  return read(choices().emplace(key, *record).first->second);
}

std::optional<ChoiceRecord> recordFor(const std::string& key) {
  return readRecord(key, [](const ChoiceRecord& record) { return record; });
}

// The remembered way, and whether this process should measure it again first.
struct Remembered {
  std::string choice;
  bool measure_again = false;
};
std::optional<Remembered> remembered(const std::string& key) {
  return readRecord(key, [](const ChoiceRecord& record) {
    return Remembered{record.choice, !record.settled() && !record.measured_here};
  });
}

// Folds one measurement (each usable way's best time in it) into the record for `key` and stores
// it: each way keeps its best time across measurements; the fastest of those is the choice. A way
// not usable in this measurement is not chosen.
ChoiceRecord recordMeasurement(const std::string& key, const std::vector<std::pair<std::string, double>>& measured) {
  std::optional<ChoiceRecord> earlier = recordFor(key);
  ChoiceRecord record;
  record.measurements = (earlier ? earlier->measurements : 0) + 1;
  record.measured_here = true;
  double best = std::numeric_limits<double>::infinity();
  for (const auto& [way, ns] : measured) {
    double kept = ns;
    if (earlier) {
      for (const auto& [earlier_way, earlier_ns] : earlier->best_ns) {
        if (earlier_way == way) kept = std::min(kept, earlier_ns);
      }
    }
    record.best_ns.emplace_back(way, kept);
    if (kept < best) {
      best = kept;
      record.choice = way;
    }
  }
  {
    std::lock_guard<std::mutex> lock(choices_mutex);
    choices()[key] = record;
  }
  choiceCache().store(diskKey(key), serialize(record));
  return record;
}

}  // namespace

std::optional<std::string> rememberedChoice(const std::string& key) {
  return readRecord(key, [](const ChoiceRecord& record) { return record.choice; });
}

std::optional<std::string> settledChoice(const std::string& key) {
  std::optional<Remembered> earlier = remembered(key);
  if (!earlier || earlier->measure_again) return std::nullopt;
  return earlier->choice;
}

int rememberedMeasurements(const std::string& key) {
  return readRecord(key, [](const ChoiceRecord& record) { return record.measurements; }).value_or(0);
}

bool claimMeasurement(const std::string& key) {
  std::lock_guard<std::mutex> lock(choices_mutex);
  return measuring().insert(key).second;
}

void endMeasurement(const std::string& key) {
  std::lock_guard<std::mutex> lock(choices_mutex);
  measuring().erase(key);
}

std::atomic<uint64_t> generation{0};

void forgetChoicesInMemory() {
  std::lock_guard<std::mutex> lock(choices_mutex);
  choices().clear();
  generation++;
}

uint64_t choicesGeneration() { return generation.load(std::memory_order_acquire); }

std::atomic<bool> any_forced{false};

void forceChoice(const std::string& choice) {
  std::lock_guard<std::mutex> lock(choices_mutex);
  forced() = choice;
  any_forced = !choice.empty();
  generation++;
}

bool choiceForced() { return any_forced.load(std::memory_order_relaxed); }

std::string forcedChoice() {
  if (!choiceForced()) return std::string();  // every call asks: no lock unless a test forces
  std::lock_guard<std::mutex> lock(choices_mutex);
  return forced();
}

// ---- Weights prepared once ----

namespace {

struct Prepared {
  std::optional<c10::weak_intrusive_ptr<c10::TensorImpl>> owner;
  uint32_t version = 0;
  at::Tensor tensor;
};

std::mutex prepared_mutex;
std::unordered_map<std::string, Prepared>& preparedTable() {
  static auto* table = new std::unordered_map<std::string, Prepared>();
  return *table;
}

std::string preparedKey(const at::TensorImpl* weight, const std::string& what) {
  return std::to_string(reinterpret_cast<uintptr_t>(weight)) + " " + what;
}

void dropFreed(std::unordered_map<std::string, Prepared>& table) {
  for (auto it = table.begin(); it != table.end();) it = it->second.owner->expired() ? table.erase(it) : std::next(it);
}

}  // namespace

at::Tensor preparedWeight(const at::Tensor& weight, const std::string& what, const std::function<at::Tensor()>& make) {
  const std::string key = preparedKey(weight.unsafeGetTensorImpl(), what);
  {
    std::lock_guard<std::mutex> lock(prepared_mutex);
    auto found = preparedTable().find(key);
    if (found != preparedTable().end()) {
      c10::intrusive_ptr<c10::TensorImpl> owner = found->second.owner->lock();
      if (owner.get() == weight.unsafeGetTensorImpl() && found->second.version == weight._version())
        return found->second.tensor;
    }
  }
  at::NoGradGuard no_grad;
  Prepared entry;
  entry.owner.emplace(weight.getIntrusivePtr());
  entry.version = weight._version();
  entry.tensor = make();
  std::lock_guard<std::mutex> lock(prepared_mutex);
  auto& table = preparedTable();
  dropFreed(table);
  table[key] = entry;
  return entry.tensor;
}

void forgetPreparedWeight(const at::TensorImpl* weight, const std::string& what) {
  std::lock_guard<std::mutex> lock(prepared_mutex);
  preparedTable().erase(preparedKey(weight, what));
}

namespace {

// Writes `bytes` at `data` back from every cache level (and drops them there).
void evictFromCaches(const void* data, size_t bytes) {
#if defined(__x86_64__)
  const char* begin = static_cast<const char*>(data);
  for (size_t offset = 0; offset < bytes; offset += 64) _mm_clflush(begin + offset);
  _mm_mfence();
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace

size_t evictWeightFromCaches(const at::TensorImpl* weight) {
  if (weight == nullptr || !weight->has_storage() || weight->device_type() != c10::DeviceType::CPU) return 0;
  std::vector<at::Tensor> copies;
  {
    std::lock_guard<std::mutex> lock(prepared_mutex);
    for (const auto& [key, entry] : preparedTable()) {
      c10::intrusive_ptr<c10::TensorImpl> owner = entry.owner->lock();
      if (owner.get() == weight) copies.push_back(entry.tensor);
    }
  }
  size_t bytes = weight->storage().nbytes();
  evictFromCaches(weight->storage().data(), weight->storage().nbytes());
  for (const at::Tensor& copy : copies) {
    // A oneDNN-prepacked copy may be an opaque tensor with no storage of its own to flush.
    if (!copy.defined() || !copy.has_storage() || !copy.device().is_cpu()) continue;
    bytes += copy.storage().nbytes();
    evictFromCaches(copy.storage().data(), copy.storage().nbytes());
  }
  return bytes;
}

int64_t preparedWeightCount() {
  std::lock_guard<std::mutex> lock(prepared_mutex);
  dropFreed(preparedTable());
  return static_cast<int64_t>(preparedTable().size());
}

namespace {

using Clock = std::chrono::steady_clock;

// Agreement with ATen's result, to the tolerance of the dtype: a GEMM's sums in another order.
bool agrees(const at::Tensor& result, const at::Tensor& reference) {
  if (result.sizes() != reference.sizes() || result.scalar_type() != reference.scalar_type()) return false;
  if (reference.numel() == 0) return true;
  const double tolerance = reference.scalar_type() == at::kFloat || reference.scalar_type() == at::kDouble ? 1e-3 : 5e-2;
  const at::Tensor a = result.to(at::kFloat), b = reference.to(at::kFloat);
  const double scale = b.abs().max().item<double>();
  const double error = (a - b).abs().max().item<double>();
  return error <= tolerance * (scale + 1e-6) || (std::isnan(error) && a.isnan().equal(b.isnan()));
}

void logOnce(const std::string& key, const std::string& message, LogLevel level = LogLevel::kWarning) {
  static std::mutex mutex;
  static auto* seen = new std::unordered_map<std::string, bool>();
  std::lock_guard<std::mutex> lock(mutex);
  if ((*seen)[key]) return;
  (*seen)[key] = true;
  log(level, message);
}

bool agrees(const std::vector<at::Tensor>& result, const std::vector<at::Tensor>& reference) {
  if (result.size() != reference.size()) return false;
  for (size_t i = 0; i < result.size(); ++i) {
    if (!agrees(result[i], reference[i])) return false;
  }
  return true;
}

// Runs one way; every way but the first (the reference) is a library call a test can make fail.
template <typename Result>
Result runWay(const BasicMeasuredWay<Result>& way, const BasicMeasuredWay<Result>& reference,
              const std::optional<at::Tensor>& other) {
  if (&way != &reference) failIfInjected(FaultStage::kLibrary);
  return way.run(other);
}

template <typename Result>
Result runFastestOf(const std::string& key, const std::vector<BasicMeasuredWay<Result>>& candidates,
                    GroupCounters& counters, const std::optional<at::Tensor>& other, bool mutates_other,
                    const at::TensorImpl* weight) {
  using MeasuredWay = BasicMeasuredWay<Result>;
  const char* const kAten = candidates[0].name;
  const auto start = Clock::now();
  // A call that measured is counted but not timed: its time is the candidates'.
  auto finish = [&](Result result, const char* name, bool timed = true) {
    counters.calls++;
    if (timed) {
      counters.timed_calls++;
      counters.timed_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
    }
    counters.choice = name;
    return result;
  };
  auto runNamed = [&](const std::string& name) -> std::optional<Result> {
    for (const MeasuredWay& candidate : candidates) {
      if (name != candidate.name) continue;
      try {
        // A library call fails before it writes (oneDNN checks and creates its primitive first),
        // so `other` is as it was for the ATen ops that follow.
        return finish(runWay(candidate, candidates[0], other), candidate.name);
      } catch (const std::exception& error) {
        logOnce(key + name, std::string(candidate.name) + " failed for " + key + ", running ATen's ops: " +
                                errorLine(error.what()), candidate.failure_level);
      }
    }
    return std::nullopt;
  };
  if (candidates.size() == 1) return finish(candidates[0].run(other), kAten);
  const std::string forced = forcedChoice();
  if (!forced.empty()) {
    if (std::optional<Result> result = runNamed(forced)) return *result;
    return finish(candidates[0].run(other), kAten);
  }
  // A remembered choice runs, unless it is not settled yet and this process has not measured it:
  // then this call measures again (another thread measuring meanwhile runs the remembered way).
  const std::optional<Remembered> earlier = remembered(key);
  auto runRemembered = [&]() -> Result {
    if (std::optional<Result> result = runNamed(earlier->choice)) return *result;
    return finish(candidates[0].run(other), kAten);
  };
  if (earlier && !earlier->measure_again) return runRemembered();
  if (!claimMeasurement(key)) return earlier ? runRemembered() : finish(candidates[0].run(other), kAten);
  struct Claim {
    const std::string& key;
    ~Claim() { endMeasurement(key); }
  } claim{key};
  // Each candidate once to warm up (its result checked against ATen's); then rounds in which
  // every candidate runs once in turn, so that the machine's drift falls on all of them alike: at
  // least three, more while a round takes under 10 ms; each candidate's best run, since what only
  // slows a run down is noise.
  auto scratch = [&]() -> std::optional<at::Tensor> {
    if (!mutates_other || !other) return other;
    return other->clone(at::MemoryFormat::Preserve);
  };
  Result reference = candidates[0].run(scratch());
  std::vector<const MeasuredWay*> usable;
  double round_ns = 0;
  for (const MeasuredWay& candidate : candidates) {
    try {
      const auto warm_start = Clock::now();
      Result result = runWay(candidate, candidates[0], scratch());
      round_ns += std::chrono::duration<double, std::nano>(Clock::now() - warm_start).count();
      if (&candidate != &candidates[0] && !agrees(result, reference)) {
        logOnce(key + candidate.name, std::string(candidate.name) + " disagrees with ATen for " + key + "; not used");
        continue;
      }
      usable.push_back(&candidate);
    } catch (const std::exception& error) {
      logOnce(key + candidate.name, std::string(candidate.name) + " failed for " + key + "; not used: " + errorLine(error.what()),
              candidate.failure_level);
    }
  }
  const bool cold_weight = weight != nullptr && weight->has_storage() && weight->device_type() == c10::DeviceType::CPU &&
                           weight->storage().nbytes() >= kColdWeightBytes;
  std::vector<double> fastest(usable.size(), std::numeric_limits<double>::infinity());
  std::vector<Result> results(usable.size());
  const int rounds = static_cast<int>(std::clamp(10e6 / std::max(round_ns, 1.0), 3.0, 20.0));
  for (int round = 0; round < rounds; ++round) {
    for (size_t i = 0; i < usable.size(); ++i) {
      if (!std::isfinite(fastest[i]) && round > 0) continue;  // it failed in an earlier round
      try {
        std::optional<at::Tensor> operand = scratch();
        // A weight too large to stay in this core's cache between two calls of a model comes from
        // memory every call: each way is timed that way too, its weight and copies evicted.
        if (cold_weight) evictWeightFromCaches(weight);
        const auto begin = Clock::now();
        results[i] = runWay(*usable[i], candidates[0], operand);
        fastest[i] = std::min<double>(fastest[i], std::chrono::duration<double, std::nano>(Clock::now() - begin).count());
      } catch (const std::exception& error) {
        logOnce(key + usable[i]->name, std::string(usable[i]->name) + " failed for " + key + "; not used: " + errorLine(error.what()),
                usable[i]->failure_level);
        fastest[i] = std::numeric_limits<double>::infinity();
      }
    }
  }
  std::vector<std::pair<std::string, double>> measured;
  for (size_t i = 0; i < usable.size(); ++i) {
    if (std::isfinite(fastest[i])) measured.emplace_back(usable[i]->name, fastest[i]);
  }
  // The choice over this and earlier processes' measurements (see recordMeasurement).
  const ChoiceRecord record = recordMeasurement(key, measured);
  Result best_result = reference;
  const char* best_name = kAten;
  for (size_t i = 0; i < usable.size(); ++i) {
    if (record.choice == usable[i]->name && std::isfinite(fastest[i])) {
      best_name = usable[i]->name;
      best_result = results[i];
    }
  }
  const char* best_keeps = nullptr;
  for (const MeasuredWay& candidate : candidates) {
    if (candidate.name == best_name) best_keeps = candidate.keeps;
  }
  for (const MeasuredWay& candidate : candidates) {
    if (weight == nullptr || candidate.name == best_name || candidate.keeps == nullptr) continue;
    if (best_keeps == nullptr || std::string(best_keeps) != candidate.keeps) forgetPreparedWeight(weight, candidate.keeps);
  }
  log(LogLevel::kInfo, key + " runs " + best_name + " (measured " + std::to_string(record.measurements) + " time" +
                         (record.measurements == 1 ? "" : "s") + ")");
  return finish(best_result, best_name, /*timed=*/false);
}

}  // namespace

at::Tensor runFastest(const std::string& key, const std::vector<MeasuredWay>& ways, GroupCounters& counters,
                      const std::optional<at::Tensor>& other, bool mutates_other, const at::TensorImpl* weight) {
  return runFastestOf(key, ways, counters, other, mutates_other, weight);
}

std::vector<at::Tensor> runFastest(const std::string& key, const std::vector<MeasuredWayOfMany>& ways,
                                   GroupCounters& counters) {
  return runFastestOf(key, ways, counters, std::nullopt, false, nullptr);
}

}  // namespace kiln
