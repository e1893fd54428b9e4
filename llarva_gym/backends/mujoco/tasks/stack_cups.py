"""stack_cups: stack the other two cups into the cup of the variation's colour.

As RLBench: 20 variations; cup2 takes the variation's colour, cup1 and cup3 each a random other
colour; the three upright cups are spread over the table; success when cup1 and cup3 are detected
inside cup2 (stacked into it) and nothing is grasped. The expert grasps each cup by its rim, lifts
it, lowers it into cup2 and lets go: cup1 first, then cup3 into cup1.

The cups are tapered (eight slanted wall panels and a floor). A cup's rim stop (a disc as wide as
its floor's outer edge) touches only other cups' walls, so a cup set into another rests on the
walls where the taper closes on it, as paper cups nest.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import COLORS, GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint

CUPS = ("cup1", "cup2", "cup3")
BOTTOM_RADIUS, TOP_RADIUS, HEIGHT, WALL = 0.03, 0.04, 0.08, 0.004
FLOOR = 0.004       # thickness of the floor plate (square, for resting flat) and the round rim stop
PANELS = 8
NEST_STEP = 0.027   # a cup set into another rests this much higher (where its rim stop meets the walls)
GRIP_DEPTH = 0.015  # the gripper tip closes this far below the rim, on the panel facing -y
CARRY_HEIGHT = 0.21  # of the gripper tip above the table while moving a cup


def _quat_mul(a, b):
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return (w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2)


def _cup(name: str) -> str:
    tilt = np.arctan((TOP_RADIUS - BOTTOM_RADIUS) / HEIGHT)
    centre_radius = (BOTTOM_RADIUS + TOP_RADIUS) / 2 - WALL / 2
    half_width = centre_radius * np.tan(np.pi / PANELS) + 0.001
    panels = []
    for k in range(PANELS):
        angle = 2 * np.pi * k / PANELS
        quat = _quat_mul((np.cos(angle / 2), 0, 0, np.sin(angle / 2)), (np.cos(tilt / 2), 0, np.sin(tilt / 2), 0))
        # Walls collide with the table, the floor and other cups' floors and rim stops (bit 8), not
        # with other cups' walls. They start above the floor plate: a standing cup rests on its plate.
        panels.append(
            f'<geom name="{name}_wall{k}" type="box" size="{WALL / 2} {half_width:.4f} {(HEIGHT - FLOOR) / 2 / np.cos(tilt):.4f}" '
            f'pos="{centre_radius * np.cos(angle):.4f} {centre_radius * np.sin(angle):.4f} {(HEIGHT + FLOOR) / 2}" '
            f'quat="{quat[0]:.5f} {quat[1]:.5f} {quat[2]:.5f} {quat[3]:.5f}" contype="9" conaffinity="0" mass="0.01"/>')
    return f"""
    <body name="{name}"><freejoint/>
      {"".join(panels)}
      <geom name="{name}_floor" type="box" size="0.02 0.02 {FLOOR / 2}" pos="0 0 {FLOOR / 2}" mass="0.02" contype="1" conaffinity="1" group="3"/>
      <geom name="{name}_rim_stop" type="cylinder" size="{BOTTOM_RADIUS} {FLOOR / 2}" pos="0 0 {FLOOR / 2}" mass="0.005" contype="0" conaffinity="8"/>
    </body>"""


class StackCups(Task):
    name = "stack_cups"
    variation_count = len(COLORS)
    graspable = CUPS
    xml = f"<worldbody>{''.join(_cup(name) for name in CUPS)}</worldbody>"

    def descriptions(self, variation):
        color = COLORS[variation][0]
        return [f"stack the other cups on top of the {color} cup",
                "place two of the cups onto the odd cup out",
                f"put the remaining two cups on top of the {color} cup",
                f"pick up and set the cups down into the {color} cup",
                f"create a stack of cups with the {color} cup as its base",
                f"keeping the {color} cup on the table, stack the other two onto it"]

    def _paint(self, cup: str, rgb):
        for suffix in [f"wall{k}" for k in range(PANELS)] + ["floor", "rim_stop"]:
            self.set_rgba(f"{cup}_{suffix}", rgb)

    def init_episode(self, variation, rng):
        # RLBench draws each of the other two colours independently (they may be the same).
        others = [int(rng.choice([i for i in range(len(COLORS)) if i != variation])) for _ in range(2)]
        self._paint("cup2", COLORS[variation][1])
        self._paint("cup1", COLORS[others[0]][1])
        self._paint("cup3", COLORS[others[1]][1])
        while True:   # three cups, rims well apart (RLBench samples them upright, unturned)
            points = rng.uniform((0.05, -0.25), (0.38, 0.25), size=(3, 2))
            if min(np.linalg.norm(points[i] - points[j]) for i, j in ((0, 1), (0, 2), (1, 2))) >= 0.13:
                break
        for name, (x, y) in zip(("cup2", "cup1", "cup3"), points):
            self.set_free_body(name, (x, y, TABLE_HEIGHT))

    def _inside_base(self, cup: str) -> bool:
        offset = self.body_position(cup) - self.body_position("cup2")
        return bool(np.hypot(offset[0], offset[1]) < 0.015 and 0.0 < offset[2] < HEIGHT)

    def success(self):
        return self._inside_base("cup1") and self._inside_base("cup3") and self.panda.grasped is None

    def waypoints(self):
        # The tip closes on the rim of the panel facing -y, fingers across the wall.
        grip = np.array([0.0, -(TOP_RADIUS - WALL / 2 - GRIP_DEPTH * (TOP_RADIUS - BOTTOM_RADIUS) / HEIGHT),
                         HEIGHT - GRIP_DEPTH])
        base = self.body_position("cup2")
        path = []
        for level, cup in enumerate(("cup1", "cup3"), start=1):
            rim = self.body_position(cup) + grip
            place = base + grip + np.array([0.0, 0.0, level * NEST_STEP + 0.004])
            path += [
                Waypoint(rim + [0, 0, 0.06], GRIPPER_DOWN, 1.0, speed=0.6),
                Waypoint(rim, GRIPPER_DOWN, 0.0, speed=0.3),
                Waypoint(np.r_[rim[:2], TABLE_HEIGHT + CARRY_HEIGHT], GRIPPER_DOWN, 0.0, speed=0.5),
                Waypoint(np.r_[place[:2], TABLE_HEIGHT + CARRY_HEIGHT], GRIPPER_DOWN, 0.0, speed=0.6),
                Waypoint(place, GRIPPER_DOWN, 1.0, speed=0.3),
            ]
        return path

    def low_dim_state(self):
        return np.concatenate([self.body_position(name) for name in CUPS])
