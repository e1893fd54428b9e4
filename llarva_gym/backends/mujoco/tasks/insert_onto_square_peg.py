"""insert_onto_square_peg: put the square ring onto the spoke of the variation's colour.

RLBench's objects: a base with three square spokes (pillars) and a square ring (graspable). One
spoke, drawn at random, takes the variation's colour (20 colours), the other two two other colours
at random. Success when the ring sits down round the chosen spoke (RLBench's four detectors round
its foot). The expert grasps the ring by one side, lifts it over the spoke, turns it square with
the spoke, lowers it round the spoke and lets go.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import COLORS, GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint, yaw_matrix

SPOKES = 3
SPOKE_HALF, SPOKE_HEIGHT, SPOKE_PITCH = 0.012, 0.1, 0.1
BASE_HALF = (0.05, 0.15, 0.006)
RING_OUTER, RING_INNER, RING_HALF_HEIGHT = 0.04, 0.025, 0.0125
RING_SIDE = (RING_OUTER + RING_INNER) / 2    # from the ring's centre to the middle of a side
BASE_TOP = 2 * BASE_HALF[2]
DROP_ABOVE_BASE = 0.035                      # the ring's centre when the expert lets go


def _spoke(i: int) -> str:
    y = (i - 1) * SPOKE_PITCH
    return (f'<geom name="spoke{i}" type="box" size="{SPOKE_HALF} {SPOKE_HALF} {SPOKE_HEIGHT / 2}" '
            f'pos="0 {y} {BASE_TOP + SPOKE_HEIGHT / 2}"/>')


def _ring() -> str:
    bar = (RING_OUTER - RING_INNER) / 2
    sides = [((RING_OUTER, bar / 2), (0, RING_SIDE)), ((RING_OUTER, bar / 2), (0, -RING_SIDE)),
             ((bar / 2, RING_INNER), (RING_SIDE, 0)), ((bar / 2, RING_INNER), (-RING_SIDE, 0))]
    geoms = "".join(f'<geom type="box" size="{a} {b} {RING_HALF_HEIGHT}" pos="{x} {y} 0" mass="0.02" '
                    f'friction="0.6 0.005 0.0001" rgba="0.8 0.8 0.82 1"/>' for (a, b), (x, y) in sides)
    return f'<body name="square_ring"><freejoint/>{geoms}</body>'


def yaw_of(xmat: np.ndarray) -> float:
    return float(np.arctan2(xmat[3], xmat[0]))


class InsertOntoSquarePeg(Task):
    name = "insert_onto_square_peg"
    variation_count = len(COLORS)
    graspable = ("square_ring",)
    xml = f"""
    <worldbody>
      <body name="spokes" mocap="true">
        <geom name="spokes_base" type="box" size="{BASE_HALF[0]} {BASE_HALF[1]} {BASE_HALF[2]}" pos="0 0 {BASE_HALF[2]}" rgba="0.45 0.3 0.2 1"/>
        {"".join(_spoke(i) for i in range(SPOKES))}
      </body>
      {_ring()}
    </worldbody>
    """

    def descriptions(self, variation):
        color = COLORS[variation][0]
        return [f"put the ring on the {color} spoke",
                f"slide the ring onto the {color} colored spoke",
                f"place the ring onto the {color} spoke"]

    def init_episode(self, variation, rng):
        self.chosen = int(rng.integers(SPOKES))
        others = rng.choice([i for i in range(len(COLORS)) if i != variation], size=SPOKES - 1, replace=False)
        colors = list(others)
        colors.insert(self.chosen, variation)
        for i, color in enumerate(colors):
            self.set_rgba(f"spoke{i}", COLORS[color][1])
        # The spokes on one side of the table, the ring on the other.
        side = rng.choice([-1.0, 1.0])
        base_yaw = rng.uniform(-np.pi / 8, np.pi / 8)
        base = (rng.uniform(0.2, 0.3), side * rng.uniform(0.1, 0.14), TABLE_HEIGHT)
        self.set_mocap("spokes", base, (np.cos(base_yaw / 2), 0, 0, np.sin(base_yaw / 2)))
        ring_yaw = rng.uniform(-np.pi / 4, np.pi / 4)
        ring = (rng.uniform(0.05, 0.3), -side * rng.uniform(0.12, 0.25), TABLE_HEIGHT + RING_HALF_HEIGHT)
        self.set_free_body("square_ring", ring, (np.cos(ring_yaw / 2), 0, 0, np.sin(ring_yaw / 2)))

    def spoke_position(self, i: int) -> np.ndarray:
        return self.data.geom(f"spoke{i}").xpos.copy()

    def success(self):
        offset = self.body_position("square_ring") - self.spoke_position(self.chosen)
        # The spoke passes through the ring's opening and the ring is down near the spoke's foot.
        ring_height = self.body_position("square_ring")[2] - self.body_position("spokes")[2]
        return bool(np.linalg.norm(offset[:2]) < RING_INNER - SPOKE_HALF and ring_height < BASE_TOP + 0.03)

    def waypoints(self):
        ring = self.body_position("square_ring")
        ring_yaw = yaw_of(self.data.body("square_ring").xmat)
        # Grasp the side on the ring's +y, fingers closing across it.
        grasp = ring + yaw_matrix(ring_yaw) @ np.array([0.0, RING_SIDE, 0.0])
        grasp_rotation = yaw_matrix(ring_yaw) @ GRIPPER_DOWN
        # Turn the ring square with the spokes, by the quarter turn nearest its own yaw.
        spokes_yaw = yaw_of(self.data.body("spokes").xmat)
        place_yaw = spokes_yaw + np.round((ring_yaw - spokes_yaw) / (np.pi / 2)) * (np.pi / 2)
        spoke = self.spoke_position(self.chosen)
        base_z = self.body_position("spokes")[2]
        over = spoke * np.array([1.0, 1.0, 0.0]) + yaw_matrix(place_yaw) @ np.array([0.0, RING_SIDE, 0.0])
        carry = np.array([0.0, 0.0, base_z + BASE_TOP + SPOKE_HEIGHT + RING_HALF_HEIGHT + 0.03])
        drop = np.array([0.0, 0.0, base_z + BASE_TOP + DROP_ABOVE_BASE])
        place_rotation = yaw_matrix(place_yaw) @ GRIPPER_DOWN
        return [
            Waypoint(grasp + np.array([0.0, 0.0, 0.08]), grasp_rotation, 1.0, speed=0.8),
            Waypoint(grasp, grasp_rotation, 0.0, speed=0.3),
            Waypoint(grasp * np.array([1.0, 1.0, 0.0]) + carry, grasp_rotation, 0.0, speed=0.4),
            Waypoint(over + carry, place_rotation, 0.0, speed=0.5),
            Waypoint(over + drop, place_rotation, 1.0, speed=0.25),
            Waypoint(over + carry, place_rotation, 1.0, speed=0.4),
        ]

    def low_dim_state(self):
        return np.concatenate([self.body_position("square_ring"), self.spoke_position(self.chosen)])
