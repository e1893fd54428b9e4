"""close_jar: pick the lid up from the table and screw it onto the jar of the variation's colour.

Two jars (the target in colours[variation], the other in another colour drawn per episode) and a
lid stand on the table. Success when the lid sits on the target jar's mouth and the gripper holds
nothing, as RLBench's proximity sensor above the jar and NothingGrasped. The expert grasps the
lid from above, carries it over the jar, lowers it while turning it a quarter turn clockwise and
lets go. Jars and lid are cylinders to look at; what touches is boxes (flat, multi-point
contacts that let the lid rest still).
"""

import numpy as np

from llarva_gym.backends.mujoco.task import COLORS, GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint, sample_separated, yaw_matrix

JAR_RADIUS, JAR_HEIGHT = 0.035, 0.08
NECK_RADIUS, NECK_TOP = 0.026, 0.095      # the mouth, above the table
LID_RADIUS, LID_HALF_HEIGHT = 0.03, 0.011
LID_BOX = LID_RADIUS / np.sqrt(2)        # half side of the square inside the lid's circle
SCREW_TURN = -np.pi / 2                   # a quarter turn clockwise, seen from above
SPAWN_LOW, SPAWN_HIGH = (0.0, -0.28), (0.32, 0.28)


def _jar(name: str) -> str:
    # The body (coloured), its neck and, for the lid to rest on, a box inside the neck.
    box = NECK_RADIUS / np.sqrt(2)
    return f"""
      <body name="{name}" mocap="true">
        <geom name="{name}" type="cylinder" size="{JAR_RADIUS} {JAR_HEIGHT / 2}" pos="0 0 {JAR_HEIGHT / 2}" contype="0" conaffinity="0"/>
        <geom name="{name}_neck" type="cylinder" size="{NECK_RADIUS} {(NECK_TOP - JAR_HEIGHT) / 2}" pos="0 0 {(NECK_TOP + JAR_HEIGHT) / 2}" rgba="0.85 0.9 0.95 1" contype="0" conaffinity="0"/>
        <geom type="box" size="{box} {box} {NECK_TOP / 2}" pos="0 0 {NECK_TOP / 2}" rgba="0 0 0 0" group="3"/>
      </body>"""


def wrist_angle(yaw: float, point) -> float:
    """About where joint 7 (the wrist, limits +-2.9 rad) sits with the gripper pointing down,
    turned by `yaw` about the vertical (0: GRIPPER_DOWN), its tip at `point` (measured on the
    expert's motions). Expert plans pick among equivalent grips the one that keeps it small: a
    wrist driven into its limit stalls the straight-line motion."""
    bearing = np.arctan2(point[1], point[0] + 0.3)   # of the point, seen from the robot's base
    return 0.785 - yaw + 1.5 * bearing


def wrist_yaw(points, turn: float = 0.0) -> float:
    """A gripper yaw to hold at all `points` and then turn by `turn` at the last, that keeps the
    wrist furthest from its limits."""
    def worst(yaw):
        return max([abs(wrist_angle(yaw, p)) for p in points] + [abs(wrist_angle(yaw + turn, points[-1]))])

    return min(np.linspace(-np.pi, np.pi, 73), key=worst)


class CloseJar(Task):
    name = "close_jar"
    variation_count = len(COLORS)
    graspable = ("jar_lid0",)
    xml = f"""
    <worldbody>
      {_jar("jar0")}
      {_jar("jar1")}
      <body name="jar_lid0" pos="0 0 1.0">
        <freejoint/>
        <geom type="cylinder" size="{LID_RADIUS} {LID_HALF_HEIGHT}" rgba="0.55 0.55 0.58 1" contype="0" conaffinity="0" mass="0"/>
        <geom name="jar_lid0" type="box" size="{LID_BOX} {LID_BOX} {LID_HALF_HEIGHT}" mass="0.05" rgba="0 0 0 0" group="3" friction="0.8 0.005 0.0001"/>
      </body>
    </worldbody>"""

    def descriptions(self, variation):
        color = COLORS[variation][0]
        return [f"close the {color} jar",
                f"screw on the {color} jar lid",
                f"grasping the lid, lift it from the table and use it to seal the {color} jar",
                f"pick up the lid from the table and put it on the {color} jar"]

    def init_episode(self, variation, rng):
        self.variation = variation
        # RLBench: the target jar is jar[index % 2]; the other takes a colour other than the target's.
        self.target, other = f"jar{variation % 2}", f"jar{1 - variation % 2}"
        distractor = rng.choice([i for i in range(len(COLORS)) if i != variation])
        self.set_rgba(self.target, COLORS[variation][1])
        self.set_rgba(other, COLORS[distractor][1])
        jar0, jar1, lid = sample_separated(rng, 3, SPAWN_LOW, SPAWN_HIGH, min_distance=0.13)
        self.set_mocap("jar0", (*jar0, TABLE_HEIGHT))
        self.set_mocap("jar1", (*jar1, TABLE_HEIGHT))
        self.set_free_body("jar_lid0", (*lid, TABLE_HEIGHT + LID_HALF_HEIGHT + 0.0005))

    def lid_on(self, jar: str) -> bool:
        offset = self.body_position("jar_lid0") - self.body_position(jar)
        return bool(np.linalg.norm(offset[:2]) < 0.012 and NECK_TOP < offset[2] < NECK_TOP + 0.03)

    def success(self):
        return self.lid_on(self.target) and self.panda.grasped is None

    def waypoints(self):
        lid = self.body_position("jar_lid0")
        jar = self.body_position(self.target)
        on_jar = jar + np.array([0.0, 0.0, NECK_TOP + LID_HALF_HEIGHT + 0.002])
        above_jar = on_jar + np.array([0.0, 0.0, 0.05])
        yaw = wrist_yaw([lid, above_jar], SCREW_TURN)
        hold, screwed = yaw_matrix(yaw) @ GRIPPER_DOWN, yaw_matrix(yaw + SCREW_TURN) @ GRIPPER_DOWN
        up = np.array([0.0, 0.0, 0.08])
        return [
            Waypoint(lid + up, hold, 1.0, speed=0.6),
            Waypoint(lid, hold, 0.0, speed=0.25),               # grasp the lid
            Waypoint(np.r_[lid[:2], above_jar[2]], hold, 0.0, speed=0.3),
            Waypoint(above_jar, hold, 0.0, speed=0.4),
            Waypoint(on_jar, screwed, 1.0, speed=0.1),          # lower while screwing, let go
            Waypoint(on_jar + up, screwed, 1.0, speed=0.3),
        ]

    def low_dim_state(self):
        return np.concatenate([self.body_position("jar_lid0"), self.body_position("jar0"), self.body_position("jar1")])
