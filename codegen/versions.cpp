#include "codegen/versions.h"

#include <llvm/Config/llvm-config.h>

namespace kiln {

std::string kilnVersion() { return KILN_VERSION_STRING; }
std::string llvmVersion() { return LLVM_VERSION_STRING; }

}  // namespace kiln
