// Loading libkiln.so (linked by an application or torch.ops.load_library from Python) registers
// the kiln pass with the TorchScript executor, unless KILN_DISABLE=1.
#include "kiln/kiln.h"

namespace {

struct RegisterOnLoad {
  RegisterOnLoad() {
    if (!kiln::Options::global().disabled) kiln::enable();
  }
};
const RegisterOnLoad register_on_load;

}  // namespace
