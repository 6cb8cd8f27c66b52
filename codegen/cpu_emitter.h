// The CPU backend's emitter: kernel IR → an LLVM module for the host CPU, not yet optimized. Its
// text is the generated source the disk cache's key names; codegen/cpu_kernel.cpp optimizes it,
// emits object code, caches and links it. Internal to codegen/.
#pragma once

#include <llvm/IR/LLVMContext.h>
#include <llvm/IR/Module.h>
#include <llvm/Target/TargetMachine.h>

#include <memory>
#include <string>

#include "codegen/cpu_kernel.h"

namespace kiln {

// Registers LLVM's native target, once per process.
void initializeLlvm();

// A kernel's module as the emitter makes it, for the host (its data layout, triple and CPU
// features set), with the machine that will compile it.
struct EmittedModule {
  std::unique_ptr<llvm::LLVMContext> context;
  std::unique_ptr<llvm::Module> module;
  std::unique_ptr<llvm::TargetMachine> machine;
  std::string symbol;  // the kernel function's name
};

// Throws std::runtime_error on invalid IR, a layout that does not fit the kernel, or a host
// LLVM cannot target.
EmittedModule emitCpuModule(const ir::Kernel& kernel, const CpuLayout& layout);

}  // namespace kiln
