"""Smoke test of bench/throughput.py on a 2-block DiT-S/2 (one device, batch 2).

XLA's FLOPs per image agree with the analytic count (2 FLOPs per multiply-add; train step =
3 x forward) within 10% for DiT: XLA also counts the elementwise work (softmax, layer norms,
modulation, the loss, AdamW and EMA). Models where the two legitimately differ by more (DyDiT's
train step: XLA adds both branches of the warm-up `lax.cond`; `--scan=on`: the loop body is
counted once) are explained in the benchmark's docstring and not asserted here.
"""

import importlib.util
import json
import os

import pytest

from tests.helpers import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "throughput", os.path.join(REPO, "bench", "throughput.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_rows(capsys):
    bench = load_benchmark()
    rows = bench.main([
        "--models=DiT-S/2", "--override=depth=2", "--batch=2", "--iters=1", "--warmup=0",
        "--devices=1",
    ])
    assert [r["what"] for r in rows] == ["forward", "train step"]
    for r in rows:
        assert r["img_s"] > 0 and r["median_s"] > 0
        assert r["compile_s"] > 0 and r["lower_s"] > 0
        assert 0.9 < r["xla_ratio"] < 1.1, r
        assert r["mem"] is None or r["mem"] > 0
    # train step: forward + backward = 3 x the forward's analytic FLOPs
    assert rows[1]["xla_gflop"] > 2.7 * rows[0]["xla_gflop"]
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    table = [line for line in out.splitlines() if "| DiT-S/2 |" in line]
    assert len(table) == 2 and all("DiT-S/2" in line for line in table)
    assert "`python bench/throughput.py --models=DiT-S/2" in table[0]


def test_torch_reference_forward_and_train_rows(capsys):
    """bench/torch_reference.py (the PyTorch baseline; runs only where torch is installed):
    both measurements on DiT-S/2, one line each and the summary line."""
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location(
        "torch_reference", os.path.join(REPO, "bench", "torch_reference.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--model=DiT-S/2", "--batch=2", "--what=forward,train", "--dtypes=float32",
                 "--iters=1", "--warmup=0"])
    out = capsys.readouterr().out.splitlines()
    assert "[DiT-S/2 forward, batch 2, float32] torch" in out[1]
    assert "[DiT-S/2 train step, batch 2, float32] torch" in out[2]
    speedups = dict(item.split("=") for item in out[-1].split())
    assert set(speedups) == {"speedup_forward_float32", "speedup_train_float32"}
    assert all(float(v) > 0 for v in speedups.values())


@pytest.mark.slow
def test_gpu_suite_dry_run_writes_every_part(tmp_path, capsys):
    """bench/gpu_suite.py --dry-run: the GPU suite's code on toy sizes (here 8 CPU devices);
    every timed call ran under a transfer guard (no host round-trip inside a train step or
    a sampling batch)."""
    from bench import gpu_suite

    out = tmp_path / "suite.json"
    gpu_suite.main(["--dry-run", f"--out={out}"])
    saved = json.loads(out.read_text())
    meta = saved["meta"]
    assert meta["dry_run"] is True and meta["peak_source"]
    context = ("device", "jax", "jaxlib", "xla_flags", "date", "command")
    rows = saved["rows"]
    assert [r["part"] for r in rows] == ["train", "udit_vs_dit", "udit_vs_dit"] + [
        "sampling"] * 3
    for r in rows:
        assert all(key in r for key in context) and "--dry-run" in r["command"]
    train = rows[0]
    assert train["batch_per_device"] == 4 and train["images_per_s"] > 0  # no limit on a CPU
    assert train["compile_s"] > 0 and train["program_bytes"] > 0
    assert rows[2]["udit_over_dit"] > 0 and rows[1]["batch_per_device"] == 4
    dit, udit, dydit = rows[3:]
    assert [r["model"] for r in (dit, udit)] == ["DiT-XL/2", "U-DiT-B"]
    assert all(r["images_per_s_250"] > 0 for r in (dit, udit, dydit))
    assert dydit["flops_ratio"] > 1 and dydit["wall_ratio"] > 0  # the engine cut FLOPs
    text = capsys.readouterr().out
    assert "| DiT-XL/2 | xla | dots | 4 |" in text and "| DyDiT-XL/2 lambda 0.5" in text
