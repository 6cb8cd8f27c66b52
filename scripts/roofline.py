"""kiln_bench's Google Benchmark JSON as a bandwidth chart: every benchmark with a bytes counter as
a point, bytes moved per iteration against the bandwidth it reached, with the copy benchmarks
(Baseline_Copy*) as the roof an I/O-bound kernel can reach on that machine. The same picture as
`kiln report --roofline`, for the benchmark suites.

    build/bin/kiln_bench --benchmark_filter='(Kiln|Baseline_Eager|Baseline_Copy)_' \
        --benchmark_out=bench.json --benchmark_out_format=json
    .venv/bin/python scripts/roofline.py bench.json -o roofline.png [--title ...] [--filter REGEX]

Kiln_* points are filled, Baseline_* hollow, one colour per pattern (the name without its prefix),
one marker per label (dtype). Needs matplotlib (in .venv).
"""
import argparse
import json
import re
import sys
from collections import defaultdict

SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def rate_of(benchmark):
    """Bytes per second from the benchmark's counters (SetBytesProcessed or a 'bytes/s' counter)."""
    if "bytes_per_second" in benchmark:
        return benchmark["bytes_per_second"]
    for key, value in benchmark.items():
        if key.endswith("bytes/s") and isinstance(value, (int, float)):
            return value
    return None


def load_points(path, pattern):
    with open(path) as file:
        data = json.load(file)
    points = []
    for benchmark in data.get("benchmarks", []):
        if benchmark.get("run_type") == "aggregate" and benchmark.get("aggregate_name") != "median":
            continue
        name = benchmark.get("run_name", benchmark["name"])
        if pattern and not re.search(pattern, name):
            continue
        rate = rate_of(benchmark)
        if not rate:
            continue
        seconds = benchmark["real_time"] * SECONDS[benchmark.get("time_unit", "ns")]
        family = name.split("/")[0]
        points.append({"name": name, "family": family, "label": benchmark.get("label", ""),
                       "bytes": rate * seconds, "rate": rate})
    return data.get("context", {}), points


def size_label(value):
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if value >= scale:
            return f"{value / scale:g} {unit}"
    return f"{value:g} B"


def pattern_of(family):
    return re.sub(r"^(Kiln|Baseline_Eager|Baseline_TorchFuser|Baseline)_", "", family)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="kiln_bench --benchmark_out file (JSON)")
    parser.add_argument("-o", "--output", required=True, help="the picture: .png or .svg")
    parser.add_argument("--title", help="the chart's title (default: the machine from the JSON)")
    parser.add_argument("--filter", help="only benchmarks whose name matches this regular expression")
    args = parser.parse_args()

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        sys.exit("roofline.py: needs matplotlib (.venv/bin/pip install matplotlib)")

    context, points = load_points(args.json, args.filter)
    if not points:
        sys.exit(f"roofline.py: no benchmark in {args.json} has a bytes counter"
                 + (f" and matches {args.filter!r}" if args.filter else ""))

    figure, axes = plt.subplots(figsize=(11, 6.5))
    copies = defaultdict(list)
    for p in points:
        if pattern_of(p["family"]).startswith("Copy") or p["family"].startswith("Baseline_Copy"):
            copies[p["label"]].append(p)
    for label, group in copies.items():
        group.sort(key=lambda p: p["bytes"])
        axes.plot([p["bytes"] for p in group], [p["rate"] / 1e9 for p in group], color="#c0392b", linewidth=2.5,
                  marker="s", markersize=4, label=f"copy {label}".strip())

    patterns = sorted({pattern_of(p["family"]) for p in points if p["family"] not in
                       {q["family"] for g in copies.values() for q in g}})
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(patterns)}
    labels = sorted({p["label"] for p in points})
    markers = {label: "osD^v<>"[i % 7] for i, label in enumerate(labels)}
    seen = set()
    for p in points:
        pattern = pattern_of(p["family"])
        if pattern not in colours:
            continue
        kiln = p["family"].startswith("Kiln")
        key = (pattern, kiln, p["label"])
        axes.scatter(p["bytes"], p["rate"] / 1e9, s=60, marker=markers[p["label"]], color=colours[pattern],
                     facecolors=colours[pattern] if kiln else "none", linewidths=1.5,
                     label=None if key in seen else f"{'kiln' if kiln else p['family'].split('_')[1].lower()} "
                                                    f"{pattern} {p['label']}".strip())
        seen.add(key)

    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: size_label(value)))
    axes.set_xlabel("bytes moved per iteration (inputs read once, outputs written once)")
    axes.set_ylabel("GB/s reached")
    axes.set_ylim(bottom=0)
    axes.grid(True, which="major", color="#ddd")
    machine = f"{context.get('num_cpus', '?')} CPUs at {context.get('mhz_per_cpu', '?')} MHz"
    axes.set_title(args.title or f"kiln_bench: bandwidth against copy ({machine}, {context.get('date', '')})")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)
    print(f"roofline.py: wrote {args.output} ({len(points)} benchmarks)")


if __name__ == "__main__":
    main()
