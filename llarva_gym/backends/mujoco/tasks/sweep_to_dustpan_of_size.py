"""sweep_to_dustpan_of_size: grasp the broom, sweep the five dirt particles into the tall or short dustpan.

Variation 0 is the tall dustpan, 1 the short one, as RLBench. Both dustpans stand on the table,
one on each side of the dirt (sides drawn per episode); success when all five particles lie in
the chosen dustpan. The broom stands in its holder until grasped from above by its handle's end.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint

SIZES = ("tall", "short")
DIRT_COUNT = 5
DIRT_HALF = 0.008
HANDLE_TOP = 0.42          # above the table
GRIP_BELOW_TOP = 0.03      # the tip closes this far below the handle's end
BROOM_HOME = np.array([0.08, 0.0, TABLE_HEIGHT])
PAN_X = 0.275              # dustpans and dirt share this line across the table (along y)
PAN_Y = 0.25               # distance of each dustpan's centre from the middle
PAN_HALF = (0.09, 0.07)    # inner half extent (x, y) of a dustpan's floor
HEAD_HALF = (0.075, 0.012, 0.02)   # narrower than the pans, so the head sweeps in


def _dustpan(name: str, handle_height: float) -> str:
    hx, hy = PAN_HALF
    # Walls on three sides, the mouth facing the middle of the table; the floor is painted on the
    # table (no collision) so that the dirt slides in rather than climbing a lip.
    return f"""
    <body name="{name}" mocap="true">
      <geom name="{name}_floor" type="box" size="{hx} {hy} 0.001" pos="0 0 0.001" rgba="0.2 0.25 0.6 1" contype="0" conaffinity="0"/>
      <geom name="{name}_back" type="box" size="{hx + 0.01} 0.006 0.03" pos="0 {hy + 0.006} 0.03" rgba="0.2 0.25 0.6 1"/>
      <geom name="{name}_left" type="box" size="0.006 {hy} 0.025" pos="{-hx - 0.006} 0 0.025" rgba="0.2 0.25 0.6 1"/>
      <geom name="{name}_right" type="box" size="0.006 {hy} 0.025" pos="{hx + 0.006} 0 0.025" rgba="0.2 0.25 0.6 1"/>
      <geom name="{name}_handle" type="capsule" fromto="0 {hy + 0.012} 0.03 0 {hy + 0.05} {handle_height}" size="0.012" rgba="0.15 0.15 0.15 1" contype="0" conaffinity="0"/>
    </body>"""


def _dirt(i: int) -> str:
    return (f'<body name="dirt{i}"><freejoint/><geom name="dirt{i}" type="box" size="{DIRT_HALF} {DIRT_HALF} {DIRT_HALF}" '
            f'mass="0.004" friction="0.4 0.005 0.0001" rgba="0.35 0.22 0.1 1" condim="3"/></body>')


class SweepToDustpanOfSize(Task):
    name = "sweep_to_dustpan_of_size"
    aliases = ("sweep_to_dustpan",)
    variation_count = 2
    graspable = ("broom",)
    xml = f"""
    <worldbody>
      <body name="broom_holder" pos="{BROOM_HOME[0]} {BROOM_HOME[1]} {TABLE_HEIGHT}">
        <geom type="cylinder" size="0.03 0.01" pos="0 0 0.2" rgba="0.3 0.3 0.3 1" contype="0" conaffinity="0"/>
        <geom type="capsule" fromto="0.03 0 0 0.03 0 0.2" size="0.006" rgba="0.3 0.3 0.3 1" contype="0" conaffinity="0"/>
      </body>
      <body name="broom" pos="{BROOM_HOME[0]} {BROOM_HOME[1]} {TABLE_HEIGHT}">
        <freejoint/>
        <geom name="broom_handle" type="capsule" fromto="0 0 {2 * HEAD_HALF[2] + 0.004} 0 0 {HANDLE_TOP}" size="0.011" rgba="0.55 0.35 0.15 1" mass="0.15" contype="0" conaffinity="0"/>
        <geom name="broom_head" type="box" size="{HEAD_HALF[0]} {HEAD_HALF[1]} {HEAD_HALF[2]}" pos="0 0 {HEAD_HALF[2] + 0.004}" rgba="0.85 0.7 0.2 1" mass="0.1" friction="0.3 0.005 0.0001"/>
      </body>
      {_dustpan("dustpan_tall", 0.3)}
      {_dustpan("dustpan_short", 0.12)}
      {"".join(_dirt(i) for i in range(DIRT_COUNT))}
    </worldbody>
    <equality><weld name="broom_in_holder" body1="broom" solref="0.004 1"/></equality>
    """

    def descriptions(self, variation):
        size = SIZES[variation]
        return [f"sweep dirt to the {size} dustpan",
                f"sweep the dirt up into the {size} dustpan",
                f"use the broom to brush the dirt into the {size} dustpan",
                f"clean up the dirt with the {size} pan"]

    def init_episode(self, variation, rng):
        self.variation = variation
        self.set_free_body("broom", BROOM_HOME)
        self.data.eq_active[self.model.eq("broom_in_holder").id] = 1
        # The weld keeps the broom where it was when the model was compiled: its home pose.
        tall_side = rng.choice([-1.0, 1.0])
        for name, side in (("dustpan_tall", tall_side), ("dustpan_short", -tall_side)):
            # Mouth towards the middle: turn the pan half a turn when it sits on the -y side.
            quat = (1, 0, 0, 0) if side > 0 else (0, 0, 0, 1)
            self.set_mocap(name, (PAN_X, side * PAN_Y, TABLE_HEIGHT), quat)
        for i in range(DIRT_COUNT):
            position = (PAN_X + rng.uniform(-0.045, 0.045), rng.uniform(-0.06, 0.06), TABLE_HEIGHT + DIRT_HALF)
            self.set_free_body(f"dirt{i}", position)

    @property
    def chosen_pan(self) -> str:
        return f"dustpan_{SIZES[self.variation]}"

    def dirt_in_pan(self, pan: str) -> list[bool]:
        centre = self.body_position(pan)
        flip = 1.0 if self.data.body(pan).xmat[4] > 0 else -1.0   # pans on -y are turned
        inside = []
        for i in range(DIRT_COUNT):
            offset = (self.body_position(f"dirt{i}") - centre) * np.array([1.0, flip, 1.0])
            inside.append(bool(abs(offset[0]) < PAN_HALF[0] and abs(offset[1]) < PAN_HALF[1] + 0.005
                               and offset[2] < 0.05))
        return inside

    def success(self):
        return all(self.dirt_in_pan(self.chosen_pan))

    def waypoints(self):
        handle_top = self.body_position("broom") + np.array([0.0, 0.0, HANDLE_TOP])
        grasp = handle_top - np.array([0.0, 0.0, GRIP_BELOW_TOP])
        # Broom held vertically by its end: the head's bottom is this far below the gripper tip.
        hold_height = HANDLE_TOP - GRIP_BELOW_TOP
        pan_y = self.body_position(self.chosen_pan)[1]
        direction = np.sign(pan_y)
        dirt_y = np.array([self.body_position(f"dirt{i}")[1] for i in range(DIRT_COUNT)])
        start_y = (dirt_y.min() if direction > 0 else dirt_y.max()) - direction * 0.05
        end_y = pan_y - direction * (PAN_HALF[1] - 0.03)

        def broom_at(y, lift=0.0):
            return np.array([PAN_X, y, TABLE_HEIGHT + hold_height + lift])

        return [
            Waypoint(grasp + np.array([0, 0, 0.06]), GRIPPER_DOWN, 1.0, speed=0.6),
            Waypoint(grasp, GRIPPER_DOWN, 0.0, speed=0.3),
            Waypoint(grasp + np.array([0, 0, 0.05]), GRIPPER_DOWN, 0.0, speed=0.3),
            Waypoint(broom_at(start_y, lift=0.04), GRIPPER_DOWN, 0.0, speed=0.5),
            Waypoint(broom_at(start_y), GRIPPER_DOWN, 0.0, speed=0.3),
            Waypoint(broom_at(end_y), GRIPPER_DOWN, 0.0, speed=0.3),
        ]

    def low_dim_state(self):
        return np.concatenate([self.body_position(b) for b in
                               ("broom", "dustpan_tall", "dustpan_short", *[f"dirt{i}" for i in range(DIRT_COUNT)])])
