"""reach_target: touch the sphere of the variation's colour; two distractor spheres of other colours."""

import numpy as np

from llarva_gym.backends.mujoco.task import COLORS, TABLE_HEIGHT, Task, Waypoint, sample_separated

SPHERE_RADIUS = 0.025
# RLBench's spawn boundary for the spheres: a volume above the table in front of the robot.
SPAWN_LOW = (0.05, -0.3, TABLE_HEIGHT + 0.05)
SPAWN_HIGH = (0.45, 0.3, TABLE_HEIGHT + 0.45)


def _sphere(name: str) -> str:
    return (f'<body name="{name}" mocap="true"><geom name="{name}" type="sphere" size="{SPHERE_RADIUS}" '
            f'contype="0" conaffinity="0"/></body>')


class ReachTarget(Task):
    name = "reach_target"
    variation_count = len(COLORS)
    xml = "<worldbody>" + "".join(_sphere(n) for n in ("target", "distractor0", "distractor1")) + "</worldbody>"

    def descriptions(self, variation):
        color = COLORS[variation][0]
        return [f"reach the {color} target",
                f"touch the {color} ball with the panda gripper",
                f"reach the {color} sphere"]

    def init_episode(self, variation, rng):
        others = rng.choice([i for i in range(len(COLORS)) if i != variation], size=2, replace=False)
        for geom, color_index in zip(("target", "distractor0", "distractor1"), (variation, *others)):
            self.set_rgba(geom, COLORS[color_index][1])
        positions = sample_separated(rng, 3, SPAWN_LOW, SPAWN_HIGH, min_distance=0.2)
        for body, position in zip(("target", "distractor0", "distractor1"), positions):
            self.set_mocap(body, position)

    def success(self):
        # RLBench's proximity sensor at the target detects the gripper tip inside the sphere.
        tip = self.data.site_xpos[self.panda.tcp]
        return bool(np.linalg.norm(tip - self.body_position("target")) < SPHERE_RADIUS)

    def waypoints(self):
        # Slowing into the target (the last 15 cm) rather than arriving at full speed: a policy
        # cloned from these demos learns to settle on what it sees instead of flying past it.
        return [Waypoint(self.body_position("target"), brake_distance=0.15)]

    def low_dim_state(self):
        return self.body_position("target")
