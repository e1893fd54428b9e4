"""Expert-takeover recording (DAgger) throughput: the driver in each recording process against the
driver batched in the main process, same checkpoint, same attempts, same run.

    python benchmarks/takeover_throughput.py --checkpoint runs/reach/model --variation 0
    python benchmarks/takeover_throughput.py --checkpoint MODEL --episodes 400 --processes 14 --num-envs 32,64  # GPU host

Each mode records `--episodes` takeover demos (the checkpoint drives 1..`--driver-steps` steps, the
expert finishes) into a fresh temporary folder with the same seed. "processes": each recording
process loads the checkpoint and answers one observation at a time (`driver_num_envs=None`, on the
GPU if there is one, as `from_pretrained` picks); "batched N": the main process drives N attempts
at a time with one batched answer per step and the recording processes replay the driven steps
(`driver_num_envs=N`). Times include loading the model and starting the processes. The ratio is
against the "processes" row of the same run. Prints a table and writes JSON (default
benchmarks/results/takeover_throughput_<task>.json).
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
from llarva_policy.train_small import IMAGE_SIZE, driver_loader


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="reach_target")
    parser.add_argument("--checkpoint", required=True, help="a LlarvaPolicy checkpoint (train-small's <out>/model)")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--num-envs", default="8", help="batched modes to measure, comma separated, e.g. 32,64")
    parser.add_argument("--variation", type=int, default=None)
    parser.add_argument("--driver-steps", type=int, default=30)
    parser.add_argument("--action-noise", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-processes", action="store_true",
                        help="measure the batched modes only (no baseline row, no ratio)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    modes = ([] if args.skip_processes else [None]) + [int(n) for n in args.num_envs.split(",") if n]
    make_driver = driver_loader(args.checkpoint)

    rows = []
    with tempfile.TemporaryDirectory(prefix="takeover_throughput_") as scratch:
        for num_envs in modes:
            root = Path(scratch) / f"n{num_envs or 0}"
            summary = record_demos(args.task, args.episodes, root, image_size=IMAGE_SIZE, cameras=("front",),
                                   processes=args.processes, variation=args.variation, seed=args.seed,
                                   action_noise=args.action_noise, driver=make_driver, driver_steps=args.driver_steps,
                                   driver_name=str(Path(args.checkpoint).resolve()), driver_num_envs=num_envs,
                                   progress=False)
            infos = [json.loads((d / EPISODE_INFO).read_text()) for d in episode_dirs(root, summary["task"])]
            rows.append({"mode": "processes" if num_envs is None else f"batched {num_envs}", "num_envs": num_envs,
                         "episodes": summary["episodes_written"], "attempts": summary["attempts"],
                         "failures": len(summary["failures"]), "seconds": summary["seconds"],
                         "driving_seconds": summary.get("driving_seconds"),
                         "demos_per_minute": summary["demos_per_minute"],
                         "mean_steps_per_episode": round(sum(i["steps"] for i in infos) / max(1, len(infos)), 1)})
    baseline = rows[0]["seconds"] if rows and rows[0]["num_envs"] is None else None
    for row in rows:
        row["speedup_vs_processes"] = round(baseline / row["seconds"], 2) if baseline else None

    print(f"{args.task}: {args.episodes} takeover demos driven by {args.checkpoint} (1..{args.driver_steps} steps), "
          f"{args.processes} recording processes, {os.cpu_count()} CPUs")
    print(f"{'mode':>12} {'seconds':>8} {'driving':>8} {'demos/min':>10} {'attempts':>8} {'speedup':>8}")
    for r in rows:
        driving = "" if r["driving_seconds"] is None else f"{r['driving_seconds']:.1f}"
        speedup = "" if r["speedup_vs_processes"] is None else f"{r['speedup_vs_processes']:.2f}x"
        print(f"{r['mode']:>12} {r['seconds']:>8.1f} {driving:>8} {r['demos_per_minute']:>10.1f} "
              f"{r['attempts']:>8} {speedup:>8}")

    import torch
    result = {"benchmark": "takeover_throughput", "task": args.task, "checkpoint": str(args.checkpoint),
              "episodes": args.episodes, "processes": args.processes, "variation": args.variation,
              "driver_steps": args.driver_steps, "action_noise": args.action_noise, "seed": args.seed, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out or Path(__file__).parent / "results" / f"takeover_throughput_{args.task}.json")
    write_json_atomic(out, result, indent=2)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
