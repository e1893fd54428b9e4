"""LlarvaAgent: a LLARVA policy as a YARR `Agent`, for RLBench evaluation scripts built on YARR.

    from llarva_policy.yarr import LlarvaAgent
    agent = LlarvaAgent("checkpoints/llarva-sweep", lang_goal="sweep dirt to the short dustpan")
    agent.build(training=False, device="cuda:0")
    agent.reset()                                   # at the start of every episode
    act_result = agent.act(step, observation, deterministic=True)
    task.step(act_result.action)                    # 7 joint velocities + gripper, RLBench's JointVelocity mode

What YARR hands `act` (stepjam/YARR `RolloutGenerator` with `yarr.envs.rlbench_env.RLBenchEnv`):
each observation value is a tensor with a batch of one and `timesteps` frames, `(1, T, ...)`, images
channels-first (`front_rgb`: (1, T, 3, H, W) uint8). The agent reads the newest frame: the front
image and the joint positions (`joint_positions`, or LLARVA's `joint_pos`, or a slice of
`low_dim_state` given as `low_dim_joint_positions`). The five-step joint history the LLARVA
prompt needs is kept across `act` calls as `LlarvaPolicy.predict`'s state and cleared by `reset()`.

The instruction: YARR's observations are tensors and cannot carry text, so it comes from, first
found: the `lang_goal` argument of `act`; `observation["lang_goal"]` (or `"instruction"`) when it is
text; `set_lang_goal()` / the constructor's `lang_goal`. LLARVA's own YARR fork calls
`act(step, observation, task_goal, deterministic)`; that form works too.

Needs YARR (`pip install git+https://github.com/stepjam/YARR`); importing this module without it
raises an ImportError that says so. Training through YARR (`update`) is not supported: LLARVA is
fine-tuned with `llarva finetune`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

try:
    from yarr.agents.agent import ActResult, Agent, Summary
except ImportError as _error:
    raise ImportError(
        "llarva_policy.yarr needs YARR (the `yarr` package), which is not on PyPI: "
        "`pip install git+https://github.com/stepjam/YARR`. LlarvaPolicy itself works without it "
        f"(import failed: {_error})") from None

NUM_JOINTS = 7
UPDATE_UNSUPPORTED = ("LlarvaAgent evaluates a LLARVA policy; it does not train through YARR's replay "
                      "buffer. Fine-tune with `llarva finetune` (LoRA on LLaVA) and load the checkpoint here.")


class LlarvaAgent(Agent):
    """YARR's Agent interface over `LlarvaPolicy` (or any object with its `predict`)."""

    def __init__(self, policy_or_path, *, lang_goal: str | None = None,
                 low_dim_joint_positions: slice | None = None, **from_pretrained_kwargs):
        """`policy_or_path`: a checkpoint folder (loaded by `build`) or a policy object with
        `predict(observation, state, episode_start, deterministic)`. `lang_goal`: the instruction,
        if the env does not hand it to `act`. `low_dim_joint_positions`: where the joint positions
        lie in `low_dim_state` when the observation has no `joint_positions` key (with RLBench's
        default ObservationConfig, YARR's low_dim_state is gripper_open, 7 joint velocities, 7 joint
        positions, ...: `slice(8, 15)`). Other keyword arguments go to `LlarvaPolicy.from_pretrained`.
        """
        if isinstance(policy_or_path, (str, os.PathLike)):
            self.path, self.policy = os.fspath(policy_or_path), None
        elif callable(getattr(policy_or_path, "predict", None)):
            if from_pretrained_kwargs:
                raise ValueError(f"{sorted(from_pretrained_kwargs)}: options for loading a checkpoint, but "
                                 "LlarvaAgent was given a policy object, which is already loaded")
            self.path, self.policy = None, policy_or_path
        else:
            raise TypeError(f"policy_or_path: expected a checkpoint folder or a policy with predict(), "
                            f"got {type(policy_or_path).__name__}")
        if low_dim_joint_positions is not None and not isinstance(low_dim_joint_positions, slice):
            raise TypeError(f"low_dim_joint_positions: expected a slice such as slice(8, 15), "
                            f"got {low_dim_joint_positions!r}")
        self.from_pretrained_kwargs = from_pretrained_kwargs
        self.lang_goal = lang_goal
        self.low_dim_joint_positions = low_dim_joint_positions
        self.device = None
        self._state = None           # the policy's joint-position history for this episode

    # --- YARR's Agent interface ------------------------------------------------------------------
    def build(self, training: bool, device=None) -> None:
        if training:
            raise NotImplementedError(UPDATE_UNSUPPORTED)
        self.device = device
        if self.path is not None:
            self.load_weights(self.path)

    def update(self, step: int, replay_sample: dict) -> dict:
        raise NotImplementedError(UPDATE_UNSUPPORTED)

    def reset(self) -> None:
        """Start a new episode: forget the joint-position history."""
        self._state = None

    def set_lang_goal(self, lang_goal: str) -> None:
        """The instruction for the episodes that follow (for envs that keep it outside the observation)."""
        self.lang_goal = lang_goal

    def act(self, step: int, observation: dict, deterministic: bool = True, *rest, lang_goal: str | None = None) -> ActResult:
        """The action for the newest frame of `observation`, as `ActResult(action)`: float32 (8,),
        seven joint velocities (rad/s) and gripper_open. `deterministic=False` adds the policy's
        history noise (LLARVA's training augmentation)."""
        if isinstance(deterministic, str):   # LLARVA's fork: act(step, observation, task_goal, deterministic)
            lang_goal, deterministic = deterministic, (rest[0] if rest else True)
        elif rest:
            raise TypeError(f"act() takes step, observation and deterministic; got {len(rest)} more argument(s)")
        if self.policy is None:
            raise RuntimeError("LlarvaAgent.act: call build(training=False, device) first, which loads the checkpoint")
        policy_obs = self._policy_observation(observation, lang_goal)
        action, self._state = self.policy.predict(policy_obs, state=self._state,
                                                  episode_start=self._state is None,
                                                  deterministic=bool(deterministic))
        last_info = getattr(self.policy, "last_info", None)    # LlarvaPolicy's prompt, text, parse_error
        info = dict(last_info[0]) if last_info else {}
        return ActResult(np.asarray(action, dtype=np.float32).reshape(8), info=info)

    def update_summaries(self) -> list[Summary]:
        return []

    def act_summaries(self) -> list[Summary]:
        return []

    def load_weights(self, savedir: str) -> None:
        """Load the checkpoint folder `savedir` (`LlarvaPolicy.from_pretrained`) on the build device."""
        from llarva_policy.policy import LlarvaPolicy
        self.policy = LlarvaPolicy.from_pretrained(savedir, device=self.device, **self.from_pretrained_kwargs)
        self.path = os.fspath(savedir)

    def save_weights(self, savedir: str) -> None:
        """Write the policy's model and processor to `savedir` in transformers' layout."""
        loaded = getattr(self.policy, "loaded", None)
        if loaded is None:
            raise RuntimeError("LlarvaAgent.save_weights: the policy has no loaded LLaVA model to save")
        os.makedirs(savedir, exist_ok=True)
        loaded.model.save_pretrained(savedir)
        loaded.processor.save_pretrained(savedir)

    # --- YARR observation -> LlarvaPolicy observation ----------------------------------------------
    def _policy_observation(self, observation: Mapping, lang_goal: str | None) -> dict:
        if not isinstance(observation, Mapping):
            raise ValueError(f"observation: expected YARR's dict of arrays or tensors, got {type(observation).__name__}")
        if "front_rgb" not in observation:
            raise ValueError(f"observation: no 'front_rgb' (LLARVA reads the front camera); keys are {sorted(observation)}")
        out = {"front_rgb": _newest_image(observation["front_rgb"]),
               "joint_positions": self._joint_positions(observation),
               "instruction": self._instruction(observation, lang_goal)}
        if "gripper_open" in observation:
            out["gripper_open"] = _newest(observation["gripper_open"], 1, "gripper_open")
        return out

    def _joint_positions(self, observation: Mapping) -> np.ndarray:
        for key in ("joint_positions", "joint_pos"):
            if key in observation:
                return _newest(observation[key], NUM_JOINTS, key)
        if self.low_dim_joint_positions is not None and "low_dim_state" in observation:
            state = _to_numpy(observation["low_dim_state"])
            joints = state.reshape(-1, state.shape[-1])[-1][self.low_dim_joint_positions]
            if joints.shape != (NUM_JOINTS,):
                raise ValueError(f"low_dim_joint_positions {self.low_dim_joint_positions} picks {joints.shape[0]} "
                                 f"values from low_dim_state of length {state.shape[-1]}; expected {NUM_JOINTS}")
            return joints.astype(np.float32)
        raise ValueError("observation: no joint positions. LLARVA's prompt needs them: give the observation a "
                         "'joint_positions' (or 'joint_pos') entry, or tell LlarvaAgent where they lie in "
                         "'low_dim_state' with low_dim_joint_positions=slice(...) (slice(8, 15) for RLBench's "
                         f"default ObservationConfig); keys are {sorted(observation)}")

    def _instruction(self, observation: Mapping, lang_goal: str | None) -> str:
        candidates = [lang_goal, _text(observation.get("lang_goal")), _text(observation.get("instruction")),
                      self.lang_goal]
        for text in candidates:
            if text:
                return text
        raise ValueError("LlarvaAgent needs the task's instruction (e.g. 'sweep dirt to the short dustpan'): pass "
                         "lang_goal= to LlarvaAgent or act(), call agent.set_lang_goal(text) after each env reset, "
                         "or put the text in observation['lang_goal']")


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):      # a torch tensor, on any device
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _newest(value, size: int, key: str) -> np.ndarray:
    """The last row of a (..., size) array: YARR's (1, T, size) gives the newest frame."""
    array = _to_numpy(value)
    if array.size == 0 or array.shape[-1] != size:
        raise ValueError(f"observation['{key}']: shape {array.shape}; expected (..., {size}), e.g. YARR's (1, T, {size})")
    return array.reshape(-1, size)[-1].astype(np.float32)


def _newest_image(value) -> np.ndarray:
    """The newest front image as (H, W, 3) uint8, from YARR's (1, T, 3, H, W) or anything shaped like it."""
    array = _to_numpy(value)
    if array.ndim < 3:
        raise ValueError(f"observation['front_rgb']: shape {array.shape}; expected an image, e.g. YARR's (1, T, 3, H, W)")
    image = array.reshape(-1, *array.shape[-3:])[-1]
    if image.shape[0] == 3 and image.shape[-1] != 3:   # channels first (YARR's default) -> last
        image = image.transpose(1, 2, 0)
    if image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"observation['front_rgb']: newest frame has shape {image.shape} dtype {image.dtype}; "
                         "expected uint8 RGB, (3, H, W) or (H, W, 3), as RLBench renders it")
    return np.ascontiguousarray(image)


def _text(value) -> str | None:
    """Text from a str, bytes, or an (object) array holding one; None for anything else (e.g. CLIP tokens)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and len(value):
        flat = np.asarray(value, dtype=object).reshape(-1)
        return _text(flat[-1])
    return None
