"""Does a policy's speed come from the image or from the joint history it is shown?

    python benchmarks/history_probe.py --task reach_target --checkpoint runs/reach/model --variation 0 \
        --visual-trace --render-quality high --episodes 8 --steps 40 --seed 1

The checkpoint (a LlarvaPolicy folder, or a `bc_baseline.py` model as `closed_loop_drift.py` takes
it) drives each episode as in `llarva eval`. At every state it reaches it is asked twice more, with
the same image and pose but another history in place of its own: `still`, the last five poses all
the current one (an arm at rest), and `expert`, the poses an arm moving at the scripted expert's
command from here would have left behind. A policy that reads where to go from the image answers
the three alike; one that copies the motion its history shows slows down with `still` and keeps
the expert's speed with `expert`, and a rollout that once slows down stays slow. Per step: the
tip's distance to the goal, the expert's speed and the policy's under each history; the summary
gives the median ratio of the policy's speed to the expert's, per history, by distance to the goal.
For a checkpoint that writes a visual trace, also where the trace (of its own history's answer)
starts against the tip and ends against the goal, in pixels: a model that still places the goal
right while it brakes reads the image well enough and fails in writing the action.
`--drive expert`: the scripted expert drives instead (the policy is still asked at every state): the
states of a demonstration, the policy's own history being the expert's. A policy that keeps the
expert's speed there and brakes on its own rollouts brakes because its rollouts leave the states
the demos visit (covariate shift, what DAgger's takeover demos address), not because it cannot
write a fast action.
Prints the summary and writes JSON (default benchmarks/results/history_probe_<task>.json),
rewritten after every episode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np

import llarva_gym  # noqa: F401  (registers the llarva/ ids)
from llarva_gym.backends.mujoco.scene import CONTROL_PERIOD
from llarva_gym.evaluation import episode_reset_seed
from llarva_gym.expert import WaypointFollower
from llarva_gym.files import write_json_atomic
from llarva_policy.annotations import project_points
from llarva_policy.codec import HISTORY_STEPS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from closed_loop_drift import load_policy  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HISTORIES = ("own", "still", "expert")
DISTANCE_BINS = (0.0, 0.03, 0.08, 0.2, np.inf)   # m from the tip to the goal
TRACE_KEYS = ("trace_start_error_px", "trace_end_error_px", "trace_length_px", "tip_to_goal_px")


def other_histories(joint_positions: np.ndarray, expert_velocity: np.ndarray) -> dict[str, np.ndarray]:
    """The (1, 5, 7) states that `predict` turns into the `still` and `expert` histories (it drops
    the oldest row and appends the current pose)."""
    steps_back = np.arange(HISTORY_STEPS, 0, -1)[:, None]       # 5, 4, 3, 2, 1 control periods ago
    return {"still": np.repeat(joint_positions[None], HISTORY_STEPS, axis=0)[None],
            "expert": (joint_positions[None] - steps_back * CONTROL_PERIOD * expert_velocity[None])[None]}


def trace_errors(policy, backend, tip: np.ndarray, goal: np.ndarray) -> dict:
    """How far (px) the visual trace the policy just wrote starts from the tip and ends from the
    goal, as the front camera sees them (the annotations' trace ends where the demo's tip ended, at
    the goal). Empty for a policy without a trace."""
    info = getattr(policy, "last_info", None)
    trace = info[0].get("trace") if info else None
    if trace is None or len(trace) == 0:
        return {}
    misc = backend.cameras.misc(backend.data)
    tip_px, goal_px = project_points(np.stack([tip, goal]), misc["front_camera_extrinsics"],
                                     misc["front_camera_intrinsics"])
    trace = np.asarray(trace, dtype=np.float64)
    return {"trace_start_error_px": round(float(np.linalg.norm(trace[0] - tip_px)), 2),
            "trace_end_error_px": round(float(np.linalg.norm(trace[-1] - goal_px)), 2),
            # the way left as the trace has it, against the true one: a model that believes it has
            # arrived writes a trace that ends where it starts
            "trace_length_px": round(float(np.linalg.norm(trace[-1] - trace[0])), 2),
            "tip_to_goal_px": round(float(np.linalg.norm(goal_px - tip_px)), 2)}


def probe_episode(policy, env, reset_seed: int, steps: int, drive: str = "policy") -> list[dict]:
    obs, _ = env.reset(seed=reset_seed)
    backend, state, rows = env.unwrapped.backend, None, []
    for t in range(steps):
        expert = WaypointFollower(backend)
        expert_action = expert.next_action("joint_velocity")
        command = expert_action[:7].astype(np.float64)
        goal = expert.waypoints[-1].position
        q = np.asarray(obs["joint_positions"], dtype=np.float32)
        speeds = {}
        for name, other in other_histories(q, command).items():
            action, _ = policy.predict(obs, state=other.astype(np.float32), episode_start=np.array([False]))
            speeds[name] = float(np.linalg.norm(np.asarray(action[:7], dtype=np.float64)))
        action, state = policy.predict(obs, state=state, episode_start=np.array([t == 0]))
        speeds["own"] = float(np.linalg.norm(np.asarray(action[:7], dtype=np.float64)))
        rows.append({"step": t, "to_goal_m": round(float(np.linalg.norm(obs["gripper_pose"][:3] - goal)), 4),
                     "expert_speed": round(float(np.linalg.norm(command)), 4),
                     "policy_speed": {name: round(speeds[name], 4) for name in HISTORIES},
                     **trace_errors(policy, backend, obs["gripper_pose"][:3], goal)})
        obs, _, terminated, truncated, info = env.step(action if drive == "policy" else expert_action)
        if terminated or truncated:
            rows[-1]["success"] = bool(info["success"])
            break
    return rows


def summarize(episodes: list[dict]) -> list[dict]:
    """Per distance bin: steps, and per history the median ratio of the policy's speed to the expert's."""
    rows = [r for e in episodes for r in e["steps"] if r["expert_speed"] > 1e-6]
    table = []
    for low, high in zip(DISTANCE_BINS[:-1], DISTANCE_BINS[1:]):
        inside = [r for r in rows if low <= r["to_goal_m"] < high]
        if inside:
            table.append({"to_goal_m": [low, None if high == np.inf else high], "steps": len(inside),
                          "speed_ratio": {name: round(float(np.median(
                              [r["policy_speed"][name] / r["expert_speed"] for r in inside])), 3)
                              for name in HISTORIES},
                          **{f"median_{key}": round(float(np.median([r[key] for r in inside])), 2)
                             for key in TRACE_KEYS if key in inside[0]}})
    return table


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--checkpoint", required=True, help="LlarvaPolicy folder, or a bc_baseline.py .pt")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1, help="llarva eval's --seed: the same episodes")
    parser.add_argument("--variation", type=int, default=None)
    parser.add_argument("--visual-trace", action=argparse.BooleanOptionalAction, default=None,
                        help="whether the checkpoint answers with a visual trace (default: as it was trained)")
    parser.add_argument("--render-quality", default="fast", choices=("fast", "high"))
    parser.add_argument("--drive", default="policy", choices=("policy", "expert"),
                        help="who moves the arm between the questions (expert: the states of a demonstration)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    policy = load_policy(args.checkpoint, args.device, args.visual_trace)
    env = gym.make(f"llarva/{args.task}", variation=args.variation, render_quality=args.render_quality)
    out = Path(args.out or RESULTS_DIR / f"history_probe_{args.task}.json")
    record = {"task": args.task, "checkpoint": str(args.checkpoint), "seed": args.seed, "variation": args.variation,
              "render_quality": args.render_quality, "drive": args.drive, "episodes": []}
    for index in range(args.episodes):
        steps = probe_episode(policy, env, episode_reset_seed(args.seed, index), args.steps, args.drive)
        record["episodes"].append({"index": index, "success": steps[-1].get("success", False), "steps": steps})
        record["summary"] = summarize(record["episodes"])
        write_json_atomic(out, record)
    env.close()
    print(f"{'to goal (m)':>12} {'steps':>6} " + " ".join(f"{name + ' history':>15}" for name in HISTORIES)
          + "".join(f" {key[:-3].replace('_', ' '):>19}" for key in TRACE_KEYS))
    for row in record["summary"]:
        low, high = row["to_goal_m"]
        print(f"{low:>5.2f}-{high if high is not None else 'inf':<6} {row['steps']:>6} "
              + " ".join(f"{row['speed_ratio'][name]:>15.2f}" for name in HISTORIES)
              + "".join(f" {row.get('median_' + key, float('nan')):>19.1f}" for key in TRACE_KEYS))
    print("(median policy speed / expert speed, per history shown; with a visual trace, medians in px: its "
          "first point's distance from the tip, its last point's from the goal, its length, and the tip's "
          "distance from the goal)")
    return record


if __name__ == "__main__":
    main()
