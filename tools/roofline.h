// `kiln report --roofline FILE`: each fused group of a model as a point, bytes it moves per call
// against the bandwidth it reached, beside this machine's measured copy bandwidth for the same
// number of bytes (the roof an I/O-bound kernel can reach). Drawn as SVG by hand; a PNG is that
// SVG rasterized by rsvg-convert when it is installed (librsvg2-bin): nothing more is linked.
#pragma once

#include <string>
#include <vector>

namespace kiln::cli {

struct RooflinePoint {
  std::string label;  // the group's name
  double bytes = 0;   // moved per call (inputs read once, outputs written once)
  double seconds = 0; // per call
};

struct RooflineCurve {
  std::vector<double> bytes;          // moved per copy (read + write)
  std::vector<double> bytes_per_sec;  // reached
};

// Times at::Tensor::copy_ of contiguous float32 tensors at sizes from `min_bytes` to `max_bytes`
// moved (powers of two), with the threads kiln's kernels use; median of several timed runs each.
RooflineCurve measureCopyBandwidth(double min_bytes, double max_bytes);

// The chart as an SVG document. `title` names the model and the device.
std::string rooflineSvg(const std::vector<RooflinePoint>& points, const RooflineCurve& copy, const std::string& title);

// The machine's CPU as /proc/cpuinfo names it, with the thread count ATen uses.
std::string cpuDescription();

// Writes `svg` to `path`: as is for .svg; for .png through `rsvg-convert`. Returns an error
// message, or "" on success. The file is written whole or not at all.
std::string writeImage(const std::string& path, const std::string& svg);

// Runs `command` (a shell command line) with `input` as its standard input; its standard output
// in *output. Returns an error message naming the command, or "".
std::string runFilter(const std::string& command, const std::string& input, std::string* output);

}  // namespace kiln::cli
