"""Action modes: what an action vector means, its space, and the checks every action passes.

- `joint_velocity` (LLARVA's, RLBench's `MoveArmThenGripper(JointVelocity(), Discrete())`): seven
  joint velocities in rad/s within the Panda's limits, then gripper_open in [0, 1] (>= 0.5 open).
- `joint_position`: seven absolute joint positions (rad) within the joint limits, then gripper_open.
- `ee_pose` (RLBench's `EndEffectorPoseViaIK`): gripper-tip position xyz (m, within RLBench's
  workspace), quaternion xyzw (any non-zero length; normalised), then gripper_open.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

# Kept here rather than imported from the MuJoCo backend so that the RLBench backend shares them.
JOINT_LOWER = np.array([-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973])
JOINT_UPPER = np.array([2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973])
VELOCITY_LIMIT = np.array([2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61])
# RLBench's workspace (PerAct's scene bounds), metres.
WORKSPACE_LOW = np.array([-0.3, -0.5, 0.6])
WORKSPACE_HIGH = np.array([0.7, 0.5, 1.6])

ACTION_MODES = ("joint_velocity", "joint_position", "ee_pose")

_BOUNDS = {
    "joint_velocity": (np.r_[-VELOCITY_LIMIT, 0.0], np.r_[VELOCITY_LIMIT, 1.0]),
    "joint_position": (np.r_[JOINT_LOWER, 0.0], np.r_[JOINT_UPPER, 1.0]),
    "ee_pose": (np.r_[WORKSPACE_LOW, -np.ones(4), 0.0], np.r_[WORKSPACE_HIGH, np.ones(4), 1.0]),
}
_NAMES = {
    "joint_velocity": [f"joint_velocity[{i}] (rad/s)" for i in range(7)] + ["gripper_open"],
    "joint_position": [f"joint_position[{i}] (rad)" for i in range(7)] + ["gripper_open"],
    "ee_pose": ["position.x (m)", "position.y (m)", "position.z (m)", "quaternion.x", "quaternion.y",
                "quaternion.z", "quaternion.w", "gripper_open"],
}
# float32 actions that were clipped to a bound in float64 may land a hair outside it.
_TOLERANCE = 1e-5


def check_mode(action_mode: str) -> str:
    if action_mode not in ACTION_MODES:
        raise ValueError(f"action_mode: unknown action mode {action_mode!r}; expected one of {ACTION_MODES}")
    return action_mode


def action_space(action_mode: str) -> spaces.Box:
    low, high = _BOUNDS[check_mode(action_mode)]
    return spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)


def validate_action(action_mode: str, action) -> np.ndarray:
    """The action as float64, or a ValueError that names the offending field and the expected form."""
    low, high = _BOUNDS[check_mode(action_mode)]
    names = _NAMES[action_mode]
    expected = f"a float array of shape (8,) for action_mode {action_mode!r}: {', '.join(names)}"
    try:
        array = np.asarray(action)
    except Exception as error:  # ragged lists and other oddities
        raise ValueError(f"action: could not be read as an array ({error}); expected {expected}") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"action: dtype {array.dtype} is not numeric; expected {expected}")
    if array.shape != (8,):
        raise ValueError(f"action: shape {array.shape}; expected {expected}")
    array = array.astype(np.float64)
    for i, (value, lo, hi) in enumerate(zip(array, low, high)):
        if not np.isfinite(value):
            raise ValueError(f"action[{i}] ({names[i]}) is {value}; expected a finite number in [{lo:g}, {hi:g}]")
        if value < lo - _TOLERANCE or value > hi + _TOLERANCE:
            raise ValueError(f"action[{i}] ({names[i]}) = {value:g} is out of range; expected a value in [{lo:g}, {hi:g}]")
    array = np.clip(array, low, high)
    if action_mode == "ee_pose":
        norm = np.linalg.norm(array[3:7])
        if norm < 1e-6:
            raise ValueError("action[3:7] (quaternion xyzw) has zero length; expected a rotation quaternion")
        array[3:7] /= norm
    return array
