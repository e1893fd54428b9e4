"""Where do a policy's reach_target episodes fail? Success by where the target stands.

    python benchmarks/success_by_place.py RESULTS.json [RESULTS.json ...] [--expert EXPERT.json ...]

`llarva eval` records each episode's reset seed; this resets the env with it, reads the target's
position (the task's low-dimensional state, RLBench's `task_low_dim_state`) and the gripper tip's
start, and splits the episodes into quartiles of the target's x (away from the robot's base),
y (sideways), z (height) and distance from the tip, with the success rate in each. `--expert`:
`llarva eval --policy expert` results on the same episodes; episodes the expert failed are
counted apart (no policy that imitates it is expected to solve them). Prints a table and writes
JSON (default benchmarks/results/train_small/success_by_place_<first results file's name>).
No rollout is run: a reset per episode, a few seconds in all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gymnasium as gym
import numpy as np

import llarva_gym  # noqa: F401  (registers the envs)
from llarva_gym.files import write_json_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "train_small"
AXES = ("x", "y", "z", "distance")


def episodes_of(paths) -> list[dict]:
    """The episodes of `llarva eval` results files, each with the file it came from."""
    episodes = []
    for path in paths:
        results = json.loads(Path(path).read_text())
        if results.get("task") != "reach_target":
            raise ValueError(f"{path}: results of {results.get('task')!r}; expected reach_target's")
        if any("reset_seed" not in episode for episode in results["episodes"]):
            raise ValueError(f"{path}: episodes without a reset_seed (replayed demos?); expected llarva eval's "
                             f"seeded episodes")
        episodes += [{**episode, "results": str(path)} for episode in results["episodes"]]
    return episodes


def target_places(episodes) -> np.ndarray:
    """(N, 4): the target's x, y, z and its distance from the gripper tip at the episode's start."""
    envs, rows = {}, []
    for episode in episodes:
        variation = episode["variation"]
        if variation not in envs:
            envs[variation] = gym.make("llarva/reach_target", variation=variation)
        env = envs[variation]
        env.reset(seed=episode["reset_seed"])
        state = env.unwrapped.rlbench_observation()
        target, tip = np.asarray(state.task_low_dim_state[:3]), np.asarray(state.gripper_pose[:3])
        rows.append([*target, np.linalg.norm(target - tip)])
    for env in envs.values():
        env.close()
    return np.array(rows)


def by_quartile(values: np.ndarray, success: np.ndarray) -> list[dict]:
    edges = np.quantile(values, [0, 0.25, 0.5, 0.75, 1])
    rows = []
    for k, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        inside = (values >= low) & ((values < high) if k < 3 else (values <= high))
        rows.append({"from": round(float(low), 3), "to": round(float(high), 3), "episodes": int(inside.sum()),
                     "success_rate": round(float(success[inside].mean()), 3)})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="llarva eval results JSON of reach_target")
    parser.add_argument("--expert", nargs="*", default=[], help="the expert's results on the same episodes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    episodes = episodes_of(args.results)
    expert_failed = {episode["reset_seed"] for episode in episodes_of(args.expert) if not episode["success"]}
    solvable = np.array([episode["reset_seed"] not in expert_failed for episode in episodes])
    success = np.array([episode["success"] for episode in episodes], dtype=float)
    places = target_places(episodes)
    report = {"results": args.results, "expert": args.expert, "episodes": len(episodes),
              "successes": int(success.sum()), "expert_failed": int((~solvable).sum()),
              "policy_successes_where_expert_failed": int(success[~solvable].sum()),
              "by": {axis: by_quartile(places[solvable, j], success[solvable]) for j, axis in enumerate(AXES)},
              "expert_failed_places": np.round(places[~solvable], 3).tolist()}

    print(f"{report['successes']}/{len(episodes)} succeeded; {report['expert_failed']} episodes the expert failed "
          f"(the policy solved {report['policy_successes_where_expert_failed']}), left out of the quartiles")
    for axis in AXES:
        cells = [f"{row['from']:.2f}-{row['to']:.2f}: {row['success_rate']:.2f}" for row in report["by"][axis]]
        print(f"{axis:<9}" + " | ".join(cells))
    out = Path(args.out) if args.out else RESULTS_DIR / f"success_by_place_{Path(args.results[0]).name}"
    write_json_atomic(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
