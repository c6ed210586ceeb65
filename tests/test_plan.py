"""Plans: the JSON document, strict loading, validation against a model, uniform plans, `stratagem plan`."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import stratagem
from stratagem.errors import ConfigError
from stratagem.launcher.cli import main
from stratagem.model import get_flavor
from stratagem.model.config import MoEConfig
from stratagem.parallel.plan import (Engine, LayerLayout, Layout, Pipeline, Plan, PlanError, Predicted, check_plan,
                                     dump_plan, even_stages, load_plan, uniform_plan)

EXAMPLES = Path(stratagem.__file__).parent / "examples" / "plans"
EXAMPLE_MODELS = {"tiny-tp2-dp2": "tiny", "tiny-hybrid-pp2": "tiny-hybrid",
                  "hybrid-340m-pp4-interleaved": "hybrid-340m", "tiny-moe-ep2-dp4": "tiny-moe"}


def hybrid_plan(**predicted) -> Plan:
    """tiny-hybrid (3 gated_deltanet, 1 attention) on 4 ranks: two uneven stages, mixed layouts."""
    return Plan(world_size=4,
                pipeline=Pipeline(degree=2, stages=[(0, 3), (3, 4)], virtual_stages=1, schedule="1f1b",
                                  micro_batch_size=2, num_micro_batches=4),
                embedding=Layout(tp=1, dp="fsdp"), head=Layout(tp=2, dp="ddp"),
                layers=[LayerLayout(tp=1, dp="fsdp", checkpoint="full", ep=1),
                        LayerLayout(tp=1, dp="zero2", checkpoint="none", ep=1),
                        LayerLayout(tp=2, dp="fsdp", checkpoint="full", ep=1),
                        LayerLayout(tp=2, dp="zero2", checkpoint="none", ep=1)],
                predicted=Predicted(**predicted))


def moe_model(pattern=("attention+moe",), **moe):
    """The tiny model with a moe feed-forward: 8 experts of width 96, top-2, unless `moe` says otherwise."""
    return dataclasses.replace(get_flavor("tiny"), pattern=list(pattern),
                               moe=MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_hidden": 96, **moe}))


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# --- the document ------------------------------------------------------------------------------

def test_round_trip_keeps_every_field(tmp_path):
    plan = hybrid_plan(step_time_s=1.25, peak_memory_bytes=3 << 30, stage_peak_memory_bytes=[3 << 30, 2 << 30])
    plan.notes = "hand-written"
    path = tmp_path / "plan.json"
    dump_plan(plan, path)
    again = load_plan(path)
    assert again == plan and again.source == str(path)
    assert again.to_json() == path.read_text() == plan.to_json()
    document = json.loads(path.read_text())
    assert document["version"] == 1 and document["pipeline"]["stages"] == [[0, 3], [3, 4]]
    assert document["layers"][2] == {"tp": 2, "dp": "fsdp", "checkpoint": "full", "ep": 1}
    assert path.read_text().count("\n") < 30  # one line per layer


def test_optional_keys_may_be_left_out(tmp_path):
    document = hybrid_plan().to_dict()
    del document["predicted"], document["notes"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(document))
    assert load_plan(path) == hybrid_plan()


def test_per_layer_layouts_give_per_layer_degrees():
    plan = hybrid_plan()
    check_plan(plan, get_flavor("tiny-hybrid"), world=4)
    assert plan.stage_size == 2
    assert [plan.dp_degree(layer) for layer in plan.layers] == [2, 2, 1, 1]
    assert [plan.stage_of(i) for i in range(4)] == [0, 0, 0, 1]
    assert plan.dp_degree(plan.embedding) == 2 and plan.dp_degree(plan.head) == 1


@pytest.mark.parametrize("name", sorted(EXAMPLE_MODELS))
def test_example_plans_check_against_their_models(name):
    plan = load_plan(EXAMPLES / f"{name}.json")
    check_plan(plan, get_flavor(EXAMPLE_MODELS[name]))
    assert EXAMPLE_MODELS[name] in plan.notes


def test_examples_are_all_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.json")) == sorted(EXAMPLE_MODELS)


def test_plan_module_does_not_import_torch():
    probe = "import sys, stratagem.parallel.plan; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


# --- bad input: one line naming the file, the key path, the value and the reason ----------------

def at(document, path):
    """The container holding the last key of `path` ("layers[3].tp") and that key."""
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    for part in parts[:-1]:
        document = document[part]
    return document, parts[-1]


def setting(path, value):
    def change(document):
        container, key = at(document, path)
        container[key] = value
    return change


def deleting(path):
    def change(document):
        container, key = at(document, path)
        del container[key]
    return change


def changes(*steps):
    def change(document):
        for step in steps:
            step(document)
    return change


BAD = [
    # reading: keys and types
    ("unknown key", setting("world_sizes", 4), "unknown key world_sizes (did you mean world_size?)"),
    ("unknown nested key", setting("layers[3].tpp", 2), "unknown key layers[3].tpp (did you mean layers[3].tp?)"),
    ("missing key", deleting("layers[1].dp"), "layers[1]: missing key 'dp'"),
    ("missing section", deleting("head"), "missing key 'head'"),
    ("missing version", deleting("version"), "missing key 'version' (this stratagem reads plan version 1)"),
    ("unknown version", setting("version", 2), "version = 2: unknown plan version; this stratagem reads version 1"),
    ("string for int", setting("layers[3].tp", "2"), 'layers[3].tp = "2": expected an integer'),
    ("bool for int", setting("world_size", True), "world_size = true: expected an integer"),
    ("float for int", setting("pipeline.micro_batch_size", 2.5),
     "pipeline.micro_batch_size = 2.5: expected an integer"),
    ("object for array", setting("layers", {}), "layers = {}: expected an array"),
    ("array for object", setting("pipeline", []), "pipeline = []: expected an object"),
    ("stage not a pair", setting("pipeline.stages[1]", [3]), "pipeline.stages[1] = [3]: expected an array of 2 items"),
    ("null for int", setting("head.tp", None), "head.tp = null: expected an integer"),
    ("bool wanted", setting("engine", {"kind": "deepspeed", "zero_stage": 3, "offload_optimizer": 1}),
     "engine.offload_optimizer = 1: expected true or false"),
    ("string for figure", setting("predicted.step_time_s", "1s"), 'predicted.step_time_s = "1s": expected a number'),
    # values that need no model
    ("unknown dp kind", setting("layers[2].dp", "zero3"),
     'layers[2].dp = "zero3": unknown data-parallel kind; known: ddp, zero2, fsdp'),
    ("unknown checkpoint", setting("layers[0].checkpoint", "selective"),
     'layers[0].checkpoint = "selective": unknown checkpointing; known: none, full'),
    ("unknown schedule", setting("pipeline.schedule", "1f1b_v"),
     'pipeline.schedule = "1f1b_v": unknown schedule; known: gpipe, 1f1b, interleaved_1f1b, zero_bubble'),
    ("zero world", setting("world_size", 0), "world_size = 0: must be at least 1"),
    ("zero micro-batches", setting("pipeline.num_micro_batches", 0),
     "pipeline.num_micro_batches = 0: must be at least 1"),
    ("pp does not divide world", setting("pipeline.degree", 3), "pipeline.degree = 3: does not divide world_size = 4"),
    ("tp does not divide stage", setting("layers[0].tp", 4),
     "layers[0].tp = 4: does not divide the stage size 2 (world_size 4 / pipeline.degree 2)"),
    ("micro-batch not split evenly", setting("pipeline.micro_batch_size", 3),
     "pipeline.micro_batch_size = 3: is not a multiple of embedding's data-parallel degree 2 "
     "(each data-parallel group gets an equal share of a micro-batch)"),
    ("ep beyond dp ranks", setting("layers[3].ep", 2),
     "layers[3].ep = 2: does not divide layer 3's data-parallel degree 1 (stage size 2 / tp 2); "
     "expert parallelism is carved out of the data-parallel ranks"),
    ("stage count", setting("pipeline.stages", [[0, 4]]),
     "pipeline.stages = [[0, 4]]: has 1 stage; pipeline.degree 2 x virtual_stages 1 needs 2"),
    ("stage gap", setting("pipeline.stages", [[0, 2], [3, 4]]),
     "pipeline.stages[1] = [3, 4]: must start at layer 2, where the previous stage ends"),
    ("empty stage", setting("pipeline.stages", [[0, 4], [4, 4]]),
     "pipeline.stages[1] = [4, 4]: is empty; a stage holds at least one layer"),
    ("stages short", setting("pipeline.stages", [[0, 2], [2, 3]]),
     "pipeline.stages[1] = [2, 3]: must end at 4: the stages cover all 4 entries of layers"),
    ("1f1b micro-batches", setting("pipeline.num_micro_batches", 1),
     "pipeline.num_micro_batches = 1: schedule 1f1b needs at least pipeline.degree = 2 micro-batches"),
    ("virtual stages on 1f1b", changes(setting("pipeline.virtual_stages", 2),
                                       setting("pipeline.stages", [[0, 1], [1, 2], [2, 3], [3, 4]])),
     "pipeline.virtual_stages = 2: schedule 1f1b runs one stage per rank; use interleaved_1f1b or zero_bubble"),
    ("interleaved rounds", changes(setting("pipeline.schedule", "interleaved_1f1b"),
                                   setting("pipeline.num_micro_batches", 5)),
     "pipeline.num_micro_batches = 5: schedule interleaved_1f1b needs a multiple of its 2 rounds "
     "(num_micro_batches // pipeline.degree): use a multiple of 2"),
    ("virtual stages without pipeline", changes(setting("pipeline.degree", 1), setting("pipeline.virtual_stages", 2)),
     "pipeline.virtual_stages = 2: needs a pipeline: pipeline.degree is 1"),
    ("stage figures", setting("predicted.stage_peak_memory_bytes", [1]),
     "predicted.stage_peak_memory_bytes = [1]: must list 2 non-negative byte counts, one per pipeline rank"),
    ("negative figure", setting("predicted.peak_memory_bytes", -1),
     "predicted.peak_memory_bytes = -1: must not be negative"),
    # values checked against the model (tiny-hybrid: n_heads 4, n_kv_heads 2, ffn_hidden 192, vocab 256)
    ("tp vs kv heads", changes(setting("world_size", 8), setting("pipeline.micro_batch_size", 4),
                               setting("layers[3].tp", 4)),
     "layers[3].tp = 4: does not divide n_kv_heads = 2 of layer 3 (attention)"),
    ("ep on a dense layer", setting("layers[0].ep", 2),
     "layers[0].ep = 2: layer 0's feed-forward is mlp; expert parallelism needs a moe layer"),
    ("layer count", changes(deleting("layers[3]"), setting("pipeline.stages", [[0, 2], [2, 3]])),
     "layers: 3 entries, but the model has n_layers = 4"),
]


@pytest.mark.parametrize("change,expected", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_plans_fail_with_one_line(tmp_path, change, expected):
    document = json.loads(hybrid_plan().to_json())
    change(document)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as info:
        check_plan(load_plan(path), get_flavor("tiny-hybrid"))
    assert one_line(info) == f"{path}: {expected}"


@pytest.mark.parametrize("text,expected", [
    ("{", "invalid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("[1]", "expected a JSON object at the top level, found [1]"),
])
def test_unreadable_plans(tmp_path, text, expected):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_plan(path)
    assert one_line(info) == f"{path}: {expected}"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_plan(tmp_path / "nope.json")
    assert one_line(info) == f"{tmp_path / 'nope.json'}: plan file not found"


def test_world_must_match():
    with pytest.raises(PlanError) as info:
        check_plan(hybrid_plan(), get_flavor("tiny-hybrid"), world=8)
    assert one_line(info) == "plan: world_size = 4: the plan is for 4 ranks, the job has 8"
    assert (info.value.key, info.value.value) == ("world_size", 4)


@pytest.mark.parametrize("model,expected", [
    (dataclasses.replace(get_flavor("tiny-hybrid"), vocab_size=255),
     "head.tp = 2: does not divide vocab_size = 255 of the head"),
    (dataclasses.replace(get_flavor("tiny-hybrid"), tie_embeddings=True),
     'head = {"tp": 2, "dp": "ddp"}: differs from embedding = {"tp": 1, "dp": "fsdp"}; the model ties the head '
     "to the embedding, so both need one layout"),
    (dataclasses.replace(get_flavor("tiny-hybrid"), pattern=["3*gated_deltanet", "mamba"]),
     "layers[3].tp = 2: layer 3 (mamba) cannot be sharded (no tensor parallelism rule for its type); use 1"),
    (dataclasses.replace(get_flavor("tiny-hybrid"), ffn_hidden=191),
     "layers[2].tp = 2: does not divide ffn_hidden = 191 of layer 2 (mlp)"),
])
def test_model_rules(model, expected):
    with pytest.raises(PlanError) as info:
        check_plan(hybrid_plan(), model)
    assert one_line(info) == f"plan: {expected}"


# --- MoE ---------------------------------------------------------------------------------------

def moe_plan(ep: int, tp: int = 1, world: int = 4) -> Plan:
    return Plan(world_size=world,
                pipeline=Pipeline(degree=1, stages=[(0, 2)], virtual_stages=1, schedule="1f1b",
                                  micro_batch_size=world, num_micro_batches=1),
                embedding=Layout(tp=1, dp="fsdp"), head=Layout(tp=1, dp="fsdp"),
                layers=[LayerLayout(tp=tp, dp="fsdp", checkpoint="none", ep=ep)] * 2)


def test_expert_parallelism_on_moe_layers():
    check_plan(moe_plan(ep=4), moe_model(num_experts=8))
    check_plan(moe_plan(ep=1, tp=2), moe_model(num_experts=8))


@pytest.mark.parametrize("plan,model,expected", [
    (moe_plan(ep=4), moe_model(num_experts=6),
     "layers[0].ep = 4: does not divide moe.num_experts = 6 of layer 0 (moe)"),
    (moe_plan(ep=1, tp=2), moe_model(expert_hidden=95),
     "layers[0].tp = 2: does not divide expert_hidden = 95 of layer 0 (moe)"),
    (moe_plan(ep=2, tp=2), moe_model(),
     "layers[0].ep = 2: expert parallelism with tp 2 on the same layer is not supported yet (experts split by "
     "expert or by width, not both); use tp 1"),
    (moe_plan(ep=2, tp=4), moe_model(),
     "layers[0].ep = 2: does not divide layer 0's data-parallel degree 1 (stage size 4 / tp 4); "
     "expert parallelism is carved out of the data-parallel ranks"),
])
def test_expert_parallelism_rules(plan, model, expected):
    with pytest.raises(PlanError) as info:
        check_plan(plan, model)
    assert one_line(info) == f"plan: {expected}"


# --- engines and tensor-parallel implementations ------------------------------------------------

def deepspeed_plan(stage: int = 3, **engine) -> Plan:
    dp = "fsdp" if stage == 3 else "zero2"
    return Plan(world_size=4,
                pipeline=Pipeline(degree=1, stages=[(0, 4)], virtual_stages=1, schedule="1f1b",
                                  micro_batch_size=4, num_micro_batches=2),
                embedding=Layout(tp=1, dp=dp), head=Layout(tp=1, dp=dp),
                layers=[LayerLayout(tp=1, dp=dp, checkpoint="none", ep=1)] * 4,
                engine=Engine(kind="deepspeed", zero_stage=stage, **engine))


def test_deepspeed_plans_round_trip_and_native_ones_leave_the_engine_out(tmp_path):
    plan = deepspeed_plan(3, offload_optimizer=True, offload_ratio=0.5)
    dump_plan(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == dataclasses.replace(plan, source=str(tmp_path / "plan.json"))
    check_plan(plan, get_flavor("tiny-hybrid"))
    assert "engine" not in hybrid_plan().to_dict() and "tp_impl" not in hybrid_plan().to_dict()


@pytest.mark.parametrize("change,expected", [
    (dict(engine=Engine(kind="zero")), 'engine.kind = "zero": unknown engine; known: native, deepspeed'),
    (dict(engine=Engine(zero_stage=2)), "engine.zero_stage = 2: is a DeepSpeed setting; engine.kind is native"),
    (dict(engine=Engine(kind="deepspeed", zero_stage=4)), "engine.zero_stage = 4: DeepSpeed's ZeRO stage must be 1, 2 or 3"),
    (dict(engine=Engine(kind="deepspeed", zero_stage=2, offload_params=True)),
     "engine.offload_params = true: parameter offload needs ZeRO stage 3, engine.zero_stage is 2"),
    (dict(engine=Engine(kind="deepspeed", zero_stage=3, offload_ratio=0.5)),
     "engine.offload_ratio = 0.5: a partial host update needs ZeRO stage 3 with engine.offload_optimizer"),
    (dict(engine=Engine(kind="deepspeed", zero_stage=2)),
     'embedding.dp = "fsdp": ZeRO stage 2 keeps every layer\'s parameters: use "zero2"'),
    (dict(tp_impl="apex"), 'tp_impl = "apex": unknown tensor-parallel implementation; known: dtensor, megatron'),
])
def test_engine_rules(change, expected):
    plan = dataclasses.replace(deepspeed_plan(3), **change)
    with pytest.raises(PlanError) as info:
        check_plan(plan, get_flavor("tiny-hybrid"))
    assert one_line(info) == f"plan: {expected}"


def test_deepspeed_plans_have_no_pipeline_tensor_or_expert_parallelism():
    plan = hybrid_plan()
    plan.engine = Engine(kind="deepspeed", zero_stage=1)
    with pytest.raises(PlanError) as info:
        check_plan(plan, get_flavor("tiny-hybrid"))
    assert one_line(info) == "plan: pipeline.degree = 2: the deepspeed engine runs ZeRO data parallelism only; use 1"


def test_megatron_tensor_parallelism_covers_attention_and_mlp_only():
    plan = dataclasses.replace(hybrid_plan(), tp_impl="megatron")
    with pytest.raises(PlanError) as info:
        check_plan(plan, get_flavor("tiny-hybrid"))
    assert one_line(info) == ('plan: layers[2].tp = 2: layer 2 (gated_deltanet) has no megatron-core tensor-parallel '
                              'layers (tp_impl "megatron" covers attention, swa, mlp); use tp 1 or tp_impl "dtensor"')
    plan.layers[2] = dataclasses.replace(plan.layers[2], tp=1)
    check_plan(plan, get_flavor("tiny-hybrid"))


# --- uniform plans -----------------------------------------------------------------------------

def test_even_stages_are_contiguous_and_uneven_by_at_most_one():
    assert even_stages(4, 3) == [(0, 2), (2, 3), (3, 4)]
    assert even_stages(24, 8) == [(i, i + 3) for i in range(0, 24, 3)]


def test_uniform_plan():
    model = get_flavor("tiny-hybrid")
    plan = uniform_plan(model, 8, tp=2, pp=2, dp="fsdp", checkpoint="full")
    assert plan.pipeline.stages == [(0, 2), (2, 4)] and plan.pipeline.num_micro_batches == 2
    assert plan.pipeline.micro_batch_size == 2  # one sequence per data-parallel rank
    assert all(layer == LayerLayout(tp=2, dp="fsdp", checkpoint="full", ep=1) for layer in plan.layers)
    assert plan.embedding == plan.head == Layout(tp=2, dp="fsdp")
    interleaved = uniform_plan(model, 2, pp=2, virtual_stages=2, schedule="interleaved_1f1b")
    assert interleaved.pipeline.stages == [(0, 1), (1, 2), (2, 3), (3, 4)]
    moe = uniform_plan(moe_model(["attention+moe", "attention"], num_experts=4), 4, ep=2)
    assert [layer.ep for layer in moe.layers] == [2, 1]


@pytest.mark.parametrize("kwargs,expected", [
    ({"tp": 4}, "uniform plan: layers[3].tp = 4: does not divide n_kv_heads = 2 of layer 3 (attention)"),
    ({"pp": 8}, "uniform plan: pipeline.degree = 8: does not divide world_size = 4"),
    ({"pp": 4, "virtual_stages": 2, "schedule": "zero_bubble"},
     "uniform plan: pipeline.stages = []: has 0 stages; pipeline.degree 4 x virtual_stages 2 needs 8"),
    ({"ep": 2}, "uniform plan: ep = 2: the model has no moe layer to split into experts"),
])
def test_uniform_plan_refuses_impossible_layouts(kwargs, expected):
    with pytest.raises(ConfigError) as info:
        uniform_plan(get_flavor("tiny-hybrid"), 4, **kwargs)
    assert one_line(info) == expected


# --- the command line --------------------------------------------------------------------------

def test_cli_new_check_show(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "new", "--model", "tiny-hybrid", "--world", "4", "--tp", "2", "--pp", "2",
                 "--dp", "zero2", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: 4 ranks = pipeline 2 x 2, 4 layers in 2 stages, tp 2")
    assert load_plan(out).layers[0] == LayerLayout(tp=2, dp="zero2", checkpoint="none", ep=1)

    assert main(["plan", "check", str(out), "--model", "tiny-hybrid", "--world", "4"]) == 0
    assert capsys.readouterr().out == (
        f"{out}: OK for tiny-hybrid: 4 ranks = pipeline 2 x 2, 4 layers in 2 stages, tp 2, dp zero2, ep 1, "
        "0 checkpointed, 2 micro-batches x 1 sequence, schedule 1f1b\n")

    assert main(["plan", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "world       4 ranks = pipeline 2 x 2 ranks per stage" in shown
    assert "stages      0: layers 0-1 (rank 0), 1: layers 2-3 (rank 1)" in shown
    assert "mixer" not in shown and len(shown.splitlines()) == 6 + 2 + 6


def test_cli_show_with_model_and_figures(tmp_path, capsys):
    path = tmp_path / "plan.json"
    dump_plan(hybrid_plan(step_time_s=0.5, peak_memory_bytes=3 << 30, stage_peak_memory_bytes=[3 << 30, 1 << 30]),
              path)
    assert main(["plan", "show", str(path), "--model", "tiny-hybrid"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "predicted   step time 0.5 s; peak memory 3.00 GiB per rank; by pipeline rank 3.00 GiB, 1.00 GiB" in lines
    table = lines[lines.index(next(line for line in lines if line.startswith("layer"))):]
    assert table[0].split() == ["layer", "mixer", "ffn", "stage", "tp", "dp", "dp", "kind", "ep", "checkpoint"]
    assert table[2].split() == ["embed", "embedding", "-", "0", "1", "2", "fsdp", "-", "-"]
    assert table[5].split() == ["2", "gated_deltanet", "mlp", "0", "2", "1", "fsdp", "1", "full"]
    assert table[6].split() == ["3", "attention", "mlp", "1", "2", "1", "zero2", "1", "none"]
    assert table[7].split() == ["head", "output", "-", "1", "2", "1", "ddp", "-", "-"]


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    path = tmp_path / "plan.json"
    dump_plan(hybrid_plan(), path)
    assert main(["plan", "check", str(path), "--model", "tiny-hybrid", "--world", "8"]) == 2
    assert capsys.readouterr().err == (f"stratagem: error: {path}: world_size = 4: the plan is for 4 ranks, "
                                       "the job has 8\n")
    assert main(["plan", "check", str(path), "--model", "tiny"]) == 2
    assert capsys.readouterr().err == f"stratagem: error: {path}: layers: 4 entries, but the model has n_layers = 2\n"
    assert main(["plan", "check", str(path), "--model", "tiny-hybrid", "--model.ffn_hidden=191"]) == 2
    assert capsys.readouterr().err == (f"stratagem: error: {path}: layers[2].tp = 2: does not divide "
                                       "ffn_hidden = 191 of layer 2 (mlp)\n")


def test_cli_new_writes_deepspeed_and_megatron_plans(tmp_path, capsys):
    path = tmp_path / "ds.json"
    assert main(["plan", "new", "--model", "tiny", "--world", "4", "--zero-stage", "3", "--offload-optimizer",
                 "--offload-ratio", "0.5", "--micro-batch-size", "8", "--out", str(path)]) == 0
    plan = load_plan(path)
    assert plan.engine == Engine(kind="deepspeed", zero_stage=3, offload_optimizer=True, offload_ratio=0.5)
    assert {layer.dp for layer in plan.layers} == {"fsdp"}
    assert "deepspeed ZeRO-3, optimizer offloaded (50% of the update on the host)" in capsys.readouterr().out
    assert main(["plan", "new", "--model", "tiny", "--world", "2", "--tp", "2", "--tp-impl", "megatron",
                 "--out", str(tmp_path / "megatron.json")]) == 0
    assert load_plan(tmp_path / "megatron.json").tp_impl == "megatron"


@pytest.mark.parametrize("args,expected", [
    (["--zero-stage", "2", "--tp", "2"], "--tp: a DeepSpeed plan (--zero-stage) runs ZeRO over all ranks, with no "
                                         "tensor, pipeline or expert parallelism of stratagem's"),
    (["--offload-optimizer"], "--offload-optimizer: a DeepSpeed setting; add --zero-stage 1, 2 or 3 for a DeepSpeed plan"),
    (["--zero-stage", "2", "--offload-params"], "deepspeed ZeRO-2 plan: engine.offload_params = true: parameter "
                                                "offload needs ZeRO stage 3, engine.zero_stage is 2"),
])
def test_cli_new_refuses_mixed_engine_settings(tmp_path, capsys, args, expected):
    assert main(["plan", "new", "--model", "tiny", "--world", "4", *args, "--out", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err == f"stratagem: error: {expected}\n"
    assert not (tmp_path / "p.json").exists()


def test_cli_new_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "plan.json"
    out.write_text("mine")
    args = ["plan", "new", "--model", "tiny", "--world", "2", "--out", str(out)]
    assert main(args) == 2
    assert capsys.readouterr().err == f"stratagem: error: {out}: already exists; pass --force to replace it\n"
    assert out.read_text() == "mine"
    assert main([*args, "--force"]) == 0
    assert load_plan(out) == uniform_plan(get_flavor("tiny"), 2, notes="uniform plan for tiny")


def test_experts_of_width_zero_are_as_wide_as_ffn_hidden():
    model = dataclasses.replace(moe_model(expert_hidden=0), ffn_hidden=190)
    check_plan(moe_plan(ep=1, tp=2), model)  # 190 = 2 x 95
    with pytest.raises(PlanError) as info:
        check_plan(moe_plan(ep=1, tp=2), dataclasses.replace(model, ffn_hidden=95))
    assert one_line(info) == "plan: layers[0].tp = 2: does not divide expert_hidden = 95 of layer 0 (moe)"
