"""Record scripted-expert demos in RLBench's on-disk layout: `llarva demos`, RLBench's dataset_generator.

    record_demos("sweep_to_dustpan", 100, "data/train", cameras=("front", "wrist"), processes=4)

writes `data/train/sweep_to_dustpan_of_size/all_variations/episodes/episode0 .. episode99`.

Attempts and episodes. Attempt k of a run with seed s resets the env with a seed derived from
(s, k) alone, so attempt k gives the same episode in any process and any run. The expert nearly
always succeeds, but not always: a failed attempt is discarded and the next one tried, and
episode M is the M-th successful attempt. So the dataset depends only on (task, seed, options),
not on the number of processes or on interruptions.

Resume. Each episode folder holds `llarva_episode.json` (the seed, the attempt index and the
options it was recorded with). A rerun counts the episodes already there and continues at the
attempt after the last one's; `episodes` is the number of episodes the folder should hold. Episodes
appear only by renaming a complete folder into place, so an interrupted run never leaves a
half-written `episode<M>`; the hidden leftovers of one are removed by the next run.

Noise injection (DART, Laskey et al. 2017). A policy cloned from clean demos has never seen the
states its own small errors lead to, and under joint-velocity control those errors compound.
With `action_noise=s`, every executed joint velocity is the expert's plus Gaussian noise of
standard deviation `s` times the expert's fastest joint speed at that step (so the arm stands still
where the expert does, and the expert still settles on its waypoints); the expert, which plans
from the state it finds, corrects the drift in the next steps. RLBench's record stays truthful:
`joint_velocities` is what was executed, and `misc["expert_joint_velocities"]` the expert's
command, which `annotate` uses as the label. The noise of attempt k is a function of its reset
seed alone.

Expert takeover (DAgger-style). A policy cloned from demos, even noisy ones, drifts in closed loop
into states no demo visits, and nothing taught it the way back. With `driver` (a learned policy),
each attempt lets it drive the first k steps (k drawn from 1..`driver_steps`, a function of the
attempt's seed) and then the expert takes over from wherever the arm is and finishes the task: the
episode shows the expert recovering from the states the policy itself reaches. The driven steps
stay in the record (they are the history of what follows) and are marked
`misc["policy_driven"]`; `annotate` makes no training sample of them.

Batched takeover. A learned driver answers one observation at a time in each recording process:
for a LLaVA model that is a whole generated answer per step. With
`driver_num_envs=N` the main process instead drives the attempts first, all N at a time in a
vector env, with one batched `predict` per step (on the GPU if the policy is there), and keeps
each attempt's driven actions (`DrivenStart`); the recording processes then replay those actions
from the same reset seed (`ReplayDriver`), which reaches the same states (the simulator is
deterministic; the replay checks the joint positions at every driven step), and the expert takes
over as before. The driven episodes are the driver's own, but a language model's answers can
differ by float rounding with the batch they were computed in, so they are not bit-for-bit those
of `driver_num_envs=None`.
The driven steps are also kept in `<out>/<task>/driven_starts.npz` (about 1 MB for 800 attempts),
and a run that finds that file, recorded with the same settings, replays the attempts it holds
instead of driving them again: a folder re-recorded on another machine (a device call that finds
a fresh machine, with the file carried there) skips the driving, most of a takeover set's time.
Should that machine's simulator not reach the same states (the replay's check fails), the file's
starts are dropped with a warning and the attempts driven again.

Processes. `processes=N` runs attempts in N worker processes (the "spawn" start method: a forked
OpenGL context is not safe), each with its own env; results come back in attempt order and
episodes are numbered in that order. A worker writes its successful attempt into a hidden staging
folder (PNG encoding is the slow part of writing, so it happens in parallel); the main process
renames staging folders into `episode<M>` in order. Scripts that use processes > 1 need the usual
`if __name__ == "__main__":` guard, as any "spawn" multiprocessing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import time
import warnings
import zipfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from llarva_gym.action_modes import VELOCITY_LIMIT
from llarva_gym.demos import Demo, episode_dirs, episode_path, episodes_dir, next_episode_index, save_demo
from llarva_gym.expert import ScriptedExpert
from llarva_gym.observation import ObservationConfig
from llarva_gym.registration import TASKS, make_vec, resolve_task

EPISODE_INFO = "llarva_episode.json"   # how an episode was recorded; read on resume
# Hidden folders an interrupted run may leave in the episodes folder: our staging folders
# (".attempt<k>") and save_demo's temporary ones ("..attempt<k>.tmp-...", ".episode<M>.tmp-...").
_LEFTOVER = re.compile(r"\.{1,2}(attempt\d+|episode\d+)(\..*)?")
# The options an episode is recorded with; a resumed run must use the same ones.
_SETTINGS = ("task", "seed", "cameras", "image_size", "depth", "variation", "max_episode_steps", "render_quality",
             "action_noise", "driver", "driver_steps")
# What a setting was before it was recorded: episodes written before render_quality existed were
# rendered "fast", so a folder of them still resumes with the default.
_SETTING_DEFAULTS = {"render_quality": "fast", "action_noise": 0.0, "driver": None, "driver_steps": 0}
EXPERT_ACTION_KEY = "expert_joint_velocities"   # in an observation's misc: the command behind a noisy step
POLICY_STEP_KEY = "policy_driven"   # in an observation's misc: the step that led here was the driver's


def attempt_seed(seed: int, attempt: int) -> int:
    """The `env.reset(seed=...)` of attempt `attempt` of a run with `seed`: a function of the two alone."""
    return int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])


@dataclass
class Attempt:
    """What one attempt gave: a staged episode folder if the expert succeeded, else the reason."""

    index: int
    reset_seed: int
    steps: int
    success: bool
    reason: str = ""
    staged: str | None = None   # hidden folder holding the complete episode, to be renamed into place


# --- one attempt (runs in a worker process, or in the main one when processes=1) ------------------

_worker: dict = {}   # this process's env and recording settings, made by _start_worker


def _start_worker(settings: dict, folder: str, make_driver=None, torch_threads: int | None = None) -> None:
    """Make this process's env (each process needs its own simulator and OpenGL context) and driver.
    `torch_threads`: a driver running on torch uses that many threads (by default each process
    would take one per core, and the recording processes would crowd each other out)."""
    import llarva_gym  # noqa: F401  (registers the llarva/ ids in a spawned process)
    env = gym.make(f"llarva/{settings['task']}", cameras=settings["cameras"], image_size=settings["image_size"],
                   depth=settings["depth"], variation=settings["variation"],
                   max_episode_steps=settings["max_episode_steps"], render_quality=settings["render_quality"])
    driver = make_driver() if make_driver is not None else None
    if driver is not None and torch_threads:
        try:
            import torch
        except ImportError:   # a driver that does not run on torch
            pass
        else:
            torch.set_num_threads(torch_threads)
    _worker.update(env=env, expert=ScriptedExpert(env), settings=settings, folder=Path(folder), driver=driver)


def _stop_worker() -> None:
    if "env" in _worker:
        _worker["env"].close()
    _worker.clear()


def takeover_step(reset_seed: int, driver_steps: int) -> int:
    """How many steps the driver takes in the attempt reset with `reset_seed`: 1..driver_steps."""
    return int(np.random.default_rng((reset_seed, 2)).integers(1, driver_steps + 1))


@dataclass
class DrivenStart:
    """The driver's steps of one attempt, driven in a vector env, for a recording process to replay."""

    actions: np.ndarray           # (k, 8) float32: the driver's action at steps 0..k-1
    joint_positions: np.ndarray   # (k, 7) float32: the arm's joint positions each was chosen at


class ReplayDivergedError(RuntimeError):
    """A replay of driven steps did not reach the states they were driven from: not a failed
    attempt but a mismatch between the driving and the recording envs, so it stops the run."""


class ReplayDriver:
    """A driver that replays a `DrivenStart`: its actions in order, after checking that the arm is
    where it was when each was chosen (a mismatch means the env was made with other settings)."""

    def __init__(self, driven: DrivenStart):
        self.driven = driven

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        step = 0 if state is None else state
        if step >= len(self.driven.actions):
            raise ReplayDivergedError(f"replay of the driven steps: asked for step {step}, but the driven episode "
                                      f"ended after {len(self.driven.actions)}; the replay left the driven states")
        expected, found = self.driven.joint_positions[step], np.asarray(observation["joint_positions"])
        if not np.allclose(found, expected, rtol=0.0, atol=1e-5):
            raise ReplayDivergedError(f"replay of the driven steps: at step {step} the joint positions are "
                                      f"{found.tolist()}, the driver chose its action at {expected.tolist()}; the "
                                      f"replaying env must be made with the driving env's settings")
        return self.driven.actions[step], step + 1


DRIVEN_STARTS_FILE = "driven_starts.npz"   # in <out>/<task>/: the batched driver's steps of each attempt


def driven_starts_path(out, task: str) -> Path:
    """Where `record_demos` keeps the driven steps of the attempts it drove: `<out>/<task>/driven_starts.npz`."""
    return Path(out) / resolve_task(task) / DRIVEN_STARTS_FILE


def save_driven_starts(path, settings: dict, driven: dict) -> None:
    """Write `driven` ({attempt: DrivenStart}) and the recording settings to `path`, atomically."""
    path = Path(path)
    attempts = sorted(driven)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "wb") as file:
        np.savez_compressed(file, settings=np.array(json.dumps(settings, sort_keys=True)),
                            attempts=np.array(attempts, dtype=np.int64),
                            lengths=np.array([len(driven[a].actions) for a in attempts], dtype=np.int64),
                            actions=np.concatenate([driven[a].actions for a in attempts]).astype(np.float32),
                            joint_positions=np.concatenate([driven[a].joint_positions for a in attempts]).astype(np.float32))
    os.replace(temp, path)


def driven_starts_settings(path) -> dict:
    """The recording settings a driven-starts file was saved with (its driver's name among them)."""
    path = Path(path)
    try:
        with np.load(path) as stored:
            return json.loads(str(stored["settings"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable driven-starts file ({type(error).__name__}: {error}); expected "
                         f"a {DRIVEN_STARTS_FILE} that record_demos saved") from None


def load_driven_starts(path, settings: dict) -> dict:
    """The {attempt: DrivenStart} saved at `path` by a run with these `settings`; {} if there is no
    file. A file from a run with other settings is not used (a warning names them): the attempts
    are driven again. A damaged file is an error that says to remove it."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with np.load(path) as stored:
            recorded = json.loads(str(stored["settings"]))
            attempts, lengths = stored["attempts"], stored["lengths"]
            actions, positions = stored["actions"], stored["joint_positions"]
        if (len(attempts) != len(lengths) or actions.shape != (int(lengths.sum()), 8)
                or positions.shape != (int(lengths.sum()), 7)):
            raise ValueError(f"arrays of mismatched sizes (attempts {len(attempts)}, lengths {len(lengths)}, "
                             f"actions {actions.shape}, joint_positions {positions.shape})")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable driven-starts file ({type(error).__name__}: {error}); remove it "
                         f"to drive the attempts again") from None
    settings = json.loads(json.dumps(settings))    # as JSON has it (tuples become lists)
    differing = sorted(key for key in set(recorded) | set(settings) if recorded.get(key) != settings.get(key))
    if differing:
        warnings.warn(f"{path}: recorded with other settings ({', '.join(f'{k}: {recorded.get(k)!r}' for k in differing)}); "
                      f"not replayed, the attempts are driven again", RuntimeWarning, stacklevel=3)
        return {}
    ends = np.cumsum(lengths)
    return {int(a): DrivenStart(actions[end - k:end], positions[end - k:end])
            for a, k, end in zip(attempts, lengths, ends)}


def drive_attempts(envs, policy, seed: int, attempts, driver_steps: int, progress: bool = False) -> dict:
    """Drive `attempts` (attempt indices of a run with `seed`) with `policy`, `envs.num_envs` at a
    time in `envs` (a vector env with autoreset off, made as the recording env), each for
    `takeover_step(reset_seed, driver_steps)` steps or until its episode ends. One batched
    `predict` per step. Returns {attempt index: DrivenStart}."""
    todo, driven = deque(attempts), {}
    n = envs.num_envs
    running: list[dict | None] = [None] * n
    bar = tqdm(total=len(todo), desc="drive", unit="attempt", disable=not progress, dynamic_ncols=True)

    def start_next(i: int):
        """Reset sub-env i into the next attempt (with none left, into any state: it idles)."""
        seeds = [None] * n
        index = todo.popleft() if todo else None
        if index is not None:
            seeds[i] = attempt_seed(seed, index)
            running[i] = {"index": index, "steps": takeover_step(seeds[i], driver_steps), "actions": [], "positions": []}
        else:
            running[i] = None
        observation, _ = envs.reset(seed=seeds, options={"reset_mask": np.arange(n) == i})
        return observation

    try:
        observation, _ = envs.reset(seed=seed)     # masked resets need every sub-env to hold an observation
        for i in range(n):
            observation = start_next(i)
        episode_start, state = np.ones(n, dtype=bool), None
        while any(attempt is not None for attempt in running):
            actions, state = policy.predict(observation, state=state, episode_start=episode_start, deterministic=True)
            actions = np.asarray(actions, dtype=np.float32)
            for i, attempt in enumerate(running):
                if attempt is not None:
                    attempt["actions"].append(actions[i])
                    attempt["positions"].append(np.asarray(observation["joint_positions"][i], dtype=np.float32))
            observation, _, terminated, truncated, _ = envs.step(actions)
            episode_start[:] = False
            for i, attempt in enumerate(running):
                if attempt is not None and (terminated[i] or truncated[i] or len(attempt["actions"]) == attempt["steps"]):
                    driven[attempt["index"]] = DrivenStart(np.stack(attempt["actions"]), np.stack(attempt["positions"]))
                    bar.update(1)
                    observation = start_next(i)
                    episode_start[i] = True
    finally:
        bar.close()
    return driven


def record_episode(env, expert, reset_seed: int, action_noise: float = 0.0, driver=None,
                   driver_steps: int = 0) -> tuple[Demo, dict]:
    """Run the expert for one episode from `env.reset(seed=reset_seed)`, keeping RLBench's record of
    every step: the observation right after reset, then one after each step (the last included).
    Returns the Demo and the final step's info (`success` says whether to keep it).
    `action_noise`: DART's noise on the executed joint velocities; `driver` (a policy with
    Stable-Baselines3's `predict`) drives the first `takeover_step(reset_seed, driver_steps)`
    steps before the expert takes over (see the module docstring for both)."""
    if action_noise and env.unwrapped.action_mode != "joint_velocity":
        raise ValueError(f"action_noise: noise injection perturbs joint velocities; the env's action_mode is "
                         f"{env.unwrapped.action_mode!r}, expected 'joint_velocity' (or action_noise=0)")
    noise_rng = np.random.default_rng((reset_seed, 1))
    driven = takeover_step(reset_seed, driver_steps) if driver is not None else 0
    obs, start = env.reset(seed=reset_seed)
    observations = [env.unwrapped.rlbench_observation()]
    terminated = truncated = False
    info, driver_state = start, None
    while not (terminated or truncated):
        step = len(observations) - 1
        if step < driven:
            action, driver_state = driver.predict(obs, state=driver_state, episode_start=np.array([step == 0]),
                                                  deterministic=True)
            executed = action
        else:
            action, _ = expert.predict(obs)
            executed = perturb_joint_velocities(action, action_noise, noise_rng) if action_noise else action
        obs, _, terminated, truncated, info = env.step(executed)
        record = env.unwrapped.rlbench_observation()
        if step < driven:
            record.misc[POLICY_STEP_KEY] = True
        elif action_noise:
            record.misc[EXPERT_ACTION_KEY] = np.asarray(action[:7], dtype=np.float64)
        observations.append(record)
    # What env.reset(options={"demo": demo}) reads to rebuild this episode's start.
    demo = Demo(observations, random_seed={"episode_seed": start["episode_seed"], "variation": start["variation"]})
    demo.variation_number, demo.variation_descriptions = start["variation"], list(start["descriptions"])
    return demo, info


def perturb_joint_velocities(action: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """`action` (joint velocities, gripper) with noise of sigma `scale` x its fastest joint speed on
    the joints, clipped to the Panda's velocity limits; the gripper command is kept."""
    action = np.asarray(action, dtype=np.float64)
    sigma = scale * np.max(np.abs(action[:7]))
    joints = np.clip(action[:7] + rng.normal(0.0, 1.0, 7) * sigma, -VELOCITY_LIMIT, VELOCITY_LIMIT)
    return np.r_[joints, action[7]].astype(np.float32)


def _run_attempt(index: int, driven: DrivenStart | None = None) -> Attempt:
    """Record attempt `index` with this process's env (replaying `driven`, the driver's steps
    computed in the main process, if given); stage it on disk if the expert succeeded."""
    settings, folder = _worker["settings"], _worker["folder"]
    reset_seed = attempt_seed(settings["seed"], index)
    driver = ReplayDriver(driven) if driven is not None else _worker["driver"]
    try:
        demo, info = record_episode(_worker["env"], _worker["expert"], reset_seed, settings["action_noise"],
                                    driver, settings["driver_steps"])
    except ReplayDivergedError:
        raise
    except Exception as error:   # a simulator failure loses this attempt, not the run (as RLBench)
        return Attempt(index, reset_seed, 0, False, f"{type(error).__name__}: {error}")
    steps = len(demo) - 1
    if not info["success"]:
        return Attempt(index, reset_seed, steps, False, f"no success within {steps} steps")
    staged = folder / f".attempt{index}"
    save_demo(demo, staged, overwrite=True)
    record = {**settings, "attempt": index, "reset_seed": reset_seed, "steps": steps,
              "episode_seed": info["episode_seed"], "variation_number": info["variation"]}
    (staged / EPISODE_INFO).write_text(json.dumps(record, indent=1) + "\n")
    return Attempt(index, reset_seed, steps, True, staged=str(staged))


# --- the run --------------------------------------------------------------------------------------

def _settings(task, cameras, image_size, depth, variation, seed, max_episode_steps, render_quality="fast",
              action_noise=0.0, driver=None, driver_steps=0) -> dict:
    """Checked options, in the JSON-friendly form stored in each episode's llarva_episode.json."""
    if isinstance(cameras, str):
        cameras = [c.strip() for c in cameras.split(",") if c.strip()]
    config = ObservationConfig(cameras=cameras, image_size=image_size, depth=depth,
                               render_quality=render_quality)   # names bad values
    if variation is not None and not (isinstance(variation, (int, np.integer)) and 0 <= variation < TASKS[task]):
        raise ValueError(f"variation: expected None (one drawn per episode) or an int in "
                         f"[0, {TASKS[task] - 1}] for {task}, got {variation!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    if max_episode_steps is None:   # the task's own limit, as registered for its gym id
        max_episode_steps = gym.spec(f"llarva/{task}").max_episode_steps
    if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, (int, np.integer)) or max_episode_steps < 1:
        raise ValueError(f"max_episode_steps: expected a positive int, got {max_episode_steps!r}")
    if isinstance(action_noise, bool) or not isinstance(action_noise, (int, float)) or not 0 <= action_noise < 10:
        raise ValueError(f"action_noise: expected a number in [0, 10) (noise sigma as a fraction of the expert's "
                         f"fastest joint speed; 0: clean demos), got {action_noise!r}")
    if driver is not None and not (isinstance(driver, str) and driver):
        raise ValueError(f"driver_name: expected a non-empty str naming the driver, got {driver!r}")
    if driver is not None and (isinstance(driver_steps, bool) or not isinstance(driver_steps, (int, np.integer))
                               or driver_steps < 1):
        raise ValueError(f"driver_steps: expected an int >= 1 (the most steps the driver takes before the "
                         f"expert takes over), got {driver_steps!r}")
    return {"task": task, "seed": int(seed), "cameras": list(config.cameras), "image_size": list(config.image_size),
            "depth": bool(depth), "variation": None if variation is None else int(variation),
            "max_episode_steps": int(max_episode_steps), "render_quality": config.render_quality,
            "action_noise": float(action_noise), "driver": driver,
            "driver_steps": int(driver_steps) if driver is not None else 0}


def _remove_leftovers(folder: Path) -> None:
    # Hidden folders of an interrupted run: complete or partial, they are not episodes.
    if folder.is_dir():
        for entry in os.scandir(folder):
            if entry.is_dir() and _LEFTOVER.fullmatch(entry.name):
                shutil.rmtree(entry.path, ignore_errors=True)


def _first_attempt(existing: list[Path], settings: dict) -> int:
    """The attempt after the last recorded episode's; refuses to extend a folder made differently."""
    if not existing:
        return 0
    info_path = existing[-1] / EPISODE_INFO
    if not info_path.is_file():
        raise ValueError(f"{existing[-1]}: has no {EPISODE_INFO}, so it was not recorded by record_demos "
                         f"and a run cannot continue it reproducibly; write to another `out` folder")
    try:
        recorded = json.loads(info_path.read_text())
    except ValueError as error:
        raise ValueError(f"{info_path}: not readable JSON ({error}); the last episode is damaged, "
                         f"remove {existing[-1].name} to continue") from None
    recorded = {**_SETTING_DEFAULTS, **recorded}
    differing = {key: (recorded.get(key), settings[key]) for key in _SETTINGS if recorded.get(key) != settings[key]}
    if differing:
        listing = ", ".join(f"{key}: recorded {old!r}, asked {new!r}" for key, (old, new) in differing.items())
        raise ValueError(f"{info_path}: the episodes in this folder were recorded with other options ({listing}); "
                         f"continue with the same options or write to another `out` folder")
    if not isinstance(recorded.get("attempt"), int):
        raise ValueError(f"{info_path}: has no integer 'attempt'; remove {existing[-1].name} to continue")
    return recorded["attempt"] + 1


def record_demos(task: str, episodes: int, out, *, image_size=128, cameras=("front",), depth: bool = False,
                 processes: int = 1, variation: int | None = None, seed: int = 0, progress: bool = True,
                 max_episode_steps: int | None = None, max_attempts: int | None = None,
                 render_quality: str = "fast", action_noise: float = 0.0, driver=None, driver_steps: int = 30,
                 driver_name: str | None = None, driver_num_envs: int | None = None) -> dict:
    """Record scripted-expert episodes of `task` until `<out>/<task>/all_variations/episodes` holds
    `episodes` of them (RLBench's layout, `task` resolved to RLBench's name); returns a summary.

    `cameras` (names, or "front,wrist"), `image_size` and `depth` choose the images stored;
    `variation` fixes one variation (default: one drawn per episode from its seed). Episodes are
    a function of (task, seed, options) alone, whatever `processes` is and however often the run
    was interrupted and resumed. An episode must succeed within `max_episode_steps` steps (default:
    the task's registered limit, the evaluation's); failed attempts are discarded. `max_attempts` caps the
    attempts of this call (default: twice the episodes still missing, plus 10); reaching it
    warns and returns with `complete` False. `render_quality` is the env's: "fast" (default, no
    shadows) or "high" (shadows and multisampling, much slower on CPU); evaluate a policy trained on
    such images with the same `render_quality`. `action_noise`: DART's noise injection (module
    docstring), 0 for clean demos. `driver`: expert takeover (module docstring), a callable with
    no arguments that returns the policy (each worker process makes its own, so with
    `processes` > 1 it must pickle: a `functools.partial`, say), which drives at most
    `driver_steps` steps of each attempt; `driver_name` (default: its repr) identifies it in the
    episodes' records, which a resumed run must match. `driver_num_envs=N`: the main process makes
    the driver once and drives the attempts N at a time, batched, before the recording processes
    replay them (module docstring); for a driver on a GPU.

    Summary: task, episodes_dir, episodes (in the folder now), episodes_written (by this call),
    attempts, failures (list of {attempt, reason}), complete, seconds, demos_per_minute, and with
    `driver_num_envs` driving_seconds (of seconds, those spent driving) and, where a saved
    `driven_starts.npz` was replayed, replayed_from_file (attempts).
    """
    started = time.perf_counter()
    task = resolve_task(task)
    if driver is not None and not callable(driver):
        raise ValueError(f"driver: expected a callable that returns a policy (or None), got {driver!r}")
    settings = _settings(task, cameras, image_size, depth, variation, seed, max_episode_steps, render_quality,
                         action_noise, None if driver is None else (driver_name or repr(driver)), driver_steps)
    if isinstance(episodes, bool) or not isinstance(episodes, (int, np.integer)) or episodes < 0:
        raise ValueError(f"episodes: expected a non-negative int, got {episodes!r}")
    if isinstance(processes, bool) or not isinstance(processes, (int, np.integer)) or processes < 1:
        raise ValueError(f"processes: expected a positive int, got {processes!r}")
    if driver_num_envs is not None and (isinstance(driver_num_envs, bool) or driver is None
                                        or not isinstance(driver_num_envs, (int, np.integer)) or driver_num_envs < 1):
        raise ValueError(f"driver_num_envs: expected None or, with a driver, a positive int (the attempts driven "
                         f"at a time in the main process), got {driver_num_envs!r} with driver={driver!r}")

    folder = episodes_dir(out, task)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder)
    existing = episode_dirs(out, task)
    next_attempt = _first_attempt(existing, settings)
    next_index = next_episode_index(out, task)
    missing = max(0, episodes - len(existing))
    if max_attempts is None:
        max_attempts = 2 * missing + 10
    attempt_limit = next_attempt + max_attempts

    written, failures, attempts = 0, [], 0
    bar = tqdm(total=episodes, initial=min(len(existing), episodes), desc=f"demos {task}", unit="demo",
               disable=not progress, dynamic_ncols=True)
    pool = driving = None
    # Every attempt's driven steps known so far (saved by an earlier run, maybe on another machine),
    # and those still to replay.
    starts_path = driven_starts_path(out, task)
    known = load_driven_starts(starts_path, settings) if driver is not None else {}
    driven: dict[int, DrivenStart] = {a: start for a, start in known.items() if a >= next_attempt}
    from_file, replayed_from_file = set(driven), 0
    batched_driver = None
    try:
        if missing and driver_num_envs:
            # The recording processes replay what the main process drove: they need no driver.
            batched_driver, driver = driver, None
            if not all(a in driven for a in range(next_attempt, next_attempt + missing)):
                driving = _BatchedDriving(settings, batched_driver, driver_num_envs, progress)
        if missing and processes == 1:
            _start_worker(settings, str(folder), driver)
        elif missing:
            pool = ProcessPoolExecutor(min(processes, missing), mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_start_worker,
                                       initargs=(settings, str(folder), driver, max(1, (os.cpu_count() or 1) // processes)))
        # Keep as many attempts under way as there are episodes still missing (at most 2 per
        # process, so none waits for work): with a successful expert, none is wasted at the end.
        window = 1 if pool is None else 2 * processes

        def run(index: int, start: DrivenStart | None):
            return _Later(_run_attempt, index, start) if pool is None else pool.submit(_run_attempt, index, start)

        under_way: deque = deque()
        while written < missing:
            while len(under_way) < min(window, missing - written) and next_attempt < attempt_limit:
                if batched_driver is not None and next_attempt not in driven:
                    if driving is None:   # the saved starts ran out: more attempts failed than they cover
                        driving = _BatchedDriving(settings, batched_driver, driver_num_envs, progress, fork=False)
                    # Drive every attempt still needed at once (one batch: all of them, at first).
                    count = min(missing - written - len(under_way), attempt_limit - next_attempt)
                    new = driving.drive([a for a in range(next_attempt, next_attempt + count) if a not in driven])
                    driven.update(new)
                    known.update(new)
                    save_driven_starts(starts_path, settings, known)
                start = driven.pop(next_attempt, None)
                under_way.append((next_attempt, next_attempt in from_file, run(next_attempt, start)))
                next_attempt += 1
            if not under_way:
                break
            index, saved_start, future = under_way.popleft()
            try:
                result: Attempt = future.result()
                replayed_from_file += saved_start
            except ReplayDivergedError as error:
                if not saved_start:
                    raise
                # The saved starts do not replay on this machine (its simulator differs in the last
                # digits): forget them all and drive this attempt and the rest again.
                if from_file:
                    warnings.warn(f"{starts_path}: the saved driven steps do not replay here ({error}); driving the "
                                  f"attempts again", RuntimeWarning, stacklevel=2)
                    for attempt in from_file:
                        driven.pop(attempt, None)
                        known.pop(attempt, None)
                    from_file.clear()
                if batched_driver is None:     # the recording processes drive themselves
                    result = run(index, None).result()
                else:
                    if driving is None:
                        driving = _BatchedDriving(settings, batched_driver, driver_num_envs, progress, fork=False)
                    new = driving.drive([index])
                    known.update(new)
                    save_driven_starts(starts_path, settings, known)
                    result = run(index, new[index]).result()
            attempts += 1
            if not result.success:
                failures.append({"attempt": result.index, "reason": result.reason})
                bar.set_postfix(failures=len(failures))
                continue
            target = episode_path(out, task, next_index)
            try:
                os.rename(result.staged, target)
            except OSError as error:
                raise FileExistsError(f"{target}: could not move the recorded episode into place ({error}); "
                                      f"is another run writing to this folder?") from error
            next_index += 1
            written += 1
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if driving is not None:
            driving.close()
        _stop_worker()
        _remove_leftovers(folder)   # the staged episodes of attempts no longer needed

    seconds = time.perf_counter() - started
    summary = {"task": task, "episodes_dir": str(folder), "episodes": len(existing) + written,
               "episodes_written": written, "attempts": attempts, "failures": failures,
               "complete": len(existing) + written >= episodes, "processes": int(processes),
               "seconds": round(seconds, 3), "demos_per_minute": round(60 * written / seconds, 2)}
    if driving is not None:     # of `seconds`, those the batched driver took
        summary["driving_seconds"] = round(driving.seconds, 3)
    if replayed_from_file:      # attempts replayed from driven_starts.npz, not driven by this run
        summary["replayed_from_file"] = replayed_from_file
    if not summary["complete"]:
        warnings.warn(f"record_demos: {task}: stopped after {attempts} attempts ({len(failures)} failed) with "
                      f"{summary['episodes']} of {episodes} episodes; last failure: "
                      f"{failures[-1]['reason'] if failures else 'none'}. Rerun to continue "
                      f"(or raise max_attempts)", RuntimeWarning, stacklevel=2)
    if progress and driving is not None:
        tqdm.write(f"{task}: driving the attempts took {driving.seconds:.1f} s")
    if progress:
        tqdm.write(f"{task}: wrote {written} episodes ({summary['episodes']} in {folder}), {attempts} attempts, "
                   f"{len(failures)} failed, {seconds:.1f} s, {summary['demos_per_minute']:.1f} demos/min")
    return summary


class _BatchedDriving:
    """The driver and its vector env in the main process, for `drive_attempts`. The env workers
    are forked before the driver is made (which may start CUDA), or spawned if CUDA runs already."""

    def __init__(self, settings: dict, make_driver, num_envs: int, progress: bool, fork: bool = True):
        self.settings, self.progress, self.seconds = settings, progress, 0.0
        # `fork=False`: made while the recording processes' pool runs (its threads make a fork unsafe).
        self.envs = make_vec(f"llarva/{settings['task']}", num_envs, autoreset_mode=gym.vector.AutoresetMode.DISABLED,
                             context=None if fork else "spawn", cameras=settings["cameras"],
                             image_size=settings["image_size"], depth=settings["depth"], variation=settings["variation"],
                             max_episode_steps=settings["max_episode_steps"], render_quality=settings["render_quality"])
        try:
            self.policy = make_driver()
        except BaseException:
            self.envs.close()
            raise

    def drive(self, attempts) -> dict:
        started = time.perf_counter()
        driven = drive_attempts(self.envs, self.policy, self.settings["seed"], attempts, self.settings["driver_steps"],
                                self.progress)
        self.seconds += time.perf_counter() - started
        return driven

    def close(self) -> None:
        self.envs.close()


class _Later:
    """An attempt run in this process when its `result()` is asked for, as a future of the pool's
    (whose errors, a diverged replay's among them, also come from `result()`)."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def result(self):
        return self.function(*self.args)
