// Versions of the code generators kiln was built with; they also enter every kernel cache key.
#pragma once

#include <string>

namespace kiln {

std::string kilnVersion();
std::string llvmVersion();

}  // namespace kiln
