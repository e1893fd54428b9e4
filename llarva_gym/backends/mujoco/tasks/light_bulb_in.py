"""light_bulb_in: take the light bulb from the holder of the variation's colour and screw it into the lamp.

Two bulb holders (the target in colours[variation], the other in another colour drawn per
episode), each with a bulb standing in it, and a lamp with an empty socket. Success when the
target holder's bulb sits in the lamp's socket and the gripper holds nothing, as RLBench's
proximity sensor in the socket and NothingGrasped. The expert grasps the bulb by its glass, lifts
it over the lamp, lowers it into the socket while turning it a quarter turn clockwise and lets go.
What touches is boxes (flat, multi-point contacts): each bulb's base stands on a box inside its
holder or the socket; the glass, holders and lamp are for looks.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import COLORS, GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint, sample_separated, yaw_matrix
from llarva_gym.backends.mujoco.tasks.close_jar import wrist_yaw

HOLDER_RADIUS, HOLDER_HEIGHT = 0.032, 0.05
HOLDER_FLOOR = 0.03            # a bulb's base stands this high in its holder
BASE_RADIUS, BASE_HEIGHT = 0.012, 0.026
GLASS_RADIUS = 0.022
GLASS_CENTRE = BASE_HEIGHT + GLASS_RADIUS - 0.004   # above the bottom of the bulb (its origin)
SOCKET_FLOOR = 0.16            # the lamp's socket, above the table
SCREW_TURN = -np.pi / 2        # a quarter turn clockwise, seen from above
SPAWN_LOW, SPAWN_HIGH = (0.0, -0.28), (0.32, 0.28)
METAL = "0.6 0.6 0.62 1"


def _holder(i: int) -> str:
    return f"""
      <body name="bulb_holder{i}" mocap="true">
        <geom name="bulb_holder{i}" type="cylinder" size="{HOLDER_RADIUS} {HOLDER_HEIGHT / 2}" pos="0 0 {HOLDER_HEIGHT / 2}" contype="0" conaffinity="0"/>
        <geom type="box" size="0.015 0.015 {HOLDER_FLOOR / 2}" pos="0 0 {HOLDER_FLOOR / 2}" rgba="0 0 0 0" group="3"/>
      </body>"""


def _bulb(i: int) -> str:
    box = BASE_RADIUS / np.sqrt(2)
    return f"""
      <body name="bulb_phys{i}" pos="{i} 0 1.2">
        <freejoint/>
        <geom name="bulb_phys{i}" type="box" size="{box} {box} {BASE_HEIGHT / 2}" pos="0 0 {BASE_HEIGHT / 2}" mass="0.03" rgba="0 0 0 0" group="3" friction="0.8 0.005 0.0001"/>
        <geom type="cylinder" size="{BASE_RADIUS} {BASE_HEIGHT / 2}" pos="0 0 {BASE_HEIGHT / 2}" rgba="{METAL}" contype="0" conaffinity="0" mass="0"/>
        <geom name="bulb{i}" type="sphere" size="{GLASS_RADIUS}" pos="0 0 {GLASS_CENTRE}" rgba="0.95 0.95 0.9 1" contype="0" conaffinity="0" mass="0"/>
      </body>"""


class LightBulbIn(Task):
    name = "light_bulb_in"
    variation_count = len(COLORS)
    graspable = ("bulb_phys0", "bulb_phys1")
    xml = f"""
    <worldbody>
      {_holder(0)}
      {_holder(1)}
      {_bulb(0)}
      {_bulb(1)}
      <body name="lamp" mocap="true">
        <geom type="cylinder" size="0.06 0.008" pos="0 0 0.008" rgba="0.15 0.15 0.17 1" contype="0" conaffinity="0"/>
        <geom type="capsule" fromto="0 0 0.01 0 0 {SOCKET_FLOOR - 0.015}" size="0.012" rgba="0.15 0.15 0.17 1" contype="0" conaffinity="0"/>
        <geom name="lamp_socket" type="cylinder" size="0.02 0.013" pos="0 0 {SOCKET_FLOOR + 0.006}" rgba="{METAL}" contype="0" conaffinity="0"/>
        <geom type="box" size="0.015 0.015 0.01" pos="0 0 {SOCKET_FLOOR - 0.01}" rgba="0 0 0 0" group="3"/>
      </body>
    </worldbody>"""

    def descriptions(self, variation):
        color = COLORS[variation][0]
        return [f"screw in the {color} light bulb",
                f"screw the light bulb from the {color} holder into the lamp",
                f"pick up the light bulb from the {color} stand, lift it up to just above the lamp, "
                f"then screw it down into the lamp in a clockwise fashion",
                f"put the light bulb from the {color} casing into the lamp"]

    def init_episode(self, variation, rng):
        self.variation = variation
        # RLBench: the target holder is holder[index % 2]; the other takes another colour.
        target = variation % 2
        self.bulb = f"bulb_phys{target}"
        distractor = rng.choice([i for i in range(len(COLORS)) if i != variation])
        self.set_rgba(f"bulb_holder{target}", COLORS[variation][1])
        self.set_rgba(f"bulb_holder{1 - target}", COLORS[distractor][1])
        holder0, holder1, lamp = sample_separated(rng, 3, SPAWN_LOW, SPAWN_HIGH, min_distance=0.15)
        for i, holder in enumerate((holder0, holder1)):
            self.set_mocap(f"bulb_holder{i}", (*holder, TABLE_HEIGHT))
            self.set_free_body(f"bulb_phys{i}", (*holder, TABLE_HEIGHT + HOLDER_FLOOR + 0.0005))
        self.set_mocap("lamp", (*lamp, TABLE_HEIGHT))

    def bulb_in_lamp(self, bulb: str) -> bool:
        offset = self.body_position(bulb) - self.body_position("lamp")
        return bool(np.linalg.norm(offset[:2]) < 0.01 and abs(offset[2] - SOCKET_FLOOR) < 0.015)

    def success(self):
        return self.bulb_in_lamp(self.bulb) and self.panda.grasped is None

    def waypoints(self):
        glass = self.body_position(self.bulb) + np.array([0.0, 0.0, GLASS_CENTRE])
        in_socket = self.body_position("lamp") + np.array([0.0, 0.0, SOCKET_FLOOR + GLASS_CENTRE + 0.002])
        above_lamp = in_socket + np.array([0.0, 0.0, 0.05])
        yaw = wrist_yaw([glass, above_lamp], SCREW_TURN)
        hold, screwed = yaw_matrix(yaw) @ GRIPPER_DOWN, yaw_matrix(yaw + SCREW_TURN) @ GRIPPER_DOWN
        up = np.array([0.0, 0.0, 0.08])
        return [
            Waypoint(glass + up, hold, 1.0, speed=0.6),
            Waypoint(glass, hold, 0.0, speed=0.25),               # grasp the bulb by its glass
            Waypoint(np.r_[glass[:2], above_lamp[2]], hold, 0.0, speed=0.3),
            Waypoint(above_lamp, hold, 0.0, speed=0.4),
            Waypoint(in_socket, screwed, 1.0, speed=0.1),         # lower while screwing, let go
            Waypoint(in_socket + up, screwed, 1.0, speed=0.3),
        ]

    def low_dim_state(self):
        return np.concatenate([self.body_position(b) for b in ("bulb_phys0", "bulb_phys1", "bulb_holder0", "bulb_holder1", "lamp")])
