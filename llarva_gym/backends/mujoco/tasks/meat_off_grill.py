"""meat_off_grill: take the chicken (variation 0) or the steak (1) off the grill and set it down beside it.

As RLBench: both pieces of meat lie on the grill's grate, the grill (with its open lid) is placed
and turned per episode, and success is the chosen piece inside the detector volume on the table
next to the grill with nothing grasped. The expert's waypoints are RLBench's: above the meat, down
to it, grasp, lift, over the side of the grill, down, release.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint

MEAT = ("chicken", "steak")
GRILL_HALF = (0.12, 0.09, 0.05)         # the grill's box (x, y, z half extents), standing on the table
GRATE_TOP = 2 * GRILL_HALF[2] + 0.004   # height of the grate's surface above the table
# Where each piece lies on the grate, in the grill's frame (x, y), and its half height.
ON_GRILL = {"chicken": (0.0, -0.045), "steak": (0.0, 0.045)}
MEAT_HALF_HEIGHT = {"chicken": 0.018, "steak": 0.009}
# RLBench's success sensor: a volume on the table beside the grill (grill frame), half extents.
ZONE_CENTRE = (0.0, 0.235)
ZONE_HALF = (0.09, 0.075, 0.08)


def _grate_bars() -> str:
    return "".join(
        f'<geom type="box" size="{GRILL_HALF[0] - 0.01} 0.004 0.002" pos="0 {y:.3f} {GRATE_TOP - 0.002}" '
        f'rgba="0.6 0.6 0.62 1" contype="0" conaffinity="0"/>' for y in np.linspace(-0.07, 0.07, 6))


class MeatOffGrill(Task):
    name = "meat_off_grill"
    variation_count = 2
    graspable = MEAT
    xml = f"""
    <worldbody>
      <body name="grill" mocap="true">
        <geom name="grill_box" type="box" size="{GRILL_HALF[0]} {GRILL_HALF[1]} {GRILL_HALF[2]}" pos="0 0 {GRILL_HALF[2]}" rgba="0.12 0.12 0.13 1"/>
        <!-- The grate: the surface the meat rests on, drawn as bars over a dark pan. -->
        <geom name="grill_grate" type="box" size="{GRILL_HALF[0] - 0.01} {GRILL_HALF[1] - 0.01} 0.002" pos="0 0 {GRATE_TOP - 0.002}" rgba="0.05 0.05 0.05 1"/>
        {_grate_bars()}
        <!-- The lid, opened up at the back (towards the robot). -->
        <geom type="box" size="0.006 {GRILL_HALF[1]} 0.08" pos="{-GRILL_HALF[0] - 0.02} 0 {2 * GRILL_HALF[2] + 0.07}" euler="0 -0.25 0" rgba="0.12 0.12 0.13 1" contype="0" conaffinity="0"/>
        <geom type="capsule" fromto="{GRILL_HALF[0]} -0.04 0.07 {GRILL_HALF[0]} 0.04 0.07" size="0.008" rgba="0.6 0.6 0.62 1" contype="0" conaffinity="0"/>
      </body>
      <body name="chicken">
        <freejoint/>
        <geom name="chicken" type="capsule" size="{MEAT_HALF_HEIGHT['chicken']} 0.03" euler="0 1.5708 0" mass="0.1" rgba="0.85 0.58 0.3 1"/>
        <geom type="capsule" fromto="0.045 0 0 0.075 0 0.004" size="0.006" rgba="0.95 0.92 0.85 1" contype="0" conaffinity="0"/>
      </body>
      <body name="steak">
        <freejoint/>
        <geom name="steak" type="box" size="0.045 0.032 {MEAT_HALF_HEIGHT['steak']}" mass="0.1" rgba="0.55 0.16 0.12 1"/>
      </body>
    </worldbody>
    """

    def descriptions(self, variation):
        meat = MEAT[variation]
        return [f"take the {meat} off the grill",
                f"pick up the {meat} and place it next to the grill",
                f"remove the {meat} from the grill and set it down to the side"]

    def init_episode(self, variation, rng):
        self.meat = MEAT[variation]
        # RLBench places and turns the whole task (grill, meat and sensor) within the workspace.
        self.grill_yaw = rng.uniform(-np.pi / 4, np.pi / 4)
        self.grill_centre = np.array([rng.uniform(0.18, 0.3), rng.uniform(-0.15, 0.0), TABLE_HEIGHT])
        self.set_mocap("grill", self.grill_centre, (np.cos(self.grill_yaw / 2), 0, 0, np.sin(self.grill_yaw / 2)))
        for meat in MEAT:
            x, y = ON_GRILL[meat]
            position = self._to_world(x, y, GRATE_TOP + MEAT_HALF_HEIGHT[meat])
            self.set_free_body(meat, position, (np.cos(self.grill_yaw / 2), 0, 0, np.sin(self.grill_yaw / 2)))

    def _to_world(self, x, y, height):
        c, s = np.cos(self.grill_yaw), np.sin(self.grill_yaw)
        return self.grill_centre + np.array([c * x - s * y, s * x + c * y, height])

    def _in_zone(self, meat: str) -> bool:
        offset = self.body_position(meat) - self._to_world(*ZONE_CENTRE, 0.0)
        c, s = np.cos(self.grill_yaw), np.sin(self.grill_yaw)
        local = np.array([c * offset[0] + s * offset[1], -s * offset[0] + c * offset[1], offset[2]])
        return bool(abs(local[0]) < ZONE_HALF[0] and abs(local[1]) < ZONE_HALF[1] and 0 < local[2] < 2 * ZONE_HALF[2])

    def success(self):
        return self._in_zone(self.meat) and self.panda.grasped is None

    def waypoints(self):
        c, s = np.cos(self.grill_yaw), np.sin(self.grill_yaw)
        # Fingers close across the meat (the grill's y axis).
        rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ GRIPPER_DOWN
        meat = self.body_position(self.meat)
        up = np.array([0.0, 0.0, 1.0])
        place = self._to_world(*ZONE_CENTRE, MEAT_HALF_HEIGHT[self.meat] + 0.012)
        return [
            Waypoint(meat + 0.08 * up, rotation, 1.0, speed=0.6),
            Waypoint(meat, rotation, 0.0, speed=0.3),
            Waypoint(meat + 0.12 * up, rotation, 0.0, speed=0.4),
            Waypoint(place + (meat[2] + 0.12 - place[2]) * up, rotation, 0.0, speed=0.5),
            Waypoint(place, rotation, 1.0, speed=0.4),
        ]

    def low_dim_state(self):
        return np.concatenate([self.body_position("chicken"), self.body_position("steak"),
                               self._to_world(*ZONE_CENTRE, 0.0)])
