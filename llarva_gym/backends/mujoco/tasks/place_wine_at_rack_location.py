"""place_wine_at_rack_location: put the standing wine bottle into the middle, left or right slot of the rack.

As RLBench (PerAct's variation of its wine task): 3 variations, index 0 = middle, 1 = left,
2 = right; success when the bottle is detected in that slot and nothing is grasped. The rack
stands at the side of the table with its slots side by side along the table's depth, its mouth
towards the middle: its left slot is the one farther from the robot, its right the nearer one
(as a later fork of RLBench rewords them: "far side" and "near side").
The expert: above the bottle, down to its neck, grasp, lift, turn the bottle to lie along the
slot in front of its mouth, slide it in, let go.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint

# Cylinders, capsules and spheres drawn with fewer facets than MuJoCo's default (28 x 16): the same
# picture at 128 x 128, at half the software-rendering cost of this scene's round shapes.
ROUND_SHAPES = '<visual><quality numslices="20" numstacks="8"/></visual>'

LOCATIONS = ("middle", "left", "right")
SLOT_OFFSET = {"middle": 0.0, "left": 0.09, "right": -0.09}   # along x (away from the robot)
SLOT_FLOOR, SLOT_TOP, RACK_DEPTH = 0.04, 0.14, 0.16          # rack frame: y from the mouth inwards
BOTTLE_RADIUS, BODY_LENGTH = 0.03, 0.15
NECK_GRIP = 0.215       # the gripper closes on the neck this far above the bottle's bottom
LIFT = 0.3              # gripper tip above the table while the bottle turns over


def _rot(axis: str, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    if axis == "x":
        return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, -s, 0.0], [s, c, 0], [0, 0, 1]])


# Grasp the neck from above with the fingers closing along the rack's x; then turn the gripper to
# point along the rack's +y (into it) so that the bottle lies along the slot (rack frame).
NECK_GRASP = _rot("z", np.pi / 2) @ GRIPPER_DOWN
INTO_RACK = _rot("x", np.pi / 2) @ NECK_GRASP


def _rack() -> str:
    """An open wooden frame: front and back rails that the bottles lie across, posts between the
    slots, top rails and a back stop (the slots stay visible from the front camera)."""
    wood, parts = "0.55 0.36 0.2 1", []

    def box(name, half, pos):
        parts.append(f'<geom name="rack_{name}" type="box" size="{half[0]} {half[1]} {half[2]}" '
                     f'pos="{pos[0]} {pos[1]} {pos[2]}" rgba="{wood}"/>')

    post_half = (SLOT_TOP - SLOT_FLOOR) / 2
    for side, y in (("front", 0.012), ("back", RACK_DEPTH - 0.012)):
        box(f"{side}_rail", (0.145, 0.012, SLOT_FLOOR / 2), (0, y, SLOT_FLOOR / 2))
        box(f"{side}_top", (0.145, 0.012, 0.006), (0, y, SLOT_TOP + 0.006))
        for i, x in enumerate((-0.135, -0.045, 0.045, 0.135)):
            box(f"{side}_post{i}", (0.006, 0.012, post_half), (x, y, SLOT_FLOOR + post_half))
    box("stop", (0.145, 0.006, 0.012), (0, RACK_DEPTH + 0.006, SLOT_FLOOR + 0.03))
    return "".join(parts)


class PlaceWineAtRackLocation(Task):
    name = "place_wine_at_rack_location"
    variation_count = len(LOCATIONS)
    graspable = ("wine_bottle",)
    xml = f"""
    {ROUND_SHAPES}
    <worldbody>
      <body name="rack" mocap="true">{_rack()}</body>
      <body name="wine_bottle">
        <freejoint/>
        <geom name="bottle_body" type="cylinder" size="{BOTTLE_RADIUS} {BODY_LENGTH / 2}" pos="0 0 {BODY_LENGTH / 2}" mass="0.4" rgba="0.1 0.32 0.14 1"/>
        <geom name="bottle_shoulder" type="capsule" fromto="0 0 {BODY_LENGTH} 0 0 {BODY_LENGTH + 0.015}" size="0.022" mass="0.02" rgba="0.1 0.32 0.14 1"/>
        <geom name="bottle_neck" type="cylinder" size="0.011 0.035" pos="0 0 0.205" mass="0.02" rgba="0.1 0.32 0.14 1"/>
        <geom name="bottle_foil" type="cylinder" size="0.0125 0.015" pos="0 0 0.228" mass="0.005" rgba="0.45 0.05 0.08 1" contype="0" conaffinity="0"/>
        <geom name="bottle_label" type="cylinder" size="{BOTTLE_RADIUS + 0.0005} 0.035" pos="0 0 0.08" rgba="0.92 0.88 0.75 1" contype="0" conaffinity="0"/>
      </body>
    </worldbody>
    """

    def descriptions(self, variation):
        location = LOCATIONS[variation]
        return [f"stack the wine bottle to the {location} of the rack",
                f"slide the bottle onto the {location} part of the rack",
                f"put the wine on the {location}",
                f"leave the wine on the {location} section of the shelf",
                f"grasp the bottle and put it away on the {location}"]

    def init_episode(self, variation, rng):
        self.location = LOCATIONS[variation]
        # The rack's mouth (its frame's origin) on the +y side, facing -y and turned a little (RLBench
        # turns the whole task; turned towards the robot, the far slot is out of the arm's reach);
        # the bottle standing nearer the middle.
        self.rack = np.array([rng.uniform(0.15, 0.23), rng.uniform(0.12, 0.16), TABLE_HEIGHT])
        self.rack_yaw = rng.uniform(-np.pi / 8, np.pi / 16)
        self.set_mocap("rack", self.rack, (np.cos(self.rack_yaw / 2), 0, 0, np.sin(self.rack_yaw / 2)))
        self.set_free_body("wine_bottle", (rng.uniform(0.05, 0.35), rng.uniform(-0.25, -0.08), TABLE_HEIGHT))

    def _in_rack_frame(self, point) -> np.ndarray:
        return _rot("z", self.rack_yaw) @ np.asarray(point) + self.rack

    def _slot_centre(self, location: str) -> np.ndarray:
        return self._in_rack_frame((SLOT_OFFSET[location], RACK_DEPTH / 2, (SLOT_FLOOR + SLOT_TOP) / 2))

    def bottle_in_slot(self, location: str) -> bool:
        bottle = self.data.body("wine_bottle")
        centre = bottle.xpos + bottle.xmat.reshape(3, 3)[:, 2] * BODY_LENGTH / 2   # middle of its body
        offset = np.abs(_rot("z", self.rack_yaw).T @ (centre - self._slot_centre(location)))
        return bool(offset[0] < 0.04 and offset[1] < RACK_DEPTH / 2 and offset[2] < (SLOT_TOP - SLOT_FLOOR) / 2)

    def success(self):
        return self.bottle_in_slot(self.location) and self.panda.grasped is None

    def waypoints(self):
        neck = self.body_position("wine_bottle") + np.array([0.0, 0.0, NECK_GRIP])
        turn = _rot("z", self.rack_yaw)
        grasp, into_rack = turn @ NECK_GRASP, turn @ INTO_RACK
        # Lying along the slot, the bottle's bottom is NECK_GRIP ahead of the gripper tip.
        height = SLOT_FLOOR + BOTTLE_RADIUS + 0.004
        in_front = self._in_rack_frame((SLOT_OFFSET[self.location], -NECK_GRIP - 0.03, height))
        inside = self._in_rack_frame((SLOT_OFFSET[self.location], RACK_DEPTH - 0.015 - NECK_GRIP, height))
        return [
            Waypoint(neck + [0, 0, 0.06], grasp, 1.0, speed=0.6),
            Waypoint(neck, grasp, 0.0, speed=0.3),
            Waypoint(np.r_[neck[:2], TABLE_HEIGHT + LIFT], grasp, 0.0, speed=0.5),
            Waypoint(np.r_[in_front[:2], TABLE_HEIGHT + LIFT], into_rack, 0.0, speed=0.5),
            Waypoint(in_front, into_rack, 0.0, speed=0.4),
            Waypoint(inside, into_rack, 1.0, speed=0.25),
        ]

    def low_dim_state(self):
        return np.concatenate([self.body_position("wine_bottle"), self._slot_centre(self.location)])
