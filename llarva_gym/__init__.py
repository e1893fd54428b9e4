"""Gymnasium environments for RLBench tasks, embedded on MuJoCo.

`import llarva_gym` registers `llarva/<task>` ids; `gym.make("llarva_gym:llarva/<task>")` works
with `import gymnasium` alone.
"""

from llarva_gym.backends import mujoco as _select_gl  # noqa: F401  (sets MUJOCO_GL before mujoco loads)
from llarva_gym.env import RLBenchEnv
from llarva_gym.expert import ScriptedExpert
from llarva_gym.observation import Observation, ObservationConfig
from llarva_gym.registration import ALIASES, TASKS, make_vec, register_all, resolve_task
from llarva_gym.wrappers import EncodeInstruction

register_all()

__all__ = ["ALIASES", "TASKS", "EncodeInstruction", "Observation", "ObservationConfig", "RLBenchEnv",
           "ScriptedExpert", "make_vec", "resolve_task"]
