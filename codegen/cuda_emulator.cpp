#include "codegen/cuda_emulator.h"

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <stdexcept>

#include "codegen/dynamic_library.h"
#include "codegen/kiln_emulator_h.h"  // generated: kKilnEmulatorH, the text of cuda/kiln_emulator.h

#ifndef KILN_HOST_CXX
#define KILN_HOST_CXX "c++"
#endif

namespace kiln {

struct EmulatedCudaKernel {
  std::unique_ptr<DynamicLibrary> library;
  int (*launch)(unsigned grid, unsigned threads, const void* params, char* error, size_t error_size) = nullptr;
};

namespace {

// A private folder for the compiler's input and output; each file goes once it is loaded.
class ScratchFolder {
 public:
  ScratchFolder() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/kiln-emulator-XXXXXX";
    if (mkdtemp(pattern.data())) path_ = pattern;
  }
  ~ScratchFolder() {
    if (!path_.empty()) rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Runs `command`, returning its exit status and what it printed.
int runCommand(const std::string& command, std::string* output) {
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (!pipe) throw std::runtime_error("kiln cuda emulator: cannot run the host compiler");
  char buffer[4096];
  size_t got;
  while ((got = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) output->append(buffer, got);
  return pclose(pipe);
}

bool needsLockstep(const std::string& kernel) {
  return kernel.find("__syncthreads") != std::string::npos || kernel.find("__shfl") != std::string::npos ||
         kernel.find("kiln_warp_") != std::string::npos || kernel.find("kiln_block_") != std::string::npos;
}

std::shared_ptr<const EmulatedCudaKernel> build(const CudaSource& source) {
  static ScratchFolder folder;
  static std::atomic<int> serial{0};
  if (folder.path().empty()) throw std::runtime_error("kiln cuda emulator: cannot make a scratch folder");
  const std::string stem = folder.path() + "/" + source.name + "-" + std::to_string(serial++);
  const std::string cpp = stem + ".cpp", library = stem + ".so";
  {
    std::ofstream out(cpp, std::ios::trunc);
    out << (needsLockstep(source.kernel) ? "#define KILN_EMU_LOCKSTEP 1\n" : "") << kKilnEmulatorH << "\n"
        << source.source << "\n"
        << "static void kiln_emu_body(const void* params) { " << source.name << "(*static_cast<const "
        << source.name << "_params*>(params)); }\n"
        << "#define KILN_EMU_LAUNCHER 1\n"
        << kKilnEmulatorH << "\n";
    if (!out) throw std::runtime_error("kiln cuda emulator: cannot write " + cpp);
  }
  std::string output;
  const int status = runCommand(emulatorCompiler() + " -std=c++17 -O1 -fPIC -shared -ffp-contract=off -fno-strict-aliasing "
                                "-fvisibility=hidden -w -x c++ -o '" + library + "' '" + cpp + "'", &output);
  std::remove(cpp.c_str());
  if (status != 0) {
    std::remove(library.c_str());
    throw std::runtime_error("kiln cuda emulator: the host compiler rejected " + source.name + ":\n" + output);
  }
  auto kernel = std::make_shared<EmulatedCudaKernel>();
  kernel->library = std::make_unique<DynamicLibrary>(std::vector<std::string>{library});
  std::remove(library.c_str());  // stays mapped
  if (!kernel->library->loaded()) throw std::runtime_error("kiln cuda emulator: " + kernel->library->error());
  kernel->launch = reinterpret_cast<decltype(kernel->launch)>(kernel->library->symbol("kiln_emu_launch"));
  if (!kernel->launch) throw std::runtime_error("kiln cuda emulator: no kiln_emu_launch in " + source.name);
  return kernel;
}

}  // namespace

std::shared_ptr<const EmulatedCudaKernel> compileEmulatedCuda(const CudaSource& source) {
  static std::mutex mutex;
  static std::map<std::string, std::shared_ptr<const EmulatedCudaKernel>> compiled;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = compiled.find(source.source);
    if (found != compiled.end()) return found->second;
  }
  std::shared_ptr<const EmulatedCudaKernel> kernel = build(source);
  std::lock_guard<std::mutex> lock(mutex);
  return compiled.emplace(source.source, kernel).first->second;
}

void launchEmulatedCuda(const EmulatedCudaKernel& kernel, int64_t blocks, const std::vector<int64_t>& arguments) {
  if (blocks < 1 || blocks > int64_t{1} << 31) throw std::runtime_error("kiln cuda emulator: bad grid size");
  char error[512] = {0};
  if (kernel.launch(static_cast<unsigned>(blocks), kCudaBlockSize, arguments.data(), error, sizeof error) != 0) {
    throw std::runtime_error(std::string("kiln cuda emulator: ") + error);
  }
}

std::string emulatorCompiler() { return KILN_HOST_CXX; }

}  // namespace kiln
