"""LLARVA's prompt and answer text: the one place that writes it and the one place that reads it.

Fine-tuning writes its training text with these functions and `LlarvaPolicy.predict` parses the
model's output with them, so what we train on is exactly what we parse. The facts come from
/work/shared/reference/llarva-format.md; in short, one training sample reads

    {system} USER: <image>
    You are a Franka robot using the joint control. The task is "<instruction>", and the previous
    five (including current) steps are [[...7 numbers...], ... 5 vectors]. Can you predict action of
    the next 1 step? ASSISTANT: The next action step: [v1, v2, v3, v4, v5, v6, v7, g]</s>

(without the line breaks inside the question). Numbers are written the way Python prints a list of
floats rounded with `round(x, 4)`: `-0.106`, `1.0`, `0.0`. A value in (-0.00005, 0) rounds to `-0.0`
and is printed as `-0.0`, as the original annotation code would print it; it parses back to -0.0,
which compares equal to 0.0.

Typical use:

    question = build_question(instruction, format_history(joint_positions_so_far))
    prompt = build_prompt(question)                    # model input for generation
    parsed = parse_answer(generated_text)              # parsed.action: (8,) float32
    text = build_conversation_text(question, format_answer(action))   # a training sample
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

HISTORY_STEPS = 5          # joint-position vectors in the question: the current step and four before it
NUM_JOINTS = 7
IMAGE_TOKEN = "<image>"
DECIMALS = 4


@dataclass(frozen=True)
class Template:
    """The wording of one conversation: system line, question, answer, roles and separators.

    `question` and `question_with_trace` are `str.format` strings with `{instruction}` and
    `{history}`. An answer is `[trace_prefix + trace + trace_suffix] + action_prefix + action`.
    """

    name: str
    system: str
    question: str
    question_with_trace: str
    action_prefix: str = "The next action step: "
    trace_prefix: str = "The visual trace of the end effector: "
    trace_suffix: str = ". "
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    separator: str = " "            # after the system line and after the user's turn
    end_of_answer: str = "</s>"     # after the assistant's answer (the tokenizer's end-of-sequence)


_QUESTION_START = ('You are a Franka robot using the joint control. The task is "{instruction}", '
                   "and the previous five (including current) steps ")

# The wording the original fine-tuning wrote (Vicuna v1 system line). Our default for both sides.
TRAINING = Template(
    name="training",
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    question=_QUESTION_START + "are {history}. Can you predict action of the next 1 step?",
    question_with_trace=_QUESTION_START + "are {history}. Can you predict the 2D visual trace of "
                                          "the end effector and the action of the next 1 step?",
)

# The wording of the original eval script (llava_v1 system line, "steps is ..., can you ...").
# It differs from what the released checkpoints were trained on; kept so they can be served as
# they were evaluated.
RELEASED_INFERENCE = Template(
    name="released_inference",
    system="A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    question=_QUESTION_START + "is {history}, can you predict action of the next 1 step?",
    question_with_trace=_QUESTION_START + "is {history}, can you predict the 2D visual trace of "
                                          "the end effector and the action of the next 1 step?",
)

TEMPLATES = {t.name: t for t in (TRAINING, RELEASED_INFERENCE)}


def get_template(name_or_template: str | Template) -> Template:
    """A `Template` given itself or one of the names in `TEMPLATES`."""
    if isinstance(name_or_template, Template):
        return name_or_template
    try:
        return TEMPLATES[name_or_template]
    except (KeyError, TypeError):
        raise ValueError(f"template: unknown template {name_or_template!r}; expected one of "
                         f"{sorted(TEMPLATES)} or a llarva_policy.codec.Template") from None


# --- Answer grammar, for constrained decoding ------------------------------------------------
# An action answer (no trace) is exactly
#     ANSWER_PREFIX + number + (NUMBER_SEPARATOR + number) * (ACTION_SIZE - 1) + ANSWER_CLOSE
# where every number matches NUMBER_PATTERN: Python's printing of round(x, 4) for |x| < 1e15 is
# always fixed-point with one to four decimals (`1.0`, `-0.106`, `0.0001`, `-0.0`), never `1e-05`.
# The prefix belongs to the TRAINING template; use `template.action_prefix + "["` for another one.
ANSWER_PREFIX = TRAINING.action_prefix + "["
NUMBER_SEPARATOR = ", "
ANSWER_CLOSE = "]"
NUMBER_PATTERN = r"-?\d+\.\d{1,4}"
ACTION_SIZE = 8      # seven joint velocities (rad/s) and gripper_open (1.0 open, 0.0 closed)

_NUMBER_RE = re.compile(NUMBER_PATTERN)
_MAX_PRINTABLE = 1e15   # below this, repr(round(x, 4)) matches NUMBER_PATTERN


def _round(value) -> float:
    """round(x, 4) on a Python float: numpy scalars would print as `np.float64(...)` in lists."""
    return round(float(value), DECIMALS)


def _finite_vector(values, name: str, size: int, expected: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {expected}, got {values!r}") from None
    if array.shape != (size,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: expected {expected}, got {values!r}")
    return array


# --- Question ------------------------------------------------------------------------------


def format_history(joint_positions_history: Sequence[Sequence[float]], *, noise_sigma: float = 0.0,
                   rng: np.random.Generator | None = None) -> str:
    """The `<history>` text: the last five joint-position vectors, oldest first, current last.

    Fewer than five steps are padded at the front with `[0, 0, 0, 0, 0, 0, 0]` (integers, as the
    original wrote them). With `noise_sigma > 0`, Gaussian noise is added to the real steps (not
    the padding) before rounding: LLARVA's training augmentation (sigma 0.01). `rng` makes it
    reproducible; without one a fresh unseeded generator is used.
    """
    expected = (f"a non-empty sequence of joint-position vectors of {NUM_JOINTS} finite numbers "
                f"each, oldest first")
    if isinstance(joint_positions_history, np.ndarray) and joint_positions_history.ndim == 1:
        raise ValueError(f"joint_positions: expected {expected} (got one flat vector; wrap it in a "
                         f"list for a history of one step)")
    steps = list(joint_positions_history)[-HISTORY_STEPS:]
    if not steps:
        raise ValueError(f"joint_positions: expected {expected}, got an empty history")
    real = np.stack([_finite_vector(step, "joint_positions", NUM_JOINTS, expected) for step in steps])
    if noise_sigma < 0 or not math.isfinite(noise_sigma):
        raise ValueError(f"noise_sigma: expected a finite number >= 0, got {noise_sigma!r}")
    if noise_sigma > 0:
        rng = np.random.default_rng() if rng is None else rng
        real = real + rng.normal(0.0, noise_sigma, size=real.shape)
    padding = [[0] * NUM_JOINTS] * (HISTORY_STEPS - len(real))
    return str(padding + [[_round(x) for x in step] for step in real])


def build_question(instruction: str, history_text: str, *, visual_trace: bool = False,
                   template: str | Template = TRAINING) -> str:
    """The human turn: the image token, a newline, then the question about the next step."""
    template = get_template(template)
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"instruction: expected a non-empty string, got {instruction!r}")
    wording = template.question_with_trace if visual_trace else template.question
    return f"{IMAGE_TOKEN}\n" + wording.format(instruction=instruction, history=history_text)


# --- Answer --------------------------------------------------------------------------------


def _format_number(value: float, name: str) -> str:
    text = repr(_round(value))
    if not _NUMBER_RE.fullmatch(text):   # only for |x| >= 1e15, which Python prints as 1e+15
        raise ValueError(f"{name}: value {value!r} is too large to print in fixed point "
                         f"(expected |x| < {_MAX_PRINTABLE:g})")
    return text


def format_answer(action: Sequence[float], trace: np.ndarray | None = None, *,
                  template: str | Template = TRAINING) -> str:
    """The assistant's answer: `The next action step: [v1, ..., v7, g]`, optionally after a trace.

    `action` is eight finite numbers (seven joint velocities, gripper_open), each written rounded
    to four decimals. `trace` is (k, 2) pixel positions (column, row), written as integers
    (rounded to the nearest integer).
    """
    template = get_template(template)
    action = _finite_vector(action, "action", ACTION_SIZE,
                            f"{ACTION_SIZE} finite numbers (7 joint velocities, gripper_open)")
    text = template.action_prefix + "[" + NUMBER_SEPARATOR.join(
        _format_number(v, "action") for v in action) + ANSWER_CLOSE
    if trace is None:
        return text
    points = np.asarray(trace, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < 1 or points.shape[1] != 2 or not np.all(np.isfinite(points)):
        raise ValueError(f"trace: expected a (k, 2) array of finite pixel positions with k >= 1, "
                         f"got shape {points.shape}")
    trace_text = str([[int(x), int(y)] for x, y in np.rint(points)])
    return template.trace_prefix + trace_text + template.trace_suffix + text


# What each character of an answer writes, for a loss that weighs them apart (train-small's
# `answer_weights`) and for reading a loss by part (benchmarks/answer_token_loss.py). "other": the
# fixed words, brackets, commas and `</s>`; a positive number has no sign character.
ANSWER_KINDS = ("other", "trace_digit", "sign", "integer_digit",
                "decimal1", "decimal2", "decimal3", "decimal4", "gripper")


def answer_character_kinds(answer: str, *, template: str | Template = TRAINING) -> list[str]:
    """The kind (one of `ANSWER_KINDS`) of every character of `answer`, `format_answer`'s text."""
    prefix = get_template(template).action_prefix + "["
    if prefix not in answer:
        raise ValueError(f"answer: expected the action after {prefix!r}, got {answer[:80]!r}")
    kinds = ["other"] * len(answer)
    action_start = answer.index(prefix) + len(prefix)
    for i, character in enumerate(answer[:action_start]):
        if character.isdigit():
            kinds[i] = "trace_digit"    # only the trace's pixel positions hold digits before the action
    for j, number in enumerate(_NUMBER_RE.finditer(answer, action_start)):
        start, text = number.start(), number.group()
        dot = text.index(".")
        for i, character in enumerate(text):
            if j == ACTION_SIZE - 1:
                kinds[start + i] = "gripper"
            elif character == "-":
                kinds[start + i] = "sign"
            elif i < dot:
                kinds[start + i] = "integer_digit"
            elif i > dot:
                kinds[start + i] = f"decimal{i - dot}"
    return kinds


class AnswerParseError(ValueError):
    """The model's output is not an answer in the expected form. `text` is the whole output."""

    def __init__(self, problem: str, text: str, expected: str):
        self.text = text
        shown = text if len(text) <= 200 else text[:200] + "..."
        super().__init__(f"{problem}; expected {expected}; got {shown!r}")


@dataclass(frozen=True)
class ParsedAnswer:
    action: np.ndarray              # (8,) float32: seven joint velocities, gripper_open
    trace: np.ndarray | None        # (k, 2) int64 pixel positions (column, row), or None
    gripper_was_missing: bool = False   # only seven numbers came back; gripper set to 1.0 (open)


_DECIMAL_RE = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")
_NON_FINITE_RE = re.compile(r"[-+]?(nan|inf|infinity)", re.IGNORECASE)


def parse_answer(text: str, *, expect_trace: bool = False,
                 template: str | Template = TRAINING) -> ParsedAnswer:
    """Read an answer written by `format_answer` (or generated by a model trained on it).

    The whole text must be the answer, except for surrounding whitespace and a trailing `</s>`.
    One leniency, as the original: if the action has only the seven joint velocities, gripper_open
    is taken as 1.0 (open) and `gripper_was_missing` is set. Anything else raises AnswerParseError.
    """
    template = get_template(template)
    action_form = f"{template.action_prefix}[v1, v2, v3, v4, v5, v6, v7, g]"
    expected = (f"'{template.trace_prefix}[[x1, y1], ..., [xk, yk]]{template.trace_suffix}{action_form}'"
                if expect_trace else f"'{action_form}'")
    if not isinstance(text, str):
        raise AnswerParseError(f"answer is a {type(text).__name__}, not a string", repr(text), expected)

    body = text.strip()
    if body.endswith(template.end_of_answer):
        body = body[: -len(template.end_of_answer)].rstrip()

    found = re.search(re.escape(template.action_prefix) + r"\[([^\[\]]*)\]", body)
    if found is None:
        raise AnswerParseError(f"no '{template.action_prefix}[...]' in the answer", text, expected)
    if body[found.end():]:
        raise AnswerParseError("unexpected text after the action", text, expected)
    before = body[: found.start()]

    trace = None
    if expect_trace:
        trace_match = re.fullmatch(re.escape(template.trace_prefix) + r"\[(.*)\]" +
                                   re.escape(template.trace_suffix.rstrip()) + r"\s*", before, re.DOTALL)
        if trace_match is None:
            raise AnswerParseError("no visual trace before the action", text, expected)
        trace = _parse_trace(trace_match.group(1), text, expected)
    elif before.strip():
        raise AnswerParseError("unexpected text before the action (a visual trace? then parse with "
                               "expect_trace=True)", text, expected)

    values = [_parse_number(token, text, expected) for token in found.group(1).split(",")]
    gripper_was_missing = len(values) == ACTION_SIZE - 1
    if gripper_was_missing:
        values.append(1.0)
    if len(values) != ACTION_SIZE:
        raise AnswerParseError(f"the action has {len(values)} numbers, not {ACTION_SIZE} "
                               f"(or {ACTION_SIZE - 1} without the gripper)", text, expected)
    return ParsedAnswer(np.array(values, dtype=np.float32), trace, gripper_was_missing)


def _parse_number(token: str, text: str, expected: str) -> float:
    token = token.strip()
    if _NON_FINITE_RE.fullmatch(token):
        raise AnswerParseError(f"non-finite number {token!r} in the action", text, expected)
    if not _DECIMAL_RE.fullmatch(token):
        raise AnswerParseError(f"{token!r} is not a number", text, expected)
    value = float(token)
    if not math.isfinite(value):     # e.g. 1e999
        raise AnswerParseError(f"non-finite number {token!r} in the action", text, expected)
    return value


def _parse_trace(inner: str, text: str, expected: str) -> np.ndarray:
    """`inner` is what lies between the trace's outer brackets: `[x1, y1], [x2, y2], ...`."""
    pairs = re.findall(r"\[([^\[\]]*)\]", inner)
    if not pairs or re.sub(r"\[[^\[\]]*\]", "", inner).replace(",", "").strip():
        raise AnswerParseError("the visual trace is not a list of [x, y] pairs", text, expected)
    points = []
    for pair in pairs:
        coordinates = [c.strip() for c in pair.split(",")]
        if len(coordinates) != 2 or not all(re.fullmatch(r"-?\d+", c) for c in coordinates):
            raise AnswerParseError(f"trace point [{pair}] is not two integers", text, expected)
        points.append([int(c) for c in coordinates])
    return np.array(points, dtype=np.int64)


# --- Whole conversations -----------------------------------------------------------------------


def build_prompt(question: str, *, template: str | Template = TRAINING) -> str:
    """The model input for generation: `{system} USER: {question} ASSISTANT:` (LLaVA's llava_v1)."""
    template = get_template(template)
    return (f"{template.system}{template.separator}{template.user_role}: {question}"
            f"{template.separator}{template.assistant_role}:")


def build_conversation_text(question: str, answer: str, *, template: str | Template = TRAINING) -> str:
    """A training sample: `{system} USER: {question} ASSISTANT: {answer}</s>`."""
    template = get_template(template)
    return f"{build_prompt(question, template=template)} {answer}{template.end_of_answer}"


def answer_span(question: str, answer: str, *, template: str | Template = TRAINING) -> tuple[int, int]:
    """(start, end) characters of the answer and its closing `</s>` in `build_conversation_text`.

    Fine-tuning computes the loss on these characters only. The `</s>` is inside the span because
    the model must learn to stop after the action.
    """
    template = get_template(template)
    start = len(build_prompt(question, template=template)) + 1     # + the space after "ASSISTANT:"
    return start, start + len(answer) + len(template.end_of_answer)
