"""place_shape_in_shape_sorter: put the named shape into its slot in the shape sorter.

RLBench's objects: a shape sorter and five shapes (cube, cylinder, triangular prism, star, moon;
variation = index in that list), all graspable, spread over the table. Success when the chosen
shape is inside the sorter (RLBench's sensor inside it). The expert grasps the shape at its centre,
lifts it, turns it square with the sorter, lowers it through its slot and lets go, as RLBench's
waypoints (grasp point, lift, drop point, release).

Built from primitives: the prism is three slices narrowing to a point, the star three crossed
bars (six points), the moon four bars round an arc. The sorter is a hollow box whose lid has
five square openings (a 3x3 grid's corners and centre), each drawn as its shape's outline on the
lid; every shape fits through every opening (RLBench's slots fit only their own shape), and each
shape collides as one box around its footprint.
"""

import numpy as np

from llarva_gym.backends.mujoco.task import GRIPPER_DOWN, TABLE_HEIGHT, Task, Waypoint, sample_separated, yaw_matrix

SHAPE_NAMES = ["cube", "cylinder", "triangular prism", "star", "moon"]
SHAPE_HALF_HEIGHT = 0.015
SHAPE_RGBA = ["0.85 0.15 0.15 1", "0.15 0.35 0.85 1", "0.95 0.75 0.1 1", "0.2 0.7 0.25 1", "0.6 0.25 0.75 1"]
# The sorter: a hollow box, its lid a 3x3 grid of square cells with openings at the corners and
# the centre (cell index (row along x, column along y) for each shape).
CELL, BAR, WALL = 0.055, 0.012, 0.01
SORTER_HALF = 1.5 * CELL + 2 * BAR          # outer half side
SORTER_HEIGHT = 0.1
LID = 0.01                                  # lid thickness
PITCH = CELL + BAR                          # between the centres of neighbouring cells
SLOTS = {"cube": (-1, -1), "cylinder": (-1, 1), "triangular prism": (0, 0), "star": (1, -1), "moon": (1, 1)}
SORTER_RGBA = "0.9 0.88 0.8 1"
HOLE_RGBA = "0.1 0.1 0.12 1"
INSERT_DEPTH = 0.025   # the held shape's bottom goes this far below the lid's top before release


def _shape_geoms(shape: str, half_height: float, extra: str) -> str:
    """The visible geoms of one shape in its body frame (footprint centred on the origin, about
    4 cm across)."""
    h = half_height
    if shape == "cube":
        return f'<geom type="box" size="0.018 0.018 {h}" {extra}/>'
    if shape == "cylinder":
        return f'<geom type="cylinder" size="0.019 {h}" {extra}/>'
    if shape == "triangular prism":
        # Slices along x, narrowing from the base (-x) to the apex (+x): a triangle seen from above.
        return "".join(f'<geom type="box" size="0.006 {w} {h}" pos="{x} 0 0" {extra}/>'
                       for x, w in ((-0.012, 0.02), (0.0, 0.0135), (0.012, 0.0065)))
    if shape == "star":
        return "".join(f'<geom type="box" size="0.021 0.0055 {h}" euler="0 0 {k * np.pi / 3:.4f}" {extra}/>'
                       for k in range(3))
    if shape == "moon":
        # Four bars round an arc, open towards -x: a crescent seen from above (boxes draw far
        # cheaper than cylinders on a software renderer).
        return "".join(f'<geom type="box" size="0.005 0.0085 {h}" pos="{0.013 * np.cos(a):.4f} {0.013 * np.sin(a):.4f} 0" '
                       f'euler="0 0 {a:.4f}" {extra}/>' for a in np.deg2rad([-105, -35, 35, 105]))
    raise ValueError(shape)


# Each shape touches the world through one box around its footprint (few contacts, a flat rest);
# its visible geoms do not collide.
SHAPE_HULLS = {"cube": (0.018, 0.018), "cylinder": (0.019, 0.019), "triangular prism": (0.018, 0.02),
               "star": (0.02, 0.02), "moon": (0.0165, 0.02)}
HULL_CENTRES = {"moon": (0.0035, 0.0)}


def _body_name(shape: str) -> str:
    return shape.replace(" ", "_")


def _sorter() -> str:
    s, top = SORTER_HALF, SORTER_HEIGHT
    lid_z, wall_h = top - LID / 2, (top - LID) / 2
    boxes = [
        # Walls, from the table up to the lid.
        ((s, WALL / 2, wall_h), (0, s - WALL / 2, wall_h)),
        ((s, WALL / 2, wall_h), (0, -s + WALL / 2, wall_h)),
        ((WALL / 2, s - WALL, wall_h), (s - WALL / 2, 0, wall_h)),
        ((WALL / 2, s - WALL, wall_h), (-s + WALL / 2, 0, wall_h)),
        # The lid's rim along the two sides parallel to x.
        ((s, BAR / 2, LID / 2), (0, s - BAR / 2, lid_z)),
        ((s, BAR / 2, LID / 2), (0, -s + BAR / 2, lid_z)),
    ]
    # Bars across (along y) at the rim and between the rows of cells.
    for x in (-s + BAR / 2, -PITCH / 2, PITCH / 2, s - BAR / 2):
        boxes.append(((BAR / 2, s - BAR, LID / 2), (x, 0, lid_z)))
    # The solid cells between the openings, with the bars beside them.
    for x in (-PITCH, PITCH):
        boxes.append(((CELL / 2, CELL / 2 + BAR, LID / 2), (x, 0, lid_z)))
    for y in (-(PITCH - BAR / 2), PITCH - BAR / 2):
        boxes.append(((CELL / 2, (CELL + BAR) / 2, LID / 2), (0, y, lid_z)))
    # These collide but are not drawn (group 3): the camera sees one closed box instead, with each
    # opening's shape painted on its lid, so the openings read as shaped slots.
    geoms = [f'<geom type="box" size="{a:.4f} {b:.4f} {c:.4f}" pos="{x:.4f} {y:.4f} {z:.4f}" group="3"/>'
             for (a, b, c), (x, y, z) in boxes]
    paint = 'contype="0" conaffinity="0"'
    geoms.append(f'<geom type="box" size="{s} {s} {top / 2}" pos="0 0 {top / 2}" rgba="{SORTER_RGBA}" {paint}/>')
    for shape, (row, col) in SLOTS.items():
        outline = _shape_geoms(shape, 0.0005, f'rgba="{HOLE_RGBA}" {paint}')
        geoms.append(f'<body pos="{row * PITCH:.4f} {col * PITCH:.4f} {top}">{outline}</body>')
    return f'<body name="shape_sorter" mocap="true">{"".join(geoms)}</body>'


def _shape(i: int, shape: str) -> str:
    name = _body_name(shape)
    (hx, hy), (cx, cy) = SHAPE_HULLS[shape], HULL_CENTRES.get(shape, (0.0, 0.0))
    hull = (f'<geom name="{name}" type="box" size="{hx} {hy} {SHAPE_HALF_HEIGHT}" pos="{cx} {cy} 0" mass="0.03" '
            f'friction="0.8 0.005 0.0001" group="3"/>')
    looks = _shape_geoms(shape, SHAPE_HALF_HEIGHT, f'rgba="{SHAPE_RGBA[i]}" contype="0" conaffinity="0" mass="0"')
    return f'<body name="{name}"><freejoint/>{hull}{looks}</body>'


class PlaceShapeInShapeSorter(Task):
    name = "place_shape_in_shape_sorter"
    variation_count = len(SHAPE_NAMES)
    graspable = tuple(_body_name(s) for s in SHAPE_NAMES)
    xml = f"<worldbody>{_sorter()}{''.join(_shape(i, s) for i, s in enumerate(SHAPE_NAMES))}</worldbody>"

    def descriptions(self, variation):
        shape = SHAPE_NAMES[variation]
        return [f"put the {shape} in the shape sorter",
                f"pick up the {shape} and put it in the sorter",
                f"place the {shape} into its slot in the shape sorter",
                f"slot the {shape} into the shape sorter"]

    def init_episode(self, variation, rng):
        self.shape = _body_name(SHAPE_NAMES[variation])
        # The sorter on one side of the table, the shapes spread over the other.
        side = rng.choice([-1.0, 1.0])
        sorter = (rng.uniform(0.2, 0.3), side * rng.uniform(0.13, 0.17), TABLE_HEIGHT)
        self.set_mocap("shape_sorter", sorter)
        positions = sample_separated(rng, len(SHAPE_NAMES), (0.0, 0.03), (0.32, 0.3), min_distance=0.075)
        for shape, (x, y), yaw in zip(SHAPE_NAMES, positions, rng.uniform(-np.pi / 4, np.pi / 4, len(SHAPE_NAMES))):
            self.set_free_body(_body_name(shape), (x, -side * y, TABLE_HEIGHT + SHAPE_HALF_HEIGHT),
                               (np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)))

    def in_sorter(self, body: str) -> bool:
        offset = self.body_position(body) - self.body_position("shape_sorter")
        return bool(np.all(np.abs(offset[:2]) < SORTER_HALF - WALL) and offset[2] < SORTER_HEIGHT - LID - SHAPE_HALF_HEIGHT)

    def success(self):
        return self.in_sorter(self.shape)

    def waypoints(self):
        shape = self.body_position(self.shape)
        yaw = np.arctan2(self.data.body(self.shape).xmat[3], self.data.body(self.shape).xmat[0])
        row, col = SLOTS[SHAPE_NAMES[self.graspable.index(self.shape)]]
        slot = self.body_position("shape_sorter") + np.array([row * PITCH, col * PITCH, 0.0])
        # The tip closes at the shape's centre, so the shape's centre follows the tip.
        top = TABLE_HEIGHT + SORTER_HEIGHT
        carry = np.array([0.0, 0.0, top + SHAPE_HALF_HEIGHT + 0.05])
        drop = slot * np.array([1.0, 1.0, 0.0]) + np.array([0.0, 0.0, top + SHAPE_HALF_HEIGHT - INSERT_DEPTH])
        grasp_rotation = yaw_matrix(yaw) @ GRIPPER_DOWN
        return [
            Waypoint(shape + np.array([0.0, 0.0, 0.08]), grasp_rotation, 1.0, speed=0.8),
            Waypoint(shape, grasp_rotation, 0.0, speed=0.3),
            Waypoint(shape * np.array([1.0, 1.0, 0.0]) + carry, grasp_rotation, 0.0, speed=0.4),
            Waypoint(slot * np.array([1.0, 1.0, 0.0]) + carry, GRIPPER_DOWN, 0.0, speed=0.5),
            Waypoint(drop, GRIPPER_DOWN, 1.0, speed=0.2),
            Waypoint(slot * np.array([1.0, 1.0, 0.0]) + carry, GRIPPER_DOWN, 1.0, speed=0.4),
        ]

    def low_dim_state(self):
        return np.concatenate([self.body_position("shape_sorter"),
                               *[self.body_position(_body_name(s)) for s in SHAPE_NAMES]])
