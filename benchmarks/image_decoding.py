"""Decoding the training set's front images (train-small's data stage): threads against worker
processes, same files, same run.

    python benchmarks/image_decoding.py --demos runs/reach/demos                     # a recorded dataset
    python benchmarks/image_decoding.py --record 60                                  # records 60 demos first
    python benchmarks/image_decoding.py --demos /tmp/dagger/reach_target --repeat 1 --processes 4,8,16   # GPU host

"threads N" is how `load_images` decoded before (a thread pool over PIL: PIL keeps the GIL while
it decodes a small PNG); "processes N" is `load_images(processes=N)` (forkserver workers, one
contiguous block each). Every mode decodes the same list (the dataset's front images, `--repeat`
times over) and must return the same array. The ratio is against the "threads" row of the same
run; the processes' time includes starting the forkserver and the workers. Prints a table and writes JSON (default benchmarks/results/image_decoding.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llarva_gym.demos import read_rgb_image
from llarva_gym.files import write_json_atomic
from llarva_gym.recording import record_demos


def decode_in_threads(paths, threads: int) -> np.ndarray:
    with ThreadPoolExecutor(threads) as pool:
        return np.stack(list(pool.map(read_rgb_image, paths, chunksize=64)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demos", help="a dataset root; every front_rgb/*.png under it is decoded")
    parser.add_argument("--record", type=int, default=0, help="record this many reach_target demos first")
    parser.add_argument("--repeat", type=int, default=3, help="decode the list this many times over")
    parser.add_argument("--processes", default=None, help="comma separated (default: 2 and the core count)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if bool(args.demos) == bool(args.record):
        parser.error("give --demos ROOT or --record N")
    # Imported here, not at the top: the workers' forkserver imports this script as its main module,
    # and it should cost them what `llarva train-small`'s light main module does, not torch's import.
    from llarva_policy.train_small import load_images

    with tempfile.TemporaryDirectory() as temp:
        root = Path(args.demos) if args.demos else Path(temp)
        if args.record:
            record_demos("reach_target", args.record, root, processes=min(4, os.cpu_count() or 1), variation=0)
        paths = sorted(str(p) for p in root.rglob("front_rgb/*.png")) * args.repeat
        if not paths:
            raise SystemExit(f"--demos: no front_rgb/*.png under {root}")
        cores = os.cpu_count() or 1
        counts = [int(n) for n in args.processes.split(",")] if args.processes else sorted({2, min(16, cores)})
        modes = [("threads", min(16, cores))] + [("processes", n) for n in counts]
        rows, reference = [], None
        for kind, n in modes:
            clock = time.perf_counter()
            images = decode_in_threads(paths, n) if kind == "threads" else load_images(paths, processes=n)
            seconds = time.perf_counter() - clock
            if reference is None:
                reference = images
            elif not np.array_equal(images, reference):
                raise SystemExit(f"{kind} {n}: decoded images differ from the threads' ones")
            rows.append({"mode": f"{kind} {n}", "workers": n, "images": len(paths), "seconds": round(seconds, 3),
                         "ms_per_image": round(1000 * seconds / len(paths), 4)})
    for row in rows:
        row["speedup_vs_threads"] = round(rows[0]["seconds"] / row["seconds"], 2)

    print(f"{len(paths)} images ({reference.shape[1]}x{reference.shape[2]}), {cores} CPUs")
    print(f"{'mode':>14} {'seconds':>8} {'ms/image':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['mode']:>14} {r['seconds']:>8.2f} {r['ms_per_image']:>9.3f} {r['speedup_vs_threads']:>7.2f}x")
    result = {"benchmark": "image_decoding", "images": len(paths), "repeat": args.repeat, "rows": rows,
              "machine": {"cpus": cores, "platform": platform.platform(), "python": platform.python_version()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out or Path(__file__).parent / "results" / "image_decoding.json")
    write_json_atomic(out, result, indent=2)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
