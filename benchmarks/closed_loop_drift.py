"""Where does a trained policy leave the demos? The expert's command at every state of its own rollout.

    python benchmarks/closed_loop_drift.py --task reach_target --checkpoint runs/reach/model --variation 0 \
        --visual-trace --episodes 3 --steps 60

A rollout evaluation says only that an episode failed. Here the checkpoint drives each episode as
in `llarva eval` (greedy, constrained) while, at every state it reaches, the scripted expert is
asked what it would do from there (it plans from the state it finds, as in DART's and the
takeover demos' labels). Per step: the cosine between the policy's and the expert's joint
velocities, both speeds, the gripper tip's distance to the expert's current waypoint, and its
offset from the last waypoint (the goal) split along the front camera's ray to the goal (depth:
positive beyond the goal, as the camera sees it) and across it (lateral): a policy that reads
depth from the image worse than position leaves misses mostly along the ray. Per episode also the
closest the tip came to each of the scene's placed (mocap) objects: a miss that ends at another
object is a wrong choice, not a wrong depth. The step where the cosine first turns negative is
where the policy has left anything the demos taught it. Prints a row every few steps and writes JSON (default
benchmarks/results/closed_loop_drift_<task>.json), rewritten atomically after every episode.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np

import llarva_gym  # noqa: F401  (registers the llarva/ ids)
from llarva_gym.evaluation import episode_reset_seed
from llarva_gym.expert import WaypointFollower
from llarva_gym.files import write_json_atomic
from llarva_policy import LlarvaPolicy

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def placed_objects(backend) -> dict[str, np.ndarray]:
    """The positions of the scene's mocap bodies (what a task places per episode)."""
    model = backend.model
    return {mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, body):
            backend.data.mocap_pos[model.body_mocapid[body]].copy()
            for body in range(model.nbody) if model.body_mocapid[body] >= 0}


def rollout(policy, env, reset_seed: int, steps: int) -> tuple[list[dict], dict]:
    obs, _ = env.reset(seed=reset_seed)
    backend, state, rows = env.unwrapped.backend, None, []
    objects = placed_objects(backend)
    closest_to_objects = dict.fromkeys(objects, np.inf)
    goal = WaypointFollower(backend).waypoints[-1].position
    camera = backend.cameras.misc(backend.data)["front_camera_extrinsics"][:3, 3]
    ray = (goal - camera) / np.linalg.norm(goal - camera)
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
                     "tip_to_waypoint_m": round(float(np.linalg.norm(obs["gripper_pose"][:3] - waypoint)), 4),
                     **depth_and_lateral(obs["gripper_pose"][:3] - goal, ray)})
        for name, position in objects.items():
            distance = float(np.linalg.norm(obs["gripper_pose"][:3] - position))
            closest_to_objects[name] = min(closest_to_objects[name], distance)
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            rows[-1]["success"] = bool(info["success"])
            break
    return rows, {name: round(distance, 4) for name, distance in closest_to_objects.items()}


def depth_and_lateral(offset: np.ndarray, ray: np.ndarray) -> dict:
    depth = float(offset @ ray)
    return {"depth_m": round(depth, 4), "lateral_m": round(float(np.linalg.norm(offset - depth * ray)), 4)}


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
    print(f"{'episode':>7} {'step':>4} {'cosine':>7} {'policy':>7} {'expert':>7} {'to waypoint':>11} {'depth':>6} "
          f"{'lateral':>7}  (speeds in rad/s, m)")
    for index in range(args.episodes):
        rows, closest_to_objects = rollout(policy, env, episode_reset_seed(args.seed, index), args.steps)
        negative = [r["step"] for r in rows if r["cosine"] is not None and r["cosine"] < 0]
        closest = min(rows, key=lambda r: np.hypot(r["depth_m"], r["lateral_m"]))
        record["episodes"].append({"index": index, "first_negative_cosine_step": negative[0] if negative else None,
                                   "closest_m": min(r["tip_to_waypoint_m"] for r in rows),
                                   "closest_to_goal": {key: closest[key] for key in ("step", "depth_m", "lateral_m")},
                                   "closest_to_objects_m": closest_to_objects,
                                   "success": rows[-1].get("success", False), "steps": rows})
        for r in rows[::args.every]:
            print(f"{index:>7} {r['step']:>4} {r['cosine'] if r['cosine'] is not None else 'n/a':>7} "
                  f"{r['policy_speed']:>7.2f} {r['expert_speed']:>7.2f} {r['tip_to_waypoint_m']:>11.3f} "
                  f"{r['depth_m']:>6.3f} {r['lateral_m']:>7.3f}")
        summary = record["episodes"][-1]
        print(f"episode {index}: first negative cosine at step {summary['first_negative_cosine_step']}, "
              f"closest {summary['closest_m']:.3f} m; closest to the goal at step {closest['step']}: "
              f"depth {closest['depth_m']:+.3f} m, lateral {closest['lateral_m']:.3f} m, success {summary['success']}; "
              f"closest to each placed object (m): {closest_to_objects}", flush=True)
        write_json_atomic(out, record)
    env.close()


if __name__ == "__main__":
    main()
