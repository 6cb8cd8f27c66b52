// Which of several ways to run one library call is fastest (ATen's GEMM over the weight as given
// or transposed, oneDNN with fused post-ops on a prepacked weight, ...) depends on the shapes and
// the machine; kiln times them, as TensorRT's builder does, once per shape class and machine, and
// remembers the answer in memory and in the kernel cache on disk.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "fuser/group_stats.h"
#include "kiln/options.h"

namespace kiln {

// One way to run a call. `other` is the call's, or during measurement a copy of it when the way
// writes into it. Result: at::Tensor, or std::vector<at::Tensor> for calls with several outputs.
template <typename Result>
struct BasicMeasuredWay {
  const char* name;
  std::function<Result(const std::optional<at::Tensor>& other)> run;
  // What the way keeps of the call's weight (preparedWeight's `what`: a transposed or prepacked
  // copy), if anything: dropped once measuring has chosen a way that keeps something else.
  const char* keeps = nullptr;
  // How a failure of this way is logged: a warning, or info for a way expected to refuse some
  // inputs (oneDNN Graph partitions that oneDNN cannot compile).
  LogLevel failure_level = LogLevel::kWarning;
};
using MeasuredWay = BasicMeasuredWay<at::Tensor>;
using MeasuredWayOfMany = BasicMeasuredWay<std::vector<at::Tensor>>;

// Runs the call the fastest way. ways[0] is the reference and the fallback (ATen's ops): the
// first call of a shape class `key` (empty: no measuring, ways[0] runs) runs each way once, checks
// its result against ways[0]'s (a way that disagrees beyond the dtype's tolerance or throws is not
// used, with one warning), then times them in interleaved rounds and remembers the fastest; later
// calls run the remembered way (ways[0] if it fails). The ways measured slower drop what they
// keep of `weight`. While one thread measures a key, others run ways[0]. `mutates_other`: the ways
// write into `other`, so each measured run gets a copy. Counts the call, its time (not of a
// measuring call) and the way in `counters`.
at::Tensor runFastest(const std::string& key, const std::vector<MeasuredWay>& ways, GroupCounters& counters,
                      const std::optional<at::Tensor>& other = std::nullopt, bool mutates_other = false,
                      const at::TensorImpl* weight = nullptr);
// The same for a call with several outputs (every output checked against the reference's).
std::vector<at::Tensor> runFastest(const std::string& key, const std::vector<MeasuredWayOfMany>& ways,
                                   GroupCounters& counters);

// What a way makes of a call's weight once (transposed, prepacked), keyed by the weight's
// TensorImpl and `what` (the parameters the packing depends on): made by `make` on first use, made
// again if the weight was written to, dropped when the weight is freed.
at::Tensor preparedWeight(const at::Tensor& weight, const std::string& what, const std::function<at::Tensor()>& make);
// Drops what `what` made of this weight (a way measured slower keeps no copy of the weight); made
// again if a later call runs that way after all.
void forgetPreparedWeight(const at::TensorImpl* weight, const std::string& what);
// How many prepared copies of live weights are kept.
int64_t preparedWeightCount();

// Weights of at least this many bytes are timed cold when measuring (runFastest): in a model, a
// weight this large has left the core's cache (2 MiB of L2 here) by the next call that reads it.
constexpr size_t kColdWeightBytes = size_t{1} << 20;
// Evicts the weight and every copy prepared of it from the CPU's caches; returns the bytes.
size_t evictWeightFromCaches(const at::TensorImpl* weight);

// The smallest power of two >= n: a batch or row count's shape class.
int64_t powerOfTwoAtLeast(int64_t n);

// The machine a choice was measured on: CPU model and the thread count torch uses.
std::string hostSignature();

// The remembered choice for `key` (a shape class), from memory, else from the disk cache. A choice
// is measured again by each new process that meets it (each way keeping its best time across the
// measurements) until it has been measured three times: one measurement made while the machine
// was loaded does not decide for good.
std::optional<std::string> rememberedChoice(const std::string& key);
// The remembered choice for `key` once this process may run it without measuring again (settled
// across processes, or measured here): what a call site may keep for its next calls.
std::optional<std::string> settledChoice(const std::string& key);
// Changes whenever the choices held in memory are forgotten or a choice is forced: what a call
// site kept from before is stale then.
uint64_t choicesGeneration();
// How many times the remembered choice for `key` has been measured (0: none remembered).
int rememberedMeasurements(const std::string& key);

// One thread measures a key at a time: claimMeasurement is true for the caller that should
// measure (and must then call endMeasurement); others run the default way meanwhile.
bool claimMeasurement(const std::string& key);
void endMeasurement(const std::string& key);

// Tests: forgets the choices held in memory, as a new process starts (the disk cache keeps them).
void forgetChoicesInMemory();
// Tests: makes every library call run `choice` where it can ("" measures again).
void forceChoice(const std::string& choice);
std::string forcedChoice();
// Whether a choice is forced: a lock-free read for the calls' fast paths.
bool choiceForced();

}  // namespace kiln
