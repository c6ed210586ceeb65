"""`launcher.profile`: one real, short profile on 2 gloo ranks, its fits, the file and the cache.

The measured run is shared by the tests (ranks take seconds to start); its sizes are kept small
through `ProfileSettings`: sequences of 64 tokens, micro-batches of 1 and 8, messages of 4 KiB,
1 MiB and 16 MiB.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from stratagem.launcher import profile as profiling
from stratagem.launcher.cli import main
from stratagem.launcher.calibrate import corrected_seconds
from stratagem.launcher.cluster import KINDS, Link, collective_seconds
from stratagem.launcher.cost import TERMS
from stratagem.launcher.probe import calibrate_with_probes, probe_model
from stratagem.launcher.profile import (HEAD, VERSION, CollectiveFit, LinearFit, MissingLayerType, ProfileError,
                                        ProfileSettings, ensure_profile, load_profile, profile_machine,
                                        this_machine)
from stratagem.model import get_flavor
from stratagem.model.counts import count_model

FLAVOR = "tiny-hybrid-moe"  # gated_deltanet/moe and attention/moe layers
SEQ_LEN = 64
SMALL = ProfileSettings(micro_batches=(1, 8), repeats=3, max_repeats=3, seconds=0.0,
                        message_sizes=(4096, 2**20, 2**24), optimizer_params=2**16, probes=False)
KIB4, MIB16 = 4096, 2**24


@pytest.fixture(scope="module")
def measured():
    return profile_machine(get_flavor(FLAVOR), 2, SEQ_LEN, SMALL, progress=False)


@pytest.fixture
def saved(measured, tmp_path):
    path = tmp_path / "host-2r.json"
    measured.save(path)
    return path


# 1. the fits


def test_linear_fit_recovers_a_line_and_keeps_its_terms_non_negative():
    exact = LinearFit.fit([(1, 5.0), (2, 8.0), (4, 14.0)])  # 2 + 3x
    assert (exact.intercept, exact.slope) == (pytest.approx(2.0), pytest.approx(3.0))
    assert exact.residual == pytest.approx(0.0, abs=1e-12)
    through_origin = LinearFit.fit([(1, 1.0), (2, 3.0), (3, 5.0)])  # -1 + 2x: no negative time
    assert through_origin.intercept == 0.0 and through_origin.slope > 0
    assert through_origin.residual > 0.1
    falling = LinearFit.fit([(1, 3.0), (2, 2.0)])  # noise: never a negative slope
    assert falling.slope == 0.0 and 2.0 <= falling.intercept <= 3.0


def test_collective_fit_means_what_the_cluster_formulas_mean():
    link = Link(bandwidth=2e9, latency=30e-6)
    for kind in KINDS:
        for n in (2, 4):
            points = [(b, collective_seconds(kind, b, n, link)) for b in (KIB4, 2**20, MIB16)]
            fit = CollectiveFit.fit(kind, n, points)
            assert fit.bandwidth == pytest.approx(link.bandwidth, rel=1e-9)
            assert fit.latency == pytest.approx(link.latency, rel=1e-9)


def test_collective_times_that_do_not_grow_are_refused():
    with pytest.raises(ProfileError, match="all_reduce on 2 ranks: measured times do not grow"):
        CollectiveFit.fit("all_reduce", 2, [(KIB4, 0.002), (MIB16, 0.001)])


# 2. a real profile


def test_layer_types_of_the_model_the_reference_block_and_the_head(measured):
    assert set(measured.layer_keys()) == {"gated_deltanet/moe", "attention/moe", "attention/mlp", HEAD}
    assert measured.seq_len == SEQ_LEN and measured.dtype == "float32"
    assert measured.machine == this_machine(2)


@pytest.mark.parametrize("key", ["gated_deltanet/moe", "attention/moe", "attention/mlp", HEAD])
def test_layer_fits_are_positive_and_grow_with_tokens(measured, key):
    entry = measured.layers[key]
    for fit in (entry.forward, entry.backward, entry.forward_checkpointed, entry.backward_checkpointed):
        if fit is None:
            continue
        assert [x for x, _ in fit.points] == [SEQ_LEN, 8 * SEQ_LEN]
        assert all(y > 0 for _, y in fit.points)
        assert fit.intercept >= 0 and fit.slope >= 0 and math.isfinite(fit.residual)
    for checkpoint in (False, True) if key != HEAD else (False,):
        small = sum(measured.layer_seconds(key, SEQ_LEN, checkpoint))
        large = sum(measured.layer_seconds(key, 8 * SEQ_LEN, checkpoint))
        assert large > small > 0


def test_counts_come_from_the_layer_types(measured):
    cfg = get_flavor(FLAVOR)
    counts = count_model(cfg, SEQ_LEN)
    by_key = {f"{c.mixer}/{c.ffn}": c for c in counts.layers}
    for key, c in by_key.items():
        entry = measured.layers[key]
        assert (entry.params, entry.flops_per_token) == (c.params, c.flops_per_token)
        assert entry.counted_activation_bytes_per_token == c.activation_bytes_per_token
        assert entry.state_bytes == 16 * c.params
    head = measured.layers[HEAD]
    assert head.params == counts.embedding_params + counts.head_params + counts.final_norm_params
    assert head.flops_per_token == 2 * cfg.dim * cfg.vocab_size


def test_measured_activation_bytes_check_the_counts(measured):
    dim_bytes = get_flavor(FLAVOR).dim * 4
    for key in ("attention/moe", "attention/mlp"):  # exact in float32 (tests/test_model.py, test_moe.py)
        entry = measured.layers[key]
        assert entry.activation_bytes_per_token == entry.counted_activation_bytes_per_token
    linear = measured.layers["gated_deltanet/moe"]  # the hook also sees the dropped final state's graph
    assert linear.counted_activation_bytes_per_token <= linear.activation_bytes_per_token
    assert linear.activation_bytes_per_token <= 1.02 * linear.counted_activation_bytes_per_token
    for key in ("gated_deltanet/moe", "attention/moe", "attention/mlp"):
        assert measured.layers[key].checkpointed_activation_bytes_per_token == dim_bytes  # the layer's input only
    assert measured.layers[HEAD].activation_bytes_per_token > 0


def test_collectives_are_fitted_per_kind_and_group_and_grow_with_size(measured):
    assert set(measured.collectives) == set(KINDS)
    for kind, fits in measured.collectives.items():
        assert set(fits) == {2}
        fit = fits[2]
        assert fit.latency >= 0 and fit.bandwidth > 0 and math.isfinite(fit.residual)
        sizes = [b for b, _ in fit.points]
        assert sizes == [KIB4, 2**20, MIB16]
        measured_small, measured_large = fit.points[0][1], fit.points[-1][1]
        assert measured_large > measured_small
        assert measured.collective_seconds(kind, MIB16, 2) > measured.collective_seconds(kind, KIB4, 2)


def test_unmeasured_group_sizes_use_the_nearest_measured_link(measured):
    link = measured.collectives["all_reduce"][2].link
    assert measured.collective_seconds("all_reduce", MIB16, 8) == collective_seconds("all_reduce", MIB16, 8, link)
    assert measured.collective_seconds("all_to_all", MIB16, 1) == 0.0
    with pytest.raises(ValueError, match="unknown collective 'broadcast'"):
        measured.collective_seconds("broadcast", MIB16, 2)


def test_optimizer_seconds_scale_with_parameters(measured):
    assert measured.optimizer_seconds(10**6) > 0
    assert measured.optimizer_seconds(2 * 10**6) == pytest.approx(2 * measured.optimizer_seconds(10**6))


def test_host_figures_for_offload(measured):
    """The ranks are their own host: a copy at memory speed, torch's AdamW (the optimizer step) unless
    DeepSpeed's CPU Adam op was prebuilt."""
    host = measured.host
    assert not host.separate_device and host.copy_bandwidth > 1e8
    assert host.pinned_copy_bandwidth is None or host.pinned_copy_bandwidth > 1e8
    if profiling.deepspeed_cpu_adam_prebuilt():
        assert host.adam == profiling.DEEPSPEED_ADAM and host.adam_seconds_per_param > 0
    else:
        assert host.adam == profiling.TORCH_ADAM and "not prebuilt" in host.note
        assert host.adam_seconds_per_param == measured.optimizer_seconds_per_param


def test_measured_cluster_spec(measured):
    spec = measured.cluster()
    assert (spec.nodes, spec.devices_per_node, spec.world) == (1, 2, 2)
    assert spec.intra_node == spec.inter_node == measured.collectives["all_reduce"][2].link
    assert spec.compute_efficiency == 1.0
    assert 1e6 < spec.device_flops < 1e13  # one CPU core: between a MFLOP/s and 10 TFLOP/s
    assert spec.device_memory == measured.memory_available // 2 > 0


def test_missing_layer_types_are_one_line_key_errors(measured):
    with pytest.raises(MissingLayerType) as info:
        measured.layer_seconds("gla/mlp", 128, checkpoint=False)
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("profile: no layer type 'gla/mlp' in this profile (it has gated_deltanet/moe")
    assert "\n" not in str(info.value)
    with pytest.raises(MissingLayerType, match="'head' has no checkpointed timing"):
        measured.layer_seconds(HEAD, 128, checkpoint=True)


def test_which_models_a_profile_covers(measured):
    cfg = get_flavor(FLAVOR)
    assert measured.mismatch(cfg, SEQ_LEN) is None
    measured.check_model(cfg, SEQ_LEN)
    assert measured.mismatch(cfg, 128) == f"measured at seq_len {SEQ_LEN}, not 128"
    assert measured.mismatch(dataclasses.replace(cfg, n_layers=4), SEQ_LEN) is None  # depth does not matter
    assert measured.mismatch(dataclasses.replace(cfg, dim=128, n_heads=8), SEQ_LEN) == (
        "'gated_deltanet/moe' was measured for another model shape")
    assert measured.mismatch(get_flavor("tiny-gla"), SEQ_LEN).startswith("no layer type 'gla/mlp'")
    with pytest.raises(ProfileError, match="does not fit the model: no layer type 'gla/mlp'"):
        measured.check_model(get_flavor("tiny-gla"), SEQ_LEN)


# 3. the file


def test_json_round_trip(measured, saved):
    document = json.loads(saved.read_text())
    assert document["version"] == VERSION == 2
    assert document["machine"]["ranks"] == 2
    assert document["layers"]["attention/moe"]["shape_hash"]
    loaded = load_profile(saved, expect_ranks=2)
    assert loaded.to_dict() == measured.to_dict()
    assert loaded.source == str(saved)
    assert loaded.layer_seconds("attention/moe", 300, True) == measured.layer_seconds("attention/moe", 300, True)
    assert loaded.cluster() == measured.cluster()


def rewrite(path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("change, message", [
    pytest.param(lambda d: d["machine"].update(hostname="elsewhere"),
                 "a profile of another machine: hostname 'elsewhere', here ", id="hostname"),
    pytest.param(lambda d: d["machine"].update(torch="1.0.0", cores=64),
                 "a profile of another machine: cores 64, here ", id="cores-and-torch"),
    pytest.param(lambda d: d.update(version=1), "profile version 1; this stratagem reads version 2", id="old-version"),
    pytest.param(lambda d: d.pop("version"), "profile version None; this stratagem reads version 2", id="no-version"),
    pytest.param(lambda d: d.pop("layers"), "corrupt profile (KeyError: 'layers')", id="missing-key"),
    pytest.param(lambda d: d["collectives"]["all_reduce"]["2"].update(bandwidth="fast"),
                 "corrupt profile (ValueError: ", id="bad-value"),
])
def test_load_refuses_other_machines_old_versions_and_corrupt_files(saved, change, message):
    rewrite(saved, change)
    with pytest.raises(ProfileError) as info:
        load_profile(saved)
    text = str(info.value)
    assert text.startswith(f"{saved}: {message}")
    assert text.endswith("; measure this machine with stratagem profile")
    assert "\n" not in text


def test_load_refuses_truncated_files_and_other_rank_counts(saved):
    with pytest.raises(ProfileError, match="a profile of another machine: ranks 2, here 4; measure"):
        load_profile(saved, expect_ranks=4)
    saved.write_text(saved.read_text()[:100])
    with pytest.raises(ProfileError, match=r"host-2r\.json: corrupt profile \(invalid JSON: "):
        load_profile(saved)
    with pytest.raises(ProfileError, match="no profile yet"):
        load_profile(saved.with_name("other.json"))


# 4. the cache


def test_a_matching_profile_is_reused_without_measuring(saved, monkeypatch):
    monkeypatch.setattr(profiling, "profile_machine", lambda *a, **k: pytest.fail("measured again"))
    said = []
    profile = ensure_profile(get_flavor(FLAVOR), 2, SEQ_LEN, saved, say=said.append)
    assert profile.to_dict() == load_profile(saved).to_dict()
    assert said == [f"{saved}: reusing the profile measured {profile.created} (same machine, 2 ranks, model shape "
                    f"and seq_len {SEQ_LEN}); --force measures again"]


@pytest.mark.parametrize("case, reason", [
    ("force", "--force"),
    ("seq_len", f"measured at seq_len {SEQ_LEN}, not 32"),
    ("corrupt", "corrupt profile (invalid JSON: "),
    ("missing", "no profile yet"),
])
def test_a_stale_profile_is_measured_again_and_replaced(measured, saved, monkeypatch, case, reason):
    calls = []

    def fake_measure(cfg, ranks, seq_len, settings, progress):
        calls.append((ranks, seq_len, settings))
        return dataclasses.replace(measured, created="now")

    monkeypatch.setattr(profiling, "profile_machine", fake_measure)
    seq_len = 32 if case == "seq_len" else SEQ_LEN
    if case == "corrupt":
        saved.write_text("{")
    if case == "missing":
        saved.unlink()
    said = []
    ensure_profile(get_flavor(FLAVOR), 2, seq_len, saved, force=case == "force", settings=SMALL, say=said.append)
    assert calls == [(2, seq_len, SMALL)]
    assert said[0].startswith(f"{saved}: {reason}") and said[0].endswith("; measuring on 2 ranks")
    assert load_profile(saved).created == "now"


def test_cli_reuses_the_cached_profile(saved, monkeypatch, capsys):
    monkeypatch.setattr(profiling, "profile_machine", lambda *a, **k: pytest.fail("measured again"))
    assert main(["profile", "--model", FLAVOR, "--ranks", "2", "--seq-len", str(SEQ_LEN), "--out", str(saved)]) == 0
    out = capsys.readouterr().out
    assert f"{saved}: reusing the profile measured" in out
    assert "gated_deltanet/moe" in out and "all_reduce" in out
    last = out.rstrip().splitlines()[-1]
    assert last.startswith(f"profile {saved} ({FLAVOR}, 2 ranks, seq_len {SEQ_LEN}); wall time ")


def test_cli_refuses_one_rank(capsys, tmp_path):
    assert main(["profile", "--model", FLAVOR, "--ranks", "1", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err == "stratagem: error: ranks = 1: a profile needs at least 2 ranks (it measures collectives)\n"


# 5. calibration probes


def test_probes_time_real_plans_and_calibrate_the_profile(measured):
    """The probes run on real ranks; the factors fitted to them can only bring the predictions of
    those same steps closer (least squares with the uncorrected prediction among its choices)."""
    profile = dataclasses.replace(measured, corrections={}, observations=[])
    said = []
    recorded = calibrate_with_probes(profile, get_flavor(FLAVOR), 2, SEQ_LEN, say=said.append)
    names = [o["run"] for o in profile.observations]
    assert recorded == len(names) and names == ["probe ddp", "probe fsdp-checkpointed", "probe tp2", "probe pp2",
                                                "probe ep2-fsdp"]
    assert said[-1].startswith(f"probes: {recorded} plans timed in ")
    assert set(profile.corrections) == set(TERMS) and min(profile.corrections.values()) >= 1.0

    def squared_error(corrections):
        return sum((corrected_seconds(o["terms"], corrections) / o["measured_s"] - 1) ** 2
                   for o in profile.observations)

    assert squared_error(profile.corrections) <= squared_error({}) + 1e-12
    assert all(o["measured_s"] > 0 and set(o["terms"]) == set(TERMS) for o in profile.observations)


def test_probes_leave_out_what_would_not_fit_or_take_too_long(measured):
    profile = dataclasses.replace(measured, corrections={}, observations=[], memory_available=1)
    said = []
    assert calibrate_with_probes(profile, get_flavor(FLAVOR), 2, SEQ_LEN, say=said.append) == 0
    assert said == [f"probe {name}: left out (does not fit)"
                    for name in ("ddp", "fsdp-checkpointed", "tp2", "pp2", "ep2-fsdp")]
    assert profile.observations == [] and profile.corrections == {}


def test_probe_model_keeps_every_layer_type():
    hybrid = dataclasses.replace(get_flavor("tiny-hybrid"), n_layers=12)  # 3 gated_deltanet : 1 attention
    assert probe_model(hybrid).n_layers == 4
    longer = dataclasses.replace(hybrid, pattern=["5*gated_deltanet", "attention"])
    assert probe_model(longer) is longer  # 4 layers would lose the attention layers
