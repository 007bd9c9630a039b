"""The digits miniature of the papers' comparison: a tiny run writes the table and the plot."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dydit_jax.experiments import digits_paper


@pytest.mark.slow
def test_tiny_digits_paper_run_writes_table_plot_and_resumes(tmp_path, capsys):
    workdir = str(tmp_path / "paper")
    assert digits_paper.main([f"--workdir={workdir}", "--scale=tiny", "--lambdas=0.5"]) == 0
    table = open(os.path.join(workdir, "results.md")).read()
    rows = json.load(open(os.path.join(workdir, "results.json")))
    assert [r["name"] for r in rows] == ["DiT", "DyDiT lambda=0.5", "U-DiT"]
    for r in rows:
        assert f"| {r['name']} |" in table
        assert np.isfinite(r["fid"]) and r["fid"] >= 0
        assert 0 <= r["class_accuracy"] <= 1 and r["images_per_s"] > 0
    dit, dydit, udit = rows
    # The DyDiT ran the engine on fewer FLOPs than its DiT; the U-DiT is of the DiT's size.
    assert 0 < dydit["flops_ratio"] < 1 and dydit["gflops"] < dit["gflops"]
    assert dydit["engine"]["tokens_overflow"] >= 0
    plot = Image.open(os.path.join(workdir, "flops_vs_fid.png"))
    assert plot.size == (720, 480)
    assert len(np.unique(np.asarray(plot).reshape(-1, 3), axis=0)) > 3  # not a blank image
    samples = np.load(os.path.join(workdir, "dit", "samples.npz"))
    assert samples["arr_0"].dtype == np.uint8 and samples["arr_0"].shape[0] == 20
    # A second run redoes nothing (each stage trained, sampled and evaluated) and writes the
    # same table.
    capsys.readouterr()
    assert digits_paper.main([f"--workdir={workdir}", "--scale=tiny", "--lambdas=0.5"]) == 0
    out = capsys.readouterr().out
    assert out.count("already trained") == 3 and out.count("already sampled") == 3
    assert json.load(open(os.path.join(workdir, "results.json"))) == rows


def test_bad_lambda_is_one_clear_error(tmp_path, capsys):
    assert digits_paper.main([f"--workdir={tmp_path}", "--scale=tiny", "--lambdas=1.5"]) == 2
    assert "lambdas" in capsys.readouterr().err
