"""The task table and its Gymnasium ids: `llarva/<rlbench_name>` and short aliases."""

import sys

import gymnasium as gym

from llarva_gym.backends.mujoco.tasks import TASKS as _EMBEDDED_TASKS

# Every supported RLBench task and its number of variations.
TASKS: dict[str, int] = {name: task.variation_count for name, task in _EMBEDDED_TASKS.items()}
ALIASES: dict[str, str] = {alias: name for name, task in _EMBEDDED_TASKS.items() for alias in task.aliases}


def register_all() -> None:
    ids = [(name, name) for name in TASKS] + list(ALIASES.items())
    for env_name, task in ids:
        env_id = f"llarva/{env_name}"
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="llarva_gym.env:RLBenchEnv", kwargs={"task": task},
                         max_episode_steps=_EMBEDDED_TASKS[task].max_episode_steps)


def resolve_task(name: str) -> str:
    """RLBench's task name for a task name, alias or env id (`llarva/sweep_to_dustpan`)."""
    short = name.split("/", 1)[1] if name.startswith("llarva/") else name
    short = ALIASES.get(short, short)
    if short not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; known tasks: {sorted(TASKS)} "
                         f"(aliases: {sorted(ALIASES)})")
    return short


def make_vec(env_id: str, num_envs: int, *, asynchronous: bool = True,
             autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, context: str | None = None, **kwargs):
    """A vector env for demos and evaluation: subprocess workers, same-step autoreset (as LeRobot,
    Meta-World and ManiSkill evaluate), and no shared memory, which cannot carry a Text space.
    Workers are forked, which is safe because the software renderer runs without helper threads
    (LP_NUM_THREADS=0, see backends/mujoco/__init__.py). `autoreset_mode=DISABLED` is for
    callers that reset each finished sub-env themselves (evaluation: per-episode reset options).
    A process that has started CUDA (a policy trained or run on a GPU here) spawns them instead: a
    child forked after that cannot make an EGL context. `context` chooses explicitly."""
    if context is None:
        torch = sys.modules.get("torch")
        context = "spawn" if torch is not None and torch.cuda.is_initialized() else "fork"
    if num_envs == 1 or not asynchronous:
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync", **kwargs,
                            vector_kwargs={"autoreset_mode": autoreset_mode})
    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="async", **kwargs,
                        vector_kwargs={"autoreset_mode": autoreset_mode,
                                       "shared_memory": False, "context": context})
