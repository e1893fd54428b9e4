"""Where a demo set's training samples lie on the way to the goal, and how well a policy answers them.

    python benchmarks/takeover_coverage.py --task reach_target \
        --sets demos=runs/dag/reach_target/data takeover=runs/dag/reach_target/takeover \
        --probe benchmarks/results/train_small/history_probe_reach_target_round22_dagger3_finetune_variation0_seed1.json \
        --checkpoint models/reach_target_variation0 --visual-trace

A DAgger round's expert-takeover demos are meant to label the states the policy's own rollouts
reach. For each demo folder (`record_demos`' layout) this counts its training samples (the
expert's steps, as `annotate` makes them) by the tip's distance to the goal, in `history_probe.py`'s
bins, and where each episode's first sample lies (for a takeover episode: where the expert took the
arm over); `--probe`, a `history_probe.py` JSON, adds the share of a policy's own rollout steps in
each bin. A set whose share near the goal is far below the rollouts' labels few of the states where
the policy spends its time.
`--checkpoint` (a LlarvaPolicy folder, or a `bc_baseline.py` model) also asks the policy at the
samples within `--ask-within` m of the goal (every `--ask-every`-th step of the first
`--ask-episodes` episodes, with the recorded image and history), and reports per bin the median
ratio of its speed to the label's and the median cosine between its action and the label: how
well it fits the states it was trained on, apart from where its own rollouts go.
The goal is the task's target position (reach_target's low-dimensional state). Prints a table and
writes JSON (default benchmarks/results/takeover_coverage_<task>.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llarva_gym.demos import episode_dirs, load_demo
from llarva_gym.files import write_json_atomic
from llarva_gym.recording import EXPERT_ACTION_KEY, POLICY_STEP_KEY
from llarva_policy.codec import HISTORY_STEPS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from closed_loop_drift import load_policy  # noqa: E402
from history_probe import DISTANCE_BINS  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GOALS = {"reach_target": lambda observation: np.asarray(observation.task_low_dim_state[:3])}
BINS = [[low, None if high == np.inf else high] for low, high in zip(DISTANCE_BINS[:-1], DISTANCE_BINS[1:])]


def bin_index(distance: float) -> int:
    return int(np.searchsorted(np.asarray(DISTANCE_BINS[1:-1]), distance, side="right"))


def bin_shares(distances) -> list[float]:
    counts = np.bincount([bin_index(d) for d in distances], minlength=len(BINS))
    return [round(float(c) / max(1, len(distances)), 3) for c in counts]


def ask(policy, demo, t: int) -> tuple[float, float]:
    """The policy's answer at step t of `demo` (its image, pose and the recorded history): the ratio
    of its speed to the label's, and the cosine between them."""
    observation = demo[t]
    label = np.asarray((demo[t + 1].misc or {}).get(EXPERT_ACTION_KEY, demo[t + 1].joint_velocities))[:7]
    # `predict` drops the oldest of the HISTORY_STEPS poses it is given and appends the current one
    history = np.stack([demo[i].joint_positions for i in range(t - HISTORY_STEPS, t)]).astype(np.float32)[None]
    action, _ = policy.predict({"front_rgb": observation.front_rgb, "instruction": demo.variation_descriptions[0],
                                "joint_positions": np.asarray(observation.joint_positions, dtype=np.float32),
                                "gripper_pose": np.asarray(observation.gripper_pose, dtype=np.float32)},
                               state=history, episode_start=np.array([False]))
    action = np.asarray(action, dtype=np.float64)[:7]
    speed, label_speed = np.linalg.norm(action), np.linalg.norm(label)
    return float(speed / max(label_speed, 1e-9)), float(action @ label / max(speed * label_speed, 1e-9))


def coverage(root, task: str, policy=None, ask_every: int = 2, ask_episodes: int = 60,
             ask_within: float = 0.2) -> dict:
    """Training samples and episode starts of the demos under `root`, by the tip's distance to the
    goal (m); with `policy`, its answers at the samples near the goal."""
    goal_of = GOALS[task]
    distances, starts, asked = [], [], []
    episodes = episode_dirs(root, task)
    if not episodes:
        raise FileNotFoundError(f"--sets: no {task} episodes under {root}; expected a record_demos folder "
                                f"(<root>/{task}/all_variations/episodes/episode<N>/)")
    for index, folder in enumerate(episodes):
        asking = policy is not None and index < ask_episodes
        demo = load_demo(folder, load_images=asking)
        # The training samples, as `annotate` makes them: state t, labelled by the step to t + 1
        # unless a driver took that step (a takeover episode keeps its driven steps as history).
        samples = [t for t in range(len(demo) - 1) if not (demo[t + 1].misc or {}).get(POLICY_STEP_KEY)]
        steps = [float(np.linalg.norm(np.asarray(demo[t].gripper_pose[:3]) - goal_of(demo[t]))) for t in samples]
        distances += steps
        if steps:       # none where the driver itself finished the task
            starts.append(steps[0])
        if asking:
            asked += [(d, *ask(policy, demo, t)) for t, d in zip(samples, steps)
                      if t >= HISTORY_STEPS and t % ask_every == 0 and d < ask_within]
    result = {"root": str(root), "episodes": len(episodes), "without_samples": len(episodes) - len(starts),
              "steps": len(distances), "step_share": bin_shares(distances), "start_share": bin_shares(starts),
              "median_start_m": round(float(np.median(starts)), 4) if starts else None}
    if policy is not None:
        result["asked"] = []
        for b, (low, high) in enumerate(BINS):
            rows = np.array([row for row in asked if bin_index(row[0]) == b]).reshape(-1, 3)
            result["asked"].append({"to_goal_m": [low, high], "samples": len(rows),
                                    "median_speed_ratio": round(float(np.median(rows[:, 1])), 3) if len(rows) else None,
                                    "median_cosine": round(float(np.median(rows[:, 2])), 3) if len(rows) else None})
    return result


def probe_shares(path) -> dict:
    """The share of a history_probe run's own-rollout steps in each distance bin."""
    summary = json.loads(Path(path).read_text())["summary"]
    steps = {tuple(row["to_goal_m"]): row["steps"] for row in summary}
    total = sum(steps.values())
    return {"probe": str(path), "steps": total,
            "step_share": [round(steps.get(tuple(b), 0) / max(1, total), 3) for b in BINS]}


def checkpoint_on_sets_parser(description: str, episodes: int) -> argparse.ArgumentParser:
    """The options of a benchmark that asks a train-small checkpoint on demo folders: --task, --checkpoint,
    --sets NAME=FOLDER ..., --episodes (the first of each set), --every, --trace-points, --device, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--task", default="reach_target", choices=sorted(GOALS))
    parser.add_argument("--checkpoint", required=True, help="a train-small model folder that answers with a trace")
    parser.add_argument("--sets", nargs="+", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--episodes", type=int, default=episodes, help="the first episodes of each set")
    parser.add_argument("--every", type=int, default=2, help="every n-th step of each episode")
    parser.add_argument("--trace-points", type=int, default=3,
                        help="as the checkpoint was trained, where its record does not say (train_small.sh: 3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    return parser


def parse_sets(items: list[str]) -> dict[str, Path]:
    sets = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--sets: expected NAME=FOLDER, got {item!r}")
        sets[name] = Path(path)
        if not sets[name].is_dir():
            raise FileNotFoundError(f"--sets: {name}={path}: no such folder")
    return sets


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="reach_target", choices=sorted(GOALS))
    parser.add_argument("--sets", nargs="+", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--probe", default=None, help="a history_probe.py JSON: the policy's own rollouts")
    parser.add_argument("--checkpoint", default=None, help="LlarvaPolicy folder, or a bc_baseline.py .pt, to ask")
    parser.add_argument("--visual-trace", action=argparse.BooleanOptionalAction, default=None,
                        help="whether the checkpoint answers with a visual trace (default: as it was trained)")
    parser.add_argument("--ask-every", type=int, default=2)
    parser.add_argument("--ask-episodes", type=int, default=60)
    parser.add_argument("--ask-within", type=float, default=0.2, help="ask at samples this close to the goal (m)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sets = parse_sets(args.sets)
    policy = load_policy(args.checkpoint, args.device, args.visual_trace) if args.checkpoint else None
    results = {"task": args.task, "bins_m": BINS, "checkpoint": args.checkpoint,
               "sets": {name: coverage(root, args.task, policy, args.ask_every, args.ask_episodes, args.ask_within)
                        for name, root in sets.items()}}
    if args.probe:
        results["rollouts"] = probe_shares(args.probe)
    out = Path(args.out) if args.out else RESULTS_DIR / f"takeover_coverage_{args.task}.json"
    write_json_atomic(out, results)

    labels = [f"{low:.2f}-{'inf' if high is None else f'{high:.2f}'}" for low, high in BINS]
    print(f"{'set':<14}{'episodes':>9}{'samples':>8}  " + "".join(f"{label:>11}" for label in labels)
          + f"{'median start (m)':>18}")
    rows = [(name, s["episodes"], s["steps"], s["step_share"], s["median_start_m"]) for name, s in results["sets"].items()]
    if args.probe:
        rows.append(("own rollouts", "", results["rollouts"]["steps"], results["rollouts"]["step_share"], ""))
    for name, episodes, steps, shares, start in rows:
        print(f"{name:<14}{episodes!s:>9}{steps!s:>8}  " + "".join(f"{share:>11.3f}" for share in shares) + f"{start!s:>18}")
    print("(share of each set's training samples, and of the rollouts' steps, by the tip's distance to the goal, m)")
    if policy is not None:
        print(f"\n{args.checkpoint} at the samples: median speed / the label's, median cosine with the label")
        for name, s in results["sets"].items():
            cells = [f"{a['median_speed_ratio']} / {a['median_cosine']} ({a['samples']})" if a["samples"] else "-"
                     for a in s["asked"]]
            print(f"{name:<14}" + "".join(f"{cell:>24}" for cell in cells))
    return results


if __name__ == "__main__":
    main()
