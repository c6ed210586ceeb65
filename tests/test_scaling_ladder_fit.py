"""End to end on this CPU: `scaling ladder` + `scaling run` + `scaling fit` on the synthetic corpus,
4 sizes x 3 budgets (12 runs, 8 of them decay branches), the report comparing the fitted
irreducible loss with the corpus's exact entropy."""

from __future__ import annotations

import json

import pytest

from stratagem.data.synthetic import SyntheticCorpus
from stratagem.launcher.cli import main
from stratagem.launcher.config import load_config
from stratagem.scaling.ladder import load_ladder
from tests.test_scaling_input import png_size

BUDGETS = ["2.5e10", "5e10", "1e11"]


@pytest.mark.slow
def test_a_ladder_runs_and_fits_into_a_report(tmp_path, capsys):
    out = tmp_path / "ladder"
    assert main(["scaling", "ladder", "ladder-demo", "--budget", *BUDGETS, "--sizes", "4", "--out", str(out)]) == 0
    ladder = load_ladder(out)
    assert ladder.sizes == 4 and len(ladder.runs) == 12 and not ladder.dropped
    assert sum(bool(r.branch_of) for r in ladder.runs) == 8
    assert main(["scaling", "run", str(out)]) == 0
    for run in ladder.runs:
        lines = [json.loads(line) for line in (out / "runs" / run.name / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["step"] == run.steps and "eval_loss" in lines[-1] and lines[-1]["phase"] == "decay"
        if run.branch_of:
            assert lines[0]["step"] == run.branch_step + 1
    assert main(["scaling", "run", str(out)]) == 0  # all finished: nothing trains again
    assert "12 runs" in capsys.readouterr().out

    report = tmp_path / "report"
    assert main(["scaling", "fit", str(out / "runs"), "--out", str(report), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "12 points (decay-ends)" in printed and "corpus entropy" in printed
    text = (report / "report.md").read_text()
    assert "## Irreducible loss against the corpus's entropy" in text
    config = load_config("ladder-demo")
    entropy = SyntheticCorpus(config.data.synthetic, config.data.seq_len).entropy().per_target
    assert f"exact entropy rate is {entropy:.4f} nats/token" in text
    numbers = json.loads((report / "fit.json").read_text())
    assert numbers["points"] == 12 and numbers["runs"] == 12
    assert numbers["corpus_entropy"] == entropy
    assert numbers["approach_3"]["points"] == 12 and numbers["approach_3"]["bootstrap"] == 200
    for name in ("loss_vs_compute", "residuals", "bootstrap"):
        width, height = png_size(report / f"{name}.png")
        assert width >= 400 and height >= 300
