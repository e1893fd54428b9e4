"""Adapter over real RLBench + PyRep + CoppeliaSim (optional; not run on the project's machines)."""

from __future__ import annotations

INSTALL_HELP = (
    "backend='rlbench' needs CoppeliaSim 4.1, PyRep and RLBench, which are not on PyPI. Install "
    "CoppeliaSim 4.1 and set COPPELIASIM_ROOT, LD_LIBRARY_PATH=$COPPELIASIM_ROOT and "
    "QT_QPA_PLATFORM_PLUGIN_PATH=$COPPELIASIM_ROOT, then `pip install git+https://github.com/stepjam/PyRep` "
    "and `pip install git+https://github.com/stepjam/RLBench`; see the README section "
    "'Real RLBench backend'. The default backend='mujoco' needs none of this."
)


def import_rlbench():
    try:
        import rlbench  # noqa: F401
        import pyrep  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{INSTALL_HELP} (import failed: {error})") from None


class RLBenchBackend:
    name = "rlbench"

    def __init__(self, task_name, obs_config, action_mode):
        import_rlbench()
        raise NotImplementedError("The RLBench adapter is not implemented yet (issue 8).")
