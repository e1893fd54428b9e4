"""Demo recording throughput: scripted-expert demos per minute written in RLBench's layout.

    python benchmarks/demo_throughput.py                      # sweep_to_dustpan_of_size, 128x128, front+wrist, 1 and 2 processes
    python benchmarks/demo_throughput.py --episodes 20 --processes 1,2,4

Each setting records into a fresh temporary folder with the same seed, so every run writes the
same episodes; the script checks that and reports it. Times include starting the worker
processes (what a user waits for). Prints a table and writes JSON (default
benchmarks/results/demo_throughput.json). The machine's load average is recorded: other
jobs on a shared machine slow the figures down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from llarva_gym.demos import episode_dirs
from llarva_gym.files import write_json_atomic
from llarva_gym.recording import EPISODE_INFO, record_demos


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sweep_to_dustpan_of_size")
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--processes", default="1,2", help="comma separated, e.g. 1,2,4")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--cameras", default="front,wrist")
    parser.add_argument("--depth", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "demo_throughput.json"))
    args = parser.parse_args(argv)
    cameras = tuple(c for c in args.cameras.split(",") if c)
    process_counts = [int(p) for p in args.processes.split(",") if p]

    rows, datasets = [], {}
    with tempfile.TemporaryDirectory(prefix="demo_throughput_") as scratch:
        for processes in process_counts:
            root = Path(scratch) / f"p{processes}"
            load_before = os.getloadavg()[0]
            summary = record_demos(args.task, args.episodes, root, image_size=args.image_size, cameras=cameras,
                                   depth=args.depth, processes=processes, seed=args.seed, progress=False)
            steps = sum(json.loads((d / EPISODE_INFO).read_text())["steps"]
                        for d in episode_dirs(root, summary["task"]))
            megabytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6
            datasets[processes] = _files(root)
            rows.append({"processes": processes, "episodes": summary["episodes_written"],
                         "attempts": summary["attempts"], "failures": len(summary["failures"]),
                         "seconds": summary["seconds"], "demos_per_minute": summary["demos_per_minute"],
                         "env_steps_per_second": round(steps / summary["seconds"], 1),
                         "mean_steps_per_episode": round(steps / max(1, summary["episodes_written"]), 1),
                         "megabytes_written": round(megabytes, 2),
                         "load_average_before": round(load_before, 2),
                         "load_average_after": round(os.getloadavg()[0], 2)})
    first = datasets[process_counts[0]]
    identical = all(files == first for files in datasets.values())

    header = f"{'processes':>9} {'demos/min':>10} {'seconds':>8} {'steps/s':>8} {'attempts':>8} {'failures':>8} {'MB':>7} {'load':>10}"
    print(f"{args.task}: {args.episodes} episodes, {args.image_size}x{args.image_size}, cameras {','.join(cameras)}"
          f"{', depth' if args.depth else ''}, {os.cpu_count()} CPUs")
    print(header)
    for r in rows:
        print(f"{r['processes']:>9} {r['demos_per_minute']:>10.1f} {r['seconds']:>8.1f} {r['env_steps_per_second']:>8.1f} "
              f"{r['attempts']:>8} {r['failures']:>8} {r['megabytes_written']:>7.1f} "
              f"{r['load_average_before']:>4.1f}->{r['load_average_after']:<4.1f}")
    print(f"same episodes with every process count: {identical}")

    result = {"benchmark": "demo_throughput", "task": args.task, "episodes": args.episodes,
              "image_size": args.image_size, "cameras": list(cameras), "depth": args.depth, "seed": args.seed,
              "identical_across_process_counts": identical, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "mujoco_gl": os.environ.get("MUJOCO_GL")},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out)
    write_json_atomic(out, result, indent=2)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
