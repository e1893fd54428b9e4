"""One file per RLBench task re-created on MuJoCo; TASKS maps RLBench's task name to its class."""

from llarva_gym.backends.mujoco.tasks.reach_target import ReachTarget
from llarva_gym.backends.mujoco.tasks.sweep_to_dustpan_of_size import SweepToDustpanOfSize

TASKS = {task.name: task for task in (ReachTarget, SweepToDustpanOfSize)}
