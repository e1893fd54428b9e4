"""push_buttons: push one, two or three coloured buttons in the order the instruction names them.

RLBench's variations: index // 3 picks a permutation of three colours (RLBench's own colour list
without red and lime, whose tops are the buttons' red and pushed-green) and 1 + index % 3 is how
many buttons to push, capped at 50 variations. The buttons not to push take other colours at
random. Success when the target buttons have been pushed in order (RLBench's ordered
ConditionSet of joint conditions: each button's top moved more than 3 mm, checked one after the
other). A pushed button's top turns green, as RLBench's.
"""

import itertools

import numpy as np

from llarva_gym.backends.mujoco.task import GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint, sample_separated

# RLBench's list for this task: its colour list without red and lime.
BUTTON_COLORS = [
    ("maroon", (0.5, 0.0, 0.0)), ("green", (0.0, 0.5, 0.0)), ("blue", (0.0, 0.0, 1.0)),
    ("navy", (0.0, 0.0, 0.5)), ("yellow", (1.0, 1.0, 0.0)), ("cyan", (0.0, 1.0, 1.0)),
    ("magenta", (1.0, 0.0, 1.0)), ("silver", (0.75, 0.75, 0.75)), ("gray", (0.5, 0.5, 0.5)),
    ("orange", (1.0, 0.5, 0.0)), ("olive", (0.5, 0.5, 0.0)), ("purple", (0.5, 0.0, 0.5)),
    ("teal", (0.0, 0.5, 0.5)), ("azure", (0.0, 0.5, 1.0)), ("violet", (0.5, 0.0, 1.0)),
    ("rose", (1.0, 0.0, 0.5)), ("black", (0.0, 0.0, 0.0)), ("white", (1.0, 1.0, 1.0)),
]
COLOR_PERMUTATIONS = list(itertools.permutations(range(len(BUTTON_COLORS)), 3))
MAX_TARGET_BUTTONS = 3
MAX_VARIATIONS = 50
BUTTONS = 3
PUSHED = 0.003             # metres the top must travel (RLBench's JointCondition)
PRESS_DEPTH = 0.007        # how far the expert pushes it
TOP_TRAVEL = 0.01          # the top's full travel
BASE_HALF = (0.035, 0.035, 0.012)
TOP_RADIUS, TOP_HALF_HEIGHT = 0.017, 0.005
TOP_REST = 2 * BASE_HALF[2] + TOP_TRAVEL + TOP_HALF_HEIGHT    # top's centre above the table
PAD_HALF_HEIGHT = 0.009    # the closed fingertips' half height
RED, GREEN = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
SPAWN_LOW, SPAWN_HIGH = (0.06, -0.22), (0.34, 0.22)


def _button(i: int) -> str:
    bx, by, bz = BASE_HALF
    return f"""
    <body name="button{i}" mocap="true">
      <geom name="button{i}_base" type="box" size="{bx} {by} {bz}" pos="0 0 {bz}"/>
      <geom name="button{i}_wrap" type="cylinder" size="{TOP_RADIUS + 0.004} {TOP_TRAVEL / 2}" pos="0 0 {2 * bz + TOP_TRAVEL / 2}"
            contype="0" conaffinity="0"/>
      <body name="button{i}_top" pos="0 0 {TOP_REST}" gravcomp="1">
        <joint name="button{i}_joint" type="slide" axis="0 0 1" range="{-TOP_TRAVEL} 0" stiffness="300" damping="3"/>
        <!-- conaffinity 3: the fingertips push it. -->
        <geom name="button{i}_top" type="cylinder" size="{TOP_RADIUS} {TOP_HALF_HEIGHT}" mass="0.01" conaffinity="3"/>
      </body>
    </body>"""


class PushButtons(Task):
    name = "push_buttons"
    variation_count = min(len(COLOR_PERMUTATIONS) * MAX_TARGET_BUTTONS, MAX_VARIATIONS)
    xml = f"<worldbody>{''.join(_button(i) for i in range(BUTTONS))}</worldbody>"

    def _colors(self, variation: int) -> tuple[list[int], int]:
        return list(COLOR_PERMUTATIONS[variation // MAX_TARGET_BUTTONS]), 1 + variation % MAX_TARGET_BUTTONS

    def descriptions(self, variation):
        colors, to_push = self._colors(variation)
        names = [BUTTON_COLORS[c][0] for c in colors]
        push, press, base = (f"push the {names[0]} button", f"press the {names[0]} button",
                             f"push down the button with the {names[0]} base")
        for name in names[1:to_push]:
            push += f", then push the {name} button"
            press += f", then press the {name} button"
            base += f", then the {name} one"
        return [push, press, base]

    def init_episode(self, variation, rng):
        colors, self.to_push = self._colors(variation)
        # Buttons not to push take colours other than the targets', drawn at random.
        spare = [c for c in range(len(BUTTON_COLORS)) if c not in colors[:self.to_push]]
        colors[self.to_push:] = rng.choice(spare, size=BUTTONS - self.to_push, replace=False)
        positions = sample_separated(rng, BUTTONS, SPAWN_LOW, SPAWN_HIGH, min_distance=0.12)
        for i in range(BUTTONS):
            self.set_rgba(f"button{i}_base", BUTTON_COLORS[colors[i]][1])
            for part in ("top", "wrap"):
                self.set_rgba(f"button{i}_{part}", RED)
            self.set_mocap(f"button{i}", (*positions[i], TABLE_HEIGHT))
        self.next_to_push = 0

    def pushed(self, i: int) -> bool:
        return bool(self.data.joint(f"button{i}_joint").qpos[0] < -PUSHED)

    def success(self):
        for i in range(BUTTONS):
            if self.pushed(i):
                for part in ("top", "wrap"):
                    self.set_rgba(f"button{i}_{part}", GREEN)
        # RLBench's ordered condition set: only the next button in the order counts, once pushed.
        if self.next_to_push < self.to_push and self.pushed(self.next_to_push):
            self.next_to_push += 1
        return self.next_to_push >= self.to_push

    def waypoints(self):
        waypoints = []
        for i in range(self.to_push):
            top = self.body_position(f"button{i}") + np.array([0.0, 0.0, TOP_REST + TOP_HALF_HEIGHT])
            press = top + np.array([0.0, 0.0, PAD_HALF_HEIGHT - PRESS_DEPTH])
            above = top + np.array([0.0, 0.0, 0.07])
            waypoints += [Waypoint(above, GRIPPER_DOWN, 0.0, speed=0.8 if i == 0 else 0.6),
                          Waypoint(press, GRIPPER_DOWN, 0.0, speed=0.3),
                          Waypoint(above, GRIPPER_DOWN, 0.0, speed=0.5)]
        return waypoints

    def low_dim_state(self):
        return np.concatenate([self.body_position(f"button{i}") for i in range(BUTTONS)])
