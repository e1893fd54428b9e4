"""ScriptedExpert: solves a task from privileged state by moving through its waypoints with IK.

The planning runs inside the environment (`RLBenchEnv.expert_action`), where the simulator state
lives, so the same expert drives a single env, a sync vector env or an async one.
"""

from __future__ import annotations

import numpy as np

from llarva_gym.action_modes import VELOCITY_LIMIT
from llarva_gym.backends.mujoco.robot import mat_to_quat_xyzw, rotation_error
from llarva_gym.backends.mujoco.scene import CONTROL_PERIOD

POSITION_TOLERANCE = 0.002   # metres
ROTATION_TOLERANCE = 0.02    # radians
MAX_TURN_RATE = 1.5          # rad/s of the gripper's orientation


class WaypointFollower:
    """Moves the gripper tip along straight lines between the task's waypoints, one step at a time."""

    def __init__(self, backend):
        self.backend, self.panda = backend, backend.panda
        self.waypoints = backend.task.waypoints()
        self.index = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.waypoints)

    def next_action(self, action_mode: str) -> np.ndarray:
        target_q, gripper = self.next_joint_target(self.panda.joint_positions, self.panda.gripper_open)
        if action_mode == "joint_velocity":
            return np.r_[(target_q - self.panda.joint_positions) / CONTROL_PERIOD, gripper].astype(np.float32)
        if action_mode == "joint_position":
            return np.r_[target_q, gripper].astype(np.float32)
        position, rotation = self.panda.forward_kinematics(target_q)
        return np.r_[position, mat_to_quat_xyzw(rotation), gripper].astype(np.float32)

    def next_joint_target(self, q: np.ndarray, gripper: float) -> tuple[np.ndarray, float]:
        """From joints `q` and gripper state `gripper`: the joints to move to in one control period
        and the gripper command. Depends on nothing else, so a plan can be run without the simulator."""
        while self.index < len(self.waypoints):
            waypoint = self.waypoints[self.index]
            position, rotation = self.panda.forward_kinematics(q)
            offset = waypoint.position - position
            turn = rotation_error(rotation, waypoint.rotation)
            if np.linalg.norm(offset) < POSITION_TOLERANCE and np.linalg.norm(turn) < ROTATION_TOLERANCE:
                self.index += 1
                if waypoint.gripper_open != gripper:
                    return q, waypoint.gripper_open   # stand still while the gripper acts
                continue
            # One control period along the straight line, turning at a bounded rate.
            distance = np.linalg.norm(offset)
            step = waypoint.speed * CONTROL_PERIOD
            if waypoint.brake_distance > 0:
                step *= min(1.0, distance / waypoint.brake_distance)
            next_position = waypoint.position if distance <= step else position + offset * (step / distance)
            angle = np.linalg.norm(turn)
            fraction = min(1.0, MAX_TURN_RATE * CONTROL_PERIOD / angle) if angle > 0 else 1.0
            next_rotation = turned(rotation, turn * fraction)
            target, _ = self.panda.solve_ik(next_position, next_rotation, q)
            return within_velocity_limit(q, target), gripper
        return q, gripper


def within_velocity_limit(q: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`target`, or the point on the way to it from `q` that the joints reach in one control
    period at 95% of their speed limits (the whole step scaled, so the motion keeps its direction)."""
    scale = np.max(np.abs(target - q) / CONTROL_PERIOD / (VELOCITY_LIMIT * 0.95))
    return q + (target - q) / scale if scale > 1 else target


def reaches_every_waypoint(backend, max_steps: int) -> bool:
    """Whether the expert's arm gets to every waypoint of the episode just placed within `max_steps`.

    RLBench's reset (`Scene.init_episode`) asks its path planner for a path to each waypoint and
    draws the placement again when one has none (`Task.validate`, `WaypointError`). Ours asks the
    expert: the arm moves kinematically to the joint targets it is given, whatever it touches, so
    the expert's plan run from the start state, without stepping the simulator, is the joint path
    the episode would follow. A placement it cannot finish (a target beyond the reach of the arm
    with the gripper pointing down) is one no demonstration exists for.
    """
    follower = WaypointFollower(backend)
    q, gripper = backend.panda.joint_positions, backend.panda.gripper_open
    for _ in range(max_steps):
        if follower.done:
            break
        q, gripper = follower.next_joint_target(q, gripper)
    return follower.done


def turned(rotation: np.ndarray, axis_angle: np.ndarray) -> np.ndarray:
    """`rotation` (3x3) turned by the world-frame axis-angle vector `axis_angle` (Rodrigues)."""
    angle = np.linalg.norm(axis_angle)
    if angle < 1e-12:
        return rotation
    k = axis_angle / angle
    skew = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return (np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * skew @ skew) @ rotation


class ScriptedExpert:
    """A policy with Stable-Baselines3's `predict` that solves the task from privileged state.

    `env` is a single env made with `gym.make("llarva/...")` or a Gymnasium vector env of them.
    """

    def __init__(self, env):
        self.env = env
        self.is_vector = hasattr(env, "num_envs") and hasattr(env, "call")

    def predict(self, observation=None, state=None, episode_start=None, deterministic=True):
        if self.is_vector:
            return np.stack(self.env.call("expert_action")), state
        return self.env.unwrapped.expert_action(), state

    # LeRobot's shape of the same thing.
    def reset(self):
        pass

    def select_action(self, observation=None):
        return self.predict(observation)[0]
