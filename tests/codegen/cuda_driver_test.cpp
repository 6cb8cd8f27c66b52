// The lazily loaded CUDA driver and NVRTC: present or not, asking never crashes, and the answer
// is consistent.
#include "codegen/cuda_driver.h"

#include <gtest/gtest.h>

namespace kiln::cuda {
namespace {

TEST(CudaDriver, AbsentDriverIsReportedNotFatal) {
  std::string why;
  const DriverApi* api = driver(&why);
  if (api == nullptr) {
    EXPECT_FALSE(why.empty());
    EXPECT_TRUE(devices().empty());
    EXPECT_EQ(driverVersion().rfind("none (", 0), 0u);
  } else {
    EXPECT_NE(driverVersion().rfind("1", 0), std::string::npos);
  }
}

TEST(CudaDriver, NvrtcVersionFromToolkit) {
  std::string why;
  const NvrtcApi* api = nvrtc(&why);
  if (api == nullptr) GTEST_SKIP() << "no NVRTC here: " << why;
  int major = 0;
  int minor = 0;
  ASSERT_EQ(api->nvrtcVersion(&major, &minor), 0);
  EXPECT_GE(major, 12);
  EXPECT_EQ(nvrtcVersion(), std::to_string(major) + "." + std::to_string(minor));
}

}  // namespace
}  // namespace kiln::cuda
