"""Does a trained checkpoint read the goal from the image? Its first-step visual trace on held-out scenes.

    python benchmarks/first_step_trace.py --task reach_target --checkpoint runs/reach/model --scenes 12

A rollout evaluation (`llarva eval`, 25 episodes) takes most of an hour on a CPU and says only
whether the episodes succeeded. At the first step of an episode the goal is all there is to
decide: the arm stands at its start pose, and the end of the visual trace says where the policy
means to go. This records `--scenes` scripted-expert demos with a seed the training never saw,
asks the checkpoint for its answer at step 0 of each (greedy, constrained), and compares the
trace's end point with the demo's own (where the episode really ended), in pixels of the front
image. Two baselines from the same scenes tell chance from skill:
`mean`: predicting the average true end point for every scene; `shuffled`: the policy's end
points compared with the true ones of other scenes (a policy whose answers vary but ignore the
scene scores this). Prints a table a scene and writes JSON (default
benchmarks/results/first_step_trace_<task>.json), rewritten atomically after every scene.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from llarva_gym.demos import episode_dirs, load_demo
from llarva_gym.files import write_json_atomic
from llarva_gym.recording import record_demos
from llarva_policy import LlarvaPolicy
from llarva_policy.annotations import end_effector_trace

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def trace_points_of(checkpoint: Path, default: int) -> int:
    """The trace length the checkpoint was trained with (train-small records it), else `default`."""
    info = checkpoint / "llarva_train_small.json"
    if info.is_file():
        return json.loads(info.read_text())["options"].get("trace_points") or default
    return default


def summarize(rows: list[dict]) -> dict:
    true = np.array([row["true_end"] for row in rows], dtype=float)
    predicted = np.array([row["predicted_end"] for row in rows], dtype=float)
    errors = np.linalg.norm(true - predicted, axis=1)
    mean_errors = np.linalg.norm(true - true.mean(axis=0), axis=1)
    others = [np.linalg.norm(predicted[i] - true[j]) for i in range(len(rows)) for j in range(len(rows)) if i != j]
    return {"scenes": len(rows), "median_error_px": round(float(np.median(errors)), 1),
            "within_10_px": int((errors < 10).sum()),
            "baseline_mean_median_px": round(float(np.median(mean_errors)), 1),
            "baseline_shuffled_median_px": round(float(np.median(others)), 1) if others else None,
            "predicted_end_std_px": np.round(predicted.std(axis=0), 1).tolist(),
            "true_end_std_px": np.round(true.std(axis=0), 1).tolist()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--checkpoint", required=True, help="a LlarvaPolicy checkpoint trained with a visual trace")
    parser.add_argument("--scenes", type=int, default=12)
    parser.add_argument("--seed", type=int, default=77, help="demo seed of the held-out scenes (train-small's is 0)")
    parser.add_argument("--variation", type=int, default=None,
                        help="scenes of this one variation (for a model trained with train-small --variation)")
    parser.add_argument("--trace-points", type=int, default=10, help="used when the checkpoint does not record it")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.scenes < 2:
        parser.error("--scenes: expected at least 2 (the shuffled baseline compares scenes)")
    checkpoint = Path(args.checkpoint)
    points = trace_points_of(checkpoint, args.trace_points)
    policy = LlarvaPolicy.from_pretrained(checkpoint, device=args.device, with_visual_trace=True, constrained=True)
    out = Path(args.out) if args.out else RESULTS_DIR / f"first_step_trace_{args.task}.json"
    report = {"benchmark": "first_step_trace", "task": args.task, "checkpoint": str(checkpoint),
              "seed": args.seed, "variation": args.variation, "trace_points": points, "rows": []}
    with tempfile.TemporaryDirectory() as data:
        record_demos(args.task, args.scenes, data, seed=args.seed, variation=args.variation, progress=False)
        print(f"{'scene':>5}  {'instruction':<44} {'true end':>10} {'predicted':>10} {'error px':>9}")
        for scene, episode in enumerate(episode_dirs(data, args.task)):
            demo = load_demo(episode)
            first = demo[0]
            instruction = demo.variation_descriptions[0]
            true = end_effector_trace(demo, 0, image_size=first.front_rgb.shape[:2], max_points=points)
            observation = {"front_rgb": first.front_rgb, "instruction": instruction,
                           "joint_positions": np.asarray(first.joint_positions, dtype=np.float32)}
            policy.predict(observation, episode_start=np.array([True]))
            predicted = np.asarray(policy.last_info[0]["trace"])
            error = float(np.linalg.norm(true[-1] - predicted[-1]))
            report["rows"].append({"scene": scene, "variation": int(demo.variation_number),
                                   "instruction": instruction, "true_trace": true.tolist(),
                                   "predicted_trace": predicted.tolist(), "true_end": true[-1].tolist(),
                                   "predicted_end": predicted[-1].tolist(), "error_px": round(error, 1)})
            print(f"{scene:>5}  {instruction:<44} {str(true[-1].tolist()):>10} {str(predicted[-1].tolist()):>10} "
                  f"{error:>9.1f}", flush=True)
            report["summary"] = summarize(report["rows"])
            write_json_atomic(out, report)
    summary = report["summary"]
    print(f"\nend point: median error {summary['median_error_px']} px, {summary['within_10_px']}/{summary['scenes']} "
          f"within 10 px; baselines: mean {summary['baseline_mean_median_px']} px, "
          f"shuffled {summary['baseline_shuffled_median_px']} px\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
