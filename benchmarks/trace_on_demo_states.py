"""Where a checkpoint's visual trace ends, on the demos' own states: its training scenes against new ones.

    python benchmarks/trace_on_demo_states.py --checkpoint models/reach_target_variation0 \
        --sets training_scenes=runs/dag/reach_target/data held_out_scenes=runs/heldout --episodes 8

Every step of the first `--episodes` episodes of each demo folder (`record_demos`' layout) is asked
in order, so the policy's joint history is the demo's own, with greedy constrained decoding as
`llarva eval` asks it; the end of the trace it writes is compared with the end of the demo's own
trace there (`end_effector_trace`, what the annotations teach), in pixels of the front image, binned
by the tip's distance to the goal as `takeover_coverage.py` bins them. A folder recorded with the
training's demo seed holds scenes the model was trained on; one recorded with another seed (the
same variation, rendering and DART noise) holds new ones: the gap between the two is what the
model memorised rather than read from the image. Prints a table and writes JSON (default
benchmarks/results/trace_on_demo_states_<task>.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from llarva_gym.demos import episode_dirs, load_demo
from llarva_gym.files import write_json_atomic
from llarva_policy import LlarvaPolicy
from llarva_policy.annotations import end_effector_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from first_step_trace import trace_points_of  # noqa: E402
from takeover_coverage import BINS, GOALS, bin_index, checkpoint_on_sets_parser, parse_sets  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def set_errors(policy, root: Path, task: str, episodes: int, points: int) -> dict:
    """End-point errors (px) of the policy's trace at every step of one folder's first episodes, by distance bin."""
    folders = episode_dirs(root, task)
    if not folders:
        raise FileNotFoundError(f"--sets: no {task} episodes under {root}; expected a record_demos folder "
                                f"(<root>/{task}/all_variations/episodes/episode<N>/)")
    errors = [[] for _ in BINS]
    for folder in folders[:episodes]:
        demo = load_demo(folder)
        for t in range(len(demo) - 1):     # the last step has no future to trace
            step = demo[t]
            observation = {"front_rgb": step.front_rgb, "instruction": demo.variation_descriptions[0],
                           "joint_positions": np.asarray(step.joint_positions, dtype=np.float32)}
            policy.predict(observation, episode_start=np.array([t == 0]))
            predicted = np.asarray(policy.last_info[0]["trace"], dtype=float)
            true = end_effector_trace(demo, t, image_size=step.front_rgb.shape[:2], max_points=points)
            distance = float(np.linalg.norm(np.asarray(step.gripper_pose[:3]) - GOALS[task](step)))
            errors[bin_index(distance)].append(float(np.linalg.norm(true[-1] - predicted[-1])))
    rows = [{"to_goal_m": span, "samples": len(e),
             "median_end_error_px": round(float(np.median(e)), 2) if e else None,
             "share_within_1_px": round(float(np.mean(np.asarray(e) <= 1.0)), 3) if e else None,
             "share_over_10_px": round(float(np.mean(np.asarray(e) > 10.0)), 3) if e else None}
            for span, e in zip(BINS, errors)]
    return {"root": str(root), "episodes": min(episodes, len(folders)), "bins": rows}


def main(argv=None) -> dict:
    parser = checkpoint_on_sets_parser(__doc__.split("\n")[0], episodes=8)
    parser.add_argument("--trace-points", type=int, default=3, help="used when the checkpoint does not record it")
    args = parser.parse_args(argv)

    sets = parse_sets(args.sets)     # every folder checked
    checkpoint = Path(args.checkpoint)
    points = trace_points_of(checkpoint, args.trace_points)
    policy = LlarvaPolicy.from_pretrained(checkpoint, device=args.device, with_visual_trace=True, constrained=True)
    out = Path(args.out or RESULTS_DIR / f"trace_on_demo_states_{args.task}.json")
    record = {"task": args.task, "checkpoint": str(checkpoint), "episodes": args.episodes, "trace_points": points,
              "decoding": "greedy, constrained", "sets": {}}
    for name, root in sets.items():
        record["sets"][name] = set_errors(policy, root, args.task, args.episodes, points)
        write_json_atomic(out, record)
    print(f"{'set':16} {'to goal (m)':12} {'samples':>7} {'median px':>9} {'<=1 px':>7} {'>10 px':>7}")
    for name, result in record["sets"].items():
        for row in result["bins"]:
            low, high = row["to_goal_m"]
            span = f"{low:.2f}-{'inf' if high is None else f'{high:.2f}'}"
            cells = [row["median_end_error_px"], row["share_within_1_px"], row["share_over_10_px"]]
            print(f"{name:16} {span:12} {row['samples']:>7} "
                  + " ".join(f"{'-' if c is None else c:>{w}}" for c, w in zip(cells, (9, 7, 7))))
    print(f"(the end of the trace the policy writes against the demo's own, px of the front image)\nwrote {out}")
    return record


if __name__ == "__main__":
    main()
