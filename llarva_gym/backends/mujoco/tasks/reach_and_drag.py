"""reach_and_drag: pick up the stick by one end and drag the cube onto the target with its other end.

RLBench's objects: a stick (graspable), a cube and a target square whose colour is the variation's
(20 colours). Success when the cube sits on the target (RLBench's sensor over the square). Here the
target lies nearer the robot than the cube, and the stick lies on the table beside them, across the
table (along y). The expert grasps the stick near one end, carries it over the far side of the
cube, lowers it and rakes the cube towards the robot onto the target.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import COLORS, GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint

STICK_HALF = (0.01, 0.11, 0.01)   # a square rod lying along y
GRASP_FROM_END = 0.025            # the tip closes this far from the stick's end
CUBE_HALF = 0.025
TARGET_HALF = 0.045
CLEARANCE = 0.015                 # between the lowered stick and the cube's far face
STICK_ABOVE_TABLE = 0.004         # the held stick skims the table without touching it
# Fingers closing along x: the gripper turned a quarter turn, so a stick along y lies between them.
ACROSS_X = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ GRIPPER_DOWN


class ReachAndDrag(Task):
    name = "reach_and_drag"
    variation_count = len(COLORS)
    graspable = ("stick",)
    xml = f"""
    <worldbody>
      <body name="target" mocap="true">
        <geom name="target" type="box" size="{TARGET_HALF} {TARGET_HALF} 0.0005" pos="0 0 0.0005" contype="0" conaffinity="0"/>
      </body>
      <body name="cube">
        <freejoint/>
        <geom name="cube" type="box" size="{CUBE_HALF} {CUBE_HALF} {CUBE_HALF}" mass="0.1"
              friction="0.5 0.005 0.0001" rgba="0.15 0.35 0.75 1"/>
      </body>
      <body name="stick">
        <freejoint/>
        <geom name="stick" type="box" size="{STICK_HALF[0]} {STICK_HALF[1]} {STICK_HALF[2]}" mass="0.05"
              friction="0.8 0.005 0.0001" rgba="0.45 0.3 0.15 1"/>
      </body>
    </worldbody>
    """

    def descriptions(self, variation):
        color = COLORS[variation][0]
        return [f"use the stick to drag the cube onto the {color} target",
                f"pick up the stick and use it to push or pull the cube onto the {color} target",
                f"drag the block towards the {color} square on the table top",
                f"grasping the stick by one end, pick it up and use the its other end to move the "
                f"block onto the {color} target"]

    def init_episode(self, variation, rng):
        self.set_rgba("target", COLORS[variation][1])
        # The stick on one side of the table, the cube and its target on the other.
        side = rng.choice([-1.0, 1.0])
        stick = (rng.uniform(0.05, 0.3), side * rng.uniform(0.17, 0.21), TABLE_HEIGHT + STICK_HALF[2])
        cube = np.array([rng.uniform(0.22, 0.32), -side * rng.uniform(0.0, 0.1), TABLE_HEIGHT + CUBE_HALF])
        target = cube - np.array([rng.uniform(0.13, 0.18), 0.0, CUBE_HALF])
        self.set_free_body("stick", stick)
        self.set_free_body("cube", cube)
        self.set_mocap("target", target)

    def success(self):
        offset = self.body_position("cube") - self.body_position("target")
        return bool(np.all(np.abs(offset[:2]) < TARGET_HALF) and offset[2] < 2 * CUBE_HALF)

    def waypoints(self):
        stick, cube, target = (self.body_position(b) for b in ("stick", "cube", "target"))
        # Grasp the end farther from the cube, so the rest of the stick reaches over it.
        away = np.sign(stick[1] - cube[1])
        grasp = stick + np.array([0.0, away * (STICK_HALF[1] - GRASP_FROM_END), 0.0])
        # Where the held stick lies to rake: across the cube's far side, its middle on the cube.
        hold_height = TABLE_HEIGHT + STICK_HALF[2] + STICK_ABOVE_TABLE
        rake_x = cube[0] + CUBE_HALF + CLEARANCE + STICK_HALF[0]
        rake_y = cube[1] + (grasp[1] - stick[1])
        start = np.array([rake_x, rake_y, hold_height])
        # Stop with the cube's centre on the target's.
        end = start - np.array([cube[0] - target[0], 0.0, 0.0])
        up = np.array([0.0, 0.0, 0.08])
        return [
            Waypoint(grasp + up, ACROSS_X, 1.0, speed=0.8),
            Waypoint(grasp, ACROSS_X, 0.0, speed=0.3),
            Waypoint(grasp + up, ACROSS_X, 0.0, speed=0.3),
            Waypoint(start + up, ACROSS_X, 0.0, speed=0.5),
            Waypoint(start, ACROSS_X, 0.0, speed=0.3),
            Waypoint(end, ACROSS_X, 0.0, speed=0.15),
        ]

    def low_dim_state(self):
        return np.concatenate([self.body_position(b) for b in ("stick", "cube", "target")])
