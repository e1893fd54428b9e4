"""What every embedded task file defines: objects (MJCF), variations, descriptions, success, waypoints.

A task file (`tasks/<rlbench_name>.py`) holds one `Task` subclass; it is found by itself. Conventions:
- World frame: z up, the table top at `TABLE_HEIGHT` (0.752 m), the robot base at (-0.3, 0), the
  front camera at +x looking back at the robot. Keep objects within x 0.0..0.45, |y| < 0.35 (the
  arm reaches comfortably there with the gripper pointing down).
- Collision bits: geoms collide with each other through bit 1 (MJCF's default contype=1
  conaffinity=1). The fingers have contype=2, conaffinity=0: give a geom conaffinity="3" for the
  fingers to push it (buttons, blocks to slide). The arm links collide with nothing.
- Objects placed per episode: free bodies (`<freejoint/>`, set with `set_free_body`) or static
  bodies marked `mocap="true"` (set with `set_mocap`). Articulated parts use hinge/slide joints.
- Grasping: list body names in `graspable`; when the closing gripper's grasp region (between the
  fingertips) touches one of the body's geoms, the body is welded to the hand until the gripper
  opens (RLBench's attach/release). A body with joints (a drawer) stays on its joints and follows.
- `waypoints()` is called once per episode after `init_episode`, from privileged state; the expert
  moves the gripper tip in straight lines between them and sets the gripper after reaching each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mujoco
import numpy as np

from llarva_gym.backends.mujoco.robot import Panda
from llarva_gym.backends.mujoco.scene import TABLE_HEIGHT

# RLBench's colour list (rlbench/const.py); index = variation in colour tasks.
COLORS = [
    ("red", (1.0, 0.0, 0.0)), ("maroon", (0.5, 0.0, 0.0)), ("lime", (0.0, 1.0, 0.0)),
    ("green", (0.0, 0.5, 0.0)), ("blue", (0.0, 0.0, 1.0)), ("navy", (0.0, 0.0, 0.5)),
    ("yellow", (1.0, 1.0, 0.0)), ("cyan", (0.0, 1.0, 1.0)), ("magenta", (1.0, 0.0, 1.0)),
    ("silver", (0.75, 0.75, 0.75)), ("gray", (0.5, 0.5, 0.5)), ("orange", (1.0, 0.5, 0.0)),
    ("olive", (0.5, 0.5, 0.0)), ("purple", (0.5, 0.0, 0.5)), ("teal", (0.0, 0.5, 0.5)),
    ("azure", (0.0, 0.5, 1.0)), ("violet", (0.5, 0.0, 1.0)), ("rose", (1.0, 0.0, 0.5)),
    ("black", (0.0, 0.0, 0.0)), ("white", (1.0, 1.0, 1.0)),
]

# The gripper pointing straight down, fingers closing along world y: the usual top-down grasp.
GRIPPER_DOWN = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])


def yaw_matrix(angle: float) -> np.ndarray:
    """Rotation by `angle` (radians) about the world's vertical axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass
class Waypoint:
    """A gripper-tip pose to reach in a straight line, then the gripper state to set there."""

    position: np.ndarray
    rotation: np.ndarray = field(default_factory=GRIPPER_DOWN.copy)
    gripper_open: float = 1.0
    speed: float = 0.4   # m/s along the straight line
    # Within this distance (m) of the position the speed falls in proportion to the distance left;
    # 0: full speed to the end. A cloned policy learns from such an arrival to settle where it
    # should be, where a full-speed arrival teaches it to keep going.
    brake_distance: float = 0.0


class Task:
    name: str = ""             # RLBench's task name
    aliases: tuple[str, ...] = ()   # short gym ids (llarva/<alias>) where natural
    variation_count: int = 1
    max_episode_steps: int = 120   # LLARVA evaluates 120 steps; longer tasks may ask for more
    graspable: tuple[str, ...] = ()
    xml: str = ""   # MJCF fragment (<worldbody>, <asset>, <equality> ...) appended to the scene

    def __init__(self, model: mujoco.MjModel, data: mujoco.MjData, panda: Panda):
        self.model, self.data, self.panda = model, data, panda

    def descriptions(self, variation: int) -> list[str]:
        raise NotImplementedError

    def init_episode(self, variation: int, rng: np.random.Generator) -> None:
        """Place the objects for this episode (called after the robot is at home)."""
        raise NotImplementedError

    def success(self) -> bool:
        raise NotImplementedError

    def waypoints(self) -> list[Waypoint]:
        """The expert's path for the current episode, from privileged state, as RLBench's demos."""
        raise NotImplementedError

    def low_dim_state(self) -> np.ndarray:
        """RLBench's task_low_dim_state: positions of the task's objects."""
        return np.zeros(0)

    # --- helpers for task files ------------------------------------------------------------------
    def set_free_body(self, body: str, position, quat_wxyz=(1, 0, 0, 0)):
        joint = self.model.body(body).jntadr[0]
        adr, dof = self.model.jnt_qposadr[joint], self.model.jnt_dofadr[joint]
        self.data.qpos[adr:adr + 3] = position
        self.data.qpos[adr + 3:adr + 7] = quat_wxyz
        self.data.qvel[dof:dof + 6] = 0

    def set_mocap(self, body: str, position, quat_wxyz=(1, 0, 0, 0)):
        mocap = self.model.body(body).mocapid[0]
        self.data.mocap_pos[mocap] = position
        self.data.mocap_quat[mocap] = quat_wxyz

    def body_position(self, body: str) -> np.ndarray:
        return self.data.body(body).xpos.copy()

    def set_rgba(self, geom: str, rgb):
        self.model.geom(geom).rgba[:3] = rgb


def sample_separated(rng: np.random.Generator, count: int, low, high, min_distance: float) -> np.ndarray:
    """`count` points uniform in the box [low, high], pairwise at least `min_distance` apart
    (rejection sampling, as RLBench's SpawnBoundary)."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    for _ in range(1000):
        points = rng.uniform(low, high, size=(count, len(low)))
        gaps = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(count) * 1e9
        if gaps.min() >= min_distance:
            return points
    raise RuntimeError(f"could not place {count} objects {min_distance} m apart in {low}..{high}")


__all__ = ["COLORS", "GRIPPER_DOWN", "TABLE_HEIGHT", "Task", "Waypoint", "sample_separated", "yaw_matrix"]
