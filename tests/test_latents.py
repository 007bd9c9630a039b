"""Latent shards on disk, per-process batch reading, and posterior sampling from moments."""

import json
import os

import grain
import jax
import ml_collections
import numpy as np
import pytest

from dydit_jax.data import (
    ArraySource,
    LatentSource,
    load_source,
    make_batches,
    sample_from_moments,
    write_latent_shards,
)
from tests.helpers import CountingSource

N, H, W, C = 37, 4, 4, 4


def _moments(n=N, seed=0):
    rng = np.random.default_rng(seed)
    moments = rng.normal(size=(n, 2, H, W, 2 * C)).astype(np.float16)
    labels = rng.integers(0, 7, size=n).astype(np.int32)
    labels[3] = 9  # num_classes = 10
    return moments, labels


@pytest.fixture
def moments_dir(tmp_path):
    moments, labels = _moments()
    out = tmp_path / "lat"
    write_latent_shards(out, {"moments": moments, "label": labels}, num_shards=3)
    return out, moments, labels


def test_moment_shards_round_trip(moments_dir):
    out, moments, labels = moments_dir
    names = sorted(os.listdir(out))
    assert names == [
        "labels.npy",
        "manifest.json",
        "shard-00000-of-00003.array_record",
        "shard-00001-of-00003.array_record",
        "shard-00002-of-00003.array_record",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "dydit-latents-v1"
    assert manifest["num_examples"] == N and manifest["num_shards"] == 3
    assert manifest["shards"] == [
        {"file": f"shard-0000{k}-of-00003.array_record", "num_examples": n}
        for k, n in enumerate([13, 12, 12])
    ]
    assert manifest["kind"] == "moments" and manifest["shape"] == [2, H, W, 2 * C]
    assert manifest["dtype"] == "float16" and manifest["num_classes"] == 10

    source = LatentSource(out)
    assert len(source) == N and source.kind == "moments"
    assert source.example_shape == {"moments": (2, H, W, 2 * C), "label": ()}
    assert source.labels.dtype == np.int32
    np.testing.assert_array_equal(source.labels, labels)
    for i in range(N):
        item = source[i]
        assert set(item) == {"moments", "label"}
        assert item["moments"].dtype == np.float16 and item["label"].dtype == np.int32
        np.testing.assert_array_equal(item["moments"], moments[i])
        assert item["label"] == labels[i]
    np.testing.assert_array_equal(source[-1]["moments"], moments[-1])
    batch = source.__getitems__([5, 30, 0])
    np.testing.assert_array_equal(np.stack([b["moments"] for b in batch]), moments[[5, 30, 0]])
    with pytest.raises(IndexError):
        source[N]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_latent_shards(out, {"moments": moments, "label": labels}, num_shards=3)


def test_latents_kind_from_an_iterator_and_load_source(tmp_path):
    rng = np.random.default_rng(1)
    latents = rng.normal(size=(10, H, W, C)).astype(np.float32)
    labels = np.arange(10) % 4
    examples = ({"latents": x, "label": int(y)} for x, y in zip(latents, labels, strict=True))
    with pytest.raises(ValueError, match="num_examples"):
        write_latent_shards(tmp_path / "a", iter([]), num_shards=1)
    manifest = write_latent_shards(tmp_path / "b", examples, num_shards=4, num_examples=10)
    assert manifest["kind"] == "latents" and manifest["dtype"] == "float32"
    assert manifest["num_classes"] == 4 and manifest["shape"] == [H, W, C]

    config = ml_collections.ConfigDict(dict(dataset="latents", data_dir=str(tmp_path / "b")))
    source = load_source(config)
    assert isinstance(source, LatentSource) and source.kind == "latents"
    assert source.example_shape == {"latents": (H, W, C), "label": ()}
    got = np.stack([source[i]["latents"] for i in range(10)])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, latents)
    np.testing.assert_array_equal(source.labels, labels)
    with pytest.raises(ValueError, match="data_dir"):
        load_source(ml_collections.ConfigDict(dict(dataset="latents", data_dir="")))
    with pytest.raises(ValueError, match="data_dir"):
        load_source(ml_collections.ConfigDict(dict(dataset="latents")))


def test_batches_from_latents_match_the_reference_pipeline(moments_dir):
    out, moments, _ = moments_dir
    source = LatentSource(out)
    batches = make_batches(source, global_batch_size=8, seed=3, process_index=0, process_count=1)
    # the semantics of the original pipeline: shuffle(seed).repeat(), then batch
    reference = grain.MapDataset.source(source).shuffle(seed=3).repeat()
    for step in (0, 4, 9):  # 4 straddles the first epoch's end (37 examples)
        batch = batches[step]
        assert set(batch) == {"moments", "label"}
        assert batch["moments"].shape == (8, 2, H, W, 2 * C)
        assert batch["label"].dtype == np.int32
        expected = np.stack([reference[step * 8 + j]["moments"] for j in range(8)])
        np.testing.assert_array_equal(batch["moments"], expected)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_rows_concatenate_to_the_global_batch(moments_dir, process_count):
    source = LatentSource(moments_dir[0])
    whole = make_batches(source, global_batch_size=8, seed=1, process_index=0, process_count=1)
    parts = [
        make_batches(
            source, global_batch_size=8, seed=1, process_index=i, process_count=process_count
        )
        for i in range(process_count)
    ]
    for step in range(7):
        for key in ("moments", "label"):
            joined = np.concatenate([p[step][key] for p in parts])
            np.testing.assert_array_equal(joined, whole[step][key])


def test_each_process_reads_only_its_rows():
    source = ArraySource(np.arange(20, dtype=np.float32)[:, None], np.arange(20) % 3)
    whole = make_batches(source, global_batch_size=8, seed=1, process_index=0, process_count=1)
    counting = CountingSource(source)
    mine = make_batches(counting, global_batch_size=8, seed=1, process_index=1, process_count=2)
    for step in range(6):
        counting.seen.clear()
        rows = mine[step]["image"][:, 0]
        expected = whole[step]["image"][4:, 0]
        np.testing.assert_array_equal(rows, expected)
        assert sorted(counting.seen) == sorted(expected.astype(int).tolist())


def test_bad_directories_give_clear_errors(tmp_path, moments_dir):
    out, moments, labels = moments_dir
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentSource(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete write"):
        LatentSource(tmp_path / "empty")

    def rewrite(name, **changes):
        d = tmp_path / name
        write_latent_shards(d, {"moments": moments, "label": labels}, num_shards=3)
        manifest = json.loads((d / "manifest.json").read_text())
        manifest.update(changes)
        (d / "manifest.json").write_text(json.dumps(manifest))
        return d

    with pytest.raises(ValueError, match="unknown format 'dydit-latents-v0'"):
        LatentSource(rewrite("fmt", format="dydit-latents-v0"))

    d = rewrite("missing")
    os.remove(d / "shard-00001-of-00003.array_record")
    with pytest.raises(FileNotFoundError, match="shard-00001-of-00003.array_record.*missing"):
        LatentSource(d)

    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["shards"]
    shards[2]["num_examples"] = 11
    d = rewrite("count", shards=shards, num_examples=N - 1)
    with pytest.raises(ValueError, match="shard-00002-of-00003.array_record holds 12 records"):
        LatentSource(d)

    d = rewrite("trunc")
    path = d / "shard-00000-of-00003.array_record"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="shard-00000-of-00003.array_record is truncated"):
        LatentSource(d)


def test_a_record_of_the_wrong_length_is_an_error_naming_the_file(tmp_path):
    """A shard whose records do not match the manifest's shape (e.g. a shard of another write)."""
    moments, labels = _moments(n=6)
    d = tmp_path / "wrong"
    write_latent_shards(d, {"moments": moments, "label": labels}, num_shards=2)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["shape"] = [2, H, W, 2 * C - 2]
    (d / "manifest.json").write_text(json.dumps(manifest))
    source = LatentSource(d)
    with pytest.raises(ValueError, match=r"record 1 of .*shard-00001-of-00002.*truncated"):
        source[4]


def test_sample_from_moments_flips_clips_and_is_deterministic():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(64, 2, H, W, C)).astype(np.float32)
    moments = np.concatenate([mean, np.full_like(mean, -30.0)], axis=-1).astype(np.float16)
    key = jax.random.key(0)
    sample = jax.jit(sample_from_moments)
    out = sample(key, moments)
    assert out.shape == (64, H, W, C) and out.dtype == np.float32
    out = np.asarray(out)
    image = 0.18215 * moments[:, 0, ..., :C].astype(np.float32)
    flip = 0.18215 * moments[:, 1, ..., :C].astype(np.float32)
    is_image = np.all(np.abs(out - image) < 1e-5, axis=(1, 2, 3))
    is_flip = np.all(np.abs(out - flip) < 1e-5, axis=(1, 2, 3))
    assert np.all(is_image | is_flip)
    assert 10 < is_image.sum() < 54 and 10 < is_flip.sum() < 54
    np.testing.assert_array_equal(np.asarray(sample(key, moments)), out)
    other = np.asarray(sample(jax.random.key(1), moments))
    assert not np.array_equal(other, out)

    # logvar 100 is clipped to 20: std exp(10) (unclipped it would be exp(50))
    big = np.zeros((8, 2, 32, 32, 2 * C), np.float16)
    big[..., C:] = 100.0
    draws = np.asarray(sample(jax.random.key(2), big, 1.0))
    assert np.isfinite(draws).all()
    np.testing.assert_allclose(draws.std(), np.exp(10.0), rtol=0.05)
    with pytest.raises(ValueError, match="B, 2, H, W, 2C"):
        sample(key, moments[:, 0])
