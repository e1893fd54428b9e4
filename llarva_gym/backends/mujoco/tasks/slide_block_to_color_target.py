"""slide_block_to_color_target: push the block onto the target square of the variation's colour.

PerAct's task (its RLBench fork): one block and four coloured target squares (green, blue, pink,
yellow; variation = index in that list). Success when the block sits on the chosen square
(RLBench's proximity sensor over it). Here the four squares lie around the block, one on each side
of it, and the layout is placed and turned per episode (RLBench moves and turns a task's base);
the expert closes the gripper and pushes the block straight onto the chosen square with the
fingertips, as RLBench's demos push with the closed gripper.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint, yaw_matrix

TARGET_COLORS = [("green", (0.0, 0.6, 0.0)), ("blue", (0.0, 0.0, 1.0)),
                 ("pink", (1.0, 0.55, 0.7)), ("yellow", (1.0, 1.0, 0.0))]
# Where each target lies from the block, in the layout's frame: one square on each side.
TARGET_DIRECTIONS = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
TARGET_DISTANCE = 0.15     # block centre to target centre
TARGET_HALF = 0.045        # half side of a target square
BLOCK_HALF = 0.025
PAD_HALF = 0.009           # the closed fingertips' half thickness along a push
CLEARANCE = 0.02           # between the fingertips and the block before the push
# The block's start (the layout's centre) and how far the layout is turned.
CENTRE_LOW, CENTRE_HIGH = (0.12, -0.12), (0.26, 0.12)
MAX_YAW = np.pi / 6


def yaw_quat(angle: float) -> tuple[float, float, float, float]:
    return (np.cos(angle / 2), 0.0, 0.0, np.sin(angle / 2))


def _target(i: int) -> str:
    return (f'<body name="target{i}" mocap="true"><geom name="target{i}" type="box" '
            f'size="{TARGET_HALF} {TARGET_HALF} 0.0005" pos="0 0 0.0005" rgba="{" ".join(map(str, TARGET_COLORS[i][1]))} 1" '
            f'contype="0" conaffinity="0"/></body>')


class SlideBlockToColorTarget(Task):
    name = "slide_block_to_color_target"
    variation_count = len(TARGET_COLORS)
    xml = f"""
    <worldbody>
      {"".join(_target(i) for i in range(len(TARGET_COLORS)))}
      <body name="block">
        <freejoint/>
        <!-- conaffinity 3: the fingertips push it. -->
        <geom name="block" type="box" size="{BLOCK_HALF} {BLOCK_HALF} {BLOCK_HALF}" mass="0.1"
              friction="0.5 0.005 0.0001" rgba="0.55 0.1 0.1 1" conaffinity="3"/>
      </body>
    </worldbody>
    """

    def descriptions(self, variation):
        color = TARGET_COLORS[variation][0]
        return [f"slide the block to {color} target",
                f"slide the block onto the {color} square",
                f"push the block until it is sitting on top of the {color} target",
                f"slide the block towards the {color} plane",
                f"cover the {color} target with the block by pushing the block in its direction"]

    def init_episode(self, variation, rng):
        self.variation = variation
        centre = rng.uniform(CENTRE_LOW, CENTRE_HIGH)
        self.yaw = rng.uniform(-MAX_YAW, MAX_YAW)
        turn = yaw_matrix(self.yaw)[:2, :2]
        for i, direction in enumerate(TARGET_DIRECTIONS):
            x, y = centre + TARGET_DISTANCE * turn @ direction
            self.set_mocap(f"target{i}", (x, y, TABLE_HEIGHT), yaw_quat(self.yaw))
        self.set_free_body("block", (*centre, TABLE_HEIGHT + BLOCK_HALF), yaw_quat(self.yaw))

    def block_on_target(self, i: int) -> bool:
        # RLBench's sensor over the square sees the block: here its centre lies on the square.
        offset = self.body_position("block") - self.body_position(f"target{i}")
        local = yaw_matrix(self.yaw)[:2, :2].T @ offset[:2]
        return bool(np.all(np.abs(local) < TARGET_HALF) and offset[2] < 2 * BLOCK_HALF)

    def success(self):
        return self.block_on_target(self.variation)

    def waypoints(self):
        block = self.body_position("block")
        target = self.body_position(f"target{self.variation}")
        direction = (target - block) * np.array([1.0, 1.0, 0.0])
        distance = np.linalg.norm(direction)
        direction /= distance
        # Fingertips side by side across the push: they close along the gripper's y axis, so turn
        # the gripper to put that axis across the push direction.
        # (The gripper is symmetric: keep the turn within a quarter turn of home, away from
        # joint 7's limits.)
        push_yaw = (np.arctan2(direction[1], direction[0]) + np.pi / 2) % np.pi - np.pi / 2
        rotation = yaw_matrix(push_yaw) @ GRIPPER_DOWN
        height = np.array([0.0, 0.0, TABLE_HEIGHT + BLOCK_HALF])
        behind = BLOCK_HALF + PAD_HALF
        start = block * np.array([1.0, 1.0, 0.0]) + height - direction * (behind + CLEARANCE)
        end = target * np.array([1.0, 1.0, 0.0]) + height - direction * behind
        return [
            Waypoint(start + np.array([0.0, 0.0, 0.08]), rotation, 0.0, speed=0.8),
            Waypoint(start, rotation, 0.0, speed=0.3),
            Waypoint(end, rotation, 0.0, speed=0.15),
            Waypoint(end + np.array([0.0, 0.0, 0.06]), rotation, 0.0, speed=0.3),
        ]

    def low_dim_state(self):
        return np.concatenate([self.body_position("block"),
                               *[self.body_position(f"target{i}") for i in range(len(TARGET_COLORS))]])
