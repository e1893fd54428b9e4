"""Demos on disk: RLBench's layout written and read back, real RLBench pickles read without RLBench,
malicious pickles refused, interrupted writes leave nothing behind, broken episodes named clearly."""

import io
import json
import pickle
import sys
import types

import numpy as np
import pytest
from PIL import Image

from llarva_gym import demos
from llarva_gym.demos import (
    DEPTH_SCALE, Demo, DemoFormatError, decode_depth_rgb, decode_mask_rgb, encode_depth_rgb,
    encode_mask_rgb, episode_dirs, episode_path, iter_demos, load_demo, load_low_dim_pickle,
    next_episode_index, save_demo,
)
from llarva_gym.observation import CAMERAS, LOW_DIM_FIELDS, Observation

TASK = "sweep_to_dustpan_of_size"
H, W = 16, 20
CAMERA_RANGE = {"front": (0.01, 4.5), "wrist": (0.005, 3.0)}
DESCRIPTIONS = ["sweep dirt to the tall dustpan", "sweep the dirt up into the tall dustpan"]


def make_misc(rng, cameras=("front", "wrist")):
    misc = {}
    for camera in cameras:
        near, far = CAMERA_RANGE.get(camera, (0.01, 4.5))
        misc[f"{camera}_camera_extrinsics"] = rng.normal(size=(4, 4))
        misc[f"{camera}_camera_intrinsics"] = rng.normal(size=(3, 3))
        misc[f"{camera}_camera_near"] = near
        misc[f"{camera}_camera_far"] = far
    return misc


def make_demo(num_steps=3, seed=0, cameras=("front", "wrist"), masks=False):
    rng = np.random.default_rng(seed)
    observations = []
    for _ in range(num_steps):
        obs = Observation(
            joint_velocities=rng.normal(size=7), joint_positions=rng.normal(size=7),
            joint_forces=rng.normal(size=7), gripper_open=1.0, gripper_pose=rng.normal(size=7),
            gripper_matrix=rng.normal(size=(4, 4)), gripper_joint_positions=rng.normal(size=2),
            gripper_touch_forces=rng.normal(size=6), task_low_dim_state=rng.normal(size=12),
            ignore_collisions=np.array([0.0]), misc=make_misc(rng, cameras))
        for camera in cameras:
            near, far = CAMERA_RANGE[camera]
            setattr(obs, f"{camera}_rgb", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
            setattr(obs, f"{camera}_depth", rng.uniform(near, far, (H, W)).astype(np.float32))
            if masks:
                setattr(obs, f"{camera}_mask", rng.integers(-1, 300_000, (H, W), dtype=np.int32))
        observations.append(obs)
    return Demo(observations, random_seed=np.random.RandomState(7).get_state(), num_reset_attempts=1)


def assert_low_dim_equal(a: Observation, b: Observation):
    for name in LOW_DIM_FIELDS:
        if name == "misc":
            assert a.misc.keys() == b.misc.keys()
            for key in a.misc:
                np.testing.assert_array_equal(a.misc[key], b.misc[key])
        else:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def global_names(pickle_bytes: bytes) -> set[str]:
    """The module.name globals a pickle refers to, as the unpickler is asked for them."""

    class RecordingUnpickler(demos._RestrictedUnpickler):
        def find_class(self, module, name):
            names.add(f"{module}.{name}")
            return super().find_class(module, name)

    names = set()
    RecordingUnpickler(io.BytesIO(pickle_bytes)).load()
    return names


# --- codecs --------------------------------------------------------------------------------------

def test_depth_bit_layout_is_rlbench_high_byte_in_red():
    # With near=0 and far=2**24-1 a depth in metres is the 24-bit code itself.
    code = 0x0A0B0C
    rgb = encode_depth_rgb(np.array([[code, 0, DEPTH_SCALE]], dtype=np.float64), 0.0, DEPTH_SCALE)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 3, 3)
    assert rgb[0].tolist() == [[0x0A, 0x0B, 0x0C], [0, 0, 0], [255, 255, 255]]
    # RLBench's decoder: sum(image * [65536, 256, 1]) / (2**24 - 1), then near + (far - near) * d
    d01 = (rgb.astype(np.float64) * [65536, 256, 1]).sum(axis=2) / DEPTH_SCALE
    np.testing.assert_allclose(decode_depth_rgb(rgb, 0.5, 2.5), 0.5 + 2.0 * d01, rtol=1e-7)


def test_depth_round_trip_error_below_1e_6_of_range_and_clips_outside():
    rng = np.random.default_rng(1)
    near, far = 0.01, 4.5
    depth = rng.uniform(near, far, (64, 64)).astype(np.float32)
    back = decode_depth_rgb(encode_depth_rgb(depth, near, far), near, far)
    assert back.dtype == np.float32 and back.shape == depth.shape
    assert np.abs(back.astype(np.float64) - depth).max() < 1e-6 * (far - near)
    clipped = decode_depth_rgb(encode_depth_rgb(np.array([[-1.0, 99.0]]), near, far), near, far)
    np.testing.assert_allclose(clipped, [[near, far]], rtol=1e-6)
    with pytest.raises(ValueError, match="far > near"):
        encode_depth_rgb(depth, 2.0, 1.0)


def test_mask_codec_low_byte_in_red_as_rlbench_rgb_handles_to_mask():
    handles = np.array([[0, 1, 256, 65536 + 2 * 256 + 3, -1]], dtype=np.int32)  # -1: MuJoCo's "no object"
    rgb = encode_mask_rgb(handles)
    assert rgb[0].tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [3, 2, 1], [255, 255, 255]]
    np.testing.assert_array_equal(decode_mask_rgb(rgb), handles)
    with pytest.raises(ValueError, match="mask: handles must lie in"):
        encode_mask_rgb(np.array([[-2]]))


# --- write and read back -------------------------------------------------------------------------

def test_write_then_read_two_cameras_rgb_and_depth(tmp_path):
    demo = make_demo(num_steps=3)
    episode = save_demo(demo, episode_path(tmp_path, TASK, 0), variation_number=1, descriptions=DESCRIPTIONS,
                        cameras=("front", "wrist"), image_kinds=("rgb", "depth"))

    assert episode == tmp_path / TASK / "all_variations" / "episodes" / "episode0"
    assert sorted(p.name for p in episode.iterdir()) == [
        "front_depth", "front_rgb", "low_dim_obs.pkl", "variation_descriptions.pkl",
        "variation_number.pkl", "wrist_depth", "wrist_rgb"]
    for folder in ("front_rgb", "front_depth", "wrist_rgb", "wrist_depth"):
        assert sorted(p.name for p in (episode / folder).iterdir()) == ["0.png", "1.png", "2.png"]
    with Image.open(episode / "front_depth" / "0.png") as image:
        assert image.mode == "RGB" and image.size == (W, H)
    assert demo[0].front_rgb is not None, "the caller's demo keeps its images"
    assert [p.name for p in (episode.parent).iterdir()] == ["episode0"], "no temporary folder left"

    loaded = load_demo(episode, cameras=("front", "wrist"), image_kinds=("rgb", "depth"))
    assert len(loaded) == 3
    assert loaded.variation_number == 1 and loaded.variation_descriptions == DESCRIPTIONS
    assert loaded.episode_dir == episode and loaded.num_reset_attempts == 1
    assert pickle.loads(pickle.dumps(loaded)).variation_descriptions == DESCRIPTIONS  # e.g. to a worker
    state = loaded.random_seed
    assert state[0] == "MT19937" and np.array_equal(state[1], demo.random_seed[1])
    for original, back in zip(demo, loaded):
        assert_low_dim_equal(original, back)
        for camera in ("front", "wrist"):
            rgb, depth = getattr(back, f"{camera}_rgb"), getattr(back, f"{camera}_depth")
            assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
            np.testing.assert_array_equal(rgb, getattr(original, f"{camera}_rgb"))
            near, far = CAMERA_RANGE[camera]
            assert depth.shape == (H, W) and depth.dtype == np.float32
            assert np.abs(depth - getattr(original, f"{camera}_depth")).max() < 1e-6 * (far - near)
        assert back.front_mask is None and back.overhead_rgb is None and back.front_point_cloud is None

    # The pickle holds no images, and names RLBench's classes and numpy 1.x's module.
    raw = (episode / "low_dim_obs.pkl").read_bytes()
    assert global_names(raw) == {"rlbench.demo.Demo", "rlbench.backend.observation.Observation",
                                 "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
    assert all(obs.front_rgb is None for obs in load_low_dim_pickle(episode / "low_dim_obs.pkl"))


def test_only_asked_cameras_and_kinds_are_read(tmp_path):
    episode = save_demo(make_demo(masks=True), tmp_path / "episode0", variation_number=0,
                        descriptions=DESCRIPTIONS)
    assert {p.name for p in episode.iterdir() if p.is_dir()} == {
        f"{c}_{k}" for c in ("front", "wrist") for k in ("rgb", "depth", "mask")}

    front_only = load_demo(episode)  # defaults: front rgb
    assert front_only[0].front_rgb is not None
    assert front_only[0].front_depth is None and front_only[0].wrist_rgb is None

    masks = load_demo(episode, cameras=["wrist"], image_kinds=["mask"])
    assert masks[0].wrist_mask.dtype == np.int32 and masks[0].wrist_mask.shape == (H, W)
    np.testing.assert_array_equal(masks[0].wrist_mask, make_demo(masks=True)[0].wrist_mask)

    no_images = load_demo(episode, load_images=False)
    assert no_images[0].front_rgb is None and no_images[0].joint_positions.shape == (7,)
    with pytest.raises(ValueError, match="cameras: unknown"):
        load_demo(episode, cameras=("back",))


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    target = tmp_path / "episode0"
    save_demo(make_demo(seed=0), target, variation_number=0, descriptions=DESCRIPTIONS)
    with pytest.raises(FileExistsError, match="episode0"):
        save_demo(make_demo(seed=1), target, variation_number=1, descriptions=DESCRIPTIONS)
    assert load_demo(target).variation_number == 0
    save_demo(make_demo(seed=1), target, variation_number=1, descriptions=DESCRIPTIONS, overwrite=True)
    assert load_demo(target).variation_number == 1
    assert [p.name for p in tmp_path.iterdir()] == ["episode0"]


def test_a_loaded_demo_saves_again_with_its_own_variation(tmp_path):
    first = save_demo(make_demo(), tmp_path / "episode0", variation_number=1, descriptions=DESCRIPTIONS)
    loaded = load_demo(first, cameras=["front", "wrist"], image_kinds=["rgb", "depth"])
    copy = save_demo(loaded, tmp_path / "episode1")   # variation and descriptions come from the demo
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in first.iterdir())
    again = load_demo(copy, image_kinds=["depth"])
    assert again.variation_number == 1 and again.variation_descriptions == DESCRIPTIONS
    # float32 metres cannot hold all 24 bits over the range: re-encoding may move the lowest bit.
    assert np.abs(again[2].front_depth - loaded[2].front_depth).max() < 1e-6 * (4.5 - 0.01)
    with pytest.raises(ValueError, match="variation_number: expected a non-negative int"):
        save_demo(make_demo(), tmp_path / "episode2", descriptions=DESCRIPTIONS)


def test_save_rejects_bad_input_and_leaves_nothing(tmp_path):
    demo = make_demo()
    demo[1].front_rgb = None
    with pytest.raises(ValueError, match="observation 1: front_rgb is None"):
        save_demo(demo, tmp_path / "episode0", variation_number=0, descriptions=DESCRIPTIONS,
                  cameras=["front"], image_kinds=["rgb"])
    with pytest.raises(ValueError, match="variation_number"):
        save_demo(make_demo(), tmp_path / "episode0", variation_number=-1, descriptions=DESCRIPTIONS)
    with pytest.raises(ValueError, match="descriptions"):
        save_demo(make_demo(), tmp_path / "episode0", variation_number=0, descriptions="one string")
    assert list(tmp_path.iterdir()) == []


def test_episode_dirs_numeric_order_ignoring_temp_folders_and_iter_demos(tmp_path):
    for index in (10, 2, 1):
        save_demo(make_demo(num_steps=1, seed=index), episode_path(tmp_path, TASK, index),
                  variation_number=index % 2, descriptions=DESCRIPTIONS)
    episodes = episode_path(tmp_path, TASK, 0).parent
    (episodes / ".episode11.tmp-999-deadbeef").mkdir()   # left by a writer that was killed
    (episodes / "notes.txt").write_text("not an episode")
    assert [p.name for p in episode_dirs(tmp_path, TASK)] == ["episode1", "episode2", "episode10"]
    assert next_episode_index(tmp_path, TASK) == 11
    assert next_episode_index(tmp_path, "no_such_task") == 0
    assert [(d.name, demo.variation_number) for d, demo in iter_demos(tmp_path, TASK, load_images=False)] == [
        ("episode1", 1), ("episode2", 0), ("episode10", 0)]
    with pytest.raises(FileNotFoundError, match="no_such_task"):
        episode_dirs(tmp_path, "no_such_task")


# --- real RLBench pickles, without RLBench ---------------------------------------------------------

# rlbench/backend/observation.py (stepjam/RLBench): Observation.__init__ takes these, in this order,
# and stores each as an attribute of the same name.
RLBENCH_OBSERVATION_ARGS = (
    [f"{camera}_{kind}" for camera in ("left_shoulder", "right_shoulder", "overhead", "wrist", "front")
     for kind in ("rgb", "depth", "mask", "point_cloud")]
    + ["joint_velocities", "joint_positions", "joint_forces", "gripper_open", "gripper_pose",
       "gripper_matrix", "gripper_joint_positions", "gripper_touch_forces", "task_low_dim_state", "misc"])


@pytest.fixture
def fake_rlbench():
    """Modules rlbench.demo and rlbench.backend.observation with RLBench-shaped classes, for writing
    pickles as RLBench does; removed again before anything is read back."""

    class Observation:
        def __init__(self, *args):
            assert len(args) == len(RLBENCH_OBSERVATION_ARGS)
            for name, value in zip(RLBENCH_OBSERVATION_ARGS, args):
                setattr(self, name, value)

    class Demo:
        def __init__(self, observations, random_seed=None, num_reset_attempts=None):
            self._observations = observations
            self.random_seed = random_seed
            self.num_reset_attempts = num_reset_attempts

    modules = {name: types.ModuleType(name) for name in
               ("rlbench", "rlbench.demo", "rlbench.backend", "rlbench.backend.observation")}
    for cls, module in ((Observation, "rlbench.backend.observation"), (Demo, "rlbench.demo")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
    modules["rlbench"].demo, modules["rlbench"].backend = modules["rlbench.demo"], modules["rlbench.backend"]
    modules["rlbench.backend"].observation = modules["rlbench.backend.observation"]

    def remove():
        for name in modules:
            sys.modules.pop(name, None)

    sys.modules.update(modules)
    yield types.SimpleNamespace(Demo=Demo, Observation=Observation, remove=remove, modules=modules)
    remove()


def rlbench_demo(fake, num_steps=2, seed=0):
    rng = np.random.default_rng(seed)
    observations = []
    for _ in range(num_steps):
        low_dim = dict(joint_velocities=rng.normal(size=7), joint_positions=rng.normal(size=7),
                       joint_forces=rng.normal(size=7), gripper_open=1.0, gripper_pose=rng.normal(size=7),
                       gripper_matrix=rng.normal(size=(4, 4)), gripper_joint_positions=rng.normal(size=2),
                       gripper_touch_forces=rng.normal(size=6), task_low_dim_state=rng.normal(size=12),
                       misc=make_misc(rng, CAMERAS) | {"executed_demo_joint_position_action": rng.normal(size=8),
                                                       "near_as_numpy_scalar": np.float64(0.5)})
        args = [low_dim.get(name) for name in RLBENCH_OBSERVATION_ARGS]  # image fields None, as on disk
        obs = fake.Observation(*args)
        obs.ignore_collisions = np.array(1.0)   # forks add attributes; they must still load
        obs.keyframe = True
        observations.append(obs)
    return fake.Demo(observations, random_seed=np.random.RandomState(3).get_state())


def write_rlbench_episode(episode, fake, low_dim_bytes, num_steps):
    episode.mkdir(parents=True)
    (episode / "low_dim_obs.pkl").write_bytes(low_dim_bytes)
    (episode / "variation_descriptions.pkl").write_bytes(pickle.dumps(DESCRIPTIONS, protocol=3))
    (episode / "variation_number.pkl").write_bytes(pickle.dumps(1, protocol=3))
    (episode / "front_rgb").mkdir()
    (episode / "front_depth").mkdir()
    for i in range(num_steps):
        Image.fromarray(np.full((H, W, 3), 10 * i, np.uint8)).save(episode / "front_rgb" / f"{i}.png")
        Image.fromarray(encode_depth_rgb(np.full((H, W), 1.0 + i), 0.01, 4.5)).save(
            episode / "front_depth" / f"{i}.png")


def test_reads_rlbench_pickle_without_rlbench_installed(tmp_path, fake_rlbench):
    original = rlbench_demo(fake_rlbench, num_steps=2)
    raw = pickle.dumps(original, protocol=3)     # what RLBench on Python 3.6/3.7 wrote
    assert {"rlbench.demo.Demo", "rlbench.backend.observation.Observation"} <= global_names(raw)
    fake_rlbench.remove()
    assert "rlbench" not in sys.modules and "rlbench.demo" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(raw)   # the plain unpickler needs RLBench; ours does not

    episode = tmp_path / "episode0"
    write_rlbench_episode(episode, fake_rlbench, raw, num_steps=2)
    demo = load_demo(episode, image_kinds=("rgb", "depth"))
    assert isinstance(demo, Demo) and isinstance(demo[0], Observation) and len(demo) == 2
    assert demo.variation_number == 1 and demo.variation_descriptions == DESCRIPTIONS
    assert demo.random_seed[0] == "MT19937" and demo.num_reset_attempts is None
    for i, (theirs, ours) in enumerate(zip(original._observations, demo)):
        for name in RLBENCH_OBSERVATION_ARGS:
            if name != "misc" and getattr(theirs, name) is not None:
                np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))
        np.testing.assert_array_equal(ours.misc["front_camera_extrinsics"], theirs.misc["front_camera_extrinsics"])
        assert ours.misc["near_as_numpy_scalar"] == 0.5
        assert ours.keyframe is True and ours.ignore_collisions == 1.0
        assert ours.front_rgb[0, 0].tolist() == [10 * i] * 3
        np.testing.assert_allclose(ours.front_depth, 1.0 + i, atol=1e-6)
    assert demo[0].get_low_dim_data().shape == (1 + 7 * 3 + 7 + 2 + 6 + 12,)


def test_reads_numpy_1x_pickles_naming_numpy_core(tmp_path, fake_rlbench):
    # numpy 1.x names numpy.core.multiarray; protocol 2 spells module names as text lines, so
    # rewriting numpy 2's name gives exactly what a numpy-1.x RLBench wrote (bytes via _codecs.encode).
    raw = pickle.dumps(rlbench_demo(fake_rlbench, num_steps=2), protocol=2)
    raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    names = global_names(raw)
    assert "numpy.core.multiarray._reconstruct" in names and "_codecs.encode" in names
    assert not any(name.startswith("numpy._core") for name in names)
    fake_rlbench.remove()
    path = tmp_path / "low_dim_obs.pkl"
    path.write_bytes(raw)
    demo = load_low_dim_pickle(path)
    assert demo[1].joint_positions.shape == (7,) and demo[1].gripper_matrix.shape == (4, 4)
    assert demo[0].overhead_rgb is None and demo[0].misc["front_camera_near"] == 0.01


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_reads_every_pickle_protocol(tmp_path, protocol):
    demo = make_demo(num_steps=2)
    demo[0].misc["a_set"], demo[0].misc["empty_bytes"], demo[0].misc["z"] = {1, 2}, b"", 1 + 2j
    path = tmp_path / "low_dim_obs.pkl"
    path.write_bytes(pickle.dumps(demo, protocol=protocol))
    back = load_low_dim_pickle(path)
    assert_low_dim_equal(demo[0], back[0])
    np.testing.assert_array_equal(back[0].front_rgb, demo[0].front_rgb)


def test_our_pickles_load_with_rlbench_own_classes(tmp_path, fake_rlbench):
    episode = save_demo(make_demo(num_steps=2), tmp_path / "episode0", variation_number=0,
                        descriptions=DESCRIPTIONS)
    with open(episode / "low_dim_obs.pkl", "rb") as f:
        theirs = pickle.load(f)     # plain pickle, as RLBench's get_stored_demos does
    assert isinstance(theirs, fake_rlbench.Demo) and len(theirs._observations) == 2
    assert isinstance(theirs._observations[0], fake_rlbench.Observation)
    assert theirs.num_reset_attempts == 1 and theirs.random_seed[0] == "MT19937"
    assert not hasattr(theirs, "variation_number") and theirs._observations[0].front_rgb is None
    assert theirs._observations[0].misc["front_camera_far"] == 4.5


# --- pickles that would run code --------------------------------------------------------------------

def evil_pickles(marker):
    target = str(marker).encode()
    return {
        "os.system": b"cos\nsystem\n(Vtouch " + target + b"\ntR.",
        "builtins.eval": b"cbuiltins\neval\n(Vopen(" + repr(str(marker)).encode() + b", 'w').close()\ntR.",
        "subprocess.Popen": b"csubprocess\nPopen\n((Vtouch\nV" + target + b"\nltR.",
    }


@pytest.mark.parametrize("refused", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_refuses_pickles_that_name_code(tmp_path, refused):
    marker = tmp_path / "pwned"
    raw = evil_pickles(marker)[refused]
    path = tmp_path / "low_dim_obs.pkl"
    path.write_bytes(raw)
    with pytest.raises(DemoFormatError, match=rf"{refused}.*could run code") as info:
        load_low_dim_pickle(path)
    assert str(path) in str(info.value)
    assert not marker.exists()

    # The payload is live: the plain unpickler runs it (a harmless `touch` in tmp_path).
    result = pickle.loads(raw)
    if refused == "subprocess.Popen":
        result.wait()
    assert marker.exists()


def test_refuses_code_hidden_inside_a_demo(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').close()",))

    demo = make_demo(num_steps=2)
    demo[1].misc["innocent"] = Payload()
    episode = tmp_path / "episode0"
    save_demo(make_demo(num_steps=2), episode, variation_number=0, descriptions=DESCRIPTIONS)
    (episode / "low_dim_obs.pkl").write_bytes(pickle.dumps(demo))
    (episode / "variation_number.pkl").write_bytes(pickle.dumps(0))
    with pytest.raises(DemoFormatError, match="builtins.eval"):
        load_demo(episode)
    (episode / "low_dim_obs.pkl").write_bytes(pickle.dumps(make_demo(num_steps=2)))
    (episode / "variation_number.pkl").write_bytes(pickle.dumps(Payload()))  # every pickle is checked
    with pytest.raises(DemoFormatError, match="variation_number.pkl.*builtins.eval"):
        load_demo(episode)
    assert not marker.exists()


# --- interrupted writes and broken episodes ------------------------------------------------------------

def test_crash_mid_write_leaves_no_episode(tmp_path, monkeypatch):
    real_write_png = demos._write_png
    written = []

    def write_png_then_crash(pixels, path):
        if len(written) == 4:
            raise OSError("disk full (simulated)")
        real_write_png(pixels, path)
        written.append(path)

    monkeypatch.setattr(demos, "_write_png", write_png_then_crash)
    target = episode_path(tmp_path, TASK, 0)
    with pytest.raises(OSError, match="simulated"):
        save_demo(make_demo(num_steps=3), target, variation_number=0, descriptions=DESCRIPTIONS)
    assert len(written) == 4 and all(".episode0.tmp-" in str(p) for p in written)
    assert not target.exists()
    assert list(target.parent.iterdir()) == [], "the temporary folder is removed"
    assert episode_dirs(tmp_path, TASK) == [] and next_episode_index(tmp_path, TASK) == 0


@pytest.fixture
def episode(tmp_path):
    return save_demo(make_demo(num_steps=3), tmp_path / "episode0", variation_number=0,
                     descriptions=DESCRIPTIONS, cameras=["front"], image_kinds=["rgb", "depth"])


def test_missing_parts_are_named(episode, tmp_path):
    with pytest.raises(FileNotFoundError, match="episode7"):
        load_demo(tmp_path / "episode7")
    with pytest.raises(FileNotFoundError, match="wrist_rgb.*this episode has"):
        load_demo(episode, cameras=["wrist"])
    (episode / "front_rgb" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"front_rgb/1\.png"):
        load_demo(episode)
    (episode / "variation_descriptions.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="variation_descriptions.pkl"):
        load_demo(episode, load_images=False)
    (episode / "low_dim_obs.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="low_dim_obs.pkl"):
        load_demo(episode)


def test_image_count_must_match_observations(episode):
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(episode / "front_rgb" / "3.png")
    with pytest.raises(DemoFormatError, match=r"front_rgb: 4 PNG files for 3 observations"):
        load_demo(episode)


def test_corrupt_files_raise_format_errors(episode):
    raw = (episode / "low_dim_obs.pkl").read_bytes()
    (episode / "low_dim_obs.pkl").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DemoFormatError, match="low_dim_obs.pkl: not a readable pickle"):
        load_demo(episode)
    (episode / "low_dim_obs.pkl").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(DemoFormatError, match="low_dim_obs.pkl"):
        load_demo(episode)
    (episode / "low_dim_obs.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DemoFormatError, match="expected a Demo"):
        load_demo(episode)
    (episode / "low_dim_obs.pkl").write_bytes(raw)

    (episode / "variation_number.pkl").write_bytes(pickle.dumps("one"))
    with pytest.raises(DemoFormatError, match="variation_number.pkl: expected an int"):
        load_demo(episode)
    (episode / "variation_number.pkl").write_bytes(pickle.dumps(0))

    (episode / "front_rgb" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DemoFormatError, match=r"front_rgb/2\.png: not a readable PNG"):
        load_demo(episode)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(episode / "front_depth" / "0.png")
    with pytest.raises(DemoFormatError, match=r"front_depth/0\.png: depth PNGs are 24-bit RGB"):
        load_demo(episode, image_kinds=["depth"])


def test_a_failed_json_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    from llarva_gym.files import write_json_atomic

    path = write_json_atomic(tmp_path / "results" / "run.json", {"episodes": [1, 2], "where": tmp_path})
    assert json.loads(path.read_text()) == {"episodes": [1, 2], "where": str(tmp_path)}
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    circular: list = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular reference"):
        write_json_atomic(path, {"episodes": circular})
    assert json.loads(path.read_text())["episodes"] == [1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]
