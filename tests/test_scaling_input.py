"""What the scaling module reads: tables, filters, and one clear line for every input it cannot fit."""

from __future__ import annotations

import io
import json
import struct

import pytest

from stratagem.launcher.cli import main
from stratagem.scaling.analysis import FitOptions, analyse, choose_points
from stratagem.scaling.points import (Point, ScalingInputError, check_points, load_runs, load_table, model_family,
                                      select)
from stratagem.scaling.report import write_report
from stratagem.train.metrics import read_metrics
from tests.scaling_data import LAWS, law_points


def write_csv(path, rows, header=("run", "params", "tokens", "loss")):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


def table_rows(n=8):
    return [(f"r{i}", 1e7 * (i + 1), 2e9 * (i + 2), 3.0 - 0.1 * i) for i in range(n)]


def test_a_csv_and_a_jsonl_table_give_the_same_points(tmp_path):
    rows = table_rows()
    csv_points = load_table(write_csv(tmp_path / "t.csv", rows))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps(dict(zip(("run", "params", "tokens", "loss"), r))) for r in rows))
    assert csv_points == load_table(jsonl)
    p = csv_points[2]
    assert (p.run, p.n("total"), p.n("active"), p.tokens, p.loss) == ("r2", 3e7, 3e7, 8e9, 2.8)
    assert p.flops == 6 * 3e7 * 8e9  # 6ND without a flops column


def test_optional_columns_are_read(tmp_path):
    path = write_csv(tmp_path / "t.csv", [("a", 1e7, 1e9, 3.0, 7e16, 2.0, "moe")],
                     header=("run", "params", "tokens", "loss", "flops", "weight", "family"))
    (p,) = load_table(path)
    assert (p.flops, p.weight, p.family) == (7e16, 2.0, "moe")


@pytest.mark.parametrize("rows, header, message", [
    ([(1e7, 1e9)], ("params", "tokens"), "t.csv: missing column 'loss' (needs params, tokens, loss)"),
    ([("x", 1e9, 3.0)], ("params", "tokens", "loss"), "t.csv: row 1: params = 'x' is not a number"),
    ([], ("params", "tokens", "loss"), "t.csv: the table has no rows"),
])
def test_bad_tables_are_one_line(tmp_path, rows, header, message):
    with pytest.raises(ScalingInputError) as err:
        load_table(write_csv(tmp_path / "t.csv", rows, header))
    assert str(err.value).endswith(message) and "\n" not in str(err.value)


def point(run="r", n=1e7, d=1e9, loss=3.0, tokenizer="t1", step=0):
    return Point(run=run, step=step, tokens=d, flops=6 * n * d, loss=loss,
                 params={"total": n, "non_embedding": n, "active": n}, tokenizer=tokenizer)


@pytest.mark.parametrize("bad, message", [
    (dict(loss=float("nan")), "run r3: loss = nan: must be a positive, finite number"),
    (dict(loss=-1.0), "run r3: loss = -1.0: must be a positive, finite number"),
    (dict(n=0.0), "run r3: total params = 0.0: must be a positive, finite number"),
    (dict(d=0.0), "run r3: tokens = 0.0: must be a positive, finite number"),
])
def test_impossible_values_are_refused(bad, message):
    points = [point(run=f"r{i}", **(bad if i == 3 else {})) for i in range(8)]
    with pytest.raises(ScalingInputError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        check_points(points, 5)


def test_fewer_points_than_parameters_is_refused():
    with pytest.raises(ScalingInputError, match="^5 points for 5 free parameters: a fit needs more points than"):
        check_points([point(run=f"r{i}") for i in range(5)], 5)


def test_mixed_tokenizers_need_the_flag():
    points = [point(run=f"r{i}", tokenizer="aaaa" if i < 4 else "bbbb") for i in range(8)]
    with pytest.raises(ScalingInputError, match="different tokenizers .*r0: aaaa.*r4: bbbb.*--mix-tokenizers"):
        check_points(points, 5)
    check_points(points, 5, mix_tokenizers=True)


def test_filters_pick_decay_ends_and_final_points():
    curve = [Point(run=r, step=s, tokens=s * 1e6, flops=s * 6e13, loss=3.0 - s / 100, params={"total": 1e7},
                   phase=phase, final=s == last)
             for r, phases, last in (("cosine", ["warmup", "decay", "decay"], 3),
                                     ("stable", ["warmup", "stable", "stable"], 3))
             for s, phase in zip((1, 2, 3), phases)]
    assert [(p.run, p.step) for p in select(curve, decay_ends=True)] == [("cosine", 3)]
    assert [(p.run, p.step) for p in select(curve, final_only=True)] == [("cosine", 3), ("stable", 3)]
    assert len(select(curve, phase="warmup")) == 2
    assert choose_points(curve, "auto")[1] == "decay-ends"
    assert choose_points(select(curve, phase="stable"), "auto")[1] == "all"


def test_model_families():
    assert model_family(["attention"], ["mlp"]) == "dense"
    assert model_family(["attention"], ["moe"]) == "moe"
    assert model_family(["gated_deltanet", "attention"], ["mlp"]) == "hybrid"
    assert model_family(["gated_deltanet", "attention"], ["moe", "mlp"]) == "hybrid-moe"
    assert model_family(["gla"], ["mlp"]) == "linear"


def test_bad_options_are_one_line():
    for options, message in ((FitOptions(params="all"), "params 'all': must be one of total, non_embedding, active"),
                             (FitOptions(pinned={"C": 1.0}), "pinned 'C': the law's parameters are E, A, alpha"),
                             (FitOptions(grid="fine"), "grid 'fine': must be one of default, hoffmann")):
        with pytest.raises(ScalingInputError, match="^" + message):
            options.validate()


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_report_of_two_families_with_real_plots(tmp_path):
    """A table of two model families: the report holds the law, each approach's exponent, the
    families' own fits, four valid PNGs of sane size, and fit.json has every number."""
    points = [p.__class__(**{**p.__dict__, "family": "dense"}) for p in law_points(LAWS["chinchilla"], seed=1)]
    points += [p.__class__(**{**p.__dict__, "run": "moe-" + p.run, "family": "moe"})
               for p in law_points(LAWS["besiroglu"], seed=2)]
    analysis = analyse(points, [], ["table"], FitOptions(bootstrap=100, grid="default", target_flops=1e22))
    written = write_report(analysis, tmp_path / "report")
    for name in ("loss_vs_compute", "isoflop", "residuals", "bootstrap"):
        width, height = png_size(written[name])
        assert 400 <= width <= 2000 and 300 <= height <= 1500, (name, width, height)
        assert written[name].stat().st_size > 20_000, name  # drawn, not blank
    text = written["report"].read_text()
    assert "## Model families fitted separately" in text and "| moe |" in text and "| dense |" in text
    assert "![isoflop](isoflop.png)" in text
    numbers = json.loads(written["json"].read_text())
    assert set(numbers["approach_3"]["estimates"]) >= {"E", "A", "alpha", "B", "beta", "a", "b", "G", "n_opt"}
    assert set(numbers["families"]) == {"dense", "moe"}
    assert {f["approach"][0] for f in numbers["frontiers"]} == {"1", "2"}


def test_cli_fit_of_a_table_prints_the_summary(tmp_path, capsys):
    rows = [(p.run, p.n("total"), p.tokens, p.loss) for p in law_points(LAWS["flat-data"], seed=4)]
    table = write_csv(tmp_path / "t.csv", rows)
    assert main(["scaling", "fit", str(table), "--out", str(tmp_path / "r"), "--bootstrap", "50",
                 "--pin", "E=2.2"]) == 0
    out = capsys.readouterr().out
    assert "E (pinned)" in (tmp_path / "r" / "report.md").read_text()
    assert "a, approach 2" in out and "report" in out


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    table = write_csv(tmp_path / "t.csv", [(1e7, 1e9)], header=("params", "tokens"))
    assert main(["scaling", "fit", str(table), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"stratagem: error: {table}: missing column 'loss' (needs params, tokens, loss)"
    assert not (tmp_path / "r").exists()
    assert main(["scaling", "fit", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    rows = table_rows(8)
    good = write_csv(tmp_path / "g.csv", rows)
    assert main(["scaling", "fit", str(good), "--out", str(tmp_path / "r"), "--pin", "E"]) == 2
    assert "--pin 'E': expected NAME=VALUE" in capsys.readouterr().err


def tiny_run(tmp_path, name, *overrides):
    from stratagem.launcher.config import load_config
    from stratagem.train.loop import train

    config = load_config(None, ["--model.flavor=tiny", "--data.seq_len=32", "--train.micro_batch_size=4",
                                "--train.global_batch_tokens=256", "--train.steps=12", "--train.warmup_steps=2",
                                "--train.eval_every=4", "--train.eval_batches=1", "--train.checkpoint_every=0",
                                f"--run.dir={tmp_path}", f"--run.name={name}", *overrides])
    train(config, progress_stream=io.StringIO())
    return tmp_path / name


def test_run_directories_give_every_eval_point_with_the_models_own_counts(tmp_path, one_thread):
    run = tiny_run(tmp_path, "a")
    points, runs = load_runs([tmp_path])  # a folder of runs
    counts = json.loads((run / "model_counts.json").read_text())
    assert [p.step for p in points] == [4, 8, 12] and [p.final for p in points] == [False, False, True]
    for p in points:
        assert p.tokens == 256 * p.step and p.flops == counts["train_flops_per_token"] * p.tokens
        assert p.params == {k: counts[f"{k}_params"] for k in ("total", "non_embedding", "active")}
        assert p.family == "dense" and p.tokenizer and p.phase == "decay"
    assert [p.loss for p in points] == [r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r]
    assert runs[0].entropy is not None and runs[0].entropy > 0
    train_points, _ = load_runs([run], loss="loss")
    assert len(train_points) == 12


def test_runs_on_different_tokenizers_are_refused_unless_asked(tmp_path, one_thread):
    tiny_run(tmp_path, "a")
    tiny_run(tmp_path, "b", "--data.synthetic.seed=7")  # another corpus: another tokenizer card
    points, _ = load_runs([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ScalingInputError, match="runs use different tokenizers .*a: .*b: .*--mix-tokenizers"):
        check_points(points, 0)
    check_points(points, 0, mix_tokenizers=True)
