#include "tools/roofline.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "codegen/atomic_file.h"

namespace kiln::cli {
namespace {

// Median seconds of one copy, over runs that add up to at least 20 ms (at least 5).
double timeCopy(at::Tensor& destination, const at::Tensor& source) {
  destination.copy_(source);
  std::vector<double> seconds;
  double total = 0;
  while (seconds.size() < 5 || (total < 0.02 && seconds.size() < 2000)) {
    const auto start = std::chrono::steady_clock::now();
    destination.copy_(source);
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    seconds.push_back(elapsed);
    total += elapsed;
  }
  std::nth_element(seconds.begin(), seconds.begin() + static_cast<std::ptrdiff_t>(seconds.size() / 2), seconds.end());
  return seconds[seconds.size() / 2];
}

std::string escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string bytesLabel(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 4) {
    bytes /= 1024;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof text, "%g %s", bytes, units[unit]);
  return text;
}

std::string temporaryPath(const std::string& suffix) {
  const char* base = std::getenv("TMPDIR");
  std::string pattern = std::string(base && *base ? base : "/tmp") + "/kiln-XXXXXX" + suffix;
  const int fd = mkstemps(pattern.data(), static_cast<int>(suffix.size()));
  if (fd < 0) return "";
  close(fd);
  return pattern;
}

}  // namespace

RooflineCurve measureCopyBandwidth(double min_bytes, double max_bytes) {
  RooflineCurve curve;
  // A copy moves its size twice (read, then write): sizes in moved bytes, powers of two.
  double moved = std::exp2(std::floor(std::log2(std::max(8192.0, min_bytes))));
  const double last = std::min(std::exp2(std::ceil(std::log2(std::max(moved, max_bytes)))), 2.0 * 1024 * 1024 * 1024);
  for (; moved <= last; moved *= 2) {
    const int64_t elements = static_cast<int64_t>(moved / 2 / sizeof(float));
    at::Tensor source = at::rand({elements});
    at::Tensor destination = at::empty({elements});
    const double seconds = timeCopy(destination, source);
    curve.bytes.push_back(moved);
    curve.bytes_per_sec.push_back(moved / seconds);
  }
  return curve;
}

std::string rooflineSvg(const std::vector<RooflinePoint>& points, const RooflineCurve& copy, const std::string& title) {
  const double width = 960, height = 600, left = 90, right = 250, top = 60, bottom = 70;
  const double plot_w = width - left - right, plot_h = height - top - bottom;
  double min_bytes = 1e300, max_bytes = 0, max_rate = 0;
  for (const RooflinePoint& p : points) {
    min_bytes = std::min(min_bytes, p.bytes);
    max_bytes = std::max(max_bytes, p.bytes);
    max_rate = std::max(max_rate, p.bytes / p.seconds);
  }
  for (size_t i = 0; i < copy.bytes.size(); ++i) {
    min_bytes = std::min(min_bytes, copy.bytes[i]);
    max_bytes = std::max(max_bytes, copy.bytes[i]);
    max_rate = std::max(max_rate, copy.bytes_per_sec[i]);
  }
  if (max_bytes <= 0) min_bytes = 1, max_bytes = 2;
  // Log-2 axis from a power of two below the smallest size to one above the largest.
  const double x0 = std::floor(std::log2(min_bytes)), x1 = std::max(x0 + 2, std::ceil(std::log2(max_bytes)));
  const double gbs_max = std::max(1.0, std::ceil(max_rate / 1e9 * 1.1 / 5) * 5);
  auto x = [&](double bytes) { return left + (std::log2(bytes) - x0) / (x1 - x0) * plot_w; };
  auto y = [&](double rate) { return top + plot_h - rate / 1e9 / gbs_max * plot_h; };
  std::ostringstream svg;
  svg.precision(6);
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
      << "\" font-family=\"DejaVu Sans, Arial, sans-serif\" font-size=\"13\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << "<text x=\"" << left << "\" y=\"30\" font-size=\"16\" font-weight=\"bold\">" << escape(title) << "</text>\n";
  // Grid and axes.
  const double tick = x1 - x0 > 12 ? 4 : x1 - x0 > 6 ? 2 : 1;  // powers of two per tick
  for (double power = std::ceil(x0 / tick) * tick; power <= x1; power += tick) {
    const double px = x(std::exp2(power));
    svg << "<line x1=\"" << px << "\" y1=\"" << top << "\" x2=\"" << px << "\" y2=\"" << top + plot_h
        << "\" stroke=\"#ddd\"/>\n<text x=\"" << px << "\" y=\"" << top + plot_h + 20 << "\" text-anchor=\"middle\">"
        << bytesLabel(std::exp2(power)) << "</text>\n";
  }
  const double step = gbs_max <= 20 ? 2 : gbs_max <= 50 ? 5 : gbs_max <= 200 ? 20 : 100;
  for (double gbs = 0; gbs <= gbs_max + 1e-9; gbs += step) {
    const double py = y(gbs * 1e9);
    svg << "<line x1=\"" << left << "\" y1=\"" << py << "\" x2=\"" << left + plot_w << "\" y2=\"" << py
        << "\" stroke=\"#ddd\"/>\n<text x=\"" << left - 8 << "\" y=\"" << py + 4 << "\" text-anchor=\"end\">" << gbs
        << "</text>\n";
  }
  svg << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << plot_w << "\" height=\"" << plot_h
      << "\" fill=\"none\" stroke=\"#444\"/>\n"
      << "<text x=\"" << left + plot_w / 2 << "\" y=\"" << height - 25
      << "\" text-anchor=\"middle\">bytes moved per call (inputs read once, outputs written once; log scale)</text>\n"
      << "<text transform=\"translate(25," << top + plot_h / 2 << ") rotate(-90)\" text-anchor=\"middle\">GB/s reached</text>\n";
  // The copy roof.
  if (!copy.bytes.empty()) {
    svg << "<polyline fill=\"none\" stroke=\"#c0392b\" stroke-width=\"2.5\" points=\"";
    for (size_t i = 0; i < copy.bytes.size(); ++i) svg << x(copy.bytes[i]) << "," << y(copy.bytes_per_sec[i]) << " ";
    svg << "\"/>\n";
  }
  // The groups; a label that would overlap one already placed moves down a line.
  // Placed from the top down, so that a label pushed down stays beside its own, lower point.
  std::vector<std::pair<double, double>> placed;
  std::vector<size_t> order(points.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return points[a].bytes / points[a].seconds > points[b].bytes / points[b].seconds;
  });
  for (size_t i : order) {
    const RooflinePoint& p = points[i];
    const double px = x(p.bytes), py = y(p.bytes / p.seconds);
    double label_y = py - 6;
    for (bool moved = true; moved;) {
      moved = false;
      for (const auto& [other_x, other_y] : placed) {
        if (std::abs(other_y - label_y) < 13 && std::abs(other_x - (px + 8)) < 150) {
          label_y = other_y + 13;
          moved = true;
        }
      }
    }
    placed.emplace_back(px + 8, label_y);
    svg << "<circle cx=\"" << px << "\" cy=\"" << py << "\" r=\"5\" fill=\"#2471a3\" fill-opacity=\"0.85\"/>\n"
        << "<text x=\"" << px + 8 << "\" y=\"" << label_y << "\" font-size=\"11\" fill=\"#1a5276\">" << escape(p.label)
        << "</text>\n";
  }
  // Legend.
  const double lx = left + plot_w + 20;
  svg << "<line x1=\"" << lx << "\" y1=\"" << top + 10 << "\" x2=\"" << lx + 30 << "\" y2=\"" << top + 10
      << "\" stroke=\"#c0392b\" stroke-width=\"2.5\"/>\n<text x=\"" << lx + 38 << "\" y=\"" << top + 14
      << "\">copy of as many bytes</text>\n<text x=\"" << lx + 38 << "\" y=\"" << top + 30
      << "\" font-size=\"11\" fill=\"#555\">(torch copy_, same threads)</text>\n"
      << "<circle cx=\"" << lx + 15 << "\" cy=\"" << top + 55 << "\" r=\"5\" fill=\"#2471a3\"/>\n<text x=\"" << lx + 38
      << "\" y=\"" << top + 59 << "\">a kiln group, one call</text>\n";
  double ly = top + 95;
  for (const RooflinePoint& p : points) {
    if (ly > top + plot_h) break;
    char line[160];
    std::snprintf(line, sizeof line, "%s: %.1f GB/s", p.label.c_str(), p.bytes / p.seconds / 1e9);
    svg << "<text x=\"" << lx << "\" y=\"" << ly << "\" font-size=\"11\">" << escape(line) << "</text>\n";
    ly += 16;
  }
  svg << "</svg>\n";
  return svg.str();
}

std::string cpuDescription() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line, model = "this CPU";
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      model = line.substr(line.find(':') + 2);
      break;
    }
  }
  return model + ", " + std::to_string(at::get_num_threads()) + " threads";
}

std::string runFilter(const std::string& command, const std::string& input, std::string* output) {
  const std::string in = temporaryPath(".in"), out = temporaryPath(".out");
  if (in.empty() || out.empty()) return "cannot make a temporary file for " + command;
  std::string error;
  {
    std::ofstream file(in, std::ios::binary);
    file << input;
    if (!file) error = "cannot write a temporary file for " + command;
  }
  if (error.empty()) {
    const int status = std::system((command + " < '" + in + "' > '" + out + "' 2>/dev/null").c_str());
    if (status != 0) {
      error = command + " failed (exit status " + std::to_string(WEXITSTATUS(status)) + ")";
    } else {
      std::ifstream file(out, std::ios::binary);
      std::ostringstream bytes;
      bytes << file.rdbuf();
      *output = bytes.str();
    }
  }
  std::remove(in.c_str());
  std::remove(out.c_str());
  return error;
}

std::string writeImage(const std::string& path, const std::string& svg) {
  auto ends = [&](const char* suffix) {
    const std::string s(suffix);
    return path.size() >= s.size() && path.compare(path.size() - s.size(), s.size(), s) == 0;
  };
  if (ends(".svg")) return writeFileAtomically(path, svg);
  if (!ends(".png")) return "--roofline " + path + ": give a .svg or .png file";
  if (std::system("command -v rsvg-convert > /dev/null 2>&1") != 0) {
    return "--roofline " + path + ": writing PNG needs rsvg-convert (apt-get install librsvg2-bin); .svg needs nothing";
  }
  std::string png;
  if (std::string error = runFilter("rsvg-convert -f png", svg, &png); !error.empty()) return error;
  return writeFileAtomically(path, png);
}

}  // namespace kiln::cli
