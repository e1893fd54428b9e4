"""put_groceries_in_cupboard: put the variation's grocery item on the cupboard's bottom shelf.

As RLBench: 9 variations, one per grocery (crackers, two jellos, soup, tuna, spam, coffee, mustard,
sugar); all nine stand on the table, spread at random positions and headings; success when the
chosen item is detected on the bottom shelf and nothing is grasped. The cupboard stands at the
side of the table, open towards the middle. The expert: above the item, down to its grasp point
(the middle of its top), grasp, lift clear of the others, carry it in front of the bottom shelf
turned to face it, slide it in, let go. The groceries are boxes and cylinders sized like RLBench's
(YCB-like) items, a little smaller so that all nine fit the table.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint

# Cylinders, capsules and spheres drawn with fewer facets than MuJoCo's default (28 x 16): the same
# picture at 128 x 128, at half the software-rendering cost of this scene's round shapes.
ROUND_SHAPES = '<visual><quality numslices="20" numstacks="8"/></visual>'

# name: (shape, half extents (box: x, y, z) or (radius, half height), rgb); boxes' narrow side is y.
GROCERIES = {
    "crackers": ("box", (0.05, 0.018, 0.07), (0.85, 0.22, 0.12)),
    "chocolate jello": ("box", (0.036, 0.015, 0.028), (0.42, 0.25, 0.15)),
    "strawberry jello": ("box", (0.036, 0.015, 0.028), (0.92, 0.35, 0.45)),
    "soup": ("cylinder", (0.033, 0.048), (0.8, 0.12, 0.1)),
    "tuna": ("cylinder", (0.04, 0.017), (0.3, 0.45, 0.75)),
    "spam": ("box", (0.045, 0.024, 0.035), (0.15, 0.25, 0.55)),
    "coffee": ("cylinder", (0.042, 0.065), (0.35, 0.2, 0.1)),
    "mustard": ("box", (0.03, 0.02, 0.068), (0.95, 0.85, 0.1)),
    "sugar": ("box", (0.04, 0.018, 0.065), (0.95, 0.93, 0.85)),
}
GROCERY_NAMES = list(GROCERIES)
BODIES = [name.replace(" ", "_") for name in GROCERY_NAMES]
# The cupboard's frame: origin at the middle of its open front at table height, y into it.
CUPBOARD_HALF_WIDTH, CUPBOARD_DEPTH = 0.17, 0.17
SHELF_FLOOR, SHELF_CEILING, TOP = 0.03, 0.46, 0.6   # bottom shelf: floor, ceiling (the wrist fits under it); top
GRIP_BELOW_TOP = 0.015   # the gripper tip closes this far below an item's top
CARRY_CLEARANCE = 0.17   # item bottoms clear the table by this much while carried


def _half_height(name: str) -> float:
    shape, size, _ = GROCERIES[name]
    return size[2] if shape == "box" else size[1]


def _footprint(name: str) -> float:
    shape, size, _ = GROCERIES[name]
    return float(np.hypot(size[0], size[1])) if shape == "box" else size[0]


def _grocery(name: str) -> str:
    shape, size, rgb = GROCERIES[name]
    body = name.replace(" ", "_")
    rgba = f"{rgb[0]} {rgb[1]} {rgb[2]} 1"
    if shape == "box":
        geom = f'<geom name="{body}" type="box" size="{size[0]} {size[1]} {size[2]}" mass="0.15" rgba="{rgba}"/>'
        if name == "mustard":   # the cap
            geom += (f'<geom type="cylinder" size="0.01 0.01" pos="0 0 {size[2] + 0.01}" rgba="0.95 0.85 0.1 1" '
                     f'contype="0" conaffinity="0"/>')
    else:
        geom = (f'<geom name="{body}" type="cylinder" size="{size[0]} {size[1]}" mass="0.15" rgba="{rgba}"/>'
                f'<geom type="cylinder" size="{size[0] + 0.0005} {size[1] * 0.4}" rgba="0.93 0.93 0.9 1" '
                f'contype="0" conaffinity="0"/>')   # a label
    return f'<body name="{body}"><freejoint/>{geom}</body>'


def _cupboard() -> str:
    white, parts = "0.9 0.9 0.88 1", []

    def board(name, half, pos):
        parts.append(f'<geom name="cupboard_{name}" type="box" size="{half[0]} {half[1]} {half[2]}" '
                     f'pos="{pos[0]} {pos[1]} {pos[2]}" rgba="{white}"/>')

    w, d = CUPBOARD_HALF_WIDTH, CUPBOARD_DEPTH
    board("floor", (w, d / 2, SHELF_FLOOR / 2), (0, d / 2, SHELF_FLOOR / 2))
    board("shelf", (w, d / 2, 0.006), (0, d / 2, SHELF_CEILING + 0.006))
    board("top", (w + 0.01, d / 2 + 0.005, 0.008), (0, d / 2, TOP + 0.008))
    board("back", (w, 0.005, TOP / 2), (0, d + 0.005, TOP / 2))
    for side, x in (("left", -w - 0.005), ("right", w + 0.005)):
        board(side, (0.005, d / 2 + 0.005, TOP / 2 + 0.008), (x, d / 2, TOP / 2 + 0.008))
    return "".join(parts)


def _down(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ GRIPPER_DOWN


class PutGroceriesInCupboard(Task):
    name = "put_groceries_in_cupboard"
    variation_count = len(GROCERY_NAMES)
    graspable = tuple(BODIES)
    xml = f"""
    {ROUND_SHAPES}
    <worldbody>
      <body name="cupboard" mocap="true">{_cupboard()}</body>
      {"".join(_grocery(name) for name in GROCERY_NAMES)}
    </worldbody>
    """

    def descriptions(self, variation):
        grocery = GROCERY_NAMES[variation]
        return [f"put the {grocery} in the cupboard",
                f"pick up the {grocery} and place it in the cupboard",
                f"move the {grocery} to the bottom shelf",
                f"put away the {grocery} in the cupboard"]

    def init_episode(self, variation, rng):
        self.grocery = GROCERY_NAMES[variation]
        self.cupboard = np.array([rng.uniform(0.17, 0.23), rng.uniform(0.19, 0.21), TABLE_HEIGHT])
        self.set_mocap("cupboard", self.cupboard)
        # RLBench's spawn boundary: every item upright, turned at random, apart from the others.
        while True:
            placed: list[tuple[np.ndarray, float]] = []
            for name in GROCERY_NAMES:
                for _ in range(200):
                    point = rng.uniform((0.0, -0.3), (0.38, 0.03))
                    if all(np.linalg.norm(point - p) >= r + _footprint(name) + 0.01 for p, r in placed):
                        placed.append((point, _footprint(name)))
                        break
                else:
                    break
            if len(placed) == len(GROCERY_NAMES):
                break
        for name, body, (point, _) in zip(GROCERY_NAMES, BODIES, placed):
            yaw = rng.uniform(-np.pi, np.pi)
            self.set_free_body(body, (*point, TABLE_HEIGHT + _half_height(name)), (np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)))

    def on_bottom_shelf(self, name: str) -> bool:
        offset = self.body_position(name.replace(" ", "_")) - self.cupboard
        return bool(abs(offset[0]) < CUPBOARD_HALF_WIDTH and 0 < offset[1] < CUPBOARD_DEPTH
                    and SHELF_FLOOR < offset[2] < SHELF_CEILING)

    def success(self):
        return self.on_bottom_shelf(self.grocery) and self.panda.grasped is None

    def waypoints(self):
        body = self.grocery.replace(" ", "_")
        item = self.body_position(body)
        height = _half_height(self.grocery)
        grip = item + np.array([0.0, 0.0, height - GRIP_BELOW_TOP])
        # Fingers across the box's narrow side; any heading for a can. At the shelf the box faces it.
        matrix = self.data.body(body).xmat.reshape(3, 3)
        yaw = np.arctan2(matrix[1, 0], matrix[0, 0]) if GROCERIES[self.grocery][0] == "box" else 0.0
        yaw = (yaw + np.pi / 2) % np.pi - np.pi / 2
        tip_above_bottom = 2 * height - GRIP_BELOW_TOP
        carry_z = TABLE_HEIGHT + CARRY_CLEARANCE + tip_above_bottom
        shelf_z = self.cupboard[2] + SHELF_FLOOR + 0.006 + tip_above_bottom
        depth = _footprint(self.grocery) if GROCERIES[self.grocery][0] == "cylinder" else GROCERIES[self.grocery][1][1]
        in_front = np.array([self.cupboard[0], self.cupboard[1] - depth - 0.012, shelf_z])
        inside = np.array([self.cupboard[0], self.cupboard[1] + 0.075, shelf_z])
        return [
            Waypoint(grip + [0, 0, 0.06], _down(yaw), 1.0, speed=0.6),
            Waypoint(grip, _down(yaw), 0.0, speed=0.3),
            Waypoint(np.r_[grip[:2], carry_z], _down(yaw), 0.0, speed=0.5),
            Waypoint(np.r_[in_front[:2], carry_z], _down(0.0), 0.0, speed=0.6),
            Waypoint(in_front, _down(0.0), 0.0, speed=0.4),
            Waypoint(inside, _down(0.0), 1.0, speed=0.3),
        ]

    def low_dim_state(self):
        return np.concatenate([self.body_position(body) for body in BODIES] + [self.cupboard])
