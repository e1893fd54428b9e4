"""put_money_in_safe: put the stack of bank notes on the bottom, middle or top shelf of the open safe.

A safe (open, its door swung wide) with three shelves stands on the +y side of the table, facing
across it, turned by up to 45 degrees either way (a 90-degree range, as RLBench's base rotation);
a stack of notes lies on the -y side, turned by 0 to 90 degrees (RLBench's spawn rotation). Success
when the stack lies on the chosen shelf and the gripper holds nothing, as RLBench's proximity
sensor on that shelf and NothingGrasped. The expert grasps the stack from above by one end,
lifts it, turns it to point into the safe, slides it onto the shelf until only the gripped end
sticks out, and lets go. (RLBench's expert holds the stack tilted by about 40 degrees; ours
points straight down, which the arm reaches everywhere. The shelves and the roof start a little
behind the opening so that the hand clears them.)
"""

import numpy as np

from llarva_gym.backends.mujoco.task import GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint, yaw_matrix
from llarva_gym.backends.mujoco.tasks.close_jar import wrist_angle

OPTIONS = {0: "bottom", 1: "middle", 2: "top"}
# The safe, in its own frame: x into the safe from its opening (x = 0), y across, z up.
SAFE_DEPTH, SAFE_WIDTH, SAFE_HEIGHT = 0.25, 0.28, 0.36
WALL = 0.015
BOARD = 0.01
RECESS = 0.035            # the shelf boards and the roof start this far behind the opening
COMPARTMENT = (SAFE_HEIGHT - 2 * WALL - 2 * BOARD) / 3
MONEY_HALF = (0.075, 0.033, 0.012)
GRIP_FROM_END = 0.012     # the tip closes this far in from the stack's end
STICKS_OUT = 0.02         # on the shelf, the gripped end sticks out of the opening this far
STEEL, DARK_STEEL = "0.42 0.45 0.48 1", "0.3 0.32 0.35 1"


def shelf_floor(index: int) -> float:
    return WALL + index * (COMPARTMENT + BOARD)


def _hand_yaws(towards_middle, inwards, grip_point, before) -> tuple[float, float]:
    """The hand's yaw at the pick and in front of the safe. The hand turns the stack from
    `towards_middle` to `inwards`; pointing down, the gripper is the same turned by half a turn,
    so of the yaws that do this, take the pair that keeps the wrist furthest from its limits."""
    start = np.arctan2(towards_middle[1], towards_middle[0])
    turn = np.arctan2(inwards[1], inwards[0]) - start
    turn = (turn + np.pi) % (2 * np.pi) - np.pi

    def worst_wrist(yaw):
        return max(abs(wrist_angle(yaw, grip_point)), abs(wrist_angle(yaw + turn, before)))

    pick_yaw = min((start + k * np.pi for k in (-2, -1, 0, 1, 2)), key=worst_wrist)
    return pick_yaw, pick_yaw + turn


def _safe_xml() -> str:
    d, w, h, t = SAFE_DEPTH, SAFE_WIDTH / 2, SAFE_HEIGHT, WALL
    deep = (d - t - RECESS) / 2   # half depth of the recessed boards and roof (up to the back wall)
    boards = "".join(f'<geom type="box" size="{deep} {w - t} {BOARD / 2}" pos="{RECESS + deep} 0 {shelf_floor(i) - BOARD / 2}" rgba="{DARK_STEEL}"/>'
                     for i in (1, 2))
    # The door (for looks), swung open by 170 degrees about its hinge on the safe's +y front edge
    # (the side away from the front camera): it lies almost against that side wall, hiding
    # neither the opening nor the money from the camera.
    door_angle = np.deg2rad(-170)
    door_dir = np.array([np.sin(door_angle), -np.cos(door_angle)])
    door_centre = np.array([-0.02, w + 0.02]) + door_dir * w
    door_yaw = np.arctan2(door_dir[1], door_dir[0]) - np.pi / 2
    knob = door_centre + 0.03 * np.array([np.cos(door_yaw), np.sin(door_yaw)])
    return f"""
      <body name="safe" mocap="true">
        <geom type="box" size="{d / 2} {w} {t / 2}" pos="{d / 2} 0 {t / 2}" rgba="{STEEL}"/>
        <geom type="box" size="{deep} {w - t} {t / 2}" pos="{RECESS + deep} 0 {h - t / 2}" rgba="{STEEL}"/>
        <geom type="box" size="{d / 2} {t / 2} {h / 2}" pos="{d / 2} {w - t / 2} {h / 2}" rgba="{STEEL}"/>
        <geom type="box" size="{d / 2} {t / 2} {h / 2}" pos="{d / 2} {-w + t / 2} {h / 2}" rgba="{STEEL}"/>
        <geom type="box" size="{t / 2} {w} {h / 2}" pos="{d - t / 2} 0 {h / 2}" rgba="{STEEL}"/>
        {boards}
        <geom type="box" size="0.02 {w} {h / 2}" pos="{door_centre[0]} {door_centre[1]} {h / 2}" euler="0 0 {door_yaw}" rgba="{STEEL}" contype="0" conaffinity="0"/>
        <geom type="cylinder" size="0.035 0.012" pos="{knob[0]} {knob[1]} {h / 2}" euler="0 1.5708 {door_yaw}" rgba="0.75 0.7 0.3 1" contype="0" conaffinity="0"/>
      </body>"""


class PutMoneyInSafe(Task):
    name = "put_money_in_safe"
    variation_count = 3
    graspable = ("dollar_stack",)
    xml = f"""
    <worldbody>
      {_safe_xml()}
      <body name="dollar_stack" pos="0 -0.3 1.2">
        <freejoint/>
        <geom name="dollar_stack" type="box" size="{MONEY_HALF[0]} {MONEY_HALF[1]} {MONEY_HALF[2]}" mass="0.1" rgba="0.45 0.65 0.4 1" friction="0.8 0.005 0.0001"/>
        <geom type="box" size="0.012 {MONEY_HALF[1] + 0.0005} {MONEY_HALF[2] + 0.0005}" rgba="0.85 0.8 0.6 1" contype="0" conaffinity="0" mass="0"/>
      </body>
    </worldbody>"""

    def descriptions(self, variation):
        shelf = OPTIONS[variation]
        return [f"put the money away in the safe on the {shelf} shelf",
                f"leave the money on the {shelf} shelf on the safe",
                f"place the stack of bank notes on the {shelf} shelf of the safe"]

    def init_episode(self, variation, rng):
        self.variation = variation
        # Facing across the table (yaw 90 degrees) give or take 45 degrees. Facing more towards
        # the robot the safe stands further away, so that the arm reaching in is not folded
        # against its base.
        safe_yaw = rng.uniform(np.pi / 4, 3 * np.pi / 4)
        safe = (rng.uniform(0.12, 0.26) + 0.1 * np.cos(safe_yaw), rng.uniform(0.15, 0.25), TABLE_HEIGHT)
        self.set_mocap("safe", safe, (np.cos(safe_yaw / 2), 0.0, 0.0, np.sin(safe_yaw / 2)))
        money_yaw = rng.uniform(0.0, np.pi / 2)
        money = (rng.uniform(0.1, 0.35), rng.uniform(-0.27, -0.12), TABLE_HEIGHT + MONEY_HALF[2] + 0.0005)
        self.set_free_body("dollar_stack", money, (np.cos(money_yaw / 2), 0.0, 0.0, np.sin(money_yaw / 2)))

    def money_on_shelf(self, index: int) -> bool:
        safe = self.data.body("safe")
        local = safe.xmat.reshape(3, 3).T @ (self.body_position("dollar_stack") - safe.xpos)
        floor = shelf_floor(index)
        return bool(0.03 < local[0] < SAFE_DEPTH - WALL and abs(local[1]) < SAFE_WIDTH / 2 - WALL
                    and floor < local[2] < floor + 0.05)

    def success(self):
        return self.money_on_shelf(self.variation) and self.panda.grasped is None

    def waypoints(self):
        money = self.data.body("dollar_stack")
        along = money.xmat.reshape(3, 3)[:, 0]          # the stack's long axis
        safe = self.data.body("safe")
        safe_rotation = safe.xmat.reshape(3, 3)
        inwards = safe_rotation[:, 0]                    # into the safe through its opening
        # Grip the end from which the stack, turned to point into the safe, turns least; the
        # fingers close across the stack.
        towards_middle = along if along @ inwards >= 0 else -along
        grip_point = money.xpos - towards_middle * (MONEY_HALF[0] - GRIP_FROM_END)
        # On the shelf: 1 cm above it, the gripped end STICKS_OUT of the opening.
        inside = safe.xpos + safe_rotation @ np.array(
            [GRIP_FROM_END - STICKS_OUT, 0.0, shelf_floor(self.variation) + MONEY_HALF[2] + 0.01])
        before = inside - inwards * (2 * MONEY_HALF[0] + 0.03)
        pick_yaw, carry_yaw = _hand_yaws(towards_middle, inwards, grip_point, before)
        pick, carry = yaw_matrix(pick_yaw) @ GRIPPER_DOWN, yaw_matrix(carry_yaw) @ GRIPPER_DOWN
        up = np.array([0.0, 0.0, 0.08])
        return [
            Waypoint(grip_point + up, pick, 1.0, speed=0.6),
            Waypoint(grip_point, pick, 0.0, speed=0.25),         # grasp the stack's end
            Waypoint(grip_point + up, pick, 0.0, speed=0.3),
            Waypoint(before, carry, 0.0, speed=0.5),              # in front of the shelf
            Waypoint(inside, carry, 1.0, speed=0.2),              # slide it in, let go
            Waypoint(before, carry, 1.0, speed=0.3),
        ]

    def low_dim_state(self):
        return np.concatenate([self.body_position("dollar_stack"), self.body_position("safe")])
