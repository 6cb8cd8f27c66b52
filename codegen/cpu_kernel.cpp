// The LLVM CPU backend after emission (codegen/cpu_emitter.cpp): O3, object code, the disk cache
// and the ORC JIT; see cpu_kernel.h for the kernel's calling convention.
#include "codegen/cpu_kernel.h"

#include <dlfcn.h>
#include <llvm/ExecutionEngine/Orc/LLJIT.h>
#include <llvm/IR/LegacyPassManager.h>
#include <llvm/Passes/PassBuilder.h>
#include <llvm/Support/MemoryBuffer.h>
#include <llvm/Support/raw_ostream.h>
#include <llvm/Transforms/Utils/Cloning.h>

#include <chrono>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "codegen/cpu_emitter.h"
#include "codegen/fault_injection.h"
#include "codegen/kernel_cache.h"
#include "codegen/kernel_dump.h"
#include "codegen/versions.h"

namespace kiln {
namespace {

std::mutex jit_mutex;  // LLJIT creation and symbol definition; lookups are thread-safe

std::string moduleText(const llvm::Module& module) {
  std::string text;
  llvm::raw_string_ostream stream(text);
  module.print(stream, nullptr);
  return stream.str();
}

// Optimizes at O3 with the host's cost model.
void optimize(EmittedModule& emitted) {
  llvm::LoopAnalysisManager loops;
  llvm::FunctionAnalysisManager functions;
  llvm::CGSCCAnalysisManager cgsccs;
  llvm::ModuleAnalysisManager modules;
  llvm::PassBuilder passes(emitted.machine.get());
  passes.registerModuleAnalyses(modules);
  passes.registerCGSCCAnalyses(cgsccs);
  passes.registerFunctionAnalyses(functions);
  passes.registerLoopAnalyses(loops);
  passes.crossRegisterProxies(loops, functions, cgsccs, modules);
  passes.buildPerModuleDefaultPipeline(llvm::OptimizationLevel::O3).run(*emitted.module, modules);
}

// Machine code for the (optimized) module: an ELF object file, or assembly text.
std::string emitMachineCode(EmittedModule& emitted, llvm::CodeGenFileType type) {
  llvm::SmallString<0> buffer;
  llvm::raw_svector_ostream stream(buffer);
  llvm::legacy::PassManager emit;
  if (emitted.machine->addPassesToEmitFile(emit, stream, nullptr, type)) {
    throw std::runtime_error("kiln cpu: the host target cannot emit machine code");
  }
  auto clone = llvm::CloneModule(*emitted.module);
  emit.run(*clone);
  return buffer.str().str();
}

// Links `object` into a JIT of its own and finds the kernel. Math calls resolve explicitly to
// SLEEF and libm: libkiln.so may be loaded RTLD_LOCAL (Python), where a process-wide symbol
// search would not see its dependencies. `declarations` names what the module calls.
CpuKernelFn linkObject(const std::string& object, const std::vector<std::string>& declarations,
                       const std::string& symbol, std::unique_ptr<llvm::orc::LLJIT>* jit_out) {
  llvm::orc::SymbolMap externals;
  std::unique_ptr<llvm::orc::LLJIT> jit;
  {
    std::lock_guard<std::mutex> lock(jit_mutex);
    auto builder = llvm::orc::JITTargetMachineBuilder::detectHost();
    if (!builder) throw std::runtime_error("kiln cpu: cannot target the host: " + llvm::toString(builder.takeError()));
    auto created = llvm::orc::LLJITBuilder().setJITTargetMachineBuilder(std::move(*builder)).create();
    if (!created) throw std::runtime_error("kiln cpu: " + llvm::toString(created.takeError()));
    jit = std::move(*created);
    static void* sleef = [] {
      void* handle = dlopen("libsleef.so.3", RTLD_NOW | RTLD_LOCAL);
      return handle ? handle : dlopen(KILN_SLEEF_LIBRARY, RTLD_NOW | RTLD_LOCAL);
    }();
    if (!sleef) throw std::runtime_error("kiln cpu: cannot load libsleef.so.3 (apt-get install libsleef3)");
    for (const std::string& name : declarations) {
      void* address = dlsym(sleef, name.c_str());
      if (!address) address = dlsym(RTLD_DEFAULT, name.c_str());
      if (!address) throw std::runtime_error("kiln cpu: unresolved math function " + name);
      externals[jit->mangleAndIntern(name)] =
          llvm::JITEvaluatedSymbol(llvm::pointerToJITTargetAddress(address), llvm::JITSymbolFlags::Exported);
    }
    if (auto error = jit->getMainJITDylib().define(llvm::orc::absoluteSymbols(externals))) {
      throw std::runtime_error("kiln cpu: " + llvm::toString(std::move(error)));
    }
    // Calls LLVM itself may introduce (libm, half conversion) come from the process.
    auto generator = llvm::orc::DynamicLibrarySearchGenerator::GetForCurrentProcess(
        jit->getDataLayout().getGlobalPrefix());
    if (generator) jit->getMainJITDylib().addGenerator(std::move(*generator));
    auto buffer = llvm::MemoryBuffer::getMemBufferCopy(object, symbol + ".o");
    if (auto error = jit->addObjectFile(std::move(buffer))) {
      throw std::runtime_error("kiln cpu: " + llvm::toString(std::move(error)));
    }
  }
  auto address = jit->lookup(symbol);
  if (!address) throw std::runtime_error("kiln cpu: " + llvm::toString(address.takeError()));
  failIfInjected(FaultStage::kLoad);
  *jit_out = std::move(jit);
  return address->toPtr<CpuKernelFn>();
}

std::vector<std::string> declarationsOf(const llvm::Module& module) {
  std::vector<std::string> names;
  for (const llvm::Function& function : module) {
    if (function.isDeclaration() && !function.isIntrinsic()) names.push_back(function.getName().str());
  }
  return names;
}

// What the optimized module becomes: the object file, the functions it calls, and (when asked)
// its optimized LLVM IR and assembly for people to read.
struct MachineCode {
  std::string object;
  std::vector<std::string> declarations;
  std::string llvm_ir;
  std::string assembly;
};

MachineCode generate(EmittedModule& emitted, bool keep_text) {
  optimize(emitted);
  MachineCode code;
  code.declarations = declarationsOf(*emitted.module);
  if (keep_text) {
    code.llvm_ir = moduleText(*emitted.module);
    code.assembly = emitMachineCode(emitted, llvm::CGFT_AssemblyFile);
  }
  code.object = emitMachineCode(emitted, llvm::CGFT_ObjectFile);
  return code;
}

double millisecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

// A cached entry: one header line naming the symbols the object calls, then the object file.
std::string packObject(const std::vector<std::string>& declarations, const std::string& object) {
  std::string header = "kiln-cpu-object";
  for (const std::string& name : declarations) header += " " + name;
  return header + "\n" + object;
}

bool unpackObject(const std::string& payload, std::vector<std::string>* declarations, std::string* object) {
  const size_t end = payload.find('\n');
  if (end == std::string::npos) return false;
  std::istringstream header(payload.substr(0, end));
  std::string tag, name;
  header >> tag;
  if (tag != "kiln-cpu-object") return false;
  while (header >> name) declarations->push_back(name);
  *object = payload.substr(end + 1);
  return !object->empty();
}

}  // namespace

std::string CpuLayout::toString() const { return accessText(operands); }

CpuLayout cpuLayoutFor(const std::vector<Access>& accesses) {
  CpuLayout layout;
  for (Access access : accesses) layout.operands.push_back(innerAccess(access));
  return layout;
}

void prepareCpuBackend() {
  initializeLlvm();
  CpuTarget::host();
}

struct CpuKernel::Jit {
  std::unique_ptr<llvm::orc::LLJIT> jit;
};

CpuKernel::~CpuKernel() = default;

void CpuKernel::link(const std::string& object, const std::vector<std::string>& declarations,
                     const std::string& symbol) {
  jit_ = std::make_unique<Jit>();
  function_ = linkObject(object, declarations, symbol, &jit_->jit);
}

std::unique_ptr<CpuKernel> CpuKernel::compile(const ir::Kernel& kernel, const CpuLayout& layout,
                                              bool keep_text) {
  const auto start = std::chrono::steady_clock::now();
  EmittedModule emitted = emitCpuModule(kernel, layout);
  const MachineCode code = generate(emitted, keep_text);
  std::unique_ptr<CpuKernel> result(new CpuKernel());
  result->llvm_ir_ = code.llvm_ir;
  result->assembly_ = code.assembly;
  result->link(code.object, code.declarations, emitted.symbol);
  result->compile_ms_ = millisecondsSince(start);
  return result;
}

CpuKernelResult obtainCpuKernel(const ir::Kernel& kernel, const CpuLayout& layout) {
  const auto start = std::chrono::steady_clock::now();
  EmittedModule emitted = emitCpuModule(kernel, layout);
  const CpuTarget& target = CpuTarget::host();
  KernelCacheKey key;
  key.ir = ir::print(kernel);
  key.source = moduleText(*emitted.module);  // the emitter that made it is part of the key
  key.specialization = "layout " + layout.toString();
  key.arch = target.triple + " " + target.cpu + " " + target.features;
  key.compiler = "llvm " + llvmVersion();
  key.options = "O3 vector_bits=" + std::to_string(target.vector_bits);
  CpuKernelResult result;
  result.cache_key = key.hashHex();
  const std::string stem = dumpStem(emitted.symbol, result.cache_key);
  if (dumpEnabled()) dumpKernelFiles(stem, {{"kir", key.ir + "# layout " + layout.toString() + "\n"}});

  std::unique_ptr<CpuKernel> obtained(new CpuKernel());
  std::vector<std::string> declarations;
  std::string object;
  if (std::optional<std::string> cached = KernelCache::global().load(key);
      cached && unpackObject(*cached, &declarations, &object)) {
    obtained->link(object, declarations, emitted.symbol);
    result.from_cache = true;
  } else {
    const MachineCode code = generate(emitted, dumpEnabled());
    if (dumpEnabled()) dumpKernelFiles(stem, {{"ll", code.llvm_ir}, {"s", code.assembly}});
    KernelCache::global().store(key, packObject(code.declarations, code.object));
    obtained->llvm_ir_ = code.llvm_ir;
    obtained->assembly_ = code.assembly;
    obtained->link(code.object, code.declarations, emitted.symbol);
  }
  obtained->compile_ms_ = millisecondsSince(start);
  result.fetch_ms = obtained->compile_ms_;
  result.kernel = std::move(obtained);
  return result;
}

}  // namespace kiln
