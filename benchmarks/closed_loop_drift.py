"""Where does a trained policy leave the demos? The expert's command at every state of its own rollout.

    python benchmarks/closed_loop_drift.py --task reach_target --checkpoint runs/reach/model --variation 0 \
        --visual-trace --episodes 3 --steps 60

A rollout evaluation says only that an episode failed. Here the checkpoint drives each episode as
in `llarva eval` (greedy, constrained) while, at every state it reaches, the scripted expert is
asked what it would do from there (it plans from the state it finds, as in DART's and the
takeover demos' labels). Per step: the cosine between the policy's and the expert's joint
velocities, both speeds, and the gripper tip's distance to the expert's current waypoint. The
step where the cosine first turns negative is where the policy has left anything the demos
taught it. Prints a row every few steps and writes JSON (default
benchmarks/results/closed_loop_drift_<task>.json), rewritten atomically after every episode.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gymnasium as gym
import numpy as np

import llarva_gym  # noqa: F401  (registers the llarva/ ids)
from llarva_gym.evaluation import episode_reset_seed
from llarva_gym.expert import WaypointFollower
from llarva_gym.files import write_json_atomic
from llarva_policy import LlarvaPolicy

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def rollout(policy, env, reset_seed: int, steps: int) -> list[dict]:
    obs, _ = env.reset(seed=reset_seed)
    backend, state, rows = env.unwrapped.backend, None, []
    for t in range(steps):
        action, state = policy.predict(obs, state=state, episode_start=np.array([t == 0]))
        expert = WaypointFollower(backend)   # a fresh plan from this state, as the labels are made
        command = expert.next_action("joint_velocity")
        waypoint = expert.waypoints[min(expert.index, len(expert.waypoints) - 1)].position
        a, x = np.asarray(action[:7], dtype=np.float64), command[:7].astype(np.float64)
        norms = np.linalg.norm(a) * np.linalg.norm(x)
        rows.append({"step": t, "cosine": round(float(a @ x / norms), 4) if norms > 1e-9 else None,
                     "policy_speed": round(float(np.linalg.norm(a)), 4),
                     "expert_speed": round(float(np.linalg.norm(x)), 4),
                     "tip_to_waypoint_m": round(float(np.linalg.norm(obs["gripper_pose"][:3] - waypoint)), 4)})
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            rows[-1]["success"] = bool(info["success"])
            break
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="steps per episode (at most the task's limit)")
    parser.add_argument("--seed", type=int, default=0, help="llarva eval's --seed: the same episodes")
    parser.add_argument("--variation", type=int, default=None)
    parser.add_argument("--visual-trace", action="store_true", help="the checkpoint answers with a visual trace")
    parser.add_argument("--device", default=None)
    parser.add_argument("--every", type=int, default=3, help="print every N-th step")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    policy = LlarvaPolicy.from_pretrained(args.checkpoint, device=args.device, constrained=True,
                                          with_visual_trace=args.visual_trace)
    env = gym.make(f"llarva/{args.task}", variation=args.variation)
    out = Path(args.out or RESULTS_DIR / f"closed_loop_drift_{args.task}.json")
    record = {"task": args.task, "checkpoint": str(args.checkpoint), "seed": args.seed,
              "variation": args.variation, "episodes": []}
    print(f"{'episode':>7} {'step':>4} {'cosine':>7} {'policy':>7} {'expert':>7} {'to waypoint':>11}  (speeds in rad/s, m)")
    for index in range(args.episodes):
        rows = rollout(policy, env, episode_reset_seed(args.seed, index), args.steps)
        negative = [r["step"] for r in rows if r["cosine"] is not None and r["cosine"] < 0]
        record["episodes"].append({"index": index, "first_negative_cosine_step": negative[0] if negative else None,
                                   "closest_m": min(r["tip_to_waypoint_m"] for r in rows), "steps": rows})
        for r in rows[::args.every]:
            print(f"{index:>7} {r['step']:>4} {r['cosine'] if r['cosine'] is not None else 'n/a':>7} "
                  f"{r['policy_speed']:>7.2f} {r['expert_speed']:>7.2f} {r['tip_to_waypoint_m']:>11.3f}")
        summary = record["episodes"][-1]
        print(f"episode {index}: first negative cosine at step {summary['first_negative_cosine_step']}, "
              f"closest {summary['closest_m']:.3f} m")
        write_json_atomic(out, record)
    env.close()


if __name__ == "__main__":
    main()
