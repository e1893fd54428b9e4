"""evaluate(policy, task): success rate of a policy on a task, as LLARVA's RLBench evaluation measures it.

    from llarva_gym.evaluation import evaluate, print_summary
    results = evaluate(policy, "sweep_to_dustpan", episodes=10, num_envs=4,
                       results_path="outputs/eval.json", video_dir="outputs/videos")
    print_summary(results)

`policy` is any object with Stable-Baselines3's `predict(observation, state, episode_start,
deterministic) -> (actions, state)` that takes a batch from a vector env (`LlarvaPolicy`, an SB3
model), or the string "expert" for the scripted expert. No torch here: policies come in as objects.

The episode set. Episode i starts from `reset(seed=episode_reset_seed(seed, i))` (the env draws
the variation and the layout from it), or, with `demos=ROOT`, from the i-th stored demo's initial
state (`reset(options={"demo": demo})`: the demo's layout is rebuilt, its actions are not
replayed, as LLARVA's `eval_from_eps_number`). So a rerun, with any `num_envs`, is the same set.

Results. `results_path` is rewritten atomically (temp file + rename) after every finished episode;
a rerun with the same path skips the episodes already there, so a killed evaluation loses at most
the episodes that were running. Videos: one MP4 per episode from the env's 256x256 front render,
with the instruction and, when the policy reports one in `last_info`, its predicted visual trace.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from llarva_gym.expert import ScriptedExpert
from llarva_gym.files import write_json_atomic
from llarva_gym.registration import make_vec, resolve_task

VIDEO_FPS = 20            # one frame per control step of 0.05 s
# Evaluation episode i resets with a seed derived from (seed, i, _EVAL_STREAM). The stream number
# keeps evaluation episodes apart from `llarva demos --seed` training episodes, which derive their
# seeds from (seed, attempt): evaluating with seed 0 must not replay the demos recorded with seed 0.
_EVAL_STREAM = 0xE7A1
# What a results file must agree on with the run that resumes it.
_RUN_FIELDS = ("task", "policy", "seed", "episode_length", "demos", "render_quality", "variation")
# What a field was before results files recorded it: runs before render_quality existed rendered "fast".
_RUN_DEFAULTS = {"render_quality": "fast"}


def episode_reset_seed(seed: int, index: int) -> int:
    """The `env.reset(seed=...)` of evaluation episode `index` of a run with `seed`."""
    return int(np.random.SeedSequence([seed, index, _EVAL_STREAM]).generate_state(1)[0])


@dataclass
class _Episode:
    """An episode running in one sub-env."""

    index: int
    record: dict
    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    parse_errors: int = 0
    frames: list = field(default_factory=list)


def evaluate(policy, task: str, *, episodes: int = 10, episode_length: int | None = None, num_envs: int = 1,
             demos=None, video_dir=None, results_path=None, seed: int = 0, progress: bool = True,
             render_quality: str = "fast", variation: int | None = None) -> dict:
    """Run `episodes` episodes of `task` with `policy` over `num_envs` parallel envs; returns the results.

    `variation`: every episode of that one variation (the env's `variation`); default: each
    episode's drawn from its seed.

    `render_quality` is the env's ("fast", or "high": shadows and multisampling): a policy trained on
    demos recorded with "high" sees the same rendering.

    Results (also the JSON at `results_path`): the run's `task`, `policy`, `seed`,
    `episode_length`, `demos`, `render_quality`; `episodes`, one record per finished episode
    (index, reset_seed or demo, episode_seed, variation, instruction, success, steps, seconds,
    parse_errors, and invalid_action when the env refused one, which ends the episode as a failure,
    as in LLARVA's evaluation); and `summary` (episodes, successes, success_rate, mean_steps).
    """
    task = resolve_task(task)
    if episode_length is None:   # the task's own limit: 120 (LLARVA's) for most
        episode_length = gym.spec(f"llarva/{task}").max_episode_steps
    for name, value, low in (("episodes", episodes, 0), ("episode_length", episode_length, 1),
                             ("num_envs", num_envs, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if isinstance(policy, str) and policy != "expert":
        raise ValueError(f"policy: expected an object with predict() or the string 'expert', got {policy!r}")
    if not isinstance(policy, str) and not callable(getattr(policy, "predict", None)):
        raise ValueError(f"policy: {type(policy).__name__} has no predict(observation, state, episode_start, "
                         "deterministic) method")
    # Checked here, not only by the env: a resumed run with nothing left to do makes no env.
    if not isinstance(render_quality, str) or render_quality not in ("fast", "high"):
        raise ValueError(f"render_quality: expected 'fast' or 'high', got {render_quality!r}")
    if variation is not None and demos is not None:
        raise ValueError("variation: the stored demos fix each episode's variation; pass variation=None with demos")
    demo_dirs = _demo_dirs(demos, task, episodes)

    run = {"task": task, "policy": _policy_name(policy), "seed": int(seed), "episode_length": int(episode_length),
           "demos": str(Path(demos).resolve()) if demos is not None else None, "render_quality": render_quality}
    if variation is not None:     # recorded only when fixed: results files written before it still resume
        run["variation"] = int(variation)
    results = _load_results(results_path, run)
    done = {record["index"] for record in results["episodes"]}
    todo = deque(i for i in range(episodes) if i not in done)
    bar = tqdm(total=episodes, initial=episodes - len(todo), desc=f"eval {task}", unit="episode",
               disable=not progress)
    if not todo:
        bar.close()
        return results
    video_dir = Path(video_dir) if video_dir is not None else None
    if video_dir is not None:
        video_dir.mkdir(parents=True, exist_ok=True)

    # Each sub-env's episodes are started by this loop, not by the vector env's autoreset: every
    # episode needs its own reset (its seed or its demo), and a video needs the frame of the final
    # step, which same-step autoreset would have replaced by the next episode's first frame. So
    # autoreset is off and a finished sub-env is reset alone, with a one-hot `reset_mask`.
    num_envs = min(num_envs, len(todo))
    envs = make_vec(f"llarva/{task}", num_envs, autoreset_mode=gym.vector.AutoresetMode.DISABLED,
                    max_episode_steps=episode_length, render_mode="rgb_array" if video_dir else None,
                    render_quality=render_quality, **({"variation": variation} if variation is not None else {}))
    try:
        if isinstance(policy, str):    # "expert"
            policy = ScriptedExpert(envs)
        running: list[_Episode | None] = [None] * num_envs

        def start_next(i: int):
            """Reset sub-env i into the next episode to run (or, with none left, any episode, ignored)."""
            mask = np.arange(num_envs) == i
            seeds, options = [None] * num_envs, {"reset_mask": mask}
            index = todo.popleft() if todo else None
            if index is not None and demo_dirs is not None:
                from llarva_gym.demos import load_demo
                options["demo"] = load_demo(demo_dirs[index], load_images=False)
            elif index is not None:
                seeds[i] = episode_reset_seed(seed, index)
            observation, info = envs.reset(seed=seeds, options=options)
            running[i] = None if index is None else _Episode(index, {
                "index": index,
                **({"demo": str(demo_dirs[index])} if demo_dirs is not None else {"reset_seed": seeds[i]}),
                "episode_seed": int(info["episode_seed"][i]), "variation": int(info["variation"][i]),
                "instruction": str(observation["instruction"][i]),
            })
            return observation

        observation, _ = envs.reset(seed=seed)      # masked resets need every sub-env to hold an observation
        for i in range(num_envs):
            observation = start_next(i)
        episode_start = np.ones(num_envs, dtype=bool)
        state = None
        frames = envs.call("render") if video_dir else None
        while any(episode is not None for episode in running):
            actions, state = policy.predict(observation, state=state, episode_start=episode_start,
                                            deterministic=True)
            step_info = list(getattr(policy, "last_info", None) or [{}] * num_envs)
            for i, episode in enumerate(running):
                if episode is not None:
                    episode.parse_errors += bool(step_info[i].get("parse_error"))
                    if frames is not None:
                        episode.frames.append(_video_frame(frames[i], episode.record["instruction"],
                                                           step_info[i].get("trace"), observation["front_rgb"][i]))
            observation, _, terminated, truncated, info = envs.step(actions)
            episode_start[:] = False
            frames = envs.call("render") if video_dir else None
            for episode in running:
                if episode is not None:
                    episode.steps += 1
            # A refused action (RLBench's InvalidActionError) ends the episode as a failure.
            refused = [info["invalid_action"][i] if info.get("_invalid_action", np.zeros(num_envs))[i] else None
                       for i in range(num_envs)]
            finished = [i for i in range(num_envs) if terminated[i] or truncated[i] or refused[i]]
            for i in finished:
                episode = running[i]
                if episode is not None:
                    if frames is not None:
                        episode.frames.append(_video_frame(frames[i], episode.record["instruction"]))
                    _finish(episode, bool(info["success"][i]) and not refused[i], refused[i],
                            results, results_path, video_dir)
                    bar.update(1)
                observation = start_next(i)
                episode_start[i] = True
            if finished and video_dir:
                frames = envs.call("render")    # the new episodes' first frames
    finally:
        envs.close()
        bar.close()
    return results


def _finish(episode: _Episode, success: bool, refused, results: dict, results_path, video_dir) -> None:
    record = {**episode.record, "success": success, "steps": episode.steps,
              "seconds": round(time.perf_counter() - episode.started, 3), "parse_errors": episode.parse_errors}
    if refused:
        record["invalid_action"] = str(refused)
    if video_dir is not None:
        record["video"] = str(_write_video(episode.frames, video_dir / f"episode{episode.index:03d}.mp4"))
    results["episodes"] = sorted(results["episodes"] + [record], key=lambda r: r["index"])
    results["summary"] = _summary(results["episodes"])
    if results_path is not None:
        write_json_atomic(results_path, results)


def _summary(records: list[dict]) -> dict:
    successes = sum(record["success"] for record in records)
    return {"episodes": len(records), "successes": successes,
            "success_rate": successes / len(records) if records else 0.0,
            "mean_steps": float(np.mean([record["steps"] for record in records])) if records else 0.0}


def _policy_name(policy) -> str:
    if isinstance(policy, str):
        return policy
    return str(getattr(policy, "name", None) or type(policy).__name__)


def _demo_dirs(demos, task: str, episodes: int) -> list[Path] | None:
    if demos is None:
        return None
    from llarva_gym.demos import episode_dirs
    dirs = episode_dirs(demos, task)
    if len(dirs) < episodes:
        raise ValueError(f"demos: {demos} holds {len(dirs)} {task} episode(s) but {episodes} were asked for; "
                         f"episode i starts from the i-th stored demo")
    return dirs[:episodes]


# --- results file ----------------------------------------------------------------------------------

def _load_results(results_path, run: dict) -> dict:
    """The results so far: those in `results_path` if it exists (and is of this run), else none."""
    fresh = {**run, "summary": _summary([]), "episodes": []}
    if results_path is None or not Path(results_path).exists():
        return fresh
    path = Path(results_path)
    try:
        results = json.loads(path.read_text())
        records = results["episodes"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"results_path: {path} is not a results file of evaluate() ({error}); "
                         "move it away or pass another path") from None
    results = {**_RUN_DEFAULTS, **results}
    different = {key: (results.get(key), run.get(key)) for key in _RUN_FIELDS if results.get(key) != run.get(key)}
    if different:
        listing = ", ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in different.items())
        raise ValueError(f"results_path: {path} holds the results of another run ({listing}); "
                         "pass another path to keep both, or delete it to start over")
    return {**fresh, "episodes": records, "summary": _summary(records)}


# --- video -------------------------------------------------------------------------------------------

def _video_frame(frame: np.ndarray, instruction: str, trace=None, observation_image=None) -> np.ndarray:
    """A render with the instruction on top and, if given, the predicted visual trace.

    The trace is in pixels of the observation image (128x128); it is scaled to the render's size.
    """
    image = Image.fromarray(np.asarray(frame, dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    if trace is not None and len(trace) and observation_image is not None:
        scale = np.array([image.width / observation_image.shape[1], image.height / observation_image.shape[0]])
        points = [tuple(p) for p in (np.asarray(trace, dtype=np.float64) + 0.5) * scale]
        if len(points) > 1:
            draw.line(points, fill=(255, 64, 0), width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(255, 200, 0))
    draw.rectangle((0, 0, image.width, 14), fill=(0, 0, 0))
    draw.text((4, 2), instruction, fill=(255, 255, 255))
    return np.asarray(image)


def _write_video(frames: list[np.ndarray], path: Path) -> Path:
    import imageio.v2 as imageio
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    with imageio.get_writer(tmp, format="FFMPEG", fps=VIDEO_FPS) as writer:
        for frame in frames:
            writer.append_data(frame)
    os.replace(tmp, path)
    return path


# --- printing ----------------------------------------------------------------------------------------

def print_summary(results: dict) -> None:
    """A small table: one line per episode, then the success rate."""
    records = results["episodes"]
    print(f"{'episode':>7}  {'variation':>9}  {'success':>7}  {'steps':>5}  {'seconds':>7}  instruction")
    for r in records:
        print(f"{r['index']:>7}  {r['variation']:>9}  {'yes' if r['success'] else 'no':>7}  {r['steps']:>5}  "
              f"{r['seconds']:>7.1f}  {r['instruction']}")
    summary = results["summary"]
    print(f"{results['task']} | policy {results['policy']} | {summary['successes']}/{summary['episodes']} "
          f"succeeded ({100 * summary['success_rate']:.1f}%) | mean steps {summary['mean_steps']:.1f}")
