"""One file per RLBench task re-created on MuJoCo. TASKS maps RLBench's task name to its class;
a new task file in this folder is picked up by itself."""

import importlib
import pkgutil

from llarva_gym.backends.mujoco.task import Task

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

TASKS: dict[str, type[Task]] = {
    task.name: task for task in sorted(
        (cls for cls in Task.__subclasses__() if cls.__module__.startswith(__name__)), key=lambda c: c.name)
}
