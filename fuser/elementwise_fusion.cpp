#include "fuser/fusion_pass.h"

namespace kiln {

int fuseElementwise(std::shared_ptr<torch::jit::Graph>& graph, const Options& options) {
  return 0;
}

}  // namespace kiln
