"""Demos -> LLaVA conversation JSON: LLARVA's instruction-tuning data.

One entry per step t of every episode except the last step (it has no label):

    {"id": 17, "image": "<task>/all_variations/episodes/episode3/front_rgb/5.png",
     "conversations": [{"from": "human", "value": <question: image, instruction, joint history>},
                       {"from": "gpt", "value": <answer: the action of step t + 1>}]}

The text comes from `llarva_policy.codec`, so what we train on is what `predict` parses. The label
of step t is observation t + 1's joint_velocities and gripper_open (RLBench stores with each
observation the velocities that led to it); in demos recorded with noise injection
(`record_demos(action_noise=...)`) the label is the expert's command,
`misc["expert_joint_velocities"]`, not the noisy velocity executed; the steps a learned policy
drove (`record_demos(driver=...)`, marked `misc["policy_driven"]`) give no entry. With `visual_trace=True` the answer also holds the end
effector's future path in the front image (see `end_effector_trace`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import os
import posixpath
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from llarva_gym.demos import episode_dirs, load_demo
from llarva_gym.files import write_json_atomic
from llarva_gym.recording import EXPERT_ACTION_KEY, POLICY_STEP_KEY
from llarva_policy import codec

TRACE_POINTS = 30   # points in a visual trace, as the original development code (about 30)


def project_points(points_world: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Pixel positions (N, 2) as (u = column, v = row), floats, of world points (N, 3).

    `extrinsics` is the camera-to-world pose (4x4) and `intrinsics` the 3x3 camera matrix, as
    RLBench stores them in `misc`: PyRep's camera looks along its +z axis, and its intrinsics have
    negative focal lengths, which is what makes this plain pinhole projection land on the image
    as RLBench saves it (camera +x goes to smaller columns, camera +y to smaller rows).
    """
    points = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
    world_to_camera = np.linalg.inv(np.asarray(extrinsics, dtype=np.float64))
    in_camera = points @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
    depth = in_camera[:, 2]
    if np.any(depth <= 1e-9):
        raise ValueError(f"points_world: {int(np.sum(depth <= 1e-9))} point(s) lie behind the camera "
                         f"(camera-frame z <= 0); expected points in front of it")
    homogeneous = in_camera @ np.asarray(intrinsics, dtype=np.float64).T
    return homogeneous[:, :2] / homogeneous[:, 2:3]


def end_effector_trace(demo: Sequence, step: int, *, image_size: tuple[int, int],
                       max_points: int = TRACE_POINTS) -> np.ndarray:
    """The end effector's path from `step` to the end of the episode in the front image.

    Returns exactly `max_points` integer pixel positions (column, row), clipped to the image
    (`image_size` is (height, width)). The path starts at the current step and always ends at the
    episode's last step; longer paths are subsampled evenly, shorter ones are padded by repeating
    the last point (the arm stays where the episode ended). The camera is the one of `step`.
    """
    if not 0 <= step < len(demo):
        raise ValueError(f"step: expected 0 <= step < {len(demo)} (the demo's length), got {step}")
    misc = demo[step].misc or {}
    if "front_camera_extrinsics" not in misc or "front_camera_intrinsics" not in misc:
        raise ValueError("visual trace: the demo's observations need misc['front_camera_extrinsics'] "
                         "and misc['front_camera_intrinsics'] (RLBench records them with each step)")
    last = len(demo) - 1
    if last - step + 1 > max_points:
        indices = np.floor(np.linspace(step, last, max_points) + 0.5).astype(int)
    else:
        indices = np.arange(step, last + 1)
    positions = np.array([np.asarray(demo[i].gripper_pose, dtype=np.float64)[:3] for i in indices])
    pixels = project_points(positions, misc["front_camera_extrinsics"], misc["front_camera_intrinsics"])
    height, width = image_size
    pixels = np.clip(np.rint(pixels), [0, 0], [width - 1, height - 1]).astype(np.int64)
    padding = np.repeat(pixels[-1:], max_points - len(pixels), axis=0)
    return np.concatenate([pixels, padding])


def episode_annotations(demo: Sequence, image_prefix: str, *, visual_trace: bool = False,
                        trace_points: int = TRACE_POINTS,
                        history_noise: float = 0.0, rng: np.random.Generator | None = None,
                        template: str | codec.Template = codec.TRAINING, first_id: int = 0,
                        image_size: tuple[int, int] | None = None) -> list[dict]:
    """LLaVA conversation entries for every labelled step of one demo, ids from `first_id` on.

    `image_prefix` is the episode folder as the JSON should name it (relative to the data root).
    `history_noise` is the sigma of the joint-history noise (LLARVA trained with 0.01), drawn from
    `rng`. `trace_points`: points in each visual trace. `image_size` (height, width) clips the
    visual trace; by default it is the loaded front_rgb image's size.
    """
    template = codec.get_template(template)
    descriptions = getattr(demo, "variation_descriptions", None)
    if not descriptions:
        raise ValueError(f"demo at {image_prefix!r} has no variation_descriptions; the first one is the "
                         f"instruction")
    instruction = descriptions[0]
    if visual_trace and image_size is None:
        if len(demo) == 0 or demo[0].front_rgb is None:
            raise ValueError("image_size: needed for a visual trace when the demo's images are not loaded")
        image_size = np.asarray(demo[0].front_rgb).shape[:2]

    entries = []
    for t in range(len(demo) - 1):
        label = demo[t + 1]
        if (label.misc or {}).get(POLICY_STEP_KEY):
            continue     # a learned policy's step (expert takeover): history for what follows, not a label
        history = [demo[i].joint_positions for i in range(max(0, t - codec.HISTORY_STEPS + 1), t + 1)]
        question = codec.build_question(
            instruction, codec.format_history(history, noise_sigma=history_noise, rng=rng),
            visual_trace=visual_trace, template=template)
        velocities = (label.misc or {}).get(EXPERT_ACTION_KEY, label.joint_velocities)
        action = np.append(np.asarray(velocities, dtype=np.float64), label.gripper_open)
        trace = (end_effector_trace(demo, t, image_size=image_size, max_points=trace_points)
                 if visual_trace else None)
        entries.append({
            "id": first_id + t,
            "image": posixpath.join(image_prefix, "front_rgb", f"{t}.png"),
            "conversations": [
                {"from": "human", "value": question},
                {"from": "gpt", "value": codec.format_answer(action, trace, template=template)},
            ],
        })
    return entries


def _episodes_or_error(data_root: Path, task: str) -> list[Path]:
    """The task's episode folders, sorted by number; an error naming what is missing if none."""
    if not data_root.is_dir():
        raise FileNotFoundError(f"data_root: {data_root} is not a folder")
    if not (data_root / task).is_dir():
        found = sorted(p.name for p in data_root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"task: no folder {data_root / task}; task folders in {data_root}: "
                                f"{found or 'none'}")
    episodes = episode_dirs(data_root, task)     # raises if all_variations/episodes is missing
    if not episodes:
        raise FileNotFoundError(f"no episodes: expected folders "
                                f"{data_root / task}/all_variations/episodes/episode<M>/ (RLBench's layout)")
    return episodes


def annotate(data_root: str | os.PathLike, out_json: str | os.PathLike, task: str, *,
             visual_trace: bool = False, trace_points: int = TRACE_POINTS, history_noise: float = 0.0,
             seed: int = 0, template: str | codec.Template = "training", shuffle: bool = True,
             processes: int = 1, progress: bool = True) -> int:
    """Write LLARVA's annotation JSON for every episode of `task` under `data_root`.

    Image paths are relative to `data_root`. Ids count up in episode and step order; the list is
    then shuffled. The same seed gives the same file (noise and order), whatever `processes` is:
    each episode's history noise comes from its own stream. `processes` > 1 annotates blocks of
    episodes in that many worker processes (3,000 demos took 37 s in one on the GPU host, a
    sixth of a device call's set-up; the workers come from a forkserver, so a script calling this
    needs the `if __name__ == "__main__":` guard). The file is written atomically: a reader never
    sees half of it. Returns the number of entries.
    """
    template = codec.get_template(template)
    if isinstance(trace_points, bool) or not isinstance(trace_points, int) or trace_points < 1:
        raise ValueError(f"trace_points: expected an int >= 1, got {trace_points!r}")
    if not (isinstance(history_noise, (int, float)) and math.isfinite(history_noise) and history_noise >= 0):
        raise ValueError(f"history_noise: expected a finite number >= 0 (radians), got {history_noise!r}")
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes: expected an int >= 1, got {processes!r}")
    data_root = Path(data_root)
    episodes = _episodes_or_error(data_root, task)
    # Separate streams, so that turning the noise on or off does not change the order.
    noise_seeds, shuffle_seed = np.random.SeedSequence(seed).spawn(2)
    jobs = [(episode_dir, data_root, noise) for episode_dir, noise in zip(episodes, noise_seeds.spawn(len(episodes)))]
    options = dict(visual_trace=visual_trace, trace_points=trace_points, history_noise=history_noise,
                   template=template)
    # Blocks big enough that starting the workers is paid back, small enough to spread evenly.
    block = max(16, -(-len(jobs) // (4 * processes)))
    blocks = [jobs[start:start + block] for start in range(0, len(jobs), block)]
    parallel = processes > 1 and len(blocks) > 1
    # A forkserver, not a fork of this process (the caller may run torch's threads by now).
    context = multiprocessing.get_context("forkserver")
    entries: list[dict] = []
    bar = tqdm(total=len(jobs), desc=f"annotating {task}", unit="episode", disable=not progress)
    with ProcessPoolExecutor(min(processes, len(blocks)), mp_context=context) if parallel \
            else contextlib.nullcontext() as pool:
        for block_entries in (pool.map if parallel else map)(functools.partial(_annotate_block, **options), blocks):
            for episode_entries in block_entries:
                for entry in episode_entries:
                    entry["id"] = len(entries)
                    entries.append(entry)
            bar.update(len(block_entries))
    bar.close()
    if shuffle:
        shuffle_rng = np.random.default_rng(shuffle_seed)
        entries = [entries[i] for i in shuffle_rng.permutation(len(entries))]

    write_json_atomic(out_json, entries)
    return len(entries)


def _annotate_block(jobs, **options) -> list[list[dict]]:
    """`episode_annotations` of each (episode folder, data root, noise seed) in `jobs`; ids from 0."""
    annotated = []
    for episode_dir, data_root, noise_seed in jobs:
        demo = load_demo(episode_dir, load_images=False)
        image_size = None
        if options["visual_trace"]:   # the PNG header alone gives the size the trace is clipped to
            with Image.open(episode_dir / "front_rgb" / "0.png") as image:
                image_size = (image.height, image.width)
        try:
            annotated.append(episode_annotations(demo, episode_dir.relative_to(data_root).as_posix(),
                                                 rng=np.random.default_rng(noise_seed), image_size=image_size,
                                                 **options))
        except ValueError as error:   # say which of hundreds of episodes is bad
            raise ValueError(f"{episode_dir}: {error}") from error
    return annotated
