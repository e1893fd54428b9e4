"""Observations with RLBench's field names, and which sensors an environment renders.

`Observation` mirrors `rlbench.backend.observation.Observation` field for field, so that demos we
write and demos RLBench wrote read the same way (see `llarva_gym.demos`). The Gymnasium
environment hands out plain dicts (see `RLBenchEnv.observation_space`); `Observation` is the
record kept on disk and the object the demo reader returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CAMERAS = ("left_shoulder", "right_shoulder", "overhead", "wrist", "front")

# RLBench's Observation.__init__ argument order; the pickles store them as instance attributes.
LOW_DIM_FIELDS = (
    "joint_velocities",
    "joint_positions",
    "joint_forces",
    "gripper_open",
    "gripper_pose",
    "gripper_matrix",
    "gripper_joint_positions",
    "gripper_touch_forces",
    "task_low_dim_state",
    "ignore_collisions",
    "misc",
)
IMAGE_KINDS = ("rgb", "depth", "mask", "point_cloud")


class Observation:
    """One time step, as RLBench records it. Image fields are None when not rendered or not loaded."""

    def __init__(self, **fields):
        for camera in CAMERAS:
            for kind in IMAGE_KINDS:
                setattr(self, f"{camera}_{kind}", None)
        for name in LOW_DIM_FIELDS:
            setattr(self, name, None)
        self.misc = {}
        for name, value in fields.items():
            if not hasattr(self, name):
                raise ValueError(f"Observation has no field {name!r}; RLBench's fields are "
                                 f"{', '.join(LOW_DIM_FIELDS)} and <camera>_<rgb|depth|mask|point_cloud>")
            setattr(self, name, value)

    def get_low_dim_data(self) -> np.ndarray:
        """RLBench's flat proprioceptive vector: gripper_open, joints, gripper pose, task state."""
        parts = [np.atleast_1d(np.asarray(getattr(self, name), dtype=np.float64))
                 for name in ("gripper_open", "joint_velocities", "joint_positions", "joint_forces",
                              "gripper_pose", "gripper_joint_positions", "gripper_touch_forces",
                              "task_low_dim_state")
                 if getattr(self, name, None) is not None]
        return np.concatenate(parts) if parts else np.zeros(0)

    def __repr__(self) -> str:
        shown = [n for n in ("joint_positions", "gripper_open") if getattr(self, n, None) is not None]
        return f"Observation({', '.join(f'{n}={getattr(self, n)!r}' for n in shown)})"


@dataclass(frozen=True)
class ObservationConfig:
    """Which cameras and image kinds an environment renders, and at what size."""

    cameras: tuple[str, ...] = ("front",)
    image_size: tuple[int, int] = (128, 128)   # (height, width), RLBench/PerAct/LLARVA use 128x128
    rgb: bool = True
    depth: bool = False
    mask: bool = False
    render_quality: str = "fast"   # "fast": no shadows, no multisampling (100x cheaper on CPU); "high"

    def __post_init__(self):
        cameras = (self.cameras,) if isinstance(self.cameras, str) else tuple(self.cameras)
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown or not cameras:
            raise ValueError(f"cameras: unknown camera name(s) {unknown or '(none given)'}; "
                             f"expected a non-empty subset of {CAMERAS}")
        if len(set(cameras)) != len(cameras):
            raise ValueError(f"cameras: each camera may appear once, got {cameras}")
        object.__setattr__(self, "cameras", cameras)
        size = (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)
        if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and 16 <= s <= 2048 for s in size):
            raise ValueError(f"image_size: expected an int or (height, width) of ints in [16, 2048], "
                             f"got {self.image_size!r}")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        if self.render_quality not in ("fast", "high"):
            raise ValueError(f"render_quality: expected 'fast' or 'high', got {self.render_quality!r}")
