"""put_item_in_drawer: open the bottom, middle or top drawer and put the block from the chest's top in it.

The chest of `open_drawer` (same placement); a block lies on the chest's top. Success when the
block is inside the chosen drawer's tray, as RLBench's proximity sensor in the drawer. The
expert opens the drawer as in open_drawer, lets go, picks the block up from above and lowers it
into the part of the drawer that sticks out of the chest.
"""

import numpy as np

from llarva_gym.backends.mujoco.robot import rotation_error
from llarva_gym.backends.mujoco.task import GRIPPER_DOWN, Task, Waypoint
from llarva_gym.backends.mujoco.tasks.open_drawer import (
    CHEST_HEIGHT, OPTIONS, TRAY_DEPTH, TRAY_HALF_WIDTH, WALL_HEIGHT, bay_bottom,
    chest_frame, chest_xml, handle_waypoints, place_chest, sample_chest_pose, yaw_matrix)

ITEM_HALF = 0.02
ROBOT_BASE = np.array([-0.3, 0.0])
REACH = 0.62       # metres from the robot's base (horizontally) that the gripper, pointing down,
                   # reaches comfortably at the chest's top
DROP_AT = -0.1     # where the block goes down: in front of the chest, in the pulled-out drawer (chest y)


class PutItemInDrawer(Task):
    name = "put_item_in_drawer"
    variation_count = 3
    max_episode_steps = 160   # open a drawer, then a pick and place: longer than one motion
    graspable = ("item", *(f"drawer_{option}" for option in OPTIONS))
    xml = chest_xml().replace("</worldbody>", f"""
      <body name="item" pos="0 0 1.2">
        <freejoint/>
        <geom name="item" type="box" size="{ITEM_HALF} {ITEM_HALF} {ITEM_HALF}" mass="0.05" rgba="0.1 0.45 0.85 1" friction="0.8 0.005 0.0001"/>
      </body>
    </worldbody>""")

    def descriptions(self, variation):
        option = OPTIONS[variation]
        return [f"put item in {option} drawer",
                f"put the block away in the {option} drawer",
                f"open the {option} drawer and place the block inside of it",
                f"leave the block in the {option} drawer"]

    def init_episode(self, variation, rng):
        self.variation = variation
        # The block lies on the chest's top, square with the chest, on the front half; layouts
        # that put it out of the arm's reach are drawn again here, cheaply, before the backend's
        # check of every waypoint (which redraws the few this misses).
        for _ in range(100):
            origin, yaw = sample_chest_pose(rng)
            on_top = np.array([rng.uniform(-0.09, 0.09), rng.uniform(0.05, 0.13), CHEST_HEIGHT + ITEM_HALF + 0.001])
            item = origin + yaw_matrix(yaw) @ on_top
            if np.linalg.norm(item[:2] - ROBOT_BASE) < REACH:
                break
        place_chest(self, origin, yaw)
        self.set_free_body("item", item, (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)))

    def item_in_drawer(self, option: str) -> bool:
        drawer = self.data.body(f"drawer_{option}")
        local = drawer.xmat.reshape(3, 3).T @ (self.body_position("item") - drawer.xpos)
        return bool(abs(local[0]) < TRAY_HALF_WIDTH - 0.008 and 0.012 < local[1] < TRAY_DEPTH - 0.008
                    and 0.0 < local[2] < WALL_HEIGHT)

    def success(self):
        return self.item_in_drawer(OPTIONS[self.variation])

    def waypoints(self):
        index = self.variation
        open_drawer = handle_waypoints(self, index)
        origin, rotation = chest_frame(self)
        out = -rotation[:, 1]
        pulled, level = open_drawer[-1].position, open_drawer[-1].rotation
        yaw = np.arctan2(rotation[1, 0], rotation[0, 0])
        # Pointing down, fingers closing across the chest's front (its x axis): of the two such
        # grips, the one nearer the level grip, so that the wrist turns least.
        downs = [yaw_matrix(yaw + turn) @ GRIPPER_DOWN for turn in (np.pi / 2, -np.pi / 2)]
        down = min(downs, key=lambda r: np.linalg.norm(rotation_error(level, r)))
        item = self.body_position("item")
        backed_off = pulled + 0.04 * out + np.array([0, 0, 0.03])   # fingers clear of the handle
        # Up, and to a comfortable distance from the robot's base, before turning the gripper down:
        # a drawer pulled towards the camera leaves the arm stretched, one pulled towards the
        # robot leaves it folded, and either way turning the wrist there is awkward.
        radial = backed_off[:2] - ROBOT_BASE
        distance = np.linalg.norm(radial)
        turn_at = np.r_[ROBOT_BASE + radial * np.clip(distance, 0.42, 0.52) / distance, backed_off[2] + 0.07]
        carry_height = origin[2] + CHEST_HEIGHT + ITEM_HALF + 0.06
        drop = origin + rotation @ np.array([0.0, DROP_AT, bay_bottom(index) + 0.012 + ITEM_HALF + 0.012])
        above_drop = np.array([drop[0], drop[1], carry_height])
        return open_drawer + [
            Waypoint(pulled, level, 1.0, speed=0.2),                         # let go of the handle
            Waypoint(backed_off, level, 1.0, speed=0.4),
            Waypoint(turn_at, level, 1.0, speed=0.5),
            Waypoint(item + np.array([0, 0, 0.07]), down, 1.0, speed=0.6),   # above the block
            Waypoint(item, down, 0.0, speed=0.25),                           # grasp
            Waypoint(np.array([item[0], item[1], carry_height]), down, 0.0, speed=0.3),
            Waypoint(above_drop, down, 0.0, speed=0.5),
            Waypoint(drop, down, 1.0, speed=0.4),                            # lower in, release
        ]

    def low_dim_state(self):
        origin, _ = chest_frame(self)
        return np.concatenate([origin, self.body_position("item")]
                              + [self.data.body(f"drawer_{o}").xpos for o in OPTIONS])
