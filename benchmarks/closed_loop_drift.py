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
object is a wrong choice, not a wrong depth. Per step also where each command heads
(`policy_aim_*`, `expert_aim_*`): the depth along the camera's ray at which the tip's line of motion
meets it, less the goal's, and how far the line passes from the ray; with `--steps 1` over many
episodes, step 0's aim (summary `first_step_aim`) says in seconds an episode whether a checkpoint
reads the target's depth from the image (the expert's aim is exact to a few millimetres; the slope
of aimed against true depth is 1 for a policy that reads it, 0 for one that aims at one depth).
`--oracle-orientation` is an intervention, for diagnosis only: each step the tip moves as the policy
commands while the hand turns toward the waypoint's orientation at the expert's rate (an IK
solve from the policy's next pose); a policy that then succeeds where it failed was failing by
turning its hand. `--checkpoint` may also be a `bc_baseline.py` model (its `.pt`, with its report `.json` beside
it): the conventional regression's aim and drift on the same scenes as a LLaVA checkpoint's.
`--training-scenes` runs the scenes the demos were recorded in (with a checkpoint's demo seed, the
ones it was trained on): the aim there against held-out scenes tells a model that has not fitted
its data from one that does not generalise. The step where the cosine first turns negative is
where the policy has left anything the demos taught it. Per step also each command's motion of the
gripper (`*_tip_speed`, m/s, and `*_turn_rate`, rad/s: how fast the hand would turn), the cosine
between the two tip velocities and the hand's orientation error to the waypoint's; the summary
`by_distance` gives their medians by the tip's distance to the goal: where the expert's command is
mostly turning the hand back, a policy that does not turn it has little left to imitate.
Prints a row every few steps and writes JSON (default
benchmarks/results/closed_loop_drift_<task>.json), rewritten atomically after every episode.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np

import llarva_gym  # noqa: F401  (registers the llarva/ ids)
from llarva_gym.backends.mujoco.robot import rotation_error
from llarva_gym.backends.mujoco.scene import CONTROL_PERIOD
from llarva_gym.evaluation import episode_reset_seed
from llarva_gym.expert import MAX_TURN_RATE, WaypointFollower, turned, within_velocity_limit
from llarva_gym.files import write_json_atomic
from llarva_gym.recording import attempt_seed
from llarva_policy import LlarvaPolicy

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def placed_objects(backend) -> dict[str, np.ndarray]:
    """The positions of the scene's mocap bodies (what a task places per episode)."""
    model = backend.model
    return {mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, body):
            backend.data.mocap_pos[model.body_mocapid[body]].copy()
            for body in range(model.nbody) if model.body_mocapid[body] >= 0}


def rollout(policy, env, reset_seed: int, steps: int,
            oracle_orientation: bool = False) -> tuple[list[dict], dict, np.ndarray]:
    obs, _ = env.reset(seed=reset_seed)
    backend, state, rows = env.unwrapped.backend, None, []
    objects = placed_objects(backend)
    closest_to_objects = dict.fromkeys(objects, np.inf)
    goal = WaypointFollower(backend).waypoints[-1].position
    camera = camera_position(env)
    ray = (goal - camera) / np.linalg.norm(goal - camera)
    for t in range(steps):
        action, state = policy.predict(obs, state=state, episode_start=np.array([t == 0]))
        expert = WaypointFollower(backend)   # a fresh plan from this state, as the labels are made
        command = expert.next_action("joint_velocity")
        current = expert.waypoints[min(expert.index, len(expert.waypoints) - 1)]
        if oracle_orientation:
            action = np.r_[turning_toward(backend.panda, backend.panda.joint_positions,
                                          np.asarray(action[:7], dtype=np.float64), current.rotation),
                           action[7]].astype(np.float32)
        waypoint = current.position
        a, x = np.asarray(action[:7], dtype=np.float64), command[:7].astype(np.float64)
        norms = np.linalg.norm(a) * np.linalg.norm(x)
        q = backend.panda.joint_positions
        tip, hand = backend.panda.forward_kinematics(q)
        motions = {who: gripper_motion(backend.panda, q, velocity) for who, velocity in (("policy", a), ("expert", x))}
        tip_norms = np.linalg.norm(motions["policy"]["tip_velocity"]) * np.linalg.norm(motions["expert"]["tip_velocity"])
        aims = {who: aim(tip, backend.panda.forward_kinematics(q + velocity * CONTROL_PERIOD)[0] - tip,
                         camera, ray, goal)
                for who, velocity in (("policy", a), ("expert", x))}
        rows.append({"step": t, "cosine": round(float(a @ x / norms), 4) if norms > 1e-9 else None,
                     "policy_speed": round(float(np.linalg.norm(a)), 4),
                     "expert_speed": round(float(np.linalg.norm(x)), 4),
                     "tip_to_waypoint_m": round(float(np.linalg.norm(obs["gripper_pose"][:3] - waypoint)), 4),
                     "tip_to_goal_m": round(float(np.linalg.norm(tip - goal)), 4),
                     **{f"{who}_{key}": round(float(motion[key]), 4) for who, motion in motions.items()
                        for key in ("tip_speed", "turn_rate")},
                     "tip_cosine": (round(float(motions["policy"]["tip_velocity"] @ motions["expert"]["tip_velocity"]
                                                / tip_norms), 4) if tip_norms > 1e-12 else None),
                     "orientation_error_rad": round(float(np.linalg.norm(rotation_error(hand, current.rotation))), 4),
                     **depth_and_lateral(obs["gripper_pose"][:3] - goal, ray),
                     **{f"{who}_aim_{key}": value for who, found in aims.items() for key, value in found.items()}})
        for name, position in objects.items():
            distance = float(np.linalg.norm(obs["gripper_pose"][:3] - position))
            closest_to_objects[name] = min(closest_to_objects[name], distance)
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            rows[-1]["success"] = bool(info["success"])
            break
    return rows, {name: round(distance, 4) for name, distance in closest_to_objects.items()}, goal


def gripper_motion(panda, q: np.ndarray, velocity: np.ndarray) -> dict:
    """What a joint-velocity command does to the gripper over one control period: the tip's velocity
    (m/s), its speed, and the rate the hand turns at (rad/s)."""
    tip, hand = panda.forward_kinematics(q)
    next_tip, next_hand = panda.forward_kinematics(q + velocity * CONTROL_PERIOD)
    tip_velocity = (next_tip - tip) / CONTROL_PERIOD
    return {"tip_velocity": tip_velocity, "tip_speed": np.linalg.norm(tip_velocity),
            "turn_rate": np.linalg.norm(rotation_error(hand, next_hand)) / CONTROL_PERIOD}


def turning_toward(panda, q: np.ndarray, velocity: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """The joint velocity that moves the tip where `velocity` would while the hand turns toward
    `rotation` at the expert's rate, slowed as the expert's commands are where that needs joints
    faster than their limits."""
    next_q = q + velocity * CONTROL_PERIOD
    tip, _ = panda.forward_kinematics(next_q)
    _, hand = panda.forward_kinematics(q)
    turn = rotation_error(hand, rotation)
    angle = np.linalg.norm(turn)
    fraction = min(1.0, MAX_TURN_RATE * CONTROL_PERIOD / angle) if angle > 0 else 1.0
    target, _ = panda.solve_ik(tip, turned(hand, turn * fraction), next_q)
    return (within_velocity_limit(q, target) - q) / CONTROL_PERIOD


BANDS_M = ((0.0, 0.03), (0.03, 0.08), (0.08, 0.2), (0.2, None))
MOTION_KEYS = ("policy_tip_speed", "expert_tip_speed", "policy_turn_rate", "expert_turn_rate", "tip_cosine",
               "orientation_error_rad")


def by_distance(episodes: list[dict]) -> list[dict]:
    """Medians of the gripper-motion columns over every step, by the tip's distance to the goal."""
    steps = [row for episode in episodes for row in episode["steps"]]
    bands = []
    for low, high in BANDS_M:
        inside = [r for r in steps if r["tip_to_goal_m"] >= low and (high is None or r["tip_to_goal_m"] < high)]
        medians = {}
        for key in MOTION_KEYS:
            values = [r[key] for r in inside if r[key] is not None]
            medians[key] = round(float(np.median(values)), 3) if values else None
        bands.append({"to_goal_m": [low, high], "steps": len(inside), **medians})
    return bands


def camera_position(env) -> np.ndarray:
    backend = env.unwrapped.backend
    return backend.cameras.misc(backend.data)["front_camera_extrinsics"][:3, 3]


def aim(tip: np.ndarray, heading: np.ndarray, camera: np.ndarray, ray: np.ndarray, goal: np.ndarray) -> dict:
    """Which depth a step heads for: where the tip's line of motion passes closest to the camera's ray
    through the goal. `depth_error_m`: that point's distance along the ray less the goal's (positive
    beyond it); `miss_m`: how far the line passes from the ray (an error no depth explains). None when
    the tip barely moves or moves along the ray, or the closest point lies behind the tip."""
    none = {"depth_error_m": None, "miss_m": None}
    length = np.linalg.norm(heading)
    if length < 1e-6:
        return none
    d = heading / length
    b, w = d @ ray, tip - camera
    if abs(b) > 0.99:
        return none
    s = (b * (ray @ w) - d @ w) / (1 - b * b)   # along the tip's line
    t = (ray @ w - b * (d @ w)) / (1 - b * b)   # along the camera's ray
    if s <= 0:
        return none
    return {"depth_error_m": round(float(t - np.linalg.norm(goal - camera)), 4),
            "miss_m": round(float(np.linalg.norm(tip + s * d - camera - t * ray)), 4)}


def first_step_aim(episodes: list[dict]) -> dict:
    """Step 0's aim over the episodes (the arm at its start pose: the goal is all there is to decide)."""
    summary = {}
    for who in ("policy", "expert"):
        kept = [e for e in episodes if e["steps"][0][f"{who}_aim_depth_error_m"] is not None]
        errors = np.array([e["steps"][0][f"{who}_aim_depth_error_m"] for e in kept])
        misses = np.array([e["steps"][0][f"{who}_aim_miss_m"] for e in kept])
        true = np.array([e["goal_depth_m"] for e in kept])
        summary[who] = {"episodes": len(kept),
                        "median_abs_depth_error_m": round(float(np.median(np.abs(errors))), 4) if kept else None,
                        "median_abs_miss_m": round(float(np.median(misses)), 4) if kept else None}
        if len(kept) >= 3 and true.std() > 0:
            aimed = true + errors
            summary[who]["slope_aimed_vs_true_depth"] = round(float(np.polyfit(true, aimed, 1)[0]), 3)
            summary[who]["correlation_aimed_vs_true_depth"] = (round(float(np.corrcoef(true, aimed)[0, 1]), 3)
                                                               if aimed.std() > 1e-9 else None)
    return summary


def depth_and_lateral(offset: np.ndarray, ray: np.ndarray) -> dict:
    depth = float(offset @ ray)
    return {"depth_m": round(depth, 4), "lateral_m": round(float(np.linalg.norm(offset - depth * ray)), 4)}


def load_policy(checkpoint: str, device, visual_trace: bool | None):
    """A LlarvaPolicy checkpoint folder (`visual_trace` None: as it was trained), or a bc_baseline.py model
    (`.pt`, its `.json` beside it)."""
    path = Path(checkpoint)
    if path.suffix != ".pt":
        return LlarvaPolicy.from_pretrained(path, device=device, constrained=True, with_visual_trace=visual_trace)
    import torch

    spec = importlib.util.spec_from_file_location("bc_baseline", Path(__file__).with_name("bc_baseline.py"))
    bc_baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc_baseline)
    report = path.with_suffix(".json")
    if not report.is_file():
        raise FileNotFoundError(f"checkpoint: {path} needs its bc_baseline.py report {report.name} beside it "
                                f"(which vision the model has)")
    model = bc_baseline.VisuomotorPolicy(json.loads(report.read_text()).get("vision", "cnn")).to(device or "cpu")
    model.load_state_dict(torch.load(path, weights_only=True, map_location=device or "cpu"))
    return bc_baseline.BaselinePolicy(model.eval())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--checkpoint", required=True, help="LlarvaPolicy folder, or a bc_baseline.py .pt")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="steps per episode (at most the task's limit)")
    parser.add_argument("--seed", type=int, default=0, help="llarva eval's --seed: the same episodes")
    parser.add_argument("--training-scenes", action="store_true",
                        help="the scenes `llarva demos --seed SEED` records (attempt k's reset seed) instead of "
                             "llarva eval's: with a checkpoint's demo seed, the scenes it was trained on")
    parser.add_argument("--variation", type=int, default=None)
    parser.add_argument("--visual-trace", action=argparse.BooleanOptionalAction, default=None,
                        help="whether the checkpoint answers with a visual trace (default: as it was trained)")
    parser.add_argument("--render-quality", default="fast", choices=("fast", "high"),
                        help="the env's rendering, as the checkpoint was trained and evaluated")
    parser.add_argument("--device", default=None)
    parser.add_argument("--every", type=int, default=3, help="print every N-th step")
    parser.add_argument("--oracle-orientation", action="store_true",
                        help="diagnosis: the hand turns toward the waypoint's orientation as the expert would, "
                             "the tip moves as the policy commands")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    policy = load_policy(args.checkpoint, args.device, args.visual_trace)
    env = gym.make(f"llarva/{args.task}", variation=args.variation, render_quality=args.render_quality)
    out = Path(args.out or RESULTS_DIR / f"closed_loop_drift_{args.task}.json")
    record = {"task": args.task, "checkpoint": str(args.checkpoint), "seed": args.seed,
              "scenes": "training (llarva demos' attempts)" if args.training_scenes else "llarva eval's",
              "variation": args.variation,
              "render_quality": args.render_quality, "oracle_orientation": args.oracle_orientation, "episodes": []}
    print(f"{'episode':>7} {'step':>4} {'cosine':>7} {'policy':>7} {'expert':>7} {'to waypoint':>11} {'depth':>6} "
          f"{'lateral':>7}  (speeds in rad/s, m)")
    for index in range(args.episodes):
        reset_seed = attempt_seed(args.seed, index) if args.training_scenes else episode_reset_seed(args.seed, index)
        rows, closest_to_objects, goal = rollout(policy, env, reset_seed, args.steps, args.oracle_orientation)
        negative = [r["step"] for r in rows if r["cosine"] is not None and r["cosine"] < 0]
        closest = min(rows, key=lambda r: np.hypot(r["depth_m"], r["lateral_m"]))
        record["episodes"].append({"index": index, "first_negative_cosine_step": negative[0] if negative else None,
                                   "closest_m": min(r["tip_to_waypoint_m"] for r in rows),
                                   "closest_to_goal": {key: closest[key] for key in ("step", "depth_m", "lateral_m")},
                                   "closest_to_objects_m": closest_to_objects,
                                   "goal_m": np.round(goal, 4).tolist(),
                                   "goal_depth_m": round(float(np.linalg.norm(goal - camera_position(env))), 4),
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
        record["first_step_aim"] = first_step_aim(record["episodes"])
        record["by_distance"] = by_distance(record["episodes"])
        write_json_atomic(out, record)
    env.close()
    print("by the tip's distance to the goal (medians; speeds m/s, turn rates rad/s):")
    for band in record["by_distance"]:
        print("  " + ", ".join(f"{key} {value}" for key, value in band.items()))
    print(f"step 0's heading over {len(record['episodes'])} episodes (median absolute depth error, median miss; m): "
          f"{record['first_step_aim']}")


if __name__ == "__main__":
    main()
