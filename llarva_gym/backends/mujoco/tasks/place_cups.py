"""place_cups: hang 1, 2 or 3 mugs by their handles on the spokes of the mug tree.

As RLBench: 3 variations, index i asks for i + 1 mugs; mug k goes on spoke k; success when each of
mugs 0..i is detected on one of the spokes and nothing is grasped. Three mugs stand on the table
at random positions and headings; the mug tree (a post with three spokes rising at 30 degrees, at
three heights) is placed and turned per episode. The expert, per mug: above its rim, down, grasp
the rim, lift clear of the tree, move above the spoke turning the mug so that its handle faces the
spoke, lower the handle's opening in front of the spoke's end, slide it onto the spoke, let go,
back out. A mug let go hangs from the spoke by its handle and swings under it.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint, yaw_matrix

# Cylinders, capsules and spheres drawn with fewer facets than MuJoCo's default (28 x 16): the same
# picture at 128 x 128, at half the software-rendering cost of this scene's round shapes.
ROUND_SHAPES = '<visual><quality numslices="20" numstacks="8"/></visual>'

MUGS = ("mug0", "mug1", "mug2")
MUG_COLORS = ((0.92, 0.92, 0.9), (0.2, 0.45, 0.8), (0.85, 0.3, 0.2))
MUG_RADIUS, MUG_HEIGHT = 0.035, 0.085
HANDLE_REACH, HANDLE_LOW, HANDLE_HIGH, HANDLE_BAR = 0.03, 0.02, 0.07, 0.005   # the loop (mug frame), bar half size
HOLE = np.array([MUG_RADIUS + (HANDLE_REACH - HANDLE_BAR) / 2, 0.0, (HANDLE_LOW + HANDLE_HIGH) / 2])
POST_RADIUS, POST_HEIGHT = 0.012, 0.22
SPOKE_HEIGHTS = (0.12, 0.155, 0.19)   # where each spoke leaves the post, above the table
SPOKE_LENGTH, SPOKE_RISE, SPOKE_RADIUS = 0.1, np.radians(30), 0.005
HUNG_AT, LEAD_IN = 0.07, 0.05        # the handle ends this far along its spoke, and starts this far beyond
GRIP_BELOW_RIM = 0.015
SAFE_HEIGHT = 0.34                   # gripper tip above the table while carrying a mug over the tree


def _spoke_direction(azimuth: float) -> np.ndarray:
    return np.array([np.cos(SPOKE_RISE) * np.cos(azimuth), np.cos(SPOKE_RISE) * np.sin(azimuth), np.sin(SPOKE_RISE)])


def _wrap(angle: float) -> float:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _mug(name: str, rgb) -> str:
    r, reach, bar = MUG_RADIUS, HANDLE_REACH, HANDLE_BAR
    # The handle: a square loop of three bars (boxes draw far cheaper than capsules) and the wall.
    bar_x, bar_half_x = r + (reach - 0.004) / 2, (reach + 0.004) / 2
    color = f"{rgb[0]} {rgb[1]} {rgb[2]} 1"
    # A little damping on the free joint: a mug hanging by its handle settles within a second
    # instead of swinging on for many (it barely slows a fall).
    return f"""
    <body name="{name}">
      <joint name="{name}" type="free" damping="0.0005"/>
      <geom name="{name}" type="cylinder" size="{r} {MUG_HEIGHT / 2}" pos="0 0 {MUG_HEIGHT / 2}" mass="0.15" rgba="{color}"/>
      <geom type="cylinder" size="{r - 0.004} 0.0005" pos="0 0 {MUG_HEIGHT}" rgba="0.25 0.2 0.15 1" contype="0" conaffinity="0"/>
      <geom name="{name}_handle_top" type="box" size="{bar_half_x} {bar} {bar}" pos="{bar_x} 0 {HANDLE_HIGH}" mass="0.005" rgba="{color}"/>
      <geom name="{name}_handle_side" type="box" size="{bar} {bar} {(HANDLE_HIGH - HANDLE_LOW) / 2 + bar}" pos="{r + reach} 0 {(HANDLE_HIGH + HANDLE_LOW) / 2}" mass="0.005" rgba="{color}"/>
      <geom name="{name}_handle_bottom" type="box" size="{bar_half_x} {bar} {bar}" pos="{bar_x} 0 {HANDLE_LOW}" mass="0.005" rgba="{color}"/>
    </body>"""


def _spokes() -> str:
    parts = []
    for k, height in enumerate(SPOKE_HEIGHTS):
        azimuth = 2 * np.pi * k / 3
        root = np.array([POST_RADIUS * 0.5 * np.cos(azimuth), POST_RADIUS * 0.5 * np.sin(azimuth), height])
        tip = root + SPOKE_LENGTH * _spoke_direction(azimuth)
        parts.append(
            f'<geom name="spoke{k}" type="capsule" fromto="{root[0]:.4f} {root[1]:.4f} {root[2]:.4f} {tip[0]:.4f} {tip[1]:.4f} {tip[2]:.4f}" '
            f'size="{SPOKE_RADIUS}" rgba="0.5 0.33 0.18 1"/>'
            f'<geom type="sphere" size="0.008" pos="{tip[0]:.4f} {tip[1]:.4f} {tip[2]:.4f}" rgba="0.5 0.33 0.18 1"/>')
    return "".join(parts)


class PlaceCups(Task):
    name = "place_cups"
    variation_count = 3
    max_episode_steps = 220   # up to three mugs, each lifted over the tree (the expert needs <= 185)
    graspable = MUGS
    xml = f"""
    {ROUND_SHAPES}
    <worldbody>
      <body name="mug_tree" mocap="true">
        <geom name="tree_base" type="cylinder" size="0.07 0.006" pos="0 0 0.006" rgba="0.5 0.33 0.18 1"/>
        <geom name="tree_post" type="cylinder" size="{POST_RADIUS} {POST_HEIGHT / 2}" pos="0 0 {POST_HEIGHT / 2}" rgba="0.5 0.33 0.18 1"/>
        {_spokes()}
      </body>
      {"".join(_mug(name, rgb) for name, rgb in zip(MUGS, MUG_COLORS))}
    </worldbody>
    """

    def descriptions(self, variation):
        if variation == 0:
            return ["place 1 cup on the cup holder",
                    "pick up one cup and put it on the mug tree",
                    "move 1 mug from the table to the cup holder",
                    "pick up one cup and slide its handle onto a spoke on the mug holder"]
        count = variation + 1
        return [f"place {count} cups on the cup holder",
                f"pick up {count} cups and place them on the holder",
                f"move {count} cups from the table to the mug tree",
                f"pick up {count} mugs and slide their handles onto the cup holder spokes"]

    def init_episode(self, variation, rng):
        self.mugs_to_place = variation + 1
        self.tree = np.array([rng.uniform(0.1, 0.2), rng.uniform(0.1, 0.16), TABLE_HEIGHT])
        self.tree_yaw = rng.uniform(-np.pi / 2, np.pi / 2)   # RLBench's base rotation bounds
        self.set_mocap("mug_tree", self.tree, (np.cos(self.tree_yaw / 2), 0, 0, np.sin(self.tree_yaw / 2)))
        while True:   # mugs (handles included) well apart, in front of the tree
            points = rng.uniform((0.0, -0.3), (0.38, -0.06), size=(3, 2))
            if min(np.linalg.norm(points[i] - points[j]) for i, j in ((0, 1), (0, 2), (1, 2))) >= 0.15:
                break
        for name, (x, y) in zip(MUGS, points):
            yaw = rng.uniform(-np.pi, np.pi)
            self.set_free_body(name, (x, y, TABLE_HEIGHT), (np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)))

    def _spoke(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Root (world) and unit direction of spoke k."""
        azimuth = self.tree_yaw + 2 * np.pi * k / 3
        root = self.tree + np.array([POST_RADIUS * 0.5 * np.cos(azimuth), POST_RADIUS * 0.5 * np.sin(azimuth), SPOKE_HEIGHTS[k]])
        return root, _spoke_direction(azimuth)

    def handle_hole(self, mug: str) -> np.ndarray:
        body = self.data.body(mug)
        return body.xpos + body.xmat.reshape(3, 3) @ HOLE

    def on_spoke(self, mug: str) -> bool:
        hole = self.handle_hole(mug)
        for k in range(3):
            root, direction = self._spoke(k)
            along = np.dot(hole - root, direction)   # the spoke must pass through the handle
            if 0.0 < along < SPOKE_LENGTH and np.linalg.norm(hole - (root + along * direction)) < 0.025:
                return True
        return False

    def success(self):
        return all(self.on_spoke(mug) for mug in MUGS[:self.mugs_to_place]) and self.panda.grasped is None

    def waypoints(self):
        path = []
        for k, mug in enumerate(MUGS[:self.mugs_to_place]):
            position = self.body_position(mug)
            matrix = self.data.body(mug).xmat.reshape(3, 3)
            yaw = np.arctan2(matrix[1, 0], matrix[0, 0])
            root, direction = self._spoke(k)
            azimuth = self.tree_yaw + 2 * np.pi * k / 3
            # Hung, the mug's handle opening faces along the spoke, its body on whichever side of
            # the spoke needs the smaller turn (far enough out that a hung neighbour is clear).
            turn = min((_wrap(azimuth + side - yaw) for side in (-np.pi / 2, np.pi / 2)), key=abs)
            hung_yaw = yaw + turn
            # Grasp the rim where the gripper turns least, on the side away from the handle.
            rim_angle = _wrap(-turn / 2 - yaw - np.pi / 2)   # (mug frame) the finger line's angle
            if np.cos(rim_angle) > 0:
                rim_angle = _wrap(rim_angle + np.pi)
            grip_local = np.array([(MUG_RADIUS - 0.004) * np.cos(rim_angle), (MUG_RADIUS - 0.004) * np.sin(rim_angle),
                                   MUG_HEIGHT - GRIP_BELOW_RIM])
            grasp_yaw = yaw + rim_angle + np.pi / 2
            grasp_yaw = (grasp_yaw + np.pi / 2) % np.pi - np.pi / 2   # the fingers look the same turned half a turn
            hang_yaw = grasp_yaw + turn
            grasp_rotation = yaw_matrix(grasp_yaw) @ GRIPPER_DOWN
            hang_rotation = yaw_matrix(hang_yaw) @ GRIPPER_DOWN
            rim = position + yaw_matrix(yaw) @ grip_local
            # Tip positions that put the handle's opening at a point of the spoke (or its extension).
            tip_at = lambda along: root + along * direction + yaw_matrix(hung_yaw) @ (grip_local - HOLE)  # noqa: E731
            start, end = tip_at(HUNG_AT + LEAD_IN), tip_at(HUNG_AT)
            path += [
                Waypoint(rim + [0, 0, 0.06], grasp_rotation, 1.0, speed=0.7),
                Waypoint(rim, grasp_rotation, 0.0, speed=0.3),
                Waypoint(np.r_[rim[:2], TABLE_HEIGHT + SAFE_HEIGHT], grasp_rotation, 0.0, speed=0.7),
                Waypoint(np.r_[start[:2], TABLE_HEIGHT + SAFE_HEIGHT], hang_rotation, 0.0, speed=0.7),
                Waypoint(start, hang_rotation, 0.0, speed=0.5),
                Waypoint(end, hang_rotation, 1.0, speed=0.2),
            ]
            if k + 1 < self.mugs_to_place:   # back out along the spoke before fetching the next mug
                path.append(Waypoint(start + [0, 0, 0.03], hang_rotation, 1.0, speed=0.5))
        return path

    def low_dim_state(self):
        return np.concatenate([self.body_position(mug) for mug in MUGS] + [self.tree])
