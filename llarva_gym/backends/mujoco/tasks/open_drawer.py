"""open_drawer: grip the handle of the bottom, middle or top drawer and pull the drawer open.

A chest of three drawers stands on the table with its front across the table (towards -y), turned
by up to 45 degrees either way per episode (RLBench's base rotation bounds). Each drawer slides on
its own joint; success when the chosen drawer is out by more than 0.15 m, as RLBench's
JointCondition. The expert approaches the handle with the gripper level and its fingers closing
up and down around the bar, grips it and pulls straight out. `put_item_in_drawer` uses the same
chest (`chest_xml`, `handle_waypoints`).
"""

import numpy as np

from llarva_gym.backends.mujoco.task import TABLE_HEIGHT, Task, Waypoint, yaw_matrix

OPTIONS = ("bottom", "middle", "top")
# The chest, in its own frame: x across its front, y from the front (y = 0) to the back, z up.
CHEST_WIDTH, CHEST_DEPTH = 0.32, 0.26
PANEL = 0.01               # wall thickness
BAY_HEIGHT = 0.11          # inner height of each drawer's bay
CHEST_HEIGHT = 3 * BAY_HEIGHT + 4 * PANEL
TRAY_DEPTH = CHEST_DEPTH - 0.03
TRAY_HALF_WIDTH = CHEST_WIDTH / 2 - PANEL - 0.003
WALL_HEIGHT = 0.06         # height of a drawer's sides and back
HANDLE_OUT = 0.035         # the handle bar stands this far in front of the drawer's front
PULL = 0.19                # how far the expert pulls (the joint stops at 0.21)
OPEN_THRESHOLD = 0.15      # RLBench: JointCondition(drawer joint, 0.15)
WOOD, DARK_WOOD, METAL = "0.55 0.38 0.22 1", "0.45 0.3 0.17 1", "0.25 0.25 0.27 1"


def bay_bottom(index: int) -> float:
    return PANEL + index * (BAY_HEIGHT + PANEL)


def handle_height(index: int) -> float:
    return bay_bottom(index) + BAY_HEIGHT / 2


def _drawer(option: str, index: int) -> str:
    # A tray (floor, sides, back) behind a front panel; the joint slides it out along -y.
    # Drawers touch neither the chest nor the table (contype 0), only loose objects (conaffinity 1).
    depth, half_w = TRAY_DEPTH, TRAY_HALF_WIDTH
    z_mid = BAY_HEIGHT / 2
    return f"""
      <body name="drawer_{option}" pos="0 0 {bay_bottom(index)}">
        <joint name="drawer_joint_{option}" type="slide" axis="0 -1 0" range="0 0.21" damping="30" armature="1"/>
        <geom name="drawer_{option}_front" type="box" size="{half_w} 0.006 {BAY_HEIGHT / 2 - 0.004}" pos="0 0.006 {z_mid}" rgba="{DARK_WOOD}"/>
        <geom name="drawer_{option}_floor" type="box" size="{half_w} {depth / 2} 0.004" pos="0 {depth / 2} 0.006"/>
        <geom type="box" size="0.004 {depth / 2} {WALL_HEIGHT / 2}" pos="{half_w - 0.004} {depth / 2} {WALL_HEIGHT / 2 + 0.002}"/>
        <geom type="box" size="0.004 {depth / 2} {WALL_HEIGHT / 2}" pos="{-half_w + 0.004} {depth / 2} {WALL_HEIGHT / 2 + 0.002}"/>
        <geom type="box" size="{half_w} 0.004 {WALL_HEIGHT / 2}" pos="0 {depth - 0.004} {WALL_HEIGHT / 2 + 0.002}"/>
        <geom name="drawer_{option}_handle" type="capsule" fromto="-0.05 {-HANDLE_OUT} {z_mid} 0.05 {-HANDLE_OUT} {z_mid}" size="0.008" rgba="{METAL}"/>
        <geom type="capsule" fromto="-0.045 {-HANDLE_OUT} {z_mid} -0.045 0 {z_mid}" size="0.005" rgba="{METAL}" contype="0" conaffinity="0"/>
        <geom type="capsule" fromto="0.045 {-HANDLE_OUT} {z_mid} 0.045 0 {z_mid}" size="0.005" rgba="{METAL}" contype="0" conaffinity="0"/>
      </body>"""


def chest_xml() -> str:
    """The chest as a mocap body `chest` (placed per episode) with drawers `drawer_<option>`."""
    w, d, h, t = CHEST_WIDTH / 2, CHEST_DEPTH / 2, CHEST_HEIGHT, PANEL
    dividers = "".join(
        f'<geom type="box" size="{w - t} {d} {t / 2}" pos="0 {d} {bay_bottom(i) - t / 2}"/>' for i in (1, 2))
    return f"""
    <default>
      <default class="chest">
        <geom contype="0" conaffinity="1" rgba="{WOOD}" friction="0.8 0.005 0.0001"/>
      </default>
    </default>
    <worldbody>
      <body name="chest" mocap="true" childclass="chest">
        <geom type="box" size="{t / 2} {d} {h / 2}" pos="{-w + t / 2} {d} {h / 2}"/>
        <geom type="box" size="{t / 2} {d} {h / 2}" pos="{w - t / 2} {d} {h / 2}"/>
        <geom type="box" size="{w - t} {t / 2} {h / 2}" pos="0 {2 * d - t / 2} {h / 2}"/>
        <geom name="chest_top" type="box" size="{w} {d} {t / 2}" pos="0 {d} {h - t / 2}"/>
        <geom type="box" size="{w - t} {d} {t / 2}" pos="0 {d} {t / 2}"/>
        {dividers}
        {"".join(_drawer(option, i) for i, option in enumerate(OPTIONS))}
      </body>
    </worldbody>"""


def gripper_frame(approach, closing) -> np.ndarray:
    """The gripper-tip rotation whose z axis (pointing out of the fingers) is `approach` and whose
    y axis (the fingers' closing direction) is `closing` (made orthogonal to `approach`)."""
    z = np.asarray(approach, dtype=np.float64)
    z = z / np.linalg.norm(z)
    y = np.asarray(closing, dtype=np.float64)
    y = y - z * (y @ z)
    y = y / np.linalg.norm(y)
    return np.column_stack([np.cross(y, z), y, z])


def sample_chest_pose(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The chest's front faces -y, turned by up to 45 degrees, on the +y side of the table."""
    yaw = rng.uniform(-np.pi / 4, np.pi / 4)
    # Turned towards the camera (yaw > 0) a drawer opens away from the robot, turned towards the
    # robot it opens into the arm's base: the chest stands nearer or further so that the pulled
    # handle stays where the arm reaches it.
    x = rng.uniform(0.1, 0.22) - 0.2 * np.sin(yaw)
    return np.array([x, rng.uniform(0.1, 0.18), TABLE_HEIGHT + 0.0005]), yaw


def place_chest(task: Task, position: np.ndarray, yaw: float) -> None:
    task.set_mocap("chest", position, (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)))


def chest_frame(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """Position and rotation of the chest (its frame: x across the front, -y out of the front)."""
    return task.body_position("chest"), task.data.body("chest").xmat.reshape(3, 3).copy()


def handle_waypoints(task: Task, index: int, pull: float = PULL) -> list[Waypoint]:
    """Approach the handle of drawer `index` level, grip it, pull the drawer out by `pull`."""
    origin, rotation = chest_frame(task)
    out = -rotation[:, 1]   # the direction in which the drawers open
    handle = origin + rotation @ np.array([0.0, -HANDLE_OUT, handle_height(index)])
    # Level, pointing into the chest, fingers closing vertically around the bar.
    grip = gripper_frame(-out, (0.0, 0.0, -1.0))
    return [
        Waypoint(handle + 0.08 * out, grip, 1.0, speed=0.6),
        Waypoint(handle, grip, 0.0, speed=0.2),
        Waypoint(handle + pull * out, grip, 0.0, speed=0.2),
    ]


class OpenDrawer(Task):
    name = "open_drawer"
    variation_count = 3
    graspable = tuple(f"drawer_{option}" for option in OPTIONS)
    xml = chest_xml()

    def descriptions(self, variation):
        option = OPTIONS[variation]
        return [f"open {option} drawer",
                f"grip the {option} handle and pull the {option} drawer open",
                f"slide the {option} drawer open"]

    def init_episode(self, variation, rng):
        self.variation = variation
        place_chest(self, *sample_chest_pose(rng))

    def drawer_opening(self, option: str) -> float:
        return float(self.data.joint(f"drawer_joint_{option}").qpos[0])

    def success(self):
        # The drawers start closed (joint at 0): RLBench compares with the start position.
        return self.drawer_opening(OPTIONS[self.variation]) > OPEN_THRESHOLD

    def waypoints(self):
        return handle_waypoints(self, self.variation)

    def low_dim_state(self):
        origin, _ = chest_frame(self)
        return np.concatenate([origin] + [self.data.body(f"drawer_{o}").xpos for o in OPTIONS])
