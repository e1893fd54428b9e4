"""turn_tap: grasp the left or right handle of a tap and turn it by a quarter turn.

A tap (base, column, spout and two lever handles on posts) stands on the table, turned by any
angle per episode (RLBench's default base rotation). Left and right are the tap's own: seen from
in front of its spout, the left handle is on the left. Each lever turns on a vertical hinge;
success when the chosen one has turned by more than 1.57 rad either way, as RLBench's
JointCondition. The expert grasps the lever from above at its hinge and turns the gripper.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint, yaw_matrix
from llarva_gym.backends.mujoco.tasks.close_jar import wrist_angle

OPTIONS = ("left", "right")
HANDLE_Y = 0.12       # the handles' distance from the tap's middle
HANDLE_Z = 0.1        # height of the levers' hinges above the table
LEVER_HALF = (0.05, 0.01, 0.009)
TURN_THRESHOLD = 1.57  # RLBench: JointCondition(joint, 1.57)
TURN = 1.75            # how far the expert turns (rad)
METAL = "0.72 0.74 0.78 1"


def _handle(option: str, side: float) -> str:
    hx, hy, hz = LEVER_HALF
    return f"""
      <body name="tap_{option}" pos="0 {side * HANDLE_Y} {HANDLE_Z}">
        <joint name="{option}_joint" type="hinge" axis="0 0 1" range="-3 3" damping="0.02" frictionloss="0.02" armature="0.002"/>
        <geom type="cylinder" size="0.015 {hz}" pos="0 0 {hz}" rgba="{METAL}"/>
        <geom name="tap_{option}_lever" type="box" size="{hx} {hy} {hz}" pos="0 0 {hz}" rgba="{METAL}"/>
        <geom type="sphere" size="0.013" pos="{-hx} 0 {hz}" rgba="{METAL}"/>
      </body>"""


def _wrap(angle: float) -> float:
    return (angle + np.pi) % (2 * np.pi) - np.pi


class TurnTap(Task):
    name = "turn_tap"
    variation_count = 2
    graspable = tuple(f"tap_{option}" for option in OPTIONS)
    # The tap's frame: its spout points along -x, its left handle at +y. Only the levers are
    # touched (by the grasp), so nothing here collides.
    xml = f"""
    <worldbody>
      <body name="tap" mocap="true">
        <geom type="box" size="0.05 0.165 0.01" pos="0 0 0.01" rgba="0.5 0.5 0.53 1" contype="0" conaffinity="0"/>
        <geom type="cylinder" size="0.024 0.08" pos="0 0 0.1" rgba="{METAL}" contype="0" conaffinity="0"/>
        <geom type="capsule" fromto="0 0 0.165 -0.12 0 0.165" size="0.015" rgba="{METAL}" contype="0" conaffinity="0"/>
        <geom type="capsule" fromto="-0.12 0 0.165 -0.12 0 0.135" size="0.015" rgba="{METAL}" contype="0" conaffinity="0"/>
        <geom type="cylinder" size="0.018 {HANDLE_Z / 2}" pos="0 {HANDLE_Y} {HANDLE_Z / 2}" rgba="{METAL}" contype="0" conaffinity="0"/>
        <geom type="cylinder" size="0.018 {HANDLE_Z / 2}" pos="0 {-HANDLE_Y} {HANDLE_Z / 2}" rgba="{METAL}" contype="0" conaffinity="0"/>
        {_handle("left", 1.0)}
        {_handle("right", -1.0)}
      </body>
    </worldbody>"""

    def descriptions(self, variation):
        option = OPTIONS[variation]
        return [f"turn {option} tap",
                f"rotate the {option} tap",
                f"grasp the {option} tap and turn it"]

    def init_episode(self, variation, rng):
        self.variation = variation
        self.yaw = rng.uniform(-np.pi, np.pi)
        position = (rng.uniform(0.1, 0.3), rng.uniform(-0.15, 0.15), TABLE_HEIGHT)
        self.set_mocap("tap", position, (np.cos(self.yaw / 2), 0.0, 0.0, np.sin(self.yaw / 2)))

    def turned(self, option: str) -> float:
        return float(self.data.joint(f"{option}_joint").qpos[0])

    def success(self):
        # The levers start at 0; RLBench compares with the start position.
        return abs(self.turned(OPTIONS[self.variation])) > TURN_THRESHOLD

    def _grip_and_turn(self, lever_yaw: float, hinge: np.ndarray) -> tuple[float, float]:
        """The gripper's yaw at the grasp and the signed turn: of the two grasps across the lever
        (half a turn apart) and the two directions, the one that keeps the wrist furthest from its
        limits (RLBench counts a turn either way)."""
        def worst_wrist(yaw0, turn):
            return max(abs(wrist_angle(yaw, hinge)) for yaw in (yaw0, yaw0 + turn / 2, yaw0 + turn))

        options = [(_wrap(lever_yaw + half), direction * TURN) for half in (0.0, np.pi) for direction in (1, -1)]
        return min(options, key=lambda option: worst_wrist(*option))

    def waypoints(self):
        option = OPTIONS[self.variation]
        hinge = self.body_position(f"tap_{option}")
        grasp = hinge + np.array([0.0, 0.0, LEVER_HALF[2]])
        # The lever lies along the tap's x axis; the fingers close across it.
        yaw0, turn = self._grip_and_turn(self.yaw, hinge)
        start, end = yaw_matrix(yaw0) @ GRIPPER_DOWN, yaw_matrix(yaw0 + turn) @ GRIPPER_DOWN
        above = np.array([0.0, 0.0, 0.07])
        return [
            Waypoint(grasp + above, start, 1.0, speed=0.6),
            Waypoint(grasp, start, 0.0, speed=0.2),
            Waypoint(grasp, end, 1.0, speed=0.2),   # turn, then let go
            Waypoint(grasp + above, end, 1.0, speed=0.3),
        ]

    def low_dim_state(self):
        return np.concatenate([self.body_position("tap"), self.body_position("tap_left"), self.body_position("tap_right"),
                               [self.turned("left"), self.turned("right")]])
