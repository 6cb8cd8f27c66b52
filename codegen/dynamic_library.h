// A dlopen'ed shared library with checked symbol lookup. kiln reaches the CUDA driver and NVRTC
// this way so that libkiln.so loads and runs its CPU paths on a machine without them.
#pragma once

#include <string>
#include <vector>

namespace kiln {

class DynamicLibrary {
 public:
  // Tries each name in order; loaded() tells whether one opened, error() why not.
  explicit DynamicLibrary(const std::vector<std::string>& names);
  ~DynamicLibrary();
  DynamicLibrary(const DynamicLibrary&) = delete;
  DynamicLibrary& operator=(const DynamicLibrary&) = delete;

  bool loaded() const { return handle_ != nullptr; }
  const std::string& error() const { return error_; }
  const std::string& path() const { return path_; }
  // Returns nullptr if the symbol is absent.
  void* symbol(const char* name) const;

 private:
  void* handle_ = nullptr;
  std::string path_;
  std::string error_;
};

}  // namespace kiln
