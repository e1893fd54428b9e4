"""stack_blocks: stack 2, 3 or 4 blocks of the variation's colour on the target square.

As RLBench: 60 variations, colour = COLORS[variation // 3] and blocks to stack = 2 + variation % 3.
Four target blocks of that colour and four distractor blocks of one other colour (RLBench paints
all four distractors with the first of the two colours it draws) are spread over the table at least
0.1 m apart; success when the detector over the target square holds at least that many target
blocks and nothing is grasped. The expert repeats RLBench's waypoints for each block: above it,
down, grasp, lift, above the square at the stack's height, down, release.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import COLORS, GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint

MAX_STACKED_BLOCKS = 3   # variations per colour: 2, 3 or 4 blocks
TARGETS, DISTRACTORS = 4, 4
BLOCK_HALF = 0.025
PAD_HALF = 0.045         # the target square drawn on the table
COLUMN_RADIUS = 0.025    # a detected block's centre lies this close to the square's centre (in xy)
DROP_GAP = 0.004         # the expert releases a block this far above the stack
BLOCKS = [f"target{i}" for i in range(TARGETS)] + [f"distractor{i}" for i in range(DISTRACTORS)]


def _block(name: str) -> str:
    return (f'<body name="{name}"><freejoint/><geom name="{name}" type="box" size="{BLOCK_HALF} {BLOCK_HALF} {BLOCK_HALF}" '
            f'mass="0.05" friction="0.8 0.005 0.0001"/></body>')


def _down(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ GRIPPER_DOWN


class StackBlocks(Task):
    name = "stack_blocks"
    variation_count = len(COLORS) * MAX_STACKED_BLOCKS
    max_episode_steps = 200   # up to four pick-and-place cycles (the expert needs <= 175)
    graspable = tuple(BLOCKS)
    xml = f"""
    <worldbody>
      <body name="target_pad" mocap="true">
        <geom name="target_pad" type="box" size="{PAD_HALF} {PAD_HALF} 0.0005" pos="0 0 0.0005" rgba="0.85 0.85 0.85 1" contype="0" conaffinity="0"/>
      </body>
      {"".join(_block(name) for name in BLOCKS)}
    </worldbody>
    """

    def descriptions(self, variation):
        color, count = COLORS[variation // MAX_STACKED_BLOCKS][0], 2 + variation % MAX_STACKED_BLOCKS
        return [f"stack {count} {color} blocks",
                f"place {count} of the {color} cubes on top of each other",
                f"pick up and set down {count} {color} blocks on top of each other",
                f"build a tall tower out of {count} {color} cubes",
                f"arrange {count} {color} blocks in a vertical stack on the table top",
                f"set {count} {color} cubes on top of each other"]

    def init_episode(self, variation, rng):
        color_index = variation // MAX_STACKED_BLOCKS
        self.blocks_to_stack = 2 + variation % MAX_STACKED_BLOCKS
        others = rng.choice([i for i in range(len(COLORS)) if i != color_index], size=2, replace=False)
        for name in BLOCKS:
            self.set_rgba(name, COLORS[color_index if name.startswith("target") else others[0]][1])
        # The target square near the middle, the blocks around it (RLBench's spawn boundaries).
        pad = np.array([rng.uniform(0.12, 0.3), rng.uniform(-0.12, 0.12)])
        positions: list[np.ndarray] = []
        while len(positions) < len(BLOCKS):
            point = rng.uniform((0.0, -0.3), (0.42, 0.3))
            if np.linalg.norm(point - pad) >= 0.12 and all(np.linalg.norm(point - p) >= 0.1 for p in positions):
                positions.append(point)
        self.set_mocap("target_pad", (*pad, TABLE_HEIGHT))
        for name, (x, y) in zip(BLOCKS, positions):
            yaw = rng.uniform(-np.pi / 4, np.pi / 4)
            self.set_free_body(name, (x, y, TABLE_HEIGHT + BLOCK_HALF), (np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)))

    def stacked_targets(self) -> int:
        pad = self.body_position("target_pad")
        count = 0
        for i in range(TARGETS):
            offset = self.body_position(f"target{i}") - pad
            count += bool(np.hypot(offset[0], offset[1]) < COLUMN_RADIUS
                          and 0 < offset[2] < 2 * BLOCK_HALF * TARGETS)
        return count

    def success(self):
        return self.stacked_targets() >= self.blocks_to_stack and self.panda.grasped is None

    def waypoints(self):
        pad = self.body_position("target_pad")
        up = np.array([0.0, 0.0, 1.0])
        path = []
        for level in range(self.blocks_to_stack):
            block = self.body_position(f"target{level}")
            matrix = self.data.body(f"target{level}").xmat.reshape(3, 3)
            yaw = np.arctan2(matrix[1, 0], matrix[0, 0])   # within +-45 degrees: a cube looks the same
            carry = max(TABLE_HEIGHT + 0.1, TABLE_HEIGHT + 2 * BLOCK_HALF * (level + 1) + 0.05)
            drop = pad + (2 * BLOCK_HALF * level + BLOCK_HALF + DROP_GAP) * up
            path += [
                Waypoint(block + 0.06 * up, _down(yaw), 1.0, speed=0.6),
                Waypoint(block, _down(yaw), 0.0, speed=0.3),
                Waypoint(np.r_[block[:2], carry], _down(yaw), 0.0, speed=0.5),
                Waypoint(np.r_[pad[:2], carry], _down(0.0), 0.0, speed=0.6),
                Waypoint(drop, _down(0.0), 1.0, speed=0.3),
            ]
        return path

    def low_dim_state(self):
        return np.concatenate([self.body_position(name) for name in ("target_pad", *BLOCKS)])
