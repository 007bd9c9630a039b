"""DyDiT inference engine: equals the masked model, exact overflow, plan FLOPs, sample.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dydit_jax import config_lib, flops, model_parts, parallel, sample_lib, train_lib
from dydit_jax.diffusion import create_diffusion
from dydit_jax.dynamic import DyDiTEngine, parse_capacity, width_plan
from dydit_jax.dynamic.plan import merge_shapes
from dydit_jax.models import model_config
from tests.helpers import run_entry_point, tiny_config

TINY = dict(input_size=8, in_channels=2, num_classes=5, depth=3, hidden_size=64, num_heads=4)
STEPS = "6"


def random_dydit(seed=0, layout="first_on"):
    """A tiny DyDiT with random weights whose routers switch heads, groups and tokens on and
    off across timesteps (bias ~0); the output layer is scaled down so samples stay O(1)."""
    config = model_config("DyDiT-S/2", router_layout=layout, **TINY)
    mesh = parallel.make_mesh((-1, 1, 1))
    parts = model_parts.build_model(config, mesh, seed=0, rules=None, init_params=False)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: np.float32(0.1) * rng.standard_normal(s.shape, np.float32), parts.param_shapes
    )
    params["final_layer"] = jax.tree.map(lambda x: 0.01 * x, params["final_layer"])
    for block in params["blocks"].values():
        for router in ("attn_rate", "mlp_rate"):
            block[router]["kernel"] = 3.0 * block[router]["kernel"]
        # relu(a.x) - relu(b.x) + ...: symmetric around 0, so about half the tokens are on.
        signs = np.resize(np.float32([1, -1]), block["token_fc2"]["kernel"].shape[0])
        block["token_fc2"] = {"kernel": signs[:, None], "bias": np.zeros(1, np.float32)}
    return parts, jax.device_put(params, parts.param_shardings), mesh


def batch(mesh, n=8):
    """(key, image indices, labels) placed as sample_lib.generate places them."""
    rows = {"i": np.arange(n, dtype=np.int32), "y": np.arange(n, dtype=np.int32) % 5}
    rows = parallel.global_batch(rows, mesh)
    return jax.random.key(7), rows["i"], rows["y"]


@pytest.mark.parametrize("cfg_scale,width_multiple,sampler,interval", [
    (1.0, 1, "ddpm", (0, 1)), (2.0, 1, "ddpm", (0, 1)), (2.0, 3, "ddim", (0, 1)),
    # few-step solver, guidance on the middle steps only (both batch sizes run)
    (2.0, 1, "dpmpp2m", (0.3, 0.7)),
])
def test_engine_equals_masked_model(cfg_scale, width_multiple, sampler, interval):
    parts, params, mesh = random_dydit()
    options = dict(mesh=mesh, sampling_steps=STEPS, cfg_scale=cfg_scale, guided_channels=-1,
                   sampler=sampler, cfg_interval=interval)
    with jax.set_mesh(mesh):
        engine = DyDiTEngine(parts, params, width_multiple=width_multiple, **options)
        got = engine(*batch(mesh))
        want = sample_lib.make_batch_sampler(parts, **options)(params, *batch(mesh))
    # The plan covers exactly the timesteps the sampler feeds the network, noisiest first.
    assert list(engine.plan.timesteps) == create_diffusion(STEPS).timestep_map[::-1].tolist()
    report = engine.report()
    assert report["sampler"] == sampler
    if interval != (0, 1):  # 999, 799, 599, 400, 200, 0: two guided, 300 <= t < 700
        assert report["guided_steps"] == 2
        assert {k[2] for k in engine.compiled if k[0] == "embed"} == {False, True}
    heads = engine.plan.heads.sum(-1)
    assert heads.min() < heads.max() and heads.max() > 1  # widths really vary by step/layer
    # some token-MLP calls keep every group: they run unsliced, masked (engine.py)
    assert (engine.width_counts[1] == parts.config.num_heads).any()
    assert 0.2 < report["token_fraction"] < 0.9  # and tokens are really skipped
    assert report["tokens_overflow"] == 0
    assert report["signatures"] == sum(k[0] in ("attn", "mlp") for k in engine.compiled)
    if width_multiple > 1:  # padded heads and groups are computed but contribute nothing
        assert report["executed_flops_ratio"] > report["plan_flops_ratio"]
        assert set(np.unique(engine.width_counts[0])) <= {0, 3, 4}
    scale = float(jnp.abs(want).max())
    assert 0.5 < scale < 1e4  # the random model is far from data, not broken
    # Padding changes the matmuls' summation lengths, hence their round-off, which can flip
    # a token logit that sits at ~0 and move a sample by ~1e-4 of its range; without padding
    # the engine matches the masked model to float32 round-off (bit-exact on CPU here).
    tol = 2e-5 if width_multiple == 1 else 1e-3
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol * scale, rtol=0)


def test_engine_runs_a_dydit_trained_with_scan_over_blocks():
    """A scan_blocks=True DyDiT (stacked weights) samples through the engine exactly as the
    same weights in the per-layer layout do."""
    import dataclasses

    parts, params, mesh = random_dydit()
    scan_config = dataclasses.replace(parts.config, scan_blocks=True)
    scan_parts = model_parts.build_model(scan_config, mesh, init_params=False)
    blocks = [params["blocks"][i] for i in range(parts.config.depth)]
    stacked = {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    stacked = jax.device_put(stacked, scan_parts.param_shardings)
    options = dict(mesh=mesh, sampling_steps=STEPS, cfg_scale=2.0, guided_channels=-1)
    with jax.set_mesh(mesh):
        want = DyDiTEngine(parts, params, **options)(*batch(mesh))
        got = DyDiTEngine(scan_parts, stacked, **options)(*batch(mesh))
        masked = sample_lib.make_batch_sampler(scan_parts, **options)(stacked, *batch(mesh))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(masked), np.asarray(want), atol=2e-5 * scale, rtol=0)


def test_several_layers_per_call_run_the_same_computation():
    parts, params, mesh = random_dydit(seed=1)
    depth = parts.config.depth  # 3
    options = dict(mesh=mesh, sampling_steps=STEPS, cfg_scale=2.0, guided_channels=-1)
    with jax.set_mesh(mesh):
        # the whole step in one call, exact capacity: the masked model's samples
        whole = DyDiTEngine(parts, params, layers_per_call=depth, **options)
        got = np.asarray(whole(*batch(mesh)))
        want = np.asarray(sample_lib.make_batch_sampler(parts, **options)(params, *batch(mesh)))
        # chunks of 2 (layers 0-1, then 2) with a capacity below the selected counts: the
        # same samples, token counts and overflow as one block per call
        runs = {}
        for k in (1, 2):
            engine = DyDiTEngine(parts, params, capacity=0.25, capacity_multiple=1,
                                 layers_per_call=k, **options)
            runs[k] = (np.asarray(engine(*batch(mesh))), engine)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=0)
    steps = whole.plan.num_steps
    assert (whole.width_counts[0] == parts.config.num_heads).any()  # full-width attention too
    assert {k[0] for k in whole.compiled if k[0] in ("attn", "mlp", "blocks")} == {"blocks"}
    assert 1 <= whole.report()["signatures"] <= steps
    assert whole.report()["tokens_overflow"] == 0
    (one_out, one), (two_out, two) = runs[1], runs[2]
    assert one.report()["tokens_overflow"] > 0
    np.testing.assert_array_equal(two.selected, one.selected)
    np.testing.assert_array_equal(two.overflow, one.overflow)
    np.testing.assert_allclose(two_out, one_out, atol=2e-5 * scale, rtol=0)
    # per step: one call for layers 0-1 and one for layer 2, in order
    records = two.profile(*batch(mesh))
    blocks = [(r["step"], r["layer"], r["layers"]) for r in records if r["kind"] == "blocks"]
    assert blocks == [(s, first, n) for s in range(steps) for first, n in ((0, 2), (2, 1))]
    total = sum(r["macs"] for r in records)
    profiled_one = sum(r["macs"] for r in one.profile(*batch(mesh)))
    assert total == profiled_one  # the same multiply-adds, counted per chunk
    with pytest.raises(ValueError, match="layers_per_call"):
        DyDiTEngine(parts, params, layers_per_call=0, **options)


def test_capacity_overflow_is_counted_and_keeps_the_best_tokens():
    parts, params, _ = random_dydit(seed=1)
    model = nnx.merge(parts.graphdef, params, parts.buffers)
    block = model.blocks[1]
    rng = np.random.default_rng(0)
    b, n, d = 4, 16, 64
    x = jnp.asarray(rng.standard_normal((b, n, d)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
    mods = block.adaLN(c)
    after_attn = block.attention_residual(x, mods)
    logits = np.asarray(block.token_logits(after_attn))
    counts = (logits > 0).sum(-1)
    capacity = (counts.min() + counts.max()) // 2
    assert counts.min() < capacity < counts.max()  # some samples overflow, some do not
    got, stats = block.capacity_forward(x, c, capacity)
    # Independent: keep each sample's `capacity` highest logits among the selected ones.
    keep = np.zeros((b, n), bool)
    for i in range(b):
        best = np.argsort(-logits[i], kind="stable")[:capacity]
        keep[i, best[logits[i, best] > 0]] = True
    want, _ = block.forward(x, c, token_router=lambda _: jnp.asarray(keep, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    overflow = np.maximum(counts - capacity, 0).sum()
    assert overflow > 0
    np.testing.assert_array_equal(
        np.asarray(stats), np.stack([counts, np.maximum(counts - capacity, 0)], -1)
    )
    # With capacity = every token the capacity form equals the masked block.
    full, full_stats = block.capacity_forward(x, c, n)
    masked, _ = block.forward(x, c, token_router=lambda h: (block.token_logits(h) > 0) * 1.0)
    np.testing.assert_allclose(np.asarray(full), np.asarray(masked), atol=1e-5, rtol=1e-5)
    assert int(full_stats[:, 1].sum()) == 0


@pytest.mark.parametrize("layout", ["first_on", "all"])
def test_plan_flops_ratio_equals_flops_on_the_masks(layout):
    parts, params, mesh = random_dydit(seed=2, layout=layout)
    diffusion = create_diffusion(STEPS)
    timesteps = diffusion.timestep_map[::-1]  # the sampler's order: noisiest first
    with jax.set_mesh(mesh):
        plan = width_plan(parts.graphdef, params, parts.buffers, parts.config, timesteps)
    model = nnx.merge(parts.graphdef, params, parts.buffers)
    x = jnp.zeros((len(plan.timesteps), 8, 8, 2))
    _, masks = model(x, jnp.asarray(plan.timesteps), jnp.zeros(len(plan.timesteps), jnp.int32),
                     return_masks=True)
    np.testing.assert_array_equal(plan.heads, np.asarray(masks["heads"]) > 0)
    np.testing.assert_array_equal(plan.groups, np.asarray(masks["groups"]) > 0)
    cfg = parts.config
    want = flops.flops_ratio(masks["heads"], masks["groups"], None, cfg.num_tokens,
                             cfg.hidden_size, cfg.mlp_hidden)
    np.testing.assert_allclose(plan.step_ratios(), np.asarray(want), rtol=1e-6)
    assert plan.flops_ratio() == pytest.approx(float(np.mean(want)), rel=1e-6)
    assert plan.flops_ratio() < 1.0


def test_calibration_sets_capacities_that_do_not_overflow_on_its_batch():
    parts, params, mesh = random_dydit(seed=3)
    with jax.set_mesh(mesh):
        engine = DyDiTEngine(parts, params, mesh=mesh, sampling_steps=STEPS,
                             capacity="calibrate", capacity_multiple=2, capacity_step_buckets=2)
        first = engine(*batch(mesh))  # calibration batch: every token allowed, exact
        most = engine._last_max
        assert engine.capacity.min() < parts.config.num_tokens  # some layers need fewer
        assert (engine.capacity >= most).all() and (engine.capacity % 2 == 0).all()
        # two step buckets: capacities constant within each half of the trajectory
        assert (engine.capacity[:3] == engine.capacity[0]).all()
        assert (engine.capacity[3:] == engine.capacity[3]).all()
        again = engine(*batch(mesh))
        assert int(engine.overflow.sum()) == 0
        scale = float(jnp.abs(first).max())
        np.testing.assert_allclose(np.asarray(again), np.asarray(first), atol=2e-5 * scale)
        assert engine.report()["executed_flops_ratio"] < engine.plan.flops_ratio()
        engine.set_capacity(0.25)  # 4 tokens of 16: overflow, counted
        engine.reset_stats()
        engine(*batch(mesh))
        assert engine.report()["tokens_overflow"] > 0
        assert engine.report()["achieved_flops_ratio"] <= engine.plan.flops_ratio(0.25) + 1e-9


def test_a_shape_budget_bounds_the_compiles_and_keeps_the_samples():
    parts, params, mesh = random_dydit(seed=3)
    with jax.set_mesh(mesh):
        exact = DyDiTEngine(parts, params, mesh=mesh, sampling_steps=STEPS, capacity=None)
        want = exact(*batch(mesh))
        capacity = np.maximum(exact._last_max, 1)  # every selected token fits
        engine = DyDiTEngine(parts, params, mesh=mesh, sampling_steps=STEPS,
                             capacity=capacity, capacity_multiple=1, mlp_shape_budget=2)
        got = engine(*batch(mesh))
    shapes = {(int(g), int(c)) for g, c in zip(engine.width_counts[1].flat,
                                                engine.capacity_run.flat, strict=True)}
    needed = {(int(g), int(c)) for g, c in zip(exact.plan.groups.sum(-1).flat,
                                                capacity.flat, strict=True)}
    assert len(needed) > 2 and len(shapes) <= 2  # merged, and only those were compiled
    assert sum(k[0] == "mlp" for k in engine.compiled) == len(shapes) == engine.mlp_shapes()
    assert (engine.capacity_run >= capacity).all()
    assert (engine.width_counts[1] >= exact.plan.groups.sum(-1)).all()
    assert engine.report()["tokens_overflow"] == 0
    report = engine.report()
    assert report["executed_flops_ratio"] > exact.report()["achieved_flops_ratio"]
    # padded groups and capacity slots add nothing (round-off of longer sums only)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3 * scale)
    # re-merging under another budget: more shapes, less padding
    engine.set_shape_budget(len(needed))
    assert 2 < engine.mlp_shapes() <= len(needed)
    assert engine.report()["executed_flops_ratio"] < report["executed_flops_ratio"]
    with pytest.raises(ValueError, match="budget"):
        engine.set_shape_budget(0)


def test_merge_shapes_covers_every_point_within_the_budget():
    points = np.array([[1, 4], [2, 4], [4, 8], [1, 4]])
    # (1, 4) moves to (2, 4) (4 more MACs per use), not to (4, 8) (28 more)
    np.testing.assert_array_equal(
        merge_shapes(points, 2), [[2, 4], [2, 4], [4, 8], [2, 4]]
    )
    np.testing.assert_array_equal(merge_shapes(points, 3), points)  # within budget: as is
    rng = np.random.default_rng(0)
    points = np.stack([rng.integers(0, 13, 500), 8 * rng.integers(1, 33, 500)], -1)
    for budget in (1, 5, 16):
        merged = merge_shapes(points, budget)
        assert (merged >= points).all()
        assert len(np.unique(merged, axis=0)) <= budget
    assert (merge_shapes(points, 1) == points.max(0)).all()
    with pytest.raises(ValueError, match="budget"):
        merge_shapes(points, 0)


def test_capacity_specs_and_bad_values():
    assert parse_capacity("calibrate") == "calibrate" and parse_capacity("all") is None
    assert parse_capacity("0.75") == 0.75 and parse_capacity("192") == 192
    for bad in ("lots", "1.5", "-3", "0.0"):
        with pytest.raises(ValueError, match="token capacity"):
            parse_capacity(bad)
    config = tiny_config()
    config.sample.width_multiple = 0
    with pytest.raises(ValueError, match="width_multiple"):
        config_lib.validate_config(config)


@pytest.fixture(scope="module")
def dydit_workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dydit"))
    config = tiny_config(model="DyDiT-S/2", num_steps=2)
    config.model_overrides.update(num_heads=4)
    train_lib.train_and_evaluate(config, path)
    return path


@pytest.mark.slow
def test_sample_py_runs_the_engine_for_dydit(dydit_workdir, tmp_path):
    # few-step solver, log-SNR steps (timesteps 0, 73, 603, 999), guidance where t < 500
    common = [f"--workdir={dydit_workdir}", "--num_samples=8", "--sampler=dpmpp2m",
              "--sampling_steps=logsnr4", "--cfg_interval=0,0.5"]
    proc = run_entry_point("sample.py", *common, f"--out={tmp_path / 'engine'}",
                           "--token_capacity=all", "--layers_per_call=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DyDiT engine: FLOPs ratio" in proc.stdout
    report = json.loads((tmp_path / "engine" / "dynamic.json").read_text())
    assert report["tokens_overflow"] == 0 and report["plan"]["steps"] == 4
    # the plan covers the solver's own timesteps
    assert report["sampler"] == "dpmpp2m" and report["sampling_steps"] == "logsnr4"
    assert report["plan"]["timesteps"] == [999, 603, 73, 0] and report["guided_steps"] == 2
    run = json.loads((tmp_path / "engine" / "run.json").read_text())
    assert run["settings"]["cfg_interval"] == [0.0, 0.5]
    assert report["layers_per_call"] == 2
    # blocks per call change no image: the same run with the default is already done
    proc = run_entry_point("sample.py", *common, f"--out={tmp_path / 'engine'}",
                           "--token_capacity=all")
    assert proc.returncode == 0 and "already holds these samples" in proc.stderr, proc.stderr
    proc = run_entry_point("sample.py", *common, f"--out={tmp_path / 'masked'}", "--nodynamic")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DyDiT engine" not in proc.stdout
    assert not (tmp_path / "masked" / "dynamic.json").exists()
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("engine", "masked"))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # uint8 rounding at most
    proc = run_entry_point("sample.py", *common, f"--out={tmp_path / 'bad'}",
                           "--token_capacity=lots")
    assert proc.returncode != 0 and "token capacity 'lots'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_profile_times_every_call_and_counts_the_executed_flops():
    parts, params, mesh = random_dydit(seed=2)
    options = dict(mesh=mesh, sampling_steps=STEPS, cfg_scale=2.0, guided_channels=-1)
    with jax.set_mesh(mesh):
        engine = DyDiTEngine(parts, params, capacity=0.75, capacity_multiple=1, **options)
        records = engine.profile(*batch(mesh))
    cfg, steps = parts.config, engine.plan.num_steps
    assert len(records) == steps * (2 * cfg.depth + 2)
    assert all(r["seconds"] > 0 for r in records)
    assert [r["kind"] for r in records[: 2 * cfg.depth + 2]] == (
        ["embed"] + ["attention", "token_mlp"] * cfg.depth + ["finish"]
    )
    assert [(r["step"], r["layer"]) for r in records[-2 * cfg.depth - 2:]] == (
        [(steps - 1, -1)] + [(steps - 1, i) for i in range(cfg.depth) for _ in "am"]
        + [(steps - 1, -1)]
    )
    # The calls' multiply-adds over a DiT's (16 rows: 8 images, both guidance halves) are the
    # executed FLOPs ratio the report computes from the schedule.
    attn, mlp = flops.block_costs(cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden)
    executed = sum(r["macs"] for r in records) / (steps * cfg.depth * 16 * (attn + mlp))
    assert executed == pytest.approx(engine.report()["executed_flops_ratio"], rel=1e-9)
    assert executed < 0.9  # heads, groups and tokens really are cut
    assert not engine.step_rows.any()  # profiling leaves the sampling statistics alone


def test_speedup_bench_on_a_trained_digits_dydit(dydit_workdir, capsys):
    from bench import dydit_speedup

    dydit_speedup.main([f"--workdir={dydit_workdir}", "--steps=2", "--batch=8",
                        "--repeats=1", "--profile"])
    out = capsys.readouterr().out.strip().splitlines()
    speedups = dict(item.split("=") for item in out[-1].split())
    assert set(speedups) == {"wall_speedup", "flops_speedup"}
    assert all(float(v) > 0 for v in speedups.values())
    text = "\n".join(out)
    assert "wall/FLOPs" in text and "profile (one batch" in text
    assert "GMAC/s by heads" in text and "DiT sampler:" in text


def test_samplers_bench_writes_rows_and_resumes(dydit_workdir, tmp_path, capsys):
    from bench import samplers

    out = tmp_path / "rows.jsonl"
    argv = [f"--workdirs=DyDiT={dydit_workdir}", "--runs=ddpm:3,dpmpp2m:logsnr3",
            "--num_samples=20", "--batch_size=10", f"--out={out}",
            f"--classifier_dir={tmp_path / 'classifier'}", f"--table={tmp_path / 'table.md'}"]
    samplers.main(argv)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["sampler"], r["steps"], r["num_steps"]) for r in rows] == [
        ("ddpm", "3", 3), ("dpmpp2m", "logsnr3", 3)]
    for r in rows:
        assert r["images_per_s"] > 0 and r["fid"] >= 0 and 0 <= r["class_accuracy"] <= 1
        assert r["engine"]["tokens_overflow"] >= 0  # the DyDiT ran the engine
    table = (tmp_path / "table.md").read_text()
    assert "| DyDiT | dpmpp2m | 3 | log-SNR |" in table
    capsys.readouterr()
    samplers.main(argv)  # every row is already there: nothing is sampled again
    assert "[DyDiT]" not in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        samplers.main([f"--workdirs=DyDiT={dydit_workdir}", "--runs=dpmpp2m:1"])


def test_the_planner_lowers_both_batch_sizes_of_a_guidance_interval():
    parts, params, mesh = random_dydit()
    with jax.set_mesh(mesh):
        engine = DyDiTEngine(parts, params, mesh=mesh, sampling_steps=STEPS, cfg_scale=2.0,
                             sampler="dpmpp2m", cfg_interval=(0.3, 0.7))
        names = [name for name, _ in engine.lowered_programs(mesh, parts.param_shardings, 8)]
    # guided steps run 16 rows, the others 8: each size has its embedding and final call
    assert {"embed,rows=16", "embed,rows=8", "finish,rows=16", "finish,rows=8"} <= set(names)
    assert any(n.startswith("attention:") and n.endswith(",rows=8") for n in names)


def test_a_sampling_batch_makes_no_host_transfers_between_its_calls():
    """Inside a batch (every step: embedding, blocks, sampler update) nothing moves between
    host and device: each call's inputs are already on device (on a GPU, a transfer would
    stall the queue of calls)."""
    parts, params, mesh = random_dydit()
    with jax.set_mesh(mesh):
        engine = DyDiTEngine(parts, params, mesh=mesh, sampling_steps=STEPS, cfg_scale=2.0,
                             sampler="dpmpp2m", cfg_interval=(0.3, 0.7), capacity=0.75)
        key, indices, labels = batch(mesh)
        program = engine.prepare(key, indices, labels)
        with jax.transfer_guard("disallow"):
            x, stats = engine._run(program, key, indices, labels, lambda _k, _w, fn, *a: fn(*a))
            jax.block_until_ready((x, stats))
    assert np.isfinite(np.asarray(x)).all()
