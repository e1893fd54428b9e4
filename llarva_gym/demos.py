"""Demos on disk, in RLBench's layout: write them, read them, and read real RLBench demos without RLBench.

One episode is a folder of plain files, exactly as RLBench's dataset generator writes them, so that
RLBench-era tools and LLARVA's published data (written by real RLBench) work unchanged::

    <root>/<task>/all_variations/episodes/episode<M>/
        <camera>_rgb/<i>.png      colour image of step i, 8-bit RGB
        <camera>_depth/<i>.png    depth of step i, 24-bit integer in RGB (see encode_depth_rgb)
        <camera>_mask/<i>.png     object handles of step i, 24-bit integer in RGB (see encode_mask_rgb)
        low_dim_obs.pkl           a Demo of Observations whose image fields are None
        variation_descriptions.pkl   list of str: the variation's natural-language descriptions
        variation_number.pkl      int: the variation index

Pickles are code: unpickling a file can run any function it names. Real RLBench pickles name
`rlbench.demo.Demo` and `rlbench.backend.observation.Observation`, so we read every pickle through
a restricted unpickler that maps those names to our own classes, allows numpy arrays and plain
Python containers, and refuses everything else with a DemoFormatError.

We write pickles under RLBench's class names (and numpy 1.x's module names), so RLBench's own
code, with any numpy, loads what we write. A plain `pickle.load` of our low_dim_obs.pkl therefore
needs `rlbench` importable; without RLBench, use `load_low_dim_pickle` or `load_demo`.

Writes are atomic: an episode is written into a hidden temporary sibling folder and renamed into
place when complete, so a crash never leaves a half-written `episode<M>`.

Recording scripted-expert demos (`record_demos`, the `llarva demos` command) lives in
`llarva_gym.recording` and is importable from here too.
"""

from __future__ import annotations

import builtins
import codecs
import copy
import copyreg
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from llarva_gym.observation import CAMERAS, IMAGE_KINDS, LOW_DIM_FIELDS, Observation

try:  # numpy >= 2 (and numpy 1.26's forward-compatibility stubs)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct, scalar as _np_scalar
except ImportError:  # older numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct, scalar as _np_scalar
try:
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:
    from numpy.core.numeric import _frombuffer as _np_frombuffer

LOW_DIM_PICKLE = "low_dim_obs.pkl"
VARIATION_DESCRIPTIONS_PICKLE = "variation_descriptions.pkl"
VARIATION_NUMBER_PICKLE = "variation_number.pkl"
# Image kinds kept as PNG folders. Point clouds are never stored: RLBench recomputes them from depth.
STORED_IMAGE_KINDS = ("rgb", "depth", "mask")
DEPTH_SCALE = 2**24 - 1          # RLBench's DEPTH_SCALE: depth 0..1 becomes a 24-bit integer
_NO_OBJECT_CODE = 2**24 - 1      # mask code for handle -1 (MuJoCo's "no object")
_PICKLE_PROTOCOL = 4             # what RLBench on Python >= 3.8 writes; readable by Python >= 3.4
_EPISODE_NAME = re.compile(r"episode(\d+)")
_IMAGE_FIELDS = tuple(f"{camera}_{kind}" for camera in CAMERAS for kind in IMAGE_KINDS)


class DemoFormatError(ValueError):
    """A demo file is missing a part, is corrupt, or names something a demo must not contain."""


class Demo:
    """One recorded episode: a list of Observations, as `rlbench.demo.Demo`.

    `random_seed` is whatever resets the simulator to this episode's start. RLBench stores numpy's
    RandomState state tuple there (`np.random.get_state()`: ('MT19937', uint32[624], pos,
    has_gauss, cached_gaussian)); the embedded simulator stores an int seed or a dict of its own.
    It is kept as given.

    `variation_number`, `variation_descriptions` and `episode_dir` are filled by `load_demo` from the
    episode folder; `save_demo` leaves them out of low_dim_obs.pkl (RLBench keeps them in their own
    files), but copies and ordinary pickles (e.g. between processes) keep them.
    """

    _LOADER_FIELDS = ("variation_number", "variation_descriptions", "episode_dir")

    def __init__(self, observations, random_seed=None, num_reset_attempts=None):
        self._observations = list(observations)
        self.random_seed = random_seed
        self.num_reset_attempts = num_reset_attempts
        self.variation_number: int | None = None
        self.variation_descriptions: list[str] | None = None
        self.episode_dir: Path | None = None

    def __len__(self) -> int:
        return len(self._observations)

    def __getitem__(self, i):
        return self._observations[i]

    def __iter__(self) -> Iterator[Observation]:
        return iter(self._observations)

    def __setstate__(self, state: dict) -> None:
        # Start from the defaults: pickles from other RLBench versions may lack some attributes.
        self.__init__([])
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"Demo({len(self)} observations, variation_number={self.variation_number!r}, "
                f"episode_dir={str(self.episode_dir) if self.episode_dir else None!r})")


# --- depth and mask PNG codecs -------------------------------------------------------------------

def _check_near_far(near, far) -> tuple[float, float]:
    near, far = float(near), float(far)
    if not (np.isfinite(near) and np.isfinite(far) and far > near):
        raise ValueError(f"near/far: expected finite clipping distances with far > near, got {near}, {far}")
    return near, far


def encode_depth_rgb(depth_m, near, far) -> np.ndarray:
    """Depth in metres (H, W) -> RLBench's depth PNG pixels, (H, W, 3) uint8.

    As RLBench: depth is scaled to 0..1 between the camera's near and far planes (values outside
    are clipped), rounded to a 24-bit integer n = floor(d * (2**24 - 1) + 0.5), and stored with the
    high byte first: R = bits 16-23, G = bits 8-15, B = bits 0-7.
    """
    near, far = _check_near_far(near, far)
    depth_m = np.asarray(depth_m, dtype=np.float64)
    if depth_m.ndim != 2:
        raise ValueError(f"depth: expected an (H, W) array in metres, got shape {depth_m.shape}")
    if np.isnan(depth_m).any():
        raise ValueError("depth: contains NaN; expected distances in metres")
    depth01 = (depth_m - near) / (far - near)
    n = np.clip(np.floor(depth01 * DEPTH_SCALE + 0.5), 0, DEPTH_SCALE).astype(np.uint32)
    return np.stack([n >> 16, (n >> 8) & 0xFF, n & 0xFF], axis=-1).astype(np.uint8)


def decode_depth_rgb(rgb, near, far) -> np.ndarray:
    """RLBench's depth PNG pixels, (H, W, 3) uint8 -> depth in metres, (H, W) float32."""
    near, far = _check_near_far(near, far)
    rgb = _check_rgb_pixels(rgb, "depth PNG pixels")
    n = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    return (near + (far - near) * (n / DEPTH_SCALE)).astype(np.float32)


def encode_mask_rgb(handles) -> np.ndarray:
    """Object handles (H, W) integers -> RLBench's mask PNG pixels, (H, W, 3) uint8.

    RLBench codes a handle as R + 256 G + 65536 B: the LOW byte in R (the opposite of depth).
    -1, "no object" in MuJoCo's segmentation (RLBench's scenes always show some object), is stored
    as the all-ones code 2**24 - 1, which decode_mask_rgb turns back into -1.
    """
    handles = np.asarray(handles)
    if handles.ndim != 2 or not np.issubdtype(handles.dtype, np.integer):
        raise ValueError(f"mask: expected an (H, W) integer array of object handles, "
                         f"got shape {handles.shape} dtype {handles.dtype}")
    if handles.size and (handles.min() < -1 or handles.max() >= _NO_OBJECT_CODE):
        raise ValueError(f"mask: handles must lie in [-1, {_NO_OBJECT_CODE - 1}] to fit 24 bits, "
                         f"got {handles.min()}..{handles.max()}")
    code = np.where(handles == -1, _NO_OBJECT_CODE, handles).astype(np.uint32)
    return np.stack([code & 0xFF, (code >> 8) & 0xFF, code >> 16], axis=-1).astype(np.uint8)


def decode_mask_rgb(rgb) -> np.ndarray:
    """RLBench's mask PNG pixels, (H, W, 3) uint8 -> object handles, (H, W) int32 (-1: no object)."""
    rgb = _check_rgb_pixels(rgb, "mask PNG pixels").astype(np.int32)
    handles = rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)
    handles[handles == _NO_OBJECT_CODE] = -1
    return handles


def _check_rgb_pixels(rgb, what: str) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{what}: expected an (H, W, 3) uint8 array, got shape {rgb.shape} dtype {rgb.dtype}")
    return rgb


# --- pickles: a restricted reader, and a writer that uses RLBench's names ------------------------

def _latin1_bytes(text, encoding="latin1"):
    # Protocol-2 pickles (numpy 1.x era) spell every bytes object as _codecs.encode(text, "latin1").
    # Only that codec: we allow the name, not the general machinery.
    if encoding not in ("latin1", "latin-1"):
        raise DemoFormatError(f"refused _codecs.encode with encoding {encoding!r}; pickles use 'latin1'")
    return codecs.encode(text, "latin1")


_ALLOWED_GLOBALS = {
    ("rlbench.demo", "Demo"): Demo,
    ("rlbench.backend.observation", "Observation"): Observation,
    ("llarva_gym.demos", "Demo"): Demo,
    ("llarva_gym.observation", "Observation"): Observation,
    # numpy arrays, dtypes and scalars. numpy 1.x pickles name numpy.core, numpy 2 numpy._core;
    # _frombuffer is how numpy writes arrays in pickle protocol 5.
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(module, "_reconstruct"): _np_reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _np_scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _np_frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("_codecs", "encode"): _latin1_bytes,
    # Containers without their own opcode in older protocols (Python 2 spelling in protocols 0-2),
    # and copyreg._reconstructor, with which protocols 0 and 1 rebuild plain objects.
    **{(module, name): getattr(builtins, name)
       for module in ("builtins", "__builtin__")
       for name in ("set", "frozenset", "bytes", "bytearray", "complex", "object")},
    **{(module, "_reconstructor"): copyreg._reconstructor for module in ("copyreg", "copy_reg")},
}
# A numpy RandomState state tuple, RLBench's random_seed, is a plain tuple (str, ndarray, int,
# int, float): it needs nothing from numpy.random.


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the names in _ALLOWED_GLOBALS; refuses every other global a pickle names."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DemoFormatError(
                f"refused to load {module}.{name}: a demo pickle may only hold RLBench's Demo and "
                f"Observation, numpy arrays and plain Python values; unpickling anything else could "
                f"run code (a pickle from the internet must not)") from None


def _load_restricted_pickle(path: Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f).load()
        except DemoFormatError as exc:
            raise DemoFormatError(f"{path}: {exc}") from None
        except Exception as exc:  # any failure to decode these bytes (truncated, garbage) is a format error
            raise DemoFormatError(f"{path}: not a readable pickle, the file may be truncated or corrupt "
                                  f"({type(exc).__name__}: {exc})") from exc


def _fill_missing_fields(obs: Observation) -> None:
    # Unpickling sets only the attributes the writer had; RLBench versions differ (no overhead
    # camera, no misc, ...). Give every field we know a value so readers need no getattr guards.
    for name in _IMAGE_FIELDS + LOW_DIM_FIELDS:
        if name not in obs.__dict__:
            setattr(obs, name, {} if name == "misc" else None)


def load_low_dim_pickle(path) -> Demo:
    """Read a low_dim_obs.pkl (ours or real RLBench's) safely: a Demo of Observations.

    Raises FileNotFoundError if the file is missing and DemoFormatError if it is corrupt, is not a
    Demo, or names anything beyond Demo, Observation, numpy arrays and plain Python values.
    """
    path = Path(path)
    demo = _load_restricted_pickle(path)
    if not isinstance(demo, Demo):
        raise DemoFormatError(f"{path}: expected a Demo (rlbench.demo.Demo), found {type(demo).__name__}")
    for i, obs in enumerate(demo):
        if not isinstance(obs, Observation):
            raise DemoFormatError(f"{path}: step {i} is a {type(obs).__name__}, expected an Observation "
                                  f"(rlbench.backend.observation.Observation)")
        _fill_missing_fields(obs)
    return demo


# The writer names classes as RLBench and numpy 1.x do, so that RLBench's own code (any numpy)
# loads our pickles. Only the pure-Python pickler lets us choose the names it writes.
_WRITE_NAMES = {
    Demo: ("rlbench.demo", "Demo"),
    Observation: ("rlbench.backend.observation", "Observation"),
    _np_reconstruct: ("numpy.core.multiarray", "_reconstruct"),
    _np_scalar: ("numpy.core.multiarray", "scalar"),
}


class _RLBenchNamesPickler(pickle._Pickler):
    def reducer_override(self, obj):
        # On disk a Demo holds RLBench's attributes only: the variation lives in its own files.
        if type(obj) is Demo:
            state = {k: v for k, v in obj.__dict__.items() if k not in Demo._LOADER_FIELDS}
            return copyreg.__newobj__, (Demo,), state
        return NotImplemented

    def save_global(self, obj, name=None):
        module_and_name = _WRITE_NAMES.get(obj)
        if module_and_name is None:
            return super().save_global(obj, name)
        self.save(module_and_name[0])      # protocol >= 4 spelling of a global: two strings, then
        self.save(module_and_name[1])      # STACK_GLOBAL; memoized so later uses refer back to it
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def _write_pickle(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _RLBenchNamesPickler(f, protocol=_PICKLE_PROTOCOL).dump(obj)


# --- folders -----------------------------------------------------------------------------------

def episodes_dir(root, task: str) -> Path:
    """`<root>/<task>/all_variations/episodes`: the folder holding a task's `episode<M>` folders."""
    return Path(root) / task / "all_variations" / "episodes"


def episode_path(root, task: str, index: int) -> Path:
    """`<root>/<task>/all_variations/episodes/episode<index>`."""
    return episodes_dir(root, task) / f"episode{int(index)}"


def image_path(episode_dir, camera: str, kind: str, step: int) -> Path:
    """The PNG of one step: `<episode_dir>/<camera>_<kind>/<step>.png`."""
    return Path(episode_dir) / f"{camera}_{kind}" / f"{int(step)}.png"


def episode_dirs(root, task: str) -> list[Path]:
    """A task's episode folders, sorted by number (episode2 before episode10).

    Temporary folders of unfinished writes (hidden, `.episode<M>.tmp-...`) are not episodes.
    Raises FileNotFoundError if the task has no episodes folder.
    """
    folder = episodes_dir(root, task)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; demos of task {task!r} live in "
                                f"<root>/<task>/all_variations/episodes/episode<M>/")
    numbered = []
    for entry in os.scandir(folder):
        match = _EPISODE_NAME.fullmatch(entry.name)
        if match and entry.is_dir():
            numbered.append((int(match[1]), Path(entry.path)))
    return [path for _, path in sorted(numbered)]


def next_episode_index(root, task: str) -> int:
    """One past the highest episode number of the task (0 when it has none)."""
    try:
        dirs = episode_dirs(root, task)
    except FileNotFoundError:
        return 0
    return int(_EPISODE_NAME.fullmatch(dirs[-1].name)[1]) + 1 if dirs else 0


def iter_demos(root, task: str, **load_kwargs) -> Iterator[tuple[Path, Demo]]:
    """Yield `(episode_dir, demo)` for each episode of the task, in order; `load_kwargs` go to load_demo."""
    for episode_dir in episode_dirs(root, task):
        yield episode_dir, load_demo(episode_dir, **load_kwargs)


# --- writing -----------------------------------------------------------------------------------

def _check_names(given, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    given = (given,) if isinstance(given, str) else tuple(given)
    unknown = [g for g in given if g not in allowed]
    if unknown:
        raise ValueError(f"{what}: unknown name(s) {unknown}; expected a subset of {tuple(allowed)}")
    return given


def _image_fields_to_write(first: Observation, cameras, image_kinds) -> list[tuple[str, str]]:
    if cameras is not None and image_kinds is not None:
        return [(c, k) for c in _check_names(cameras, CAMERAS, "cameras")
                for k in _check_names(image_kinds, STORED_IMAGE_KINDS, "image_kinds")]
    # Not told: write the images the first observation carries (within what was given, if anything).
    cameras = CAMERAS if cameras is None else _check_names(cameras, CAMERAS, "cameras")
    kinds = STORED_IMAGE_KINDS if image_kinds is None else _check_names(image_kinds, STORED_IMAGE_KINDS, "image_kinds")
    return [(c, k) for c in cameras for k in kinds if getattr(first, f"{c}_{k}", None) is not None]


def _near_far(obs: Observation, camera: str) -> tuple[float, float] | None:
    misc = getattr(obs, "misc", None) or {}
    near, far = misc.get(f"{camera}_camera_near"), misc.get(f"{camera}_camera_far")
    return None if near is None or far is None else (near, far)


def _png_pixels(obs: Observation, camera: str, kind: str, step: int) -> np.ndarray:
    """The pixels RLBench stores for one image field of one step."""
    field = f"{camera}_{kind}"
    value = getattr(obs, field, None)
    if value is None:
        raise ValueError(f"observation {step}: {field} is None; every observation must carry the "
                         f"images being saved")
    if kind == "rgb":
        return _check_rgb_pixels(value, f"observation {step}: {field}")
    if kind == "depth":
        near_far = _near_far(obs, camera)
        if near_far is None:
            raise ValueError(f"observation {step}: misc lacks '{camera}_camera_near'/'{camera}_camera_far', "
                             f"needed to store {field} as RLBench does (scaled between near and far)")
        return encode_depth_rgb(value, *near_far)
    return encode_mask_rgb(value)


def _write_png(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path)


def _low_dim_copy(demo, observations: list[Observation]) -> Demo:
    # What RLBench pickles: the observations with every image field set to None (the images live
    # in the PNG folders). Copies, so the caller's demo keeps its images.
    stripped = []
    for obs in observations:
        obs = copy.copy(obs)
        for name in _IMAGE_FIELDS:
            setattr(obs, name, None)
        stripped.append(obs)
    return Demo(stripped, random_seed=getattr(demo, "random_seed", None),
                num_reset_attempts=getattr(demo, "num_reset_attempts", None))


def save_demo(demo, episode_dir, *, variation_number: int | None = None,
              descriptions: Sequence[str] | None = None, cameras: Sequence[str] | None = None,
              image_kinds: Sequence[str] | None = None, overwrite: bool = False) -> Path:
    """Write one episode in RLBench's layout into `episode_dir`; returns its path.

    `demo` is a Demo (or a list of Observations). `variation_number` and `descriptions` default
    to the demo's `variation_number` and `variation_descriptions` (set by load_demo or a
    recorder); one of the two places must give them. `cameras` and `image_kinds` (a subset of
    "rgb", "depth", "mask") choose the PNG folders; left as None, the images that the first
    observation carries are written. Every observation must carry every image written. RGB is
    (H, W, 3) uint8; depth is (H, W) metres, stored with the `misc` entries
    `<camera>_camera_near`/`_far`; mask is (H, W) integer object handles.

    Atomic: all files go into a hidden temporary sibling folder, renamed to `episode_dir` once
    complete. An existing episode is kept (FileExistsError) unless `overwrite=True`.
    """
    episode_dir = Path(episode_dir)
    observations = list(demo)
    if not observations:
        raise ValueError("demo: has no observations; an episode needs at least one step")
    bad = [i for i, obs in enumerate(observations) if not isinstance(obs, Observation)]
    if bad:
        raise ValueError(f"demo: step {bad[0]} is a {type(observations[bad[0]]).__name__}, expected an Observation")
    if variation_number is None:
        variation_number = getattr(demo, "variation_number", None)
    if descriptions is None:
        descriptions = getattr(demo, "variation_descriptions", None)
    if isinstance(variation_number, bool) or not isinstance(variation_number, (int, np.integer)) or variation_number < 0:
        raise ValueError(f"variation_number: expected a non-negative int (given, or set on the demo), "
                         f"got {variation_number!r}")
    if descriptions is None or isinstance(descriptions, str) or not all(isinstance(d, str) for d in descriptions):
        raise ValueError(f"descriptions: expected a list of str (given, or the demo's variation_descriptions), "
                         f"got {descriptions!r}")
    fields = _image_fields_to_write(observations[0], cameras, image_kinds)
    if episode_dir.exists() and not overwrite:
        raise FileExistsError(f"{episode_dir}: episode exists; pass overwrite=True to replace it "
                              f"(next_episode_index gives a free number)")

    episode_dir.parent.mkdir(parents=True, exist_ok=True)
    unique = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir = episode_dir.parent / f".{episode_dir.name}.tmp-{unique}"
    tmp_dir.mkdir()
    try:
        for camera, kind in fields:
            (tmp_dir / f"{camera}_{kind}").mkdir()
            for step, obs in enumerate(observations):
                _write_png(_png_pixels(obs, camera, kind, step), image_path(tmp_dir, camera, kind, step))
        _write_pickle(_low_dim_copy(demo, observations), tmp_dir / LOW_DIM_PICKLE)
        _write_pickle(list(descriptions), tmp_dir / VARIATION_DESCRIPTIONS_PICKLE)
        _write_pickle(int(variation_number), tmp_dir / VARIATION_NUMBER_PICKLE)

        if overwrite and episode_dir.exists():
            old_dir = episode_dir.parent / f".{episode_dir.name}.old-{unique}"
            os.rename(episode_dir, old_dir)
            os.rename(tmp_dir, episode_dir)
            shutil.rmtree(old_dir)
        else:
            try:
                os.rename(tmp_dir, episode_dir)
            except OSError as exc:  # another writer took the name since we checked
                raise FileExistsError(f"{episode_dir}: episode appeared while writing; not replaced") from exc
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return episode_dir


# --- reading -----------------------------------------------------------------------------------

def _step_image_paths(episode_dir: Path, camera: str, kind: str, num_steps: int) -> list[Path]:
    folder = episode_dir / f"{camera}_{kind}"
    if not folder.is_dir():
        present = sorted(p.name for p in episode_dir.iterdir() if p.is_dir())
        raise FileNotFoundError(f"{folder}: no such folder (asked for {camera} {kind} images); "
                                f"this episode has {present}")
    names = {entry.name for entry in os.scandir(folder) if entry.name.endswith(".png")}
    paths = [image_path(episode_dir, camera, kind, step) for step in range(num_steps)]
    for path in paths:
        if path.name not in names:
            raise FileNotFoundError(f"{path}: missing image of step {path.stem}; {LOW_DIM_PICKLE} has "
                                    f"{num_steps} observations, so 0.png .. {num_steps - 1}.png are expected")
    if len(names) != num_steps:
        raise DemoFormatError(f"{folder}: {len(names)} PNG files for {num_steps} observations in "
                              f"{LOW_DIM_PICKLE}; expected exactly 0.png .. {num_steps - 1}.png")
    return paths


def _read_png(path: Path, kind: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if kind == "rgb" and image.mode != "RGB":
                image = image.convert("RGB")
            elif kind != "rgb" and image.mode != "RGB":
                raise DemoFormatError(f"{path}: {kind} PNGs are 24-bit RGB-coded integers, found mode {image.mode}")
            return np.array(image)
    except DemoFormatError:
        raise
    except Exception as exc:  # PIL's errors for a truncated or non-PNG file vary by version
        raise DemoFormatError(f"{path}: not a readable PNG ({type(exc).__name__}: {exc})") from exc


def read_rgb_image(path) -> np.ndarray:
    """The RGB PNG at `path` as an (H, W, 3) uint8 array (DemoFormatError names a file that
    cannot be read)."""
    return _read_png(Path(path), "rgb")


def read_rgb_images(paths, shape: tuple) -> np.ndarray:
    """The RGB PNGs at `paths` stacked as an (N, *shape) uint8 array; ValueError names the first
    file of another shape."""
    pixels = np.empty((len(paths), *shape), np.uint8)
    for i, path in enumerate(paths):
        image = read_rgb_image(path)
        if image.shape != tuple(shape):
            raise ValueError(f"images: expected one size for all front images, found {tuple(shape)} and "
                             f"{image.shape} ({path})")
        pixels[i] = image
    return pixels


def _load_image(path: Path, obs: Observation, camera: str, kind: str) -> np.ndarray:
    pixels = _read_png(path, kind)
    if kind == "rgb":
        return pixels
    if kind == "mask":
        return decode_mask_rgb(pixels)
    near_far = _near_far(obs, camera)
    if near_far is None:
        raise DemoFormatError(f"{path}: decoding depth needs misc['{camera}_camera_near'] and "
                              f"misc['{camera}_camera_far'] of step {path.stem} in {LOW_DIM_PICKLE}")
    return decode_depth_rgb(pixels, *near_far)


def load_variation_number(episode_dir) -> int:
    """An episode's variation index, from its `variation_number.pkl` (without loading the demo)."""
    path = Path(episode_dir) / VARIATION_NUMBER_PICKLE
    number = _load_restricted_pickle(path)
    if isinstance(number, bool) or not isinstance(number, (int, np.integer)):
        raise DemoFormatError(f"{path}: expected an int variation number, found {type(number).__name__}")
    return int(number)


def _load_descriptions(path: Path) -> list[str]:
    descriptions = _load_restricted_pickle(path)
    if not isinstance(descriptions, (list, tuple)) or not all(isinstance(d, str) for d in descriptions):
        raise DemoFormatError(f"{path}: expected a list of str descriptions, found {descriptions!r:.200}")
    return list(descriptions)


def load_demo(episode_dir, *, cameras: Sequence[str] = ("front",), image_kinds: Sequence[str] = ("rgb",),
              load_images: bool = True) -> Demo:
    """Read one episode folder (ours or real RLBench's) into a Demo.

    Only the asked `cameras` and `image_kinds` are read from the PNG folders, into each
    observation's `<camera>_rgb` ((H, W, 3) uint8), `<camera>_depth` ((H, W) float32 metres) and
    `<camera>_mask` ((H, W) int32 object handles); other image fields stay None. With
    `load_images=False` no image is read or checked. Sets `variation_number`,
    `variation_descriptions` and `episode_dir`.

    Raises FileNotFoundError (naming the path) for a missing folder, file or step image, and
    DemoFormatError for corrupt files or image counts that differ from the number of observations.
    """
    episode_dir = Path(episode_dir)
    if not episode_dir.is_dir():
        raise FileNotFoundError(f"{episode_dir}: no such episode folder; expected "
                                f"<root>/<task>/all_variations/episodes/episode<M>/")
    cameras = _check_names(cameras, CAMERAS, "cameras")
    image_kinds = _check_names(image_kinds, STORED_IMAGE_KINDS, "image_kinds")

    demo = load_low_dim_pickle(episode_dir / LOW_DIM_PICKLE)
    demo.variation_number = load_variation_number(episode_dir)
    demo.variation_descriptions = _load_descriptions(episode_dir / VARIATION_DESCRIPTIONS_PICKLE)
    demo.episode_dir = episode_dir
    if load_images:
        for camera in cameras:
            for kind in image_kinds:
                paths = _step_image_paths(episode_dir, camera, kind, len(demo))
                for obs, path in zip(demo, paths):
                    setattr(obs, f"{camera}_{kind}", _load_image(path, obs, camera, kind))
    return demo


def __getattr__(name: str):
    # record_demos lives in llarva_gym.recording (it needs the env and the expert); imported on
    # first use so that reading demos stays light and the two modules can import each other.
    if name == "record_demos":
        from llarva_gym.recording import record_demos
        return record_demos
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
