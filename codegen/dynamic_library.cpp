#include "codegen/dynamic_library.h"

#include <dlfcn.h>

namespace kiln {

DynamicLibrary::DynamicLibrary(const std::vector<std::string>& names) {
  for (const std::string& name : names) {
    handle_ = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle_) {
      path_ = name;
      error_.clear();
      return;
    }
    const char* message = dlerror();
    if (!error_.empty()) error_ += "; ";
    error_ += message ? message : name;
  }
}

DynamicLibrary::~DynamicLibrary() {
  // Deliberately never dlclose: driver libraries must outlive every kernel handle, including
  // those released by static destructors.
}

void* DynamicLibrary::symbol(const char* name) const {
  return handle_ ? dlsym(handle_, name) : nullptr;
}

}  // namespace kiln
