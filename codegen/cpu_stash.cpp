// Which values a reduction kernel keeps between reads of a row (see CpuStashPlan in
// cpu_kernel.h); the emitter (cpu_emitter.cpp) and the runtime's scratch rows both follow it.
#include <vector>

#include "codegen/cpu_kernel.h"
#include "codegen/cpu_math.h"

namespace kiln {

CpuStashPlan planCpuStash(const ir::Kernel& kernel) {
  CpuStashPlan plan;
  const ir::RowSchedule schedule = ir::rowSchedule(kernel);
  if (schedule.stages == 0) return plan;
  const size_t size = kernel.body.size();
  // Values computed once per row, between reads.
  std::vector<bool> row_scope(size, false);
  for (size_t k = 0; k < size; ++k) {
    row_scope[k] = ir::isReduction(kernel.body[k].op) || (!schedule.per_element[k] && schedule.stage[k] > 0);
  }
  // Read r (1..stages) accumulates the reductions of stage r; read stages + 1 stores the
  // per-element outputs. `roots[r]`: what read r must produce.
  const int reads = schedule.stages + 1;
  std::vector<std::vector<int>> roots(static_cast<size_t>(reads) + 1);
  for (size_t k = 0; k < size; ++k) {
    if (ir::isReduction(kernel.body[k].op)) roots[static_cast<size_t>(schedule.stage[k])].push_back(kernel.body[k].operands[0]);
  }
  for (size_t o = 0; o < kernel.outputs.size(); ++o) {
    if (!kernel.isRowOutput(o)) roots[static_cast<size_t>(reads)].push_back(kernel.outputs[o]);
  }
  std::vector<int> computed_in(size, 0);  // the first read that computes a value (0: none yet)
  std::vector<int> target(size, -2);      // -2: not kept
  std::vector<bool> output_taken(kernel.outputs.size(), false);
  for (int read = 1; read <= reads; ++read) {
    std::vector<bool> stop(size);
    for (size_t k = 0; k < size; ++k) {
      stop[k] = (row_scope[k] && schedule.stage[k] < read) || target[k] != -2;
    }
    // A value an earlier read computed is kept by that read when computing it costs more than a
    // store and a load: transcendental math, or a rounding to half or bfloat16 (a few integer
    // ops per vector). The latest such values first, so that what they come from is not kept too.
    for (size_t v = size; v-- > 0;) {
      if (!ir::dependencies(kernel, roots[static_cast<size_t>(read)], stop)[v]) continue;
      const ir::Instr& instr = kernel.body[v];
      if (computed_in[v] == 0 || !schedule.per_element[v] || stop[v] || instr.op == ir::Op::kLoad) continue;
      const std::vector<bool> inside = ir::dependencies(kernel, {static_cast<int>(v)}, row_scope);
      bool costly = false;
      for (size_t k = 0; k < size; ++k) {
        const ir::Instr& op = kernel.body[k];
        costly |= inside[k] && (isTranscendental(op.op) || (op.op == ir::Op::kCast && ir::isStorageOnly(op.type)));
      }
      if (!costly) continue;
      CpuStash kept{static_cast<int>(v), computed_in[v], -1, -1};
      for (size_t o = 0; o < kernel.outputs.size() && kept.output < 0; ++o) {
        if (output_taken[o] || kernel.isRowOutput(o) || kernel.outputType(o) != instr.type) continue;
        output_taken[o] = true;
        kept.output = static_cast<int>(o);
      }
      if (kept.output < 0) {
        kept.scratch = static_cast<int>(plan.scratch_element_bytes.size());
        plan.scratch_element_bytes.push_back(ir::dtypeSize(instr.type));
      }
      target[v] = kept.output >= 0 ? kept.output : -1;
      stop[v] = true;
      plan.values.push_back(kept);
    }
    const std::vector<bool> done = ir::dependencies(kernel, roots[static_cast<size_t>(read)], stop);
    for (size_t k = 0; k < size; ++k) {
      if (done[k] && !stop[k] && computed_in[k] == 0) computed_in[k] = read;
    }
  }
  return plan;
}
}  // namespace kiln
