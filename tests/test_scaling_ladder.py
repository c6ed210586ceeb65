"""Scaling-law ladders: the design (sizes, budgets, decay branches, configs on disk), its slurm
array script, and one end-to-end sweep of a really tiny ladder."""

import io
import json
import math
import re

import pytest

from stratagem.errors import ConfigError
from stratagem.launcher.config import load_config
from stratagem.launcher.slurm import SlurmJob
from stratagem.model.counts import count_model
from stratagem.scaling.ladder import config_path, design_ladder, load_ladder, write_ladder
from stratagem.scaling.sweep import run_ladder, slurm_array_script, task_stop_file
from stratagem.train.metrics import read_metrics
from stratagem.train.schedule import lr_multiplier
from tests.scaling_data import write_tiny_ladder

BUDGETS = [1e12, 3e12, 1e13]


def demo(*overrides):
    return load_config("demo", ["--train.schedule=wsd", *overrides])


@pytest.fixture(scope="module")
def ladder():
    """The demo's tiny model, 5 sizes over 1.5 decades, 3 budgets: 12 runs (7 of them decay branches)."""
    return design_ladder(demo(), BUDGETS)


def non_embedding(run):
    return run.counts["non_embedding_params"]


def test_sizes_span_one_and_a_half_decades_in_log_uniform_steps(ladder):
    n = sorted({non_embedding(run) for run in ladder.runs})
    assert ladder.sizes == len(n) == 5 and ladder.span == pytest.approx(1.5, abs=0.05)
    assert math.log10(n[-1] / n[0]) == pytest.approx(ladder.span)
    for small, large in zip(n, n[1:]):  # 10^(1.5/4) = 2.37 per step, give or take a head group
        assert 1.8 < large / small < 3.0
    smallest = ladder.runs_of_size(0)[0].model
    tiny = demo().model
    assert smallest == {"dim": tiny.dim, "n_layers": tiny.n_layers, "n_heads": tiny.n_heads,
                        "n_kv_heads": tiny.n_kv_heads, "ffn_hidden": tiny.ffn_hidden}


def test_every_budget_is_spent_by_several_sizes_in_whole_steps(ladder):
    tokens_per_step = demo().train.global_batch_tokens
    for budget in BUDGETS:
        runs = [run for run in ladder.runs if run.budget == budget]
        assert len({run.size for run in runs}) >= 3
        for run in runs:
            per_step = tokens_per_step * run.counts["train_flops_per_token"]
            assert run.tokens == run.steps * tokens_per_step and run.flops == run.tokens * run.counts["train_flops_per_token"]
            assert abs(run.flops - budget) <= per_step / 2  # the budget, rounded to whole steps
            assert run.steps >= ladder.min_steps == 60  # twice the demo's 30 warmup steps
    assert {(d.size, d.budget) for d in ladder.dropped} == {(3, 1e12), (4, 1e12), (4, 3e12)}
    assert all(d.steps < ladder.min_steps for d in ladder.dropped)


def test_each_size_trains_once_and_branches_its_smaller_budgets_off_the_stable_phase(ladder, tmp_path):
    for size in range(ladder.sizes):
        main, *branches = ladder.runs_of_size(size)
        assert not main.branch_of and main.budget == max(r.budget for r in ladder.runs if r.size == size)
        assert main.keep_steps == sorted(b.branch_step for b in branches)
        main_config = ladder.config(main.name, tmp_path)
        for branch in branches:
            assert branch.branch_of == main.name and branch.steps < main.steps
            config = ladder.config(branch.name, tmp_path)
            assert config.run.init_from == str(tmp_path / "runs" / main.name / "checkpoints" / f"step-{branch.branch_step}")
            decay = branch.steps - branch.branch_step
            assert decay == round(0.2 * branch.steps) and config.train.decay_fraction == decay / branch.steps
            # the same learning rates as the main run up to the branch point, then a decay right after it
            same = range(branch.branch_step + 1)
            assert [lr_multiplier(config.train, s) for s in same] == [lr_multiplier(main_config.train, s) for s in same]
            assert lr_multiplier(config.train, branch.branch_step + 1) < 1.0


def test_the_written_configs_load_and_hold_the_designed_runs(ladder, tmp_path):
    path = write_ladder(ladder, tmp_path / "ladder")
    assert load_ladder(tmp_path / "ladder") == ladder
    table = json.loads(path.read_text())
    assert [run["name"] for run in table["runs"]] == [run.name for run in ladder.runs]
    for run in ladder.runs:
        config = load_config(str(config_path(tmp_path / "ladder", run.name)))
        assert config == ladder.config(run.name, tmp_path / "ladder")
        assert config.run.dir == str(tmp_path / "ladder" / "runs") and config.train.steps == run.steps
        counts = count_model(config.model, config.data.seq_len)
        assert run.counts == {key: getattr(counts, key) for key in run.counts}
    write_ladder(ladder, tmp_path / "ladder")  # the same ladder again: fine
    other = design_ladder(demo(), [2e12, 1e13])
    with pytest.raises(ConfigError, match="ladder.json: holds another ladder"):
        write_ladder(other, tmp_path / "ladder")
    assert all(name in ladder.table() for name in (run.name for run in ladder.runs))


@pytest.mark.parametrize("family", ["tiny-hybrid", "tiny-moe", "tiny-hybrid-moe"])
def test_a_family_keeps_its_layer_pattern_and_experts(family, tmp_path):
    ladder = design_ladder(demo(), BUDGETS, sizes=4, family=family)
    assert ladder.family == family and ladder.span == pytest.approx(1.5, abs=0.1)
    for run in ladder.runs:
        model = ladder.config(run.name, tmp_path).model
        model.validate()
        period = sum(int(entry.split("*")[0]) if "*" in entry else 1 for entry in model.pattern)
        flavor = load_config(None, [f"--model.flavor={family}"]).model
        assert model.pattern == flavor.pattern and model.n_layers % period == 0
        assert model.head_dim == flavor.head_dim and model.n_heads // model.n_kv_heads == flavor.n_heads // flavor.n_kv_heads
        assert (model.moe.num_experts, model.moe.top_k) == (flavor.moe.num_experts, flavor.moe.top_k)
        assert model.ffn_hidden / model.dim == flavor.ffn_hidden / flavor.dim
        assert model.moe.expert_hidden / model.dim == flavor.moe.expert_hidden / flavor.dim
        if family == "tiny-moe":
            assert run.counts["active_params"] < run.counts["total_params"]


def test_without_branches_every_pair_is_a_run_of_its_own():
    ladder = design_ladder(demo("--train.schedule=cosine"), BUDGETS, branches=False)
    assert len(ladder.runs) + len(ladder.dropped) == 5 * 3
    assert all(not run.branch_of and not run.keep_steps and run.decay_fraction == 0.2 for run in ladder.runs)


@pytest.mark.parametrize("kwargs, message", [
    ({"budgets": [1e12, -1.0]}, "budgets = -1.0: must be a positive number of FLOPs"),
    ({"budgets": []}, re.escape("budgets = []: name at least one")),
    ({"budgets": [1e12, 1.0001e12]}, "two budgets agree to 3 significant digits"),
    ({"sizes": 1}, "sizes = 1: a ladder needs at least 2 sizes"),
    ({"sizes": 9, "span": 0.3}, "sizes = 9: 0.3 decades hold fewer distinct shapes"),
    ({"family": "giant"}, "unknown model flavor 'giant'"),
    ({"budgets": [1e9, 1e10]}, re.escape("budgets = 1e+09, 1e+10: no (size, budget) pair reaches min_steps = 60")),
    ({"base": demo("--train.schedule=cosine"), "branches": False, "min_steps": 10},
     "run s4-1e12: train.warmup_steps = 30: exceeds steps = 12"),
    ({"base": demo("--train.schedule=cosine")}, "train.schedule = 'cosine': decay branches need the wsd schedule"),
    ({"base": demo("--train.decay_fraction=0.6")},
     re.escape("budget 1e+12 FLOPs, size 2: its decay branch would start at step 24, which must lie past the "
               "warmup (30 steps) and within the stable phase of s2-1e13 (605 steps, decay_fraction 0.6)")),
])
def test_a_bad_request_is_one_line_naming_the_value(kwargs, message):
    request = {"base": demo(), "budgets": BUDGETS, **kwargs}
    with pytest.raises(ConfigError, match=message) as err:
        design_ladder(**request)
    assert "\n" not in str(err.value)


def test_the_slurm_array_has_one_task_per_size(ladder, tmp_path):
    write_ladder(ladder, tmp_path / "my ladder")
    with pytest.raises(ConfigError, match="'ladder-my ladder': a slurm job's name and output path may hold only"):
        slurm_array_script(tmp_path / "my ladder")
    write_ladder(ladder, tmp_path / "ladder")
    script = slurm_array_script(tmp_path / "ladder", SlurmJob(time="02:00:00", partition="cpu", cpus_per_task=8),
                                python="/opt/py $(x)/bin/python")
    assert "#SBATCH --array=0-4\n" in script and "#SBATCH --time=02:00:00\n" in script
    assert "#SBATCH --cpus-per-task=8\n" in script and "#SBATCH --partition=cpu\n" in script
    assert f"#SBATCH --output={tmp_path}/ladder/slurm/%A_%a.out\n" in script and "{{" not in script
    assert f"out_dir={tmp_path}/ladder\n" in script and "python='/opt/py $(x)/bin/python'" in script
    assert '"$python" -m stratagem.launcher.cli scaling run "$out_dir" --size "$task" &' in script
    stop_file = script.split('stop_file="', 1)[1].split('"', 1)[0]
    assert stop_file.replace("$out_dir", str(tmp_path / "ladder")).replace("$task", "3") == \
        str(task_stop_file(tmp_path / "ladder", 3))
    assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_$task"' in script
    with pytest.raises(ConfigError, match="a ladder task trains on one process"):
        slurm_array_script(tmp_path / "ladder", SlurmJob(ranks_per_node=2))


class StopAt:
    """A stop signal (what `train` and `run_ladder` ask of `StopSignals`) arriving at the call-th question."""

    def __init__(self, call: int):
        self.calls, self.call = 0, call

    def agreed(self) -> str | None:
        self.calls += 1
        return "time limit" if self.calls >= self.call else None

    def arm_watchdog(self) -> None:
        pass


def test_a_tiny_ladder_runs_end_to_end(tmp_path, one_thread):
    """2 sizes x 2 budgets on the tiny model: per size a main run and one decay branch; stopped in
    the first run (asked before it and after each of its steps), then resumed to the end."""
    ladder = write_tiny_ladder(tmp_path)
    assert [(run.name, run.steps, run.branch_step) for run in ladder.runs] == [
        ("s0-8e9", 44, 0), ("s0-4e9", 22, 16), ("s1-8e9", 14, 0), ("s1-4e9", 7, 5)]
    with pytest.raises(ConfigError, match="run s0-4e9: branches from s0-8e9 at step 16; train s0-8e9 first"):
        run_ladder(tmp_path, only=["s0-4e9"])
    said = []
    stopped = run_ladder(tmp_path, say=said.append, stop=StopAt(11), progress_stream=io.StringIO())
    assert stopped.stopped == "time limit" and [(r.name, r.status, r.step) for r in stopped.runs] == \
        [("s0-8e9", "stopped", 10)]
    said.clear()
    summary = run_ladder(tmp_path, say=said.append, progress_stream=io.StringIO())
    assert [r.status for r in summary.runs] == ["trained"] * 4 and summary.stopped is None
    assert said == ["s0-8e9: 44 steps", "s0-4e9: 22 steps, branching from s0-8e9 at step 16", "s1-8e9: 14 steps",
                    "s1-4e9: 7 steps, branching from s1-8e9 at step 5"]
    for run in ladder.runs:
        records = read_metrics(tmp_path / "runs" / run.name)
        assert [r["step"] for r in records] == list(range(run.branch_step + 1, run.steps + 1))
        assert records[-1]["eval_loss"] == next(r.eval_loss for r in summary.runs if r.name == run.name)
        assert records[-1]["tokens"] == run.tokens
    again = run_ladder(tmp_path, say=said.append)
    assert [r.status for r in again.runs] == ["finished before"] * 4 and len(said) == 4
