"""The latent-extraction tool (dydit_jax.data.extract_latents) and the ADM centre crop.

A tiny random VAE (downsampling factor 2) and generated image folders; 16 px crops."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from dydit_jax import vae
from dydit_jax.convert.vae import write_vae_dir
from dydit_jax.data import LatentSource
from dydit_jax.data import extract_latents as ex
from dydit_jax.data.images import ImageFolder, center_crop, to_unit_range
from tests.helpers import REPO

SIZE = 16  # crop size; the tiny VAE gives 8 x 8 latents
TINY = vae.VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    rng = np.random.default_rng(0)

    def init(path, s):  # fan-in scaling keeps the activations O(1)
        if path[-1].key == "kernel":
            return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        if path[-1].key == "scale":
            return (1 + 0.1 * rng.normal(size=s.shape)).astype(np.float32)
        return (0.1 * rng.normal(size=s.shape)).astype(np.float32)

    d = tmp_path_factory.mktemp("vae") / "tiny"
    write_vae_dir(str(d), TINY, jax.tree_util.tree_map_with_path(init, vae.param_shapes(TINY)))
    return str(d)


def make_folder(root, seed=0):
    """3 classes (one with a nested folder), PNG/JPEG in RGB, L, RGBA, P, CMYK, odd sizes, a
    non-image file and a hidden folder; returns the expected (relative path, label) list."""
    rng = np.random.default_rng(seed)
    specs = {
        "cat": [("a.png", "RGB", (20, 24)), ("b.JPG", "L", (40, 17)), ("c.png", "RGBA", (33, 33))],
        "dog": [("d.jpeg", "CMYK", (64, 48)), ("sub/e.png", "P", (16, 16)),
                ("f.png", "RGB", (70, 150))],
        "emu": [("g.png", "RGB", (17, 40)), ("h.png", "L", (100, 31))],
    }
    expected = []
    for label, (cls, files) in enumerate(sorted(specs.items())):
        for name, mode, (w, h) in files:
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            image = rgb.convert(mode) if mode != "RGBA" else rgb.copy()
            if mode == "RGBA":
                image.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
            image.save(path)
        expected += [(os.path.join(cls, n), label) for n, _, _ in sorted(files)]
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.new("RGB", (20, 20)).save(root / ".hidden" / "x.png")
    Image.new("RGB", (20, 20)).save(root / "loose.png")  # not in a class folder: ignored
    return expected


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, make_folder(root)


@pytest.fixture(scope="module")
def reference(folder, vae_dir, tmp_path_factory):
    """A complete, uninterrupted single-process extraction of the folder in 3 shards."""
    out = tmp_path_factory.mktemp("reference") / "lat"
    assert run(folder[0], vae_dir, out, "--num_shards", "3") == 0
    return out


def run(folder_root, vae_dir, out, *extra):
    return ex.main([
        "--source", f"folder:{folder_root}", "--image_size", str(SIZE), "--vae", vae_dir,
        "--out", str(out), "--batch_size", "3", "--num_workers", "2", *extra,
    ])


@functools.cache
def _encoder(vae_dir):
    model = vae.load(vae_dir)
    sharded = vae.ShardedVAE(model)
    return lambda x: np.asarray(sharded.encode(x))


def files_of(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


# -------------------------------------------------------------------------------- the crop


def reference_crop(image, s):
    """The crop as docs/dit.md words it, one step at a time."""
    w, h = image.size
    while min(w, h) >= 2 * s:
        w, h = w // 2, h // 2
        image = image.resize((w, h), Image.Resampling.BOX)
    w, h = round(w * s / min(w, h)), round(h * s / min(w, h))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    top, left = (h - s) // 2, (w - s) // 2
    return np.asarray(image.crop((left, top, left + s, top + s)))


def test_center_crop_matches_hand_computed_crops():
    rng = np.random.default_rng(0)
    # short side == target: no resampling at all, a plain centre slice (odd margins round down)
    for h, w in [(16, 41), (37, 16), (16, 16), (16, 17)]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        top, left = (h - 16) // 2, (w - 16) // 2
        np.testing.assert_array_equal(
            center_crop(Image.fromarray(arr), 16), arr[top : top + 16, left : left + 16]
        )
    # short side 16 * 2^k: k BOX halvings (means of 2^k x 2^k blocks up to the rounding of
    # every pass),
    # then no BICUBIC change; 1024 x 1536 takes 6 halvings to 16 x 24
    for k, (h, w) in [(2, (64, 96)), (6, (1024, 1536))]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        f = 2**k
        blocks = arr.reshape(h // f, f, w // f, f, 3).astype(np.float64).mean(axis=(1, 3))
        left = (w // f - 16) // 2
        got = center_crop(Image.fromarray(arr), 16).astype(np.float64)
        err = got - blocks[:16, left : left + 16]  # Pillow rounds each pass half up
        assert -0.5 <= err.min() and err.max() <= k and err.mean() <= 0.6 * k, (k, err)
    # BICUBIC after the halvings, around the halving threshold (31/32/33/63/64) and far above
    for h, w in [(31, 50), (32, 50), (33, 47), (63, 64), (64, 63), (65, 200), (1000, 333),
                 (333, 1000), (17, 4001)]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = center_crop(Image.fromarray(arr), 16)
        assert got.shape == (16, 16, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, reference_crop(Image.fromarray(arr), 16))
    # a very large image: 6000 x 4000 halves 7 times (4000 -> 31) before the resize
    big = Image.new("RGB", (6000, 4000), (10, 200, 30))
    np.testing.assert_array_equal(center_crop(big, 16), np.full((16, 16, 3), (10, 200, 30)))
    assert center_crop(big, 256).shape == (256, 256, 3)
    # the crop's position: a left/right split image cropped off-centre to the right half
    arr = np.zeros((16, 40, 3), np.uint8)
    arr[:, 20:] = 255
    crop = center_crop(Image.fromarray(arr), 16)  # columns 12..27
    assert (crop[:, :8] == 0).all() and (crop[:, 8:] == 255).all()


def test_center_crop_modes_and_unit_range():
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    out = center_crop(grey, 16)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[..., 0], np.asarray(grey))
    np.testing.assert_array_equal(out[..., 1], out[..., 2])
    rgba = Image.new("RGBA", (16, 16), (1, 2, 3, 0))
    np.testing.assert_array_equal(center_crop(rgba, 16), np.full((16, 16, 3), (1, 2, 3)))
    cmyk = Image.new("CMYK", (20, 16), (0, 0, 0, 0))  # no ink: white
    np.testing.assert_array_equal(center_crop(cmyk, 16), np.full((16, 16, 3), 255))
    x = to_unit_range(np.array([0, 255, 128], np.uint8))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-7)


def test_image_folder_listing_and_errors(folder, tmp_path):
    root, expected = folder
    images = ImageFolder(root)
    assert images.classes == ["cat", "dog", "emu"]
    assert list(zip(images.files, images.labels.tolist(), strict=True)) == expected
    assert ImageFolder(root).fingerprint() == images.fingerprint()
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolder(tmp_path / "flat")
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="found no images"):
        ImageFolder(tmp_path / "hollow")


# ----------------------------------------------------------------------------- extraction


def test_extract_folder_end_to_end(folder, vae_dir, reference, capsys):
    root, expected = folder
    out = reference
    assert sorted(os.listdir(out)) == [
        "labels.npy", "manifest.json", *[f"shard-0000{k}-of-00003.array_record" for k in range(3)]
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "dydit-latents-v1" and manifest["kind"] == "moments"
    assert manifest["shape"] == [2, 8, 8, 8] and manifest["dtype"] == "float16"
    assert manifest["num_examples"] == 8 and manifest["num_classes"] == 3
    assert [s["num_examples"] for s in manifest["shards"]] == [3, 3, 2]
    extraction = manifest["extraction"]
    assert extraction["image_size"] == SIZE and extraction["classes"] == ["cat", "dog", "emu"]
    assert extraction["source"] == "folder" and extraction["source_path"] == str(root)

    source = LatentSource(out)
    assert len(source) == 8
    np.testing.assert_array_equal(source.labels, [label for _, label in expected])
    crops = np.stack([center_crop(Image.open(root / f), SIZE) for f, _ in expected])
    x = to_unit_range(crops)
    encode = _encoder(vae_dir)
    want = np.stack([encode(x), encode(x[:, :, ::-1])], axis=1)  # image, then its flip
    got = np.stack([source[i]["moments"] for i in range(8)])
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    assert np.abs(want[:, 0] - want[:, 1]).max() > 0.1  # the flip is a different image

    before = files_of(out)
    capsys.readouterr()
    assert run(root, vae_dir, out, "--num_shards", "3") == 0  # already complete: a no-op
    assert "nothing to do" in capsys.readouterr().out
    assert files_of(out) == before


def test_resume_after_an_interruption(folder, vae_dir, reference, tmp_path):
    root, _ = folder
    resumed = tmp_path / "resumed"

    class Stop(Exception):
        pass

    def stop_after_first(k):
        raise Stop(k)

    with pytest.raises(Stop):
        ex.extract(f"folder:{root}", str(resumed), vae_dir=vae_dir, image_size=SIZE,
                   num_shards=3, batch_size=3, progress=False, num_workers=2,
                   on_shard_done=stop_after_first)
    first = resumed / "shard-00000-of-00003.array_record"
    assert sorted(os.listdir(resumed)) == [
        "extraction.json", first.name, "shard-00000-of-00003.labels.npy"
    ]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        LatentSource(resumed)
    # a crash in the middle of shard 1 leaves its temporary file; shard 0 loses its labels file
    (resumed / "shard-00001-of-00003.array_record.tmp").write_bytes(b"partial")
    os.remove(resumed / "shard-00000-of-00003.labels.npy")
    stat = os.stat(first)

    assert run(root, vae_dir, resumed, "--num_shards", "3") == 0
    again = os.stat(first)
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # kept
    assert files_of(resumed) == files_of(reference)  # as if never interrupted


# A real kill -9: the extraction CLI in a subprocess, paced after each shard (so that the
# kill lands mid-run rather than after the last shard), killed once a shard is on disk.
_PACED_CLI = """
import sys, time
from dydit_jax.data import extract_latents as ex
whole = ex.extract
ex.extract = lambda *a, **k: whole(*a, **k, on_shard_done=lambda i: time.sleep(0.5))
sys.exit(ex.main(sys.argv[1:]))
"""


def test_a_killed_extraction_reruns_to_the_uninterrupted_result(folder, vae_dir, tmp_path):
    root, expected = folder
    shards = ["--num_shards", "4"]
    reference = tmp_path / "reference"
    assert run(root, vae_dir, reference, *shards) == 0
    out = tmp_path / "killed"
    args = ["--source", f"folder:{root}", "--image_size", str(SIZE), "--vae", vae_dir,
            "--out", str(out), "--batch_size", "3", "--num_workers", "2", *shards]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", _PACED_CLI, *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and any(f.endswith(".labels.npy") for f in os.listdir(out)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "extraction ended before it could be killed"
    done = [f for f in os.listdir(out) if f.endswith(".array_record")]
    assert 1 <= len(done) < 4
    kept = {f: os.stat(out / f).st_mtime_ns for f in done}
    assert run(root, vae_dir, out, *shards) == 0
    assert {f: os.stat(out / f).st_mtime_ns for f in done} == kept  # finished shards skipped
    assert files_of(out) == files_of(reference)  # every image once, as if never killed
    assert len(np.load(out / "labels.npy")) == len(expected)


def test_shard_assignment_covers_every_shard_once():
    for num_shards in (1, 2, 5, 8):
        for count in (1, 2, 3):
            parts = [list(ex.shards_of_process(num_shards, p, count)) for p in range(count)]
            assert sorted(sum(parts, [])) == list(range(num_shards))
    assert list(ex.shards_of_process(5, 0, 2)) == [0, 2, 4]
    assert list(ex.shards_of_process(5, 1, 2)) == [1, 3]
    with pytest.raises(ValueError):
        ex.shards_of_process(5, 2, 2)


def test_two_processes_write_the_single_process_result(folder, vae_dir, reference, tmp_path):
    """Processes simulated one after another (process_index/process_count given)."""
    root, _ = folder
    two = tmp_path / "two"
    kw = dict(vae_dir=vae_dir, image_size=SIZE, num_shards=3, batch_size=3, progress=False,
              num_workers=2)
    with pytest.raises(ValueError, match="missing or incomplete.*shard-00001-of-00003"):
        ex.extract(f"folder:{root}", str(two), process_index=0, process_count=2, **kw)
    assert not (two / "manifest.json").exists()
    written = []
    assert ex.extract(f"folder:{root}", str(two), process_index=1, process_count=2,
                      on_shard_done=written.append, **kw) is None
    assert written == [1]
    assert not (two / "manifest.json").exists()
    manifest = ex.extract(f"folder:{root}", str(two), process_index=0, process_count=2, **kw)
    assert manifest["num_examples"] == 8
    assert files_of(two) == files_of(reference)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_give_one_clear_error(folder, vae_dir, tmp_path, capsys):
    root, _ = folder

    def error(*argv):
        capsys.readouterr()
        assert ex.main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        return err

    base = ["--vae", vae_dir, "--out", str(tmp_path / "o"), "--image_size", str(SIZE)]
    assert "does not exist" in error("--source", f"folder:{tmp_path}/nowhere", *base)
    (tmp_path / "empty").mkdir()
    assert "no class subfolders" in error("--source", f"folder:{tmp_path}/empty", *base)
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    assert "found no images" in error("--source", f"folder:{tmp_path}/hollow", *base)
    assert "tfds:NAME" in error("--source", f"{root}", *base)
    assert "--vae" in error("--source", f"folder:{root}", *base[2:], "--vae", f"{tmp_path}/v")
    assert "multiple of 8" in error("--source", f"folder:{root}", *base, "--image_size", "20")
    assert "more than the 8 examples" in error("--source", f"folder:{root}", *base,
                                                "--num_shards", "9")
    assert not (tmp_path / "o").exists()  # none of these wrote anything

    # --out holding another, complete extraction (another crop size) is left alone
    done = tmp_path / "done"
    assert run(root, vae_dir, done, "--limit", "2") == 0
    before = files_of(done)
    err = error("--source", f"folder:{root}", "--vae", vae_dir, "--out", str(done),
                "--image_size", "24", "--limit", "2")
    assert "different extraction" in err and "image_size: 16 there, 24 now" in err
    # ... or another VAE
    other = tmp_path / "vae2"
    other.mkdir()
    for name in os.listdir(vae_dir):
        (other / name).write_bytes(open(os.path.join(vae_dir, name), "rb").read())
    params = dict(np.load(other / "params.npz"))
    params["quant_conv/bias"] = params["quant_conv/bias"] + 1
    np.savez(other / "params.npz", **params)
    err = error("--source", f"folder:{root}", "--vae", str(other), "--out", str(done),
                "--image_size", str(SIZE), "--limit", "2")
    assert "vae_sha256" in err
    assert files_of(done) == before
    # ... an unfinished extraction with other settings, and a directory of foreign shards
    pending = tmp_path / "pending"
    pending.mkdir()
    (pending / "extraction.json").write_text(json.dumps({"image_size": 32}))
    assert "unfinished extraction" in error("--source", f"folder:{root}", *base[:2], "--out",
                                            str(pending), "--image_size", str(SIZE))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-00000-of-00001.array_record").write_bytes(b"x")
    assert "can be resumed" in error("--source", f"folder:{root}", *base[:2], "--out",
                                        str(foreign), "--image_size", str(SIZE))
    assert (foreign / "shard-00000-of-00001.array_record").read_bytes() == b"x"


def test_tfds_that_is_not_prepared_is_an_error_without_a_download(vae_dir, tmp_path, capsys):
    pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path / "tfds"
    code = ex.main(["--source", "tfds:imagenet2012", "--tfds_data_dir", str(data_dir),
                    "--vae", vae_dir, "--out", str(tmp_path / "o"), "--image_size", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "tfds build imagenet2012" in err and "--manual_dir" in err
    assert not (tmp_path / "o").exists()
    assert not data_dir.exists() or not any(data_dir.rglob("*.tar"))


@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
    """A 7-example tfds dataset prepared twice: ArrayRecord (random access) and TFRecord."""
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, (16 + 5 * i, 30 - 2 * i, 3), dtype=np.uint8)
              for i in range(7)]

    class TinyExtractImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["x", "y", "z", "w"]),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, a in enumerate(arrays):
                yield i, {"image": a, "label": (2 * i) % 3}

    dirs = {}
    for fmt in ("array_record", "tfrecord"):
        dirs[fmt] = str(tmp_path_factory.mktemp(fmt))
        TinyExtractImages(data_dir=dirs[fmt], file_format=fmt).download_and_prepare()
    return dirs, arrays


def test_tfds_source_random_access_and_sequential(tfds_dirs, vae_dir, tmp_path):
    dirs, arrays = tfds_dirs
    outs = {}
    for fmt, data_dir in dirs.items():
        outs[fmt] = tmp_path / fmt
        assert ex.main([
            "--source", "tfds:tiny_extract_images", "--tfds_data_dir", data_dir,
            "--split", "train[1:]", "--image_size", str(SIZE), "--vae", vae_dir,
            "--out", str(outs[fmt]), "--num_shards", "2", "--batch_size", "4",
        ]) == 0
    for name in ("labels.npy", "shard-00000-of-00002.array_record",
                 "shard-00001-of-00002.array_record"):
        assert (outs["array_record"] / name).read_bytes() == (outs["tfrecord"] / name).read_bytes()
    source = LatentSource(outs["tfrecord"])
    assert source.num_classes == 4 and source.manifest["extraction"]["split"] == "train[1:]"
    # tfds stores examples in its own (hashed) order: read it back with tfds itself
    tfds = pytest.importorskip("tensorflow_datasets")
    rows = tfds.builder("tiny_extract_images", data_dir=dirs["array_record"]).as_data_source(
        "train[1:]")
    rows = [rows[i] for i in range(6)]
    index = [next(i for i, a in enumerate(arrays) if np.array_equal(r["image"], a)) for r in rows]
    assert len(set(index)) == 6  # six distinct generated images (PNG is lossless)
    np.testing.assert_array_equal(source.labels, [(2 * i) % 3 for i in index])
    x = to_unit_range(np.stack([center_crop(Image.fromarray(r["image"]), SIZE) for r in rows]))
    encode = _encoder(vae_dir)
    got = np.stack([source[i]["moments"] for i in range(6)]).astype(np.float32)
    np.testing.assert_allclose(got[:, 0], encode(x), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got[:, 1], encode(x[:, :, ::-1]), rtol=2e-3, atol=2e-3)


def test_module_entry_point_exits_2_without_a_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "dydit_jax.data.extract_latents", "--source",
         f"folder:{tmp_path}/nowhere", "--vae", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
