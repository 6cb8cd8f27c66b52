#!/usr/bin/env python3
"""Turns what scripts/device-check.sh left in its work folder into the files that come back from
the GPU machine, at most 8 under OUT, none over 16 MiB:

  summary.md      device, date, route, each stage's and step's status and seconds, test counts and
                  failures, the demo's cold and warm runs, the benchmarks' key lines
  gpu-tests.log   the shards' gtest output, one after another
  gpu-tests.xml   the shards' gtest XML, merged
  bench.json      kiln_bench's runs, scripts/reduction_bench.py's,
                  scripts/elementwise_torch_compile.py's and scripts/precision_gpu_check.py's rows
  rest.tar.gz     every other log and result (not the payload, not the kernel caches)

device-check.sh calls it after every stage, so a run cut short still leaves a summary, and once more
with --final, which also checks the files against the limits (exit 3 where one is broken).
Standard library only: it runs under the GPU machine's python3 and this machine's alike.
"""
import argparse
import datetime
import glob
import json
import os
import re
import tarfile
import xml.etree.ElementTree as ET

FILE_LIMIT = 16 << 20  # what comes back: per file, and 64 MiB, 8 files, 2 folders down in all
KEEP = 15 << 20  # what this script lets one file grow to, to stay under FILE_LIMIT
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
GTEST_RESULT = re.compile(r"^\[\s*(OK|FAILED|SKIPPED)\s*\] ([^ ,]+).*\(\d+ ms\)\s*$")


def read(path, default=""):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def rows(path, width):
    """The tab-separated lines of PATH, each padded to WIDTH fields."""
    return [(line.split("\t") + [""] * width)[:width] for line in read(path).splitlines() if line.strip()]


def capped(text, limit=KEEP):
    """TEXT, or its head and tail with a note between where it is longer than LIMIT bytes."""
    data = text.encode()
    if len(data) <= limit:
        return text
    half = limit // 2
    return (data[:half].decode(errors="ignore") + f"\n\n[... {len(data) - 2 * half} bytes left out ...]\n\n" +
            data[-half:].decode(errors="ignore"))


def gpu_tests(work, out):
    """Writes gpu-tests.log and gpu-tests.xml; returns the counts and names for the summary."""
    folder = os.path.join(work, "gpu-tests")
    logs = sorted(glob.glob(os.path.join(folder, "shard-*.log")), key=lambda p: int(re.findall(r"\d+", p)[-1]))
    if not logs:
        return None
    listing = read(os.path.join(folder, "list.txt"))
    total = sum(1 for line in listing.splitlines() if line.startswith("  ")) or None
    results, parts = {}, []
    for path in logs:
        text = read(path)
        parts.append(f"==== {os.path.basename(path)} ====\n{text}")
        for line in text.splitlines():
            match = GTEST_RESULT.match(line)
            if match:
                results[match.group(2)] = match.group(1)
    with open(os.path.join(out, "gpu-tests.log"), "w") as f:
        f.write(capped("\n".join(parts)))
    merged = ET.Element("testsuites", name="kiln_gpu_tests")
    counts = dict(tests=0, failures=0, errors=0, skipped=0, disabled=0)
    xmls = sorted(glob.glob(os.path.join(folder, "shard-*.xml")))
    for path in xmls:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            continue
        for suite in root.findall("testsuite"):
            merged.append(suite)
            for key in counts:
                counts[key] += int(suite.get(key, "0") or 0)
    if xmls:
        for key, value in counts.items():
            merged.set(key, str(value))
        ET.ElementTree(merged).write(os.path.join(out, "gpu-tests.xml"), encoding="utf-8", xml_declaration=True)
    tally = {state: sorted(name for name, s in results.items() if s == state) for state in ("OK", "FAILED", "SKIPPED")}
    return dict(total=total, shards=len(logs), xml_shards=len(xmls), **tally)


def benchmark_tables(runs):
    """kiln_bench's runs as markdown tables: one per argument signature, a row per argument
    value, a column per benchmark family; each cell its rate (GB/s, TFLOP/s) or its time."""
    tables = {}
    for run in runs:
        if run.get("run_type") == "aggregate":
            continue
        parts = run.get("name", "?").split("/")
        family = parts[0]
        args = [p for p in parts[1:] if p not in ("manual_time", "real_time") and
                not p.startswith(("min_time:", "iterations:", "repeats:", "threads:"))]
        signature = "/".join(a.split(":")[0] if ":" in a else "#" for a in args) or "-"
        if run.get("error_occurred"):
            cell = "error: " + str(run.get("error_message", ""))[:40]
        elif "GB/s" in run:
            cell = f"{run['GB/s']:.0f} GB/s" + (f" ({run['pct_copy']:.0f}% copy)" if "pct_copy" in run else "")
        elif "TFLOP/s" in run:
            cell = f"{run['TFLOP/s']:.1f} TFLOP/s, {run.get('real_time', 0):.3g} {run.get('time_unit', '')}"
        elif "bytes_per_second" in run:
            cell = f"{run['bytes_per_second'] / 1e9:.1f} GB/s"
        else:
            cell = f"{run.get('real_time', 0):.3g} {run.get('time_unit', '')}"
        table = tables.setdefault(signature, {"columns": [], "rows": {}})
        if family not in table["columns"]:
            table["columns"].append(family)
        table["rows"].setdefault("/".join(args) or "-", {})[family] = cell
    lines = []
    for signature, table in tables.items():
        lines += ["", "| " + signature + " | " + " | ".join(table["columns"]) + " |",
                  "|---" * (len(table["columns"]) + 1) + "|"]
        for key, cells in table["rows"].items():
            lines.append("| " + key + " | " + " | ".join(cells.get(c, "") for c in table["columns"]) + " |")
    return lines


def text_block(path, limit=45):
    text = read(path).rstrip()
    if not text:
        return []
    lines = text.splitlines()
    if len(lines) > limit:
        lines = lines[:limit] + [f"... {len(lines) - limit} more lines in rest.tar.gz"]
    return ["```text"] + lines + ["```"]


def bench(work, out):
    """Writes bench.json; returns the summary's benchmark section."""
    folder = os.path.join(work, "bench")
    runs, context, section = [], None, []
    for path in sorted(glob.glob(os.path.join(folder, "kiln_bench*.json"))):
        data = load_json(path)
        if data is None:
            step = os.path.basename(path)[:-len(".json")]
            if "Failed to match any benchmarks" in read(os.path.join(work, "logs", step + ".err")):
                section.append(f"- {step}: its filter matched no benchmark (the _Cuda ones register only where "
                               "torch sees a CUDA device)")
            else:
                console = [line for line in read(os.path.join(folder, step + ".txt")).splitlines()
                           if line.startswith(("Kiln_", "Baseline_"))]
                section += [f"- {step}: no JSON (a run cut short writes none); the runs it finished:", ""]
                section += (["```text"] + console[:45] + ["```", ""]) if console else ["(none)", ""]
            continue
        context = context or data.get("context")
        runs += data.get("benchmarks", [])
    combined = {"kiln_bench": {"context": context, "benchmarks": runs},
                "reductions": load_json(os.path.join(folder, "reductions.json")),
                "elementwise_torch_compile": load_json(os.path.join(folder, "torch_compile.json")),
                "precision": load_json(os.path.join(folder, "precision.json"))}
    if not os.path.isdir(folder):
        return []
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(combined, f, indent=1)
    section = ["## Benchmarks", "", "### kiln_bench", ""] + section + benchmark_tables(runs)
    if not runs and len(section) == 4:
        section.append("No kiln_bench runs.")
    for title, name in (("Row reductions (scripts/reduction_bench.py)", "reductions.txt"),
                        ("torch.compile on the elementwise chains (scripts/elementwise_torch_compile.py)",
                         "torch_compile.txt"),
                        ("An fp32 BERT-base-shaped model in reduced precision (scripts/precision_gpu_check.py)",
                         "precision.txt"),
                        ("Architectures through every route (tests/python/test_hf_architectures.py)", "models.txt"),
                        ("The same in float16", "models-fp16.txt")):
        block = text_block(os.path.join(folder, name))
        if block:
            section += ["", "### " + title, ""] + block
    return section


def demo(work):
    folder = os.path.join(work, "demo")
    runs = {label: load_json(os.path.join(folder, f"demo-{label}.json")) for label in ("cold", "warm")}
    if not os.path.isdir(folder):
        return []
    section = ["## Demo (kiln demo, BERT-base encoder layer, fresh kernel cache, cold then warm)", "",
               "| run | device | match | max abs error | unfused ms | fused ms | cache hits | misses | stores |",
               "|---|---|---|---|---|---|---|---|---|"]
    for label, run in runs.items():
        if not run:
            section.append(f"| {label} | no result (demo-{label} in rest.tar.gz) |||||||")
            continue
        cache = run.get("kernel_cache", {})
        section.append(f"| {label} | {run.get('device')} | {run.get('match')} | {run.get('max_abs_error')} | "
                       f"{run.get('unfused_ms')} | {run.get('fused_ms')} | {cache.get('hits')} | "
                       f"{cache.get('misses')} | {cache.get('stores')} |")
    cold, warm = runs["cold"], runs["warm"]
    if cold and warm:
        c, w = cold.get("kernel_cache", {}), warm.get("kernel_cache", {})
        # tests/python/test_demo_cuda_cache.py's expectations: on CUDA the warm run looks up what the
        # cold run did (groups that share a kernel hit the cold run's own store), every one a hit.
        # On the CPU a cold run also hits the kernels it compiled itself, so hits are not compared.
        expected = c.get("misses", 0) > 0 and c.get("stores") == c.get("misses") and w.get("misses") == 0
        if cold.get("device") == "cuda":
            expected = expected and w.get("hits") == c.get("hits", 0) + c.get("misses", 0)
        section += ["", "Kernel cache: " + ("the cold run compiled and stored every kernel, the warm run loaded "
                                            "them and compiled none." if expected else
                                            "**not as expected** (cold: every miss stored; warm: no miss" +
                                            (", a hit per cold lookup" if cold.get("device") == "cuda" else "") +
                                            ").")]
    return section


def failures(work):
    """The last lines of each stage and step that did not end well, for a reader of the summary alone."""
    section, failed_steps = [], []
    for stage, name, status, *_ in rows(os.path.join(work, "steps.tsv"), 6):
        if status not in ("ok", "no device"):
            failed_steps.append(stage)
            section += [f"### {stage}: {name}: {status}", ""] + tail(os.path.join(work, "logs", name + ".err"))
    for name, status, *_ in rows(os.path.join(work, "stages.tsv"), 4):
        if status not in ("ok", "skipped") and name not in failed_steps:
            section += [f"### {name}: {status}", ""] + tail(os.path.join(work, "logs", name + ".log"))
    return ["## What went wrong", ""] + section if section else []


def tail(path, count=8):
    lines = [line[:300] for line in read(path).rstrip().splitlines()[-count:]]
    return (["```text"] + lines + ["```", ""]) if lines else ["(no output)", ""]


def rest_archive(work, out):
    """rest.tar.gz: the work folder less the payload, the kernel caches and the shards' output;
    the largest files are left out where it would pass KEEP."""
    members = []
    for root, dirs, files in os.walk(work):
        dirs[:] = [d for d in dirs if d not in ("payload", "cache")]
        for name in files:
            if name.startswith("shard-") and os.path.basename(root) == "gpu-tests":
                continue  # in gpu-tests.log and gpu-tests.xml already
            path = os.path.join(root, name)
            members.append((os.path.getsize(path), path))
    left_out = []
    while True:
        target = os.path.join(out, "rest.tar.gz")
        with tarfile.open(target, "w:gz") as tar:
            for _, path in sorted(members, key=lambda m: m[1]):
                tar.add(path, arcname=os.path.relpath(path, work))
        if os.path.getsize(target) <= KEEP or not members:
            return left_out
        members.sort()
        left_out.append(os.path.relpath(members.pop()[1], work))


def check_results(out):
    """Problems with what comes back: more than 8 files, a name or depth the transfer refuses, a
    file over 16 MiB, over 64 MiB in all."""
    problems, files, total = [], [], 0
    for root, _, names in os.walk(out):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), out)
            size = os.path.getsize(os.path.join(root, name))
            files.append((relative, size))
            total += size
            if not all(NAME.match(part) for part in relative.split(os.sep)):
                problems.append(f"{relative}: a name the transfer refuses")
            if relative.count(os.sep) > 2:
                problems.append(f"{relative}: more than 2 folders down")
            if size > FILE_LIMIT:
                problems.append(f"{relative}: {size} bytes, over 16 MiB")
    if len(files) > 8:
        problems.append(f"{len(files)} files, over 8")
    if total > 4 * FILE_LIMIT:
        problems.append(f"{total} bytes in all, over 64 MiB")
    return sorted(files), problems


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("gpu", "dry"), required=True)
    parser.add_argument("--started", type=int, required=True, help="the run's start, seconds since the epoch")
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--final", action="store_true")
    args = parser.parse_args()
    work, out = args.work, args.out
    os.makedirs(out, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    elapsed = int(now.timestamp()) - args.started

    gpu = read(os.path.join(work, "gpu.txt")).strip().splitlines()
    env = load_json(os.path.join(work, "env.json")) or {}
    route = dict(line.split("=", 1) for line in read(os.path.join(work, "route.env")).splitlines() if "=" in line)
    info = read(os.path.join(work, "BUILD-INFO.txt"))
    packed = re.search(r"^packed:\s*(.*?) on ", info, re.M)
    commit = re.search(r"^commit:\s*(.*)$", info, re.M)
    if route.get("route") == "carried":
        route_text = (f"carried binaries (packed {packed.group(1) if packed else '?'}, "
                      f"commit {commit.group(1) if commit else '?'})")
    elif route.get("route") == "built":
        route_text = "built on this machine (the carried binaries were missing or did not load)"
    else:
        route_text = "none: no binaries to run (see the unpack and build stages)"
    machine = ("; ".join(gpu) + " (name, driver, memory)") if gpu else "no GPU"
    if args.mode == "dry":
        machine += " (dry run on the CPU machine)"
    lines = [f"# kiln GPU check, {now:%Y-%m-%d %H:%M} UTC" + (" (dry run)" if args.mode == "dry" else ""), "",
             "| | |", "|---|---|",
             f"| device | {machine} |",
             f"| system | {read(os.path.join(work, 'system.txt')).strip() or '?'} |",
             f"| route | {route_text} |",
             f"| kiln env | torch {env.get('torch', '?')}, CUDA driver {env.get('cuda_driver', '?')}, "
             f"NVRTC {env.get('nvrtc', '?')}, GPU {env.get('gpu', '?')} ({env.get('arch', '?')}) |",
             f"| time | {elapsed} s of the {args.budget} s budget" + ("" if args.final else ", still running") + " |",
             "", "## Stages", "", "| stage | status | seconds | limit | note |", "|---|---|---|---|---|"]
    notes_dir = os.path.join(work, "notes")
    for name, status, seconds, limit, _ in rows(os.path.join(work, "stages.tsv"), 5):
        note = " ".join(read(os.path.join(notes_dir, name)).split())
        lines.append(f"| {name} | {status} | {seconds} | {limit} | {note} |")
    steps = rows(os.path.join(work, "steps.tsv"), 6)
    if steps:
        lines += ["", "| step | status | seconds | limit | output |", "|---|---|---|---|---|"]
        lines += [f"| {stage}: {name} | {status} | {seconds} | {limit} | {output} |"
                  for stage, name, status, seconds, limit, output in steps]

    tests = gpu_tests(work, out)
    if tests:
        counted = len(tests["OK"]) + len(tests["FAILED"]) + len(tests["SKIPPED"])
        unfinished = (tests["total"] - counted) if tests["total"] else None
        lines += ["", f"## GPU tests (kiln_gpu_tests in {tests['shards']} shards, KILN_GPU_QUICK=1)", "",
                  f"passed {len(tests['OK'])}, failed {len(tests['FAILED'])}, skipped {len(tests['SKIPPED'])}, "
                  f"not finished {unfinished if unfinished is not None else '?'}, "
                  f"of {tests['total'] or '?'} (gpu-tests.log; gpu-tests.xml from {tests['xml_shards']} shards)"]
        if tests["FAILED"]:
            lines += ["", "Failed:"] + [f"- {name}" for name in tests["FAILED"][:40]]
            if len(tests["FAILED"]) > 40:
                lines.append(f"- ... {len(tests['FAILED']) - 40} more in gpu-tests.log")
    lines += [""] + failures(work)
    lines += [""] + demo(work)
    lines += [""] + bench(work, out)

    summary_path = os.path.join(out, "summary.md")
    left_out = rest_archive(work, out)
    if left_out:
        lines += ["", "rest.tar.gz leaves out, to stay under 16 MiB: " + ", ".join(left_out)]
    # What comes back, checked with the summary itself in place.
    with open(summary_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    files, problems = check_results(out)
    lines += ["", "## Files", "", "| file | bytes |", "|---|---|"] + [f"| {name} | {size} |" for name, size in files]
    lines += [""] + ([f"- **{p}**" for p in problems] if problems else
                     [f"{len(files)} files, {sum(s for _, s in files)} bytes: within the limits of what comes back "
                      "(8 files, 16 MiB each)."])
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines) + "\n")
    with open(summary_path, "w") as f:
        f.write(capped(text))
    return 3 if args.final and problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
