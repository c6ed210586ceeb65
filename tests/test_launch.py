"""`stratagem launch`: a real profile, the planner's search, training on 2 gloo ranks from streamed
shards, calibration from the measured steps, resuming under the run's plan; bad input refused first."""

from __future__ import annotations

import dataclasses
import json

import pytest

from stratagem.data.export import export_synthetic
from stratagem.errors import StratagemError
from stratagem.launcher import profile as profiling
from stratagem.launcher.calibrate import step_terms
from stratagem.launcher.cli import main
from stratagem.launcher.config import load_config
from stratagem.launcher.cost import TERMS, predict
from stratagem.launcher.hardware import Measured
from stratagem.launcher.launch import WARMUP_STEPS, launch, workload
from stratagem.launcher.profile import load_profile, profile_machine
from stratagem.parallel.plan import load_plan
from stratagem.train.metrics import read_metrics
from tests.test_profile import SMALL

SEQ_LEN = 64


def overrides(tmp_path, *extra) -> list[str]:
    return [f"--run.dir={tmp_path / 'runs'}", "--model.flavor=tiny-hybrid-moe", "--model.n_kv_heads=2",
            f"--data.seq_len={SEQ_LEN}", "--train.global_batch_tokens=512", "--train.micro_batch_size=4",
            "--train.eval_batches=2", "--train.steps=8", "--train.warmup_steps=1", "--train.eval_every=0",
            "--train.checkpoint_every=0", "--launch.ranks=2", f"--launch.profile={tmp_path / 'profile.json'}",
            *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A real profile of 2 ranks (short settings) and the synthetic corpus exported for the run."""
    root = tmp_path_factory.mktemp("launch")
    config = load_config("launch-demo", overrides(root))
    profile_machine(config.model, 2, SEQ_LEN, SMALL, progress=False).save(root / "profile.json")
    export_synthetic(config.data.synthetic, SEQ_LEN, root / "syn", train_samples=256, val_samples=16)
    return root


def config_of(root, *extra):
    streams = f"--data.mds.streams=[{{path = \"{root / 'syn'}\"}}]"
    return load_config("launch-demo", overrides(root, streams, *extra))


def test_launch_plans_trains_calibrates_and_resumes_under_its_plan(setup, monkeypatch, capsys):
    monkeypatch.setattr(profiling, "profile_machine", lambda *a, **k: pytest.fail("measured again"))
    config = config_of(setup, "--run.name=first")
    said = []
    result = launch(config, stop_after=4, say=said.append)
    run_dir = setup / "runs" / "first"

    # the searched plan is what the run trained under, its prediction the cost model's
    profile_before = dataclasses.replace(load_profile(setup / "profile.json"), corrections={}, observations=[])
    saved = load_plan(run_dir / "plan.json")
    assert saved.to_dict() == result.plan.to_dict()
    assert any(line.startswith("plan for 2 local ranks from ") for line in said)
    assert saved.pipeline.micro_batch_size % 2 == 0  # streamed: both ranks read part of every micro-batch
    assert saved.predicted.step_time_s == pytest.approx(predict(Measured(profile_before), workload(config),
                                                                saved).step_seconds)

    # calibration: the median of the steps after the warm-up, against the uncorrected terms
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    measured = sorted(r["step_s"] for r in records[WARMUP_STEPS:])
    calibration = result.calibration
    assert calibration.measured_s == pytest.approx(sum(measured) / len(measured))  # median of two
    assert calibration.predicted_s == pytest.approx(saved.predicted.step_time_s)
    profile = load_profile(setup / "profile.json")
    assert len(profile.observations) == 1 and set(profile.corrections) == set(TERMS)
    observation = profile.observations[0]
    assert observation["terms"] == pytest.approx(step_terms(predict(Measured(profile_before), workload(config), saved)))
    corrected = sum(profile.corrections[t] * x for t, x in observation["terms"].items())
    if calibration.measured_s > sum(observation["terms"].values()):  # slower than predicted: the fit explains it
        assert corrected == pytest.approx(calibration.measured_s, rel=1e-6)
    assert calibration.measured_memory_bytes > 0

    # resumed through the CLI: the run's plan, four more steps (two measured), a second observation
    assert main(["launch", "launch-demo", *overrides(setup, f"--data.mds.streams=[{{path = \"{setup / 'syn'}\"}}]",
                                                     "--run.name=first"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run_dir} under its plan" in out
    assert "step time: predicted " in out and "profile corrections refitted to 2 measured run(s)" in out
    assert load_plan(run_dir / "plan.json").to_dict() == saved.to_dict()
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))
    assert len(load_profile(setup / "profile.json").observations) == 2
    assert "final eval loss" in out and "the corpus's exact entropy is" in out  # the export is the config's corpus


def test_bad_input_is_refused_before_any_work(setup, monkeypatch, capsys):
    monkeypatch.setattr(profiling, "profile_machine", lambda *a, **k: pytest.fail("measured"))
    profile = (setup / "profile.json").read_bytes()
    missing = load_config("launch-demo", overrides(setup, "--run.name=nodata",
                                                   f"--data.mds.streams=[{{path = \"{setup / 'absent'}\"}}]"))
    with pytest.raises(StratagemError, match=f"{setup / 'absent' / 'manifest.json'}: no such file"):
        launch(missing)
    assert not (setup / "runs" / "nodata").exists()

    existing = config_of(setup, "--run.name=taken")
    (setup / "runs" / "taken").mkdir(parents=True)
    (setup / "runs" / "taken" / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(StratagemError, match="already holds a run"):
        launch(existing)
    assert (setup / "profile.json").read_bytes() == profile

    assert main(["launch", "launch-demo", "--launch.ranks=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "launch.ranks = 0: must be at least 1" in err
