"""Evaluation: the suite's metrics on synthetic features, the Inception path on a stand-in
TensorFlow graph, bad inputs, the digits classifier and the reference statistics cache.
Independent computations here are plain float64 numpy/scipy."""

import json
import os

import numpy as np
import pytest
from scipy import linalg

from dydit_jax.eval import digits_classifier as dc
from dydit_jax.eval import evaluate as ev
from dydit_jax.eval import metrics
from dydit_jax.eval.features import EvalInputError, FeatureExtractor

# ----------------------------------------------------------------------------- independent math


def fid_reference(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(root).real)


def is_reference(probs):
    p = np.asarray(probs, np.float64)
    kl = np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), axis=1)
    return float(np.exp(kl.mean()))


def pr_reference(ref, samples, k=3):
    ref, samples = np.asarray(ref, np.float64), np.asarray(samples, np.float64)
    d = lambda u, v: ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(d(ref, ref), axis=1)[:, k]
    r_smp = np.sort(d(samples, samples), axis=1)[:, k]
    cross = d(ref, samples)
    precision = np.mean((cross <= r_ref[:, None]).any(axis=0))
    recall = np.mean((cross <= r_smp[None, :]).any(axis=1))
    return float(precision), float(recall), r_ref


def rotation(d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


# ----------------------------------------------------------------------------- metric math


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.5, 3.0, 5), rng.uniform(0.5, 3.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
    # Commuting covariances with the same eigenvectors: tr sqrt(s1 s2) = sum sqrt(a b).
    q = rotation(5)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_sampled_gaussians():
    rng = np.random.default_rng(1)
    d, n = 4, 40000
    q = rotation(d, 1)
    a, b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 1.0, 1.5, 0.5])
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 0.5])
    x = rng.normal(size=(n, d)) * np.sqrt(a) @ q.T + mu1
    y = rng.normal(size=(n, d)) * np.sqrt(b) @ q.T + mu2
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fit_x, fit_y = metrics.fit_gaussian(x), metrics.fit_gaussian(y)
    np.testing.assert_allclose(fit_x.mu, x.mean(0))
    np.testing.assert_allclose(fit_x.sigma, np.cov(x, rowvar=False))
    fid = metrics.frechet_distance(*fit_x, *fit_y)
    assert fid == pytest.approx(closed, abs=0.05)
    assert fid == pytest.approx(fid_reference(x, y), rel=1e-9)
    assert metrics.frechet_distance(*fit_x, *fit_x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_retry_and_imaginary_part(monkeypatch):
    a, b = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    calls = []

    def not_finite_once(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else linalg.sqrtm(m)

    monkeypatch.setattr(metrics, "_sqrtm", not_finite_once)
    eps = 0.5  # large, to see that the offset is applied to both covariances
    got = metrics.frechet_distance(np.zeros(2), np.diag(a), np.zeros(2), np.diag(b), eps=eps)
    expected = np.sum(a + b) - 2 * np.sum(np.sqrt((a + eps) * (b + eps)))
    assert len(calls) == 2 and got == pytest.approx(expected)

    monkeypatch.setattr(metrics, "_sqrtm", lambda m: np.diag([2.0 + 1e-6j, 1.0]))
    assert metrics.frechet_distance([0, 0], np.eye(2), [0, 0], np.eye(2)) == pytest.approx(-2.0)
    monkeypatch.setattr(metrics, "_sqrtm", lambda m: np.diag([2.0 + 0.1j, 1.0]))
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance([0, 0], np.eye(2), [0, 0], np.eye(2))


def test_inception_score():
    c = 7
    assert metrics.inception_score(np.full((50, c), 1.0 / c)) == pytest.approx(1.0)
    assert metrics.inception_score(np.eye(c)[np.arange(70) % c]) == pytest.approx(c)
    # Splits are consecutive; the last one is shorter: mean(IS 4 of one-hots, IS 1 of uniform).
    probs = np.concatenate([np.eye(4), np.full((2, 4), 0.25)])
    assert metrics.inception_score(probs, split_size=4) == pytest.approx(2.5)
    p = np.random.default_rng(0).dirichlet(np.ones(10) * 0.3, size=300)
    want = np.mean([is_reference(p[i : i + 100]) for i in range(0, 300, 100)])
    assert metrics.inception_score(p, split_size=100) == pytest.approx(want, rel=1e-10)


def test_precision_recall_constructed_clouds():
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(60, 5))
    assert metrics.precision_recall(cloud, cloud.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(cloud, cloud + 1000.0) == (0.0, 0.0)
    # Reference: two far-apart clusters; samples: a copy of the first: precision 1, recall 1/2.
    reference = np.concatenate([cloud, cloud + 1000.0])
    assert metrics.precision_recall(reference, cloud.copy()) == (1.0, 0.5)

    line = lambda xs: np.stack([np.asarray(xs, np.float64), np.zeros(len(xs))], axis=1)
    ref = line(range(10))  # squared 3-NN radius: 9 at the two ends, 4 inside
    np.testing.assert_array_equal(metrics.manifold_radii(ref), [9] + [4] * 8 + [9])
    # Samples 0.5..3.5 (radii 9, 4, 4, 9) cover reference 0..6: recall 7/10.
    assert metrics.precision_recall(ref, line([0.5, 1.5, 2.5, 3.5])) == (1.0, 0.7)
    # Inside means <=: 12 lies exactly on the ball of reference 9 (radius 3), 13 beyond it;
    # sample 12's own radius (3) reaches reference 9 exactly.
    assert metrics.precision_recall(ref, line([12, 13, 14, 15])) == (0.25, 0.1)


def test_precision_recall_blockwise_equals_dense():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(150, 8)).astype(np.float32)
    samples = (rng.normal(size=(130, 8)) * 1.2 + 0.3).astype(np.float32)
    precision, recall, radii = pr_reference(ref, samples)
    assert 0 < precision < 1 and 0 < recall < 1  # a non-trivial case
    np.testing.assert_allclose(metrics.manifold_radii(ref, 3, 7, 5), radii, rtol=1e-5)
    assert metrics.precision_recall(ref, samples, 3, 7, 5) == (precision, recall)
    assert metrics.precision_recall(ref, samples) == (precision, recall)


# ----------------------------------------------------------------------------- Inception path


def write_standin_graph(path, drop=None):
    """A tiny graph with the suite's tensor names: ExpandDims (images) -> resize -> conv
    `mixed_6/conv` (8 channels) -> ReLU -> 1x1 conv -> average `pool_3` (N, 1, 1, 16) ->
    `softmax/logits/MatMul` with a constant weight (16 -> 6 classes)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    rng = np.random.default_rng(0)
    const = lambda *shape: tf.constant(rng.normal(size=shape).astype(np.float32) * 0.3)
    graph = v1.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, None, None, 3], name="ExpandDims")
        x = tf.image.resize(x, [8, 8]) / 255.0 - 0.5
        conv = tf.nn.conv2d(x, const(3, 3, 3, 8), 1, "SAME", name="mixed_6/conv")
        h = tf.nn.conv2d(tf.nn.relu(conv), const(1, 1, 8, 16), 1, "SAME")
        pool_name = "pool_3" if drop != "pool_3" else "not_pool"
        pool = tf.nn.avg_pool2d(tf.nn.relu(h) * 4.0, 8, 1, "VALID", name=pool_name)
        with tf.name_scope("softmax/logits"):
            tf.matmul(tf.reshape(pool, [-1, 16]), const(16, 6) * 3.0, name="MatMul")
    with open(path, "wb") as f:
        f.write(graph.as_graph_def().SerializeToString())
    return graph


def standin_features(graph, images):
    import tensorflow as tf

    with tf.compat.v1.Session(graph=graph) as sess:
        pool, spatial, w = sess.run(
            ["pool_3:0", "mixed_6/conv:0", "softmax/logits/MatMul:0"],
            {"ExpandDims:0": images.astype(np.float32)},
        )
    pool = pool.reshape(len(images), -1).astype(np.float64)
    logits = w.astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return pool, spatial[..., :7].reshape(len(images), -1), probs / probs.sum(1, keepdims=True)


def run_cli(capsys, *args):
    code = ev.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_inception_path_end_to_end(tmp_path, capsys):
    graph = write_standin_graph(tmp_path / "graph.pb")
    rng = np.random.default_rng(0)
    reference = np.concatenate(  # noise images, a third of them dark
        [rng.integers(0, 256, (20, 12, 12, 3)), rng.integers(0, 60, (10, 12, 12, 3))]
    ).astype(np.uint8)
    samples = np.concatenate(  # half near reference images, half bright: non-trivial P/R
        [np.clip(reference[:12].astype(int) + rng.integers(-20, 20, (12, 12, 12, 3)), 0, 255),
         rng.integers(150, 256, (12, 12, 12, 3))]
    ).astype(np.uint8)[:, :10, :10]  # another size: the graph resizes
    np.savez(tmp_path / "ref.npz", reference)
    np.savez(tmp_path / "samples.npz", samples, np.arange(24))
    code, out, err = run_cli(
        capsys, "--samples", tmp_path / "samples.npz", "--reference", tmp_path / "ref.npz",
        "--inception_graph", tmp_path / "graph.pb", "--batch_size", 7,
        "--out", tmp_path / "results.json",
    )
    assert code == 0, err
    assert "FID" in out and "Precision" in out
    results = json.loads((tmp_path / "results.json").read_text())

    ref_pool, ref_spatial, _ = standin_features(graph, reference)
    pool, spatial, probs = standin_features(graph, samples)
    precision, recall, _ = pr_reference(ref_pool, pool)
    assert results["fid"] == pytest.approx(fid_reference(pool, ref_pool), rel=1e-4)
    assert results["sfid"] == pytest.approx(fid_reference(spatial, ref_spatial), rel=1e-4)
    assert results["inception_score"] == pytest.approx(is_reference(probs), rel=1e-4)
    assert (results["precision"], results["recall"]) == (precision, recall)
    assert 0 < precision < 1 and 0 < recall < 1, (precision, recall)
    assert results["num_samples"] == 24 and results["num_reference"] == 30
    assert "class_accuracy" not in results  # Inception's classes are not the sampler's labels
    assert (tmp_path / "ref.inception.stats.npz").exists()

    # --num_samples evaluates the first N.
    code, _, err = run_cli(
        capsys, "--samples", tmp_path / "samples.npz", "--reference", tmp_path / "ref.npz",
        "--inception_graph", tmp_path / "graph.pb", "--num_samples", 12,
        "--out", tmp_path / "first12.json",
    )
    assert code == 0, err
    first = json.loads((tmp_path / "first12.json").read_text())
    assert first["fid"] == pytest.approx(fid_reference(pool[:12], ref_pool), rel=1e-4)


@pytest.mark.parametrize("graph", ["missing", "random_bytes", "no_pool_3"])
def test_inception_graph_errors(tmp_path, capsys, graph):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    path = tmp_path / "graph.pb"
    if graph == "random_bytes":
        path.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif graph == "no_pool_3":
        write_standin_graph(path, drop="pool_3")
    before = sorted(os.listdir(tmp_path))
    code, out, err = run_cli(
        capsys, "--samples", tmp_path / "s.npz", "--reference", tmp_path / "s.npz",
        "--inception_graph", path,
    )
    assert code == 2 and err.startswith("error:") and err.count("error:") == 1
    assert "classify_image_graph_def.pb" in err and "--inception_graph" in err
    if graph == "missing":
        assert "not found" in err
    elif graph == "no_pool_3":
        assert "pool_3" in err and "mixed_6/conv" not in err.split("(needs")[0]
    assert sorted(os.listdir(tmp_path)) == before


# ----------------------------------------------------------------------------- bad inputs


BAD_INPUTS = {
    "float dtype": (dict(arr_0=np.zeros((8, 8, 8, 1), np.float32)), [], "dtype float32"),
    "3-D": (dict(arr_0=np.zeros((8, 8, 8), np.uint8)), [], "expected 4-D"),
    "RGB for digits": (dict(arr_0=np.zeros((8, 8, 8, 3), np.uint8)), [], "3 channels"),
    "no arr_0": (dict(images=np.zeros((8, 8, 8, 1), np.uint8)), [], "no arr_0"),
    "empty": (dict(arr_0=np.zeros((0, 8, 8, 1), np.uint8)), [], "empty"),
    "too few": (dict(arr_0=np.zeros((8, 8, 8, 1), np.uint8)), ["--num_samples", "9"],
                "holds 8 images but --num_samples asks for 9"),
    "not an npz": (None, [], "not a readable .npz"),
    "missing": ("missing", [], "not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_npz_inputs(tmp_path, capsys, case):
    arrays, extra, message = BAD_INPUTS[case]
    good = tmp_path / "ref.npz"
    np.savez(good, np.zeros((8, 8, 8, 1), np.uint8))
    bad = tmp_path / "samples.npz"
    if arrays is None:
        bad.write_bytes(b"not a zip file")
    elif arrays != "missing":
        np.savez(bad, **arrays)
    workdir = tmp_path / "work"
    workdir.mkdir()
    before = sorted(os.listdir(tmp_path))
    code, out, err = run_cli(
        capsys, "--samples", bad, "--reference", good, "--features", "digits",
        "--workdir", workdir, "--out", tmp_path / "results.json", *extra,
    )
    assert code == 2 and out == ""
    assert err.startswith("error:") and err.count("\n") == 1 and message in err
    assert sorted(os.listdir(tmp_path)) == before and not os.listdir(workdir)
    # The same checks guard the reference.
    if arrays is not None and arrays != "missing" and not extra:
        code, _, err = run_cli(
            capsys, "--samples", good, "--reference", bad, "--features", "digits",
            "--workdir", workdir,
        )
        assert code == 2 and err.startswith("error: reference") and message in err
        assert sorted(os.listdir(tmp_path)) == before


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits")
    params, info = dc.load_or_train(str(workdir))
    assert info["trained"]
    return workdir


def test_digits_classifier_accuracy_cache_and_determinism(digits_workdir):
    params, info = dc.load_or_train(str(digits_workdir))
    assert not info["trained"]  # the cache is reused
    assert info["test_accuracy"] >= 0.95 and info["num_test"] == 360
    saved = json.loads((digits_workdir / "digits_classifier" / "classifier.json").read_text())
    assert saved["settings"] == dc.SETTINGS
    # A damaged cache is retrained, to the same weights (deterministic training).
    params_file = digits_workdir / "digits_classifier" / "params.npz"
    original = params_file.read_bytes()
    params_file.write_bytes(b"damaged")
    again, info = dc.load_or_train(str(digits_workdir))
    assert info["trained"]
    for name, value in dc._flatten(params).items():
        np.testing.assert_array_equal(dc._flatten(again)[name], value, err_msg=name)
    assert params_file.read_bytes() == original


def test_digits_metrics(digits_workdir, tmp_path, capsys):
    ref = dc.write_digits_reference(str(tmp_path / "ref.npz"), split="train")
    images, labels = dc.digits_uint8(8, "test")  # held out from the classifier and reference
    np.savez(tmp_path / "real.npz", images, labels)
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", noise, labels)
    results = {}
    for name in ("real", "noise"):
        code, out, err = run_cli(
            capsys, "--samples", tmp_path / f"{name}.npz", "--reference", ref,
            "--features", "digits", "--workdir", digits_workdir,
            "--out", tmp_path / f"{name}.json",
        )
        assert code == 0, err
        assert "Class accuracy" in out
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    real, noise = results["real"], results["noise"]
    assert real["class_accuracy"] >= 0.95 and real["fid"] < 5.0
    assert noise["fid"] > 50 * real["fid"] and noise["class_accuracy"] < 0.5
    assert real["inception_score"] > 8.0 and real["precision"] > 0.8 and real["recall"] > 0.8
    assert noise["precision"] < 0.05 and noise["recall"] < 0.05

    # Samples at another size are resized (16 -> 8 by area) against a reference of that size.
    extractor = dc.DigitsClassifier(str(digits_workdir))
    big, big_labels = dc.digits_uint8(16, "test")
    reference = ev.reference_statistics(dc.digits_uint8(16, "train")[0], extractor)
    resized = ev.evaluate_arrays(big, reference, extractor, big_labels)
    assert resized["class_accuracy"] >= 0.95 and resized["fid"] < 5.0


# ----------------------------------------------------------------------------- stats cache


class Counting(FeatureExtractor):
    """Delegates to an extractor and counts the images it sees."""

    def __init__(self, inner, tag=""):
        self.inner, self.tag, self.seen = inner, tag, 0
        self.name, self.channels, self.class_labels = inner.name, inner.channels, True

    @property
    def identity(self):
        return self.inner.identity + self.tag

    def __call__(self, images):
        self.seen += len(images)
        return self.inner(images)


def test_reference_statistics_cache(digits_workdir, tmp_path):
    extractor = dc.DigitsClassifier(str(digits_workdir))
    images, labels = dc.digits_uint8(8, "test")
    train = dc.digits_uint8(8, "train")[0]
    np.savez(tmp_path / "samples.npz", images, labels)
    np.savez(tmp_path / "R.npz", train[:600])
    cache = tmp_path / "R.digits.stats.npz"

    def evaluate(counting):
        return ev.evaluate_files(str(tmp_path / "samples.npz"), str(tmp_path / "R.npz"), counting)

    first = Counting(extractor)
    results = evaluate(first)
    assert first.seen == 360 + 600 and cache.exists()
    written = cache.stat().st_mtime_ns
    assert sorted(os.listdir(tmp_path)) == ["R.digits.stats.npz", "R.npz", "samples.npz"]

    second = Counting(extractor)
    assert evaluate(second) == results
    assert second.seen == 360 and cache.stat().st_mtime_ns == written  # reused, not rewritten

    np.savez(tmp_path / "R.npz", train[600:1100])  # the reference changed
    third = Counting(extractor)
    changed = evaluate(third)
    assert third.seen == 360 + 500 and changed["fid"] != results["fid"]
    assert changed["num_reference"] == 500

    fourth = Counting(extractor, tag=":retrained")  # another extractor
    evaluate(fourth)
    assert fourth.seen == 360 + 500
    assert sorted(os.listdir(tmp_path)) == ["R.digits.stats.npz", "R.npz", "samples.npz"]


def test_reference_with_precomputed_statistics(digits_workdir, tmp_path):
    extractor = dc.DigitsClassifier(str(digits_workdir))
    images, _ = dc.digits_uint8(8, "test")
    train = dc.digits_uint8(8, "train")[0]
    other = ev.reference_statistics(train[:300], extractor)  # stored stats differ from arr_0's
    stored = {k: other[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    np.savez(tmp_path / "R.npz", train[300:], **stored)
    np.savez(tmp_path / "S.npz", images)
    results = ev.evaluate_files(str(tmp_path / "S.npz"), str(tmp_path / "R.npz"), extractor)
    features = extractor(images)
    pool = metrics.fit_gaussian(features["pool"])
    spatial = metrics.fit_gaussian(features["spatial"])
    fid = metrics.frechet_distance(*pool, stored["mu"], stored["sigma"])
    assert results["fid"] == pytest.approx(fid, rel=1e-6)
    assert results["sfid"] == pytest.approx(
        metrics.frechet_distance(*spatial, stored["mu_s"], stored["sigma_s"]), rel=1e-6
    )
    assert results["num_reference"] == len(train) - 300  # precision/recall use arr_0

    np.savez(tmp_path / "R.npz", train[300:], **{k: v[:10] for k, v in stored.items()})
    with pytest.raises(EvalInputError, match="same feature extractor"):
        ev.evaluate_files(str(tmp_path / "S.npz"), str(tmp_path / "R.npz"), extractor)


def test_without_tensorflow_the_inception_path_names_the_imagenet_extra(tmp_path, monkeypatch):
    import sys

    from dydit_jax.data import extract_latents
    from dydit_jax.eval.features import InceptionGraph

    graph = tmp_path / "graph.pb"
    graph.write_bytes(b"not read")
    for name in ("tensorflow", "tensorflow_datasets"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(EvalInputError, match=r"pip install -e '\.\[imagenet\]'"):
        InceptionGraph(str(graph))
    with pytest.raises(ValueError, match=r"pip install -e '\.\[imagenet\]'"):
        extract_latents.open_source("tfds:imagenet2012")
