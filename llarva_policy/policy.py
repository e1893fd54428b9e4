"""LlarvaPolicy: a LLaVA checkpoint as a robot policy, with Stable-Baselines3's `predict` and
LeRobot's `reset`/`select_action`.

    policy = LlarvaPolicy.from_pretrained("checkpoints/llarva-sweep")
    env = gym.make("llarva/sweep_to_dustpan")
    obs, info = env.reset(seed=0)
    state, episode_start = None, True
    for _ in range(120):
        action, state = policy.predict(obs, state=state, episode_start=episode_start)
        obs, reward, terminated, truncated, info = env.step(action)
        episode_start = terminated or truncated

Each step the policy writes one LLARVA prompt per environment with `llarva_policy.codec` (the front
camera image, the instruction, the last five joint positions), generates all answers in one
batched call (`llarva_policy.generation.generate_text`), and parses them back with the codec.

The joint-position history the prompt needs lives in `state`, one row per environment, as
Stable-Baselines3 keeps a recurrent policy's hidden state: a float32 array (N, 5, 7), oldest step
first, with NaN rows for the steps an episode does not have yet. `episode_start[i]` clears env i's
history before its current observation is added.

An answer that does not parse is never turned into motion: the policy raises `AnswerParseError`,
or, built with `on_parse_error="hold"`, returns a zero-velocity action that keeps the gripper as it
is and reports the text and the error in `policy.last_info`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from llarva_gym.action_modes import action_space
from llarva_gym.wrappers import decode_instruction
from llarva_policy.codec import (
    HISTORY_STEPS,
    NUM_JOINTS,
    AnswerParseError,
    build_prompt,
    build_question,
    format_history,
    get_template,
    parse_answer,
)
from llarva_policy.generation import generate_text
from llarva_policy.model import LoadedLlava, load_llava

# An action answer is about 80 tokens with a digit-splitting tokenizer (LLaMA's, ours): 8 numbers
# of up to 7 characters, one token each, plus separators. A visual trace adds up to ~30 points of
# ~14 tokens. A trained model stops at </s> long before these limits; they bound a bad one.
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_MAX_NEW_TOKENS_WITH_TRACE = 768
PARSE_ERROR_MODES = ("raise", "hold")

_OBSERVATION_FORM = ("a dict with 'front_rgb' ((H, W, 3) uint8, or (N, H, W, 3) for a batch), "
                     "'joint_positions' ((7,) or (N, 7)), 'instruction' (a str, a sequence of N str, or "
                     "EncodeInstruction's uint8 bytes) and 'gripper_open' ((1,) or (N, 1))")


class LlarvaPolicy:
    """A LLARVA policy over a loaded LLaVA model (see the module docstring).

    `generation_method` ("auto", "hf", "fast") and `constrained` go to
    `llarva_policy.generation.generate_text`: "auto" uses the fast decoder on CUDA and transformers'
    `generate` elsewhere; `constrained=True` lets the model write only well-formed answers (with a
    visual trace of at most `generation.MAX_TRACE_POINTS` points when `with_visual_trace=True`),
    so every answer parses. `logits_processor` (a `transformers.LogitsProcessorList` or a list
    of processors) is passed to every generation call, e.g. to force a known answer in tests; it is
    a plain attribute and may be set after construction.
    """

    def __init__(self, loaded: LoadedLlava, *, with_visual_trace: bool = False, template="training",
                 on_parse_error: str = "raise", max_new_tokens: int | None = None, history_noise: float = 0.0,
                 seed: int | None = None, generation_method: str = "auto", constrained: bool = False,
                 logits_processor=None, name: str | None = None):
        if on_parse_error not in PARSE_ERROR_MODES:
            raise ValueError(f"on_parse_error: expected one of {PARSE_ERROR_MODES}, got {on_parse_error!r}")
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens: expected a positive int or None, got {max_new_tokens!r}")
        if not (isinstance(history_noise, (int, float)) and np.isfinite(history_noise) and history_noise >= 0):
            raise ValueError(f"history_noise: expected a finite number >= 0 (LLARVA trains with 0.01), "
                             f"got {history_noise!r}")
        self.loaded = loaded
        self.generation_method = generation_method
        self.constrained = constrained
        self.with_visual_trace = with_visual_trace
        self.template = get_template(template)
        self.on_parse_error = on_parse_error
        self.max_new_tokens = max_new_tokens or (DEFAULT_MAX_NEW_TOKENS_WITH_TRACE if with_visual_trace
                                                 else DEFAULT_MAX_NEW_TOKENS)
        self.history_noise = float(history_noise)
        self.rng = np.random.default_rng(seed)
        self.logits_processor = logits_processor
        self.name = name or f"llarva:{loaded.path.name}"
        # Actions are clipped to the env's joint-velocity bounds (gripper to [0, 1]).
        bounds = action_space("joint_velocity")
        self.action_low, self.action_high = bounds.low, bounds.high
        # Batched generation appends new tokens on the right, so prompts of different lengths must
        # be padded on the left. The tokenizer belongs to this policy's model.
        loaded.tokenizer.padding_side = "left"
        self.last_info: list[dict] = []
        self._state = None      # select_action's own history (LeRobot style)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, with_visual_trace: bool | None = None, template="training",
                        vision_tower=None, on_parse_error: str = "raise", max_new_tokens: int | None = None,
                        history_noise: float = 0.0, seed: int | None = None, generation_method: str = "auto",
                        constrained: bool = False) -> "LlarvaPolicy":
        """Load a transformers-layout or original-LLaVA-layout checkpoint folder (`load_llava`).

        `device`: None picks CUDA when available. `dtype`: None picks float32 on CPU and bfloat16
        (float16 where unsupported) on CUDA; or "fp32", "bf16", "fp16" or a torch dtype.
        `vision_tower`: a local CLIP folder for original-layout checkpoints. `with_visual_trace`:
        None asks as the checkpoint was trained (`trained_with_visual_trace`). The other options
        are the constructor's.
        """
        if with_visual_trace is None:
            with_visual_trace = trained_with_visual_trace(path)
        loaded = load_llava(path, device=device, dtype=dtype, vision_tower=vision_tower)
        return cls(loaded, with_visual_trace=with_visual_trace, template=template, on_parse_error=on_parse_error,
                   max_new_tokens=max_new_tokens, history_noise=history_noise, seed=seed,
                   generation_method=generation_method, constrained=constrained, name=f"llarva:{Path(path).name}")

    def __repr__(self) -> str:
        return (f"LlarvaPolicy({str(self.loaded.path)!r}, layout={self.loaded.layout!r}, "
                f"device={str(self.loaded.device)!r}, dtype={self.loaded.dtype}, template={self.template.name!r}, "
                f"with_visual_trace={self.with_visual_trace}, on_parse_error={self.on_parse_error!r})")

    # --- Stable-Baselines3 ----------------------------------------------------------------------

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """Actions for one observation or a batch of them; Stable-Baselines3's signature.

        Returns `(action, state)`: action float32 (8,) for one observation or (N, 8) for a batch
        (seven joint velocities in rad/s, gripper_open in [0, 1]); state the updated history to pass
        back in. `deterministic=False` adds the history noise given at construction (LLARVA's
        training augmentation); it is greedy decoding either way. After the call, `last_info[i]`
        holds env i's `prompt`, generated `text`, `parse_error` (None or the message) and `trace`
        (None or (k, 2) pixel positions in the front image).
        """
        batch = _read_observation(observation)
        prompts, state = self._prompts(batch, state, episode_start, deterministic)
        texts = self._generate(batch["images"], prompts)

        actions = np.empty((len(texts), 8), dtype=np.float32)
        self.last_info, first_error = [], None
        for i, text in enumerate(texts):
            info = {"prompt": prompts[i], "text": text, "parse_error": None, "trace": None}
            try:
                parsed = parse_answer(text, expect_trace=self.with_visual_trace, template=self.template)
            except AnswerParseError as error:
                info["parse_error"] = str(error)
                first_error = first_error or error
                actions[i] = self._hold_action(batch, i) if self.on_parse_error == "hold" else np.nan
            else:
                actions[i] = np.clip(parsed.action, self.action_low, self.action_high)
                info["trace"] = parsed.trace
                info["gripper_was_missing"] = parsed.gripper_was_missing
            self.last_info.append(info)
        if first_error is not None and self.on_parse_error == "raise":
            raise first_error     # its message holds the generated text
        return (actions[0] if batch["single"] else actions), state

    def build_prompts(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """The prompts `predict` would generate from, and the updated state: `(list of str, state)`."""
        return self._prompts(_read_observation(observation), state, episode_start, deterministic)

    # --- LeRobot ----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the history `select_action` keeps: call at the start of every episode."""
        self._state = None

    def select_action(self, batch) -> np.ndarray:
        """LeRobot's policy call: the action for an observation (or a batch), history kept inside."""
        action, self._state = self.predict(batch, state=self._state)
        return action

    # --- internals --------------------------------------------------------------------------------

    def _prompts(self, batch, state, episode_start, deterministic):
        history = _advance_history(state, episode_start, batch["joint_positions"])
        noise = 0.0 if deterministic else self.history_noise
        prompts = []
        for instruction, rows in zip(batch["instructions"], history):
            steps = [row for row in rows if not np.isnan(row).any()]
            question = build_question(instruction, format_history(steps, noise_sigma=noise, rng=self.rng),
                                      visual_trace=self.with_visual_trace, template=self.template)
            prompts.append(build_prompt(question, template=self.template))
        return prompts, history

    def _generate(self, images: np.ndarray, prompts: list[str]) -> list[str]:
        loaded = self.loaded
        inputs = loaded.processor(images=list(images), text=prompts, padding=True, return_tensors="pt")
        inputs = inputs.to(loaded.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        return generate_text(loaded, inputs, max_new_tokens=self.max_new_tokens,
                             logits_processor=self.logits_processor, method=self.generation_method,
                             constrained=self.constrained, template=self.template,
                             visual_trace=self.with_visual_trace)

    def _hold_action(self, batch, i: int) -> np.ndarray:
        gripper = batch["gripper_open"]
        if gripper is None:
            raise ValueError("observation['gripper_open'] is needed to hold the gripper when an answer does not "
                             f"parse (on_parse_error='hold'); expected {_OBSERVATION_FORM}")
        return np.r_[np.zeros(NUM_JOINTS), np.clip(gripper[i], 0.0, 1.0)].astype(np.float32)


def _advance_history(state, episode_start, joint_positions: np.ndarray) -> np.ndarray:
    """The (N, 5, 7) history after this step: cleared where an episode starts, current step appended."""
    n = len(joint_positions)
    if state is None:
        history = np.full((n, HISTORY_STEPS, NUM_JOINTS), np.nan, dtype=np.float32)
    else:
        history = np.array(state, dtype=np.float32)     # a copy: the caller's state is left as it was
        if history.shape != (n, HISTORY_STEPS, NUM_JOINTS):
            raise ValueError(f"state: expected None or the ({n}, {HISTORY_STEPS}, {NUM_JOINTS}) history that "
                             f"predict returned for this many envs, got shape {history.shape}")
    if episode_start is not None:
        starts = np.asarray(episode_start, dtype=bool).reshape(-1)
        if starts.size == 1:
            starts = np.repeat(starts, n)
        if starts.shape != (n,):
            raise ValueError(f"episode_start: expected None, one bool or {n} bools, got shape {starts.shape}")
        history[starts] = np.nan
    history = np.roll(history, -1, axis=1)   # drop the oldest step ...
    history[:, -1] = joint_positions          # ... and add the current one last
    return history


def trained_with_visual_trace(path) -> bool:
    """Whether the checkpoint at `path` was trained to answer with a visual trace first, as far as
    its folder tells: `llarva train-small` records it (llarva_train_small.json); any other
    checkpoint (LLARVA's own, `llarva finetune`'s) is taken to answer with the action alone. Asked
    the other way, a model writes nonsense numbers, so the record is read rather than guessed."""
    import json

    from llarva_policy.train_small import TRAINING_FILE

    record = Path(path) / TRAINING_FILE
    if not record.is_file():
        return False
    try:
        return bool(json.loads(record.read_text())["options"].get("visual_trace", False))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{record}: not a train-small record ({error!r}); expected JSON with an 'options' "
                         "dict, as llarva train-small writes; pass with_visual_trace explicitly") from None


def _read_observation(observation) -> dict:
    """One observation or a batch as arrays with a leading env axis, and whether it was one."""
    if not isinstance(observation, Mapping):
        raise ValueError(f"observation: expected {_OBSERVATION_FORM}, got a {type(observation).__name__}")
    missing = [key for key in ("front_rgb", "joint_positions", "instruction") if key not in observation]
    if missing:
        raise ValueError(f"observation: missing {missing}; expected {_OBSERVATION_FORM}")

    images = np.asarray(observation["front_rgb"])
    single = images.ndim == 3
    if single:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"observation['front_rgb']: shape {images.shape} dtype {images.dtype}; expected "
                         "(H, W, 3) uint8, or (N, H, W, 3) for a batch")
    n = len(images)

    joints = np.asarray(observation["joint_positions"], dtype=np.float32)
    if joints.shape not in ((n, NUM_JOINTS),) + (((NUM_JOINTS,),) if single else ()):
        raise ValueError(f"observation['joint_positions']: shape {joints.shape}; expected "
                         f"{'(7,)' if single else f'({n}, 7)'} to match front_rgb")
    joints = joints.reshape(n, NUM_JOINTS)

    gripper = observation.get("gripper_open")
    if gripper is not None:
        gripper = np.asarray(gripper, dtype=np.float32).reshape(n, -1)[:, 0]

    return {"single": single, "images": images, "joint_positions": joints,
            "instructions": _read_instructions(observation["instruction"], n), "gripper_open": gripper}


def _read_instructions(value, n: int) -> list[str]:
    """The instruction of each env: str, a sequence of str, or EncodeInstruction's uint8 bytes."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, np.ndarray) and value.dtype == np.uint8:
        texts = [decode_instruction(row) for row in value.reshape(-1, value.shape[-1])]
    else:
        texts = [item if isinstance(item, str) else decode_instruction(item) for item in value]
    if len(texts) != n:
        raise ValueError(f"observation['instruction']: {len(texts)} instruction(s) for {n} image(s); expected "
                         "one per env (a str, a sequence of str, or EncodeInstruction's uint8 bytes)")
    return texts
