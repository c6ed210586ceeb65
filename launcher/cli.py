"""The `stratagem` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from stratagem.errors import ConfigError, StratagemError

DEFAULT_CONFIG = "demo"
DEFAULT_LAUNCH_CONFIG = "launch-demo"


def _split_overrides(parser: argparse.ArgumentParser, extra: list[str]) -> list[str]:
    for item in extra:
        if not (item.startswith("--") and "." in item.split("=", 1)[0] and "=" in item):
            parser.error(f"unrecognized argument {item!r} (overrides are written --section.key=value)")
    return extra


def cmd_train(args, overrides: list[str]) -> int:
    from stratagem.launcher.config import load_config
    from stratagem.train.loop import train

    config = load_config(args.config, overrides)
    if args.nproc or args.plan:
        result = _train_on_ranks(config, args)
    else:
        result = train(config, resume=args.resume, stop_after=args.stop_after)
    _print_result(config, result)
    return 0


def _print_result(config, result) -> None:
    from stratagem.data.synthetic import SyntheticCorpus

    print(f"run directory   {result.run_dir}")
    print(f"tensorboard     tensorboard --logdir {result.run_dir / 'tensorboard'}")
    print(f"checkpoint      {result.checkpoint}")
    if result.eval_loss is None:
        return
    line = f"final eval loss {result.eval_loss:.4f} nats/token at step {result.step}"
    if config.data.kind == "synthetic" or _streams_synthetic(config):
        entropy = SyntheticCorpus(config.data.synthetic, config.data.seq_len).entropy()
        line += (f"; the corpus's exact entropy is {entropy.per_target:.4f} (Markov rate {entropy.markov_rate:.4f}, "
                 f"unigram {entropy.unigram:.4f}); gap {result.eval_loss - entropy.per_target:.4f}")
    print(line)


def _streams_synthetic(config) -> bool:
    """Whether every stream is the config's synthetic corpus exported (`stratagem data synthetic`)."""
    from stratagem.data.export import corpus_card
    from stratagem.data.streaming import check_streams
    from stratagem.data.tokenizer import card_mismatch

    return card_mismatch(check_streams(config.data.mds.streams, config.data.seq_len),
                         corpus_card(config.data.synthetic)) is None


def _train_on_ranks(config, args):
    """`train` on --nproc local ranks under --plan (default: data parallelism), everything checked first."""
    from stratagem.launcher.launch import train_on_ranks
    from stratagem.parallel.plan import load_plan
    from stratagem.parallel.runtime import default_plan

    plan = load_plan(args.plan) if args.plan else default_plan(config, args.nproc)
    return train_on_ranks(config, plan, args.nproc or plan.world_size, args.resume, args.stop_after)


def cmd_launch(args, overrides: list[str]) -> int:
    from stratagem.launcher.config import load_config
    from stratagem.launcher.launch import launch

    config = load_config(args.config, overrides)
    if args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc {args.nproc}: must be at least 1")
        config.launch.ranks = args.nproc
    result = launch(config, resume=args.resume, stop_after=args.stop_after, replan=args.replan,
                    force_profile=args.reprofile)
    _print_result(config, result.train)
    print(f"plan            {result.train.run_dir / 'plan.json'}")
    if result.calibration is not None:
        print(result.calibration.describe())
    return 0


def _flavor_or_config(target: str, overrides: list[str]):
    """The Config of a model flavor (other sections at their defaults), a config file or a named config."""
    from stratagem.launcher.config import load_config, named_configs
    from stratagem.model import FLAVORS

    if target in FLAVORS:
        return load_config(None, [f"--model.flavor={target}", *overrides])
    if target in named_configs() or target.endswith(".toml"):
        return load_config(target, overrides)
    raise ConfigError(f"unknown model flavor or config {target!r}; flavors: {', '.join(FLAVORS)}; "
                      f"configs: {', '.join(sorted(named_configs()))}")


def cmd_model(args, overrides: list[str]) -> int:
    from stratagem.model import count_model

    target = args.name
    config = _flavor_or_config(target, overrides)
    seq_len = args.seq_len or config.data.seq_len
    print(f"{config.flavor or target}: {len(config.model.layer_specs())} layers, sequence length {seq_len}")
    print(count_model(config.model, seq_len).table())
    return 0


def cmd_config(args, overrides: list[str]) -> int:
    from stratagem.launcher.config import dump_toml, load_config

    print(dump_toml(load_config(args.config, overrides).to_dict()), end="")
    return 0


def cmd_data_tokenizer(args, overrides: list[str]) -> int:
    from stratagem.data.tokenizer import train_tokenizer

    path = train_tokenizer(args.input, Path(args.out), args.vocab_size, model_type=args.model_type,
                           text_field=args.text_field, max_documents=args.max_documents,
                           overwrite=args.overwrite)
    print(f"tokenizer written to {path / 'tokenizer.model'} (card {path / 'tokenizer.json'})")
    return 0


def cmd_data_prepare(args, overrides: list[str]) -> int:
    from stratagem.data.prepare import prepare

    manifest = prepare(args.input, Path(args.tokenizer), args.seq_len, Path(args.out),
                       val_fraction=args.val_fraction, text_field=args.text_field, workers=args.workers,
                       skip_bad=args.skip_bad)
    for split in ("train", "val"):
        print(f"{split:5s} {manifest.documents[split]:>10,} documents {manifest.tokens[split]:>14,} tokens "
              f"{manifest.samples[split]:>10,} samples of {manifest.seq_len + 1} tokens")
    print(f"prepared {args.out} (manifest {Path(args.out) / 'manifest.json'})")
    return 0


def cmd_data_synthetic(args, overrides: list[str]) -> int:
    from stratagem.data.export import export_synthetic
    from stratagem.launcher.config import load_config

    config = load_config(args.config, overrides)
    seq_len = config.data.seq_len
    train_samples = args.train_samples or config.train.steps * config.train.global_batch_tokens // seq_len
    manifest, written = export_synthetic(config.data.synthetic, seq_len, Path(args.out), train_samples,
                                         args.val_samples)
    verb = "wrote" if written else "already holds"
    print(f"{args.out}: {verb} {manifest.samples['train']:,} train and {manifest.samples['val']:,} val samples of "
          f"{seq_len + 1} tokens of the synthetic corpus (vocabulary {manifest.tokenizer['vocab_size']}); stream "
          f"it with [[data.mds.streams]] path = \"{args.out}\"")
    return 0


def cmd_convert_megatron_data(args, overrides: list[str]) -> int:
    from stratagem.data.megatron import megatron_to_mds, vocabulary_card
    from stratagem.data.sources import DataError
    from stratagem.data.tokenizer import Tokenizer

    if args.tokenizer and (args.vocab_size, args.eos_id) != (None, None):
        raise DataError("--tokenizer gives the vocabulary size and EOS id; drop --vocab-size and --eos-id")
    if args.tokenizer:
        card = Tokenizer.load(args.tokenizer).card
    elif None in (args.vocabulary, args.vocab_size, args.eos_id):
        raise DataError("name the tokenizer the data was made with: --tokenizer DIR (a stratagem tokenizer), or "
                        "--vocabulary NAME with --vocab-size N and --eos-id ID")
    else:
        card = vocabulary_card(args.vocabulary, args.vocab_size, args.eos_id)
    manifest = megatron_to_mds(args.prefix, Path(args.out), args.seq_len, card, val_fraction=args.val_fraction,
                               documents_per_part=args.documents_per_part)
    print(f"{args.out}: {sum(manifest.documents.values()):,} documents, {manifest.samples['train']:,} train and "
          f"{manifest.samples['val']:,} val samples of {manifest.seq_len + 1} tokens; stream it with "
          f"[[data.mds.streams]] path = \"{args.out}\"")
    return 0


def cmd_convert_hf_export(args, overrides: list[str]) -> int:
    from stratagem.model.huggingface import export_hf

    hf_config = export_hf(args.checkpoint, args.out, dtype=args.dtype)
    print(f"{args.out}: a Hugging Face LlamaForCausalLM ({hf_config['num_hidden_layers']} layers, "
          f"{args.dtype}); load it with transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0


def cmd_convert_hf_import(args, overrides: list[str]) -> int:
    from stratagem.model.huggingface import MODEL_CONFIG, MODEL_WEIGHTS, import_hf

    cfg = import_hf(args.folder, args.out)
    out = Path(args.out)
    print(f"{out / MODEL_CONFIG}: the [model] section ({cfg.n_layers} layers, dim {cfg.dim}, vocabulary "
          f"{cfg.vocab_size}); {out / MODEL_WEIGHTS}: its weights: train from them with run.init_weights = "
          f"\"{out / MODEL_WEIGHTS}\" and that [model] section")
    return 0


def cmd_convert_deepspeed(args, overrides: list[str]) -> int:
    from stratagem.launcher.config import load_config
    from stratagem.parallel.deepspeed_checkpoint import convert_deepspeed_checkpoint

    config = load_config(args.config, overrides)
    out = convert_deepspeed_checkpoint(Path(args.ds_dir), Path(args.out), config, tag=args.tag)
    print(f"{out}: {args.ds_dir}'s DeepSpeed checkpoint as a stratagem checkpoint of {args.config}; a run resumes "
          f"from it in <run>/checkpoints/, or branches off it with run.init_from = \"{out}\"")
    return 0


def cmd_profile(args, overrides: list[str]) -> int:
    from stratagem.launcher.profile import ensure_profile

    began = time.perf_counter()
    config = _flavor_or_config(args.model, overrides)
    seq_len = args.seq_len or config.data.seq_len
    profile = ensure_profile(config.model, args.ranks, seq_len, args.out, force=args.force)
    print(profile.summary())
    print(f"profile {profile.source} ({config.flavor or args.model}, {args.ranks} ranks, seq_len {seq_len}); "
          f"wall time {time.perf_counter() - began:.1f} s")
    return 0


def cmd_plan_show(args, overrides: list[str]) -> int:
    from stratagem.parallel.plan import VERSION, check_plan, describe, load_plan

    plan = load_plan(args.plan)
    specs = None
    if args.model:
        model = _flavor_or_config(args.model, overrides).model
        check_plan(plan, model)
        specs = model.layer_specs()
    print(f"{args.plan} (plan version {VERSION})")
    print(describe(plan, specs))
    return 0


def cmd_plan_check(args, overrides: list[str]) -> int:
    from stratagem.parallel.plan import check_plan, load_plan, summary

    plan = load_plan(args.plan)
    check_plan(plan, _flavor_or_config(args.model, overrides).model, world=args.world)
    print(f"{args.plan}: OK for {args.model}: {summary(plan)}")
    return 0


def cmd_plan_new(args, overrides: list[str]) -> int:
    from stratagem.parallel.plan import check_plan, deepspeed_plan, dump_plan, summary, uniform_plan

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out}: already exists; pass --force to replace it")
    model = _flavor_or_config(args.model, overrides).model
    native_only = {"--tp": args.tp != 1, "--pp": args.pp != 1, "--ep": args.ep != 1, "--dp": args.dp is not None,
                   "--tp-impl": args.tp_impl != "dtensor", "--virtual-stages": args.virtual_stages != 1}
    deepspeed_only = {"--offload-optimizer": args.offload_optimizer, "--offload-params": args.offload_params,
                      "--offload-ratio": args.offload_ratio != 1.0, "--deepspeed-config": bool(args.deepspeed_config)}
    if args.zero_stage is not None:
        given = [flag for flag, set_ in native_only.items() if set_]
        if given:
            raise ConfigError(f"{given[0]}: a DeepSpeed plan (--zero-stage) runs ZeRO over all ranks, with no "
                              f"tensor, pipeline or expert parallelism of stratagem's")
        plan = deepspeed_plan(model, args.world, args.zero_stage, offload_optimizer=args.offload_optimizer,
                              offload_params=args.offload_params, offload_ratio=args.offload_ratio,
                              config=args.deepspeed_config, checkpoint=args.checkpoint,
                              micro_batch_size=args.micro_batch_size, num_micro_batches=args.micro_batches or 1,
                              notes=f"deepspeed plan for {args.model}")
    else:
        given = [flag for flag, set_ in deepspeed_only.items() if set_]
        if given:
            raise ConfigError(f"{given[0]}: a DeepSpeed setting; add --zero-stage 1, 2 or 3 for a DeepSpeed plan")
        plan = uniform_plan(model, args.world, tp=args.tp, pp=args.pp, dp=args.dp or "ddp",
                            checkpoint=args.checkpoint, ep=args.ep, virtual_stages=args.virtual_stages,
                            schedule=args.schedule, micro_batch_size=args.micro_batch_size,
                            num_micro_batches=args.micro_batches, notes=f"uniform plan for {args.model}")
        plan.tp_impl = args.tp_impl
        check_plan(plan, model)
    dump_plan(plan, out)
    print(f"wrote {out}: {summary(plan)}")
    return 0


def _hardware(cluster: str, nodes: int | None):
    """`--cluster`: a profile of this machine (a JSON file `stratagem profile` wrote) or a cluster spec
    (a built-in name or a spec file)."""
    import json

    from stratagem.launcher.cluster import load_cluster
    from stratagem.launcher.hardware import Analytic, Measured
    from stratagem.launcher.profile import load_profile

    path = Path(cluster)
    if path.suffix == ".json" and path.is_file():
        try:
            is_profile = "collectives" in json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable JSON cluster spec or profile ({e})") from None
        if is_profile:
            if nodes is not None:
                raise ConfigError(f"--nodes {nodes}: a profile describes the machine it was measured on; drop --nodes")
            return Measured(load_profile(path))
    return Analytic(load_cluster(cluster, nodes))


def cmd_plan_search(args, overrides: list[str]) -> int:
    from stratagem.launcher.cost import FP32_ADAM, MIXED_ADAM, Workload
    from stratagem.launcher.search import Space, plan_search
    from stratagem.parallel.plan import dump_plan

    config = _flavor_or_config(args.model, overrides)
    seq_len = args.seq_len or config.data.seq_len
    tokens = args.global_batch_tokens or config.train.global_batch_tokens
    if tokens % seq_len:
        raise ConfigError(f"--global-batch-tokens {tokens}: not a whole number of {seq_len}-token sequences")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.force:
        raise ConfigError(f"{out}: already exists; pass --force to replace it")
    hw = _hardware(args.cluster, args.nodes)
    world = args.world or hw.cluster.world
    mixed = args.precision == "bf16-mixed"
    work = Workload.of(config.model, seq_len, tokens // seq_len, state=MIXED_ADAM if mixed else FP32_ADAM,
                       activation_bytes=2 if mixed else 4)
    result = plan_search(hw, work, config.model, world, Space(engines=tuple(args.engines)))
    print(f"planned for {world} ranks of {hw.cluster.name}, {tokens:,} tokens per step ({tokens // seq_len} x "
          f"{seq_len}), {args.precision}")
    print(result.report(hw, config.model.layer_specs()))
    if out is not None:
        dump_plan(result.plan, out)
        print(f"wrote {out}")
    return 0


def cmd_submit_slurm(args, overrides: list[str]) -> int:
    from stratagem.launcher.config import load_config
    from stratagem.launcher.slurm import submit
    from stratagem.parallel.plan import load_plan
    from stratagem.parallel.runtime import default_plan

    config = load_config(args.config, overrides)
    job = _slurm_job(args, nodes=args.nodes, ranks_per_node=args.ranks_per_node)
    job.validate()
    plan = load_plan(args.plan) if args.plan else default_plan(config, job.world)
    submit(config, plan, job, dry_run=args.dry_run)
    return 0


def cmd_submit_ray(args, overrides: list[str]) -> int:
    from stratagem.launcher.config import load_config
    from stratagem.launcher.ray_jobs import submit
    from stratagem.parallel.plan import load_plan
    from stratagem.parallel.runtime import default_plan

    config = load_config(args.config, overrides)
    plan = load_plan(args.plan) if args.plan else default_plan(config, args.workers)
    submit(config, plan, args.address, args.workers, follow=args.follow)
    return 0


def cmd_scaling_ladder(args, overrides: list[str]) -> int:
    from stratagem.launcher.config import load_config
    from stratagem.scaling.ladder import design_ladder, write_ladder

    config = load_config(args.config, overrides)
    ladder = design_ladder(config, args.budget, sizes=args.sizes, span=args.span,
                           branches=config.train.schedule == "wsd", family=args.family)
    path = write_ladder(ladder, args.out)
    print(ladder.table())
    print(f"ladder          {path} ({len(ladder.runs)} runs); train it with: stratagem scaling run {args.out}")
    return 0


def cmd_scaling_run(args, overrides: list[str]) -> int:
    from stratagem.scaling.sweep import run_ladder, run_task, submit_ladder, submit_ladder_ray

    if args.slurm:
        submit_ladder(args.out, _slurm_job(args), dry_run=args.dry_run)
        return 0
    if args.ray:
        submit_ladder_ray(args.out, args.ray, follow=args.follow)
        return 0
    summary = run_task(args.out, args.size) if args.size is not None else run_ladder(args.out, args.only or None)
    print(summary.table())
    return 0


def cmd_scaling_fit(args, overrides: list[str]) -> int:
    from stratagem.scaling.analysis import FitOptions, analyse
    from stratagem.scaling.points import ScalingInputError, load_runs, load_table
    from stratagem.scaling.report import summary, write_report

    pinned = {}
    for item in args.pin:
        name, _, value = item.partition("=")
        try:
            pinned[name] = float(value)
        except ValueError:
            raise ScalingInputError(f"--pin {item!r}: expected NAME=VALUE, e.g. E=1.7") from None
    options = FitOptions(params=args.params, points=args.points, bootstrap=args.bootstrap, grid=args.grid,
                         pinned=pinned, target_flops=args.target_flops, mix_tokenizers=args.mix_tokenizers,
                         seed=args.seed)
    options.validate()
    tables = [s for s in args.sources if Path(s).suffix in (".csv", ".jsonl")]
    if tables and len(tables) != len(args.sources):
        raise ScalingInputError("give run directories or tables, not both")
    if tables:
        points, runs = [p for t in tables for p in load_table(t)], []
    else:
        points, runs = load_runs(args.sources, loss=args.loss)
    analysis = analyse(points, runs, list(args.sources), options)
    written = write_report(analysis, args.out)
    print(summary(analysis))
    print(f"report          {written['report']}")
    return 0


def _slurm_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch-job options `submit slurm` and `scaling run --slurm` share (launcher.slurm.SlurmJob)."""
    parser.add_argument("--cpus-per-task", type=int, default=1)
    parser.add_argument("--time", default="01:00:00", help="the job's (each task's) time limit (default 01:00:00)")
    parser.add_argument("--signal-seconds", type=int, default=120,
                        help="checkpoint and requeue this long before the time limit (default 120)")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                        help="one more sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")


def _slurm_job(args, **shape):
    from stratagem.launcher.slurm import SlurmJob

    return SlurmJob(cpus_per_task=args.cpus_per_task, time=args.time, signal_seconds=args.signal_seconds,
                    partition=args.partition, account=args.account, sbatch_args=args.sbatch_arg, **shape)


def _config_argument(parser: argparse.ArgumentParser, default: str = DEFAULT_CONFIG) -> None:
    parser.add_argument("config", nargs="?", default=default,
                        help=f"a .toml file or the name of a shipped config (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    from stratagem.parallel.plan import CHECKPOINTS, DP_KINDS, ENGINES, SCHEDULES, TP_IMPLS, ZERO_STAGES  # no torch

    parser = argparse.ArgumentParser(
        prog="stratagem",
        description="Pretrain dense, MoE and hybrid linear-attention language models.",
        epilog="Any command that reads a config takes overrides such as --train.steps=50 --model.dim=128.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model on one process or, with --nproc / --plan, on local ranks",
                           description="Train from a config file or a named config (default: demo). "
                                       "Writes runs/<run.name>/: config.toml, metrics.jsonl, tensorboard/, "
                                       "checkpoints/step-N/.")
    _config_argument(train)
    train.add_argument("--resume", action="store_true",
                       help="continue from the run's newest complete checkpoint (start fresh if it has none)")
    train.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                       help="stop after this step with a checkpoint (continue later with --resume)")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="local processes (ranks) to train on, gloo on CPUs, NCCL on GPUs (default: one "
                            "process, or the plan's world size)")
    train.add_argument("--plan", default=None, metavar="PLAN_JSON",
                       help="the parallel layout (stratagem plan new/show/check); default with --nproc: "
                            "data parallelism")
    train.set_defaults(func=cmd_train, takes_overrides=True)

    launch = sub.add_parser("launch", help="profile this machine, plan the config per layer, train on local ranks",
                            description="Profile this machine on [launch] ranks local ranks (cached in the "
                                        "profile file), search the fastest per-layer plan that fits, print it, train "
                                        "under it, then compare the measured step time with the prediction and "
                                        "refit the profile's corrections for the next plan.")
    _config_argument(launch, DEFAULT_LAUNCH_CONFIG)
    launch.add_argument("--resume", action="store_true",
                        help="continue from the run's newest complete checkpoint under the run's plan")
    launch.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="stop after this step with a checkpoint (continue later with --resume)")
    launch.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="local ranks to plan for and train on (default: the config's launch.ranks)")
    launch.add_argument("--replan", action="store_true", help="with --resume: search a plan again")
    launch.add_argument("--reprofile", action="store_true", help="measure this machine again")
    launch.set_defaults(func=cmd_launch, takes_overrides=True)

    model = sub.add_parser("model", help="print a model's layer table, parameter counts and FLOPs per token")
    model.add_argument("name", help="a model flavor (e.g. tiny, llama-7b) or a config")
    model.add_argument("--seq-len", type=int, default=0, help="sequence length for attention FLOPs "
                       "(default: the config's data.seq_len)")
    model.set_defaults(func=cmd_model, takes_overrides=True)

    data = sub.add_parser("data", help="train tokenizers and prepare MDS shards").add_subparsers(
        dest="data_command", required=True)
    tokenizer = data.add_parser("tokenizer", help="train a sentencepiece tokenizer (byte fallback, fixed special ids)",
                                description="Train a sentencepiece model on text files and write "
                                            "OUT/tokenizer.model with its card OUT/tokenizer.json.")
    tokenizer.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                           help=".txt, .jsonl or .parquet files (globs allowed)")
    tokenizer.add_argument("--vocab-size", type=int, required=True)
    tokenizer.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    tokenizer.add_argument("--out", required=True, help="folder to write the tokenizer into")
    tokenizer.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
    tokenizer.add_argument("--max-documents", type=int, default=None, help="train on at most this many documents")
    tokenizer.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    tokenizer.set_defaults(func=cmd_data_tokenizer)

    prep = data.add_parser("prepare", help="tokenize text into packed, resumable MDS shards",
                           description="Encode documents (EOS appended), pack them into seq_len + 1 token "
                                       "samples and write OUT/train, OUT/val (MDS) and OUT/manifest.json. "
                                       "Re-running after an interruption resumes where it stopped.")
    prep.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB")
    prep.add_argument("--tokenizer", required=True, help="a folder written by `stratagem data tokenizer`")
    prep.add_argument("--seq-len", type=int, required=True)
    prep.add_argument("--out", required=True)
    prep.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    prep.add_argument("--text-field", default="text")
    prep.add_argument("--workers", type=int, default=2, help="encoding processes (default 2)")
    prep.add_argument("--skip-bad", action="store_true",
                      help="skip malformed JSONL lines (counted and reported) instead of stopping")
    prep.set_defaults(func=cmd_data_prepare)

    synthetic = data.add_parser("synthetic", help="write the synthetic corpus as MDS shards to stream",
                                description="Write the config's synthetic corpus (data.synthetic at data.seq_len) "
                                            "as a prepared dataset: OUT/train, OUT/val (MDS) and OUT/manifest.json, "
                                            "for [[data.mds.streams]]. A finished export of the same settings is "
                                            "kept as it is.")
    _config_argument(synthetic)
    synthetic.add_argument("--out", required=True, help="the folder to write (new, empty or an earlier export)")
    synthetic.add_argument("--train-samples", type=int, default=0,
                           help="training samples (default: what the config's train.steps consume)")
    synthetic.add_argument("--val-samples", type=int, default=512, help="validation samples (default 512)")
    synthetic.set_defaults(func=cmd_data_synthetic, takes_overrides=True)

    convert = sub.add_parser("convert", help="convert data and models from and to other tools' formats").add_subparsers(
        dest="convert_command", required=True)
    megatron = convert.add_parser("megatron-data", help="a Megatron indexed dataset (PREFIX.bin/.idx) to MDS shards",
                                  description="Read PREFIX.bin and PREFIX.idx with megatron-core, follow every "
                                              "document with one EOS (unless it ends with it), pack them into seq_len "
                                              "+ 1 token samples and write OUT/train, OUT/val (MDS) and "
                                              "OUT/manifest.json, as `stratagem data prepare` does. Re-running after "
                                              "an interruption resumes where it stopped.")
    megatron.add_argument("prefix", help="the dataset's path without .bin/.idx")
    megatron.add_argument("--out", required=True, help="the folder to write (new, empty or an earlier conversion)")
    megatron.add_argument("--seq-len", type=int, required=True)
    vocabulary = megatron.add_mutually_exclusive_group()
    vocabulary.add_argument("--tokenizer", default=None, help="the stratagem tokenizer folder the data was made with")
    vocabulary.add_argument("--vocabulary", default=None, metavar="NAME",
                            help="else the name of the tokenizer the data was made with, e.g. gpt2 (with "
                                 "--vocab-size and --eos-id)")
    megatron.add_argument("--vocab-size", type=int, default=None, help="its vocabulary size: every token must be below")
    megatron.add_argument("--eos-id", type=int, default=None, help="its end-of-document token")
    megatron.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    megatron.add_argument("--documents-per-part", type=int, default=10000,
                          help="documents converted (and held in memory) at once (default 10000)")
    megatron.set_defaults(func=cmd_convert_megatron_data)
    export = convert.add_parser("hf-export", help="a checkpoint of a Llama-shaped model to a Hugging Face folder",
                                description="Write the model of CHECKPOINT (<run>/checkpoints/step-N; attention + mlp "
                                            "layers only) to OUT as a Hugging Face LlamaForCausalLM: config.json and "
                                            "model.safetensors.")
    export.add_argument("checkpoint", help="a checkpoint directory, <run>/checkpoints/step-N")
    export.add_argument("--out", required=True, help="the folder to write (new or empty)")
    export.add_argument("--dtype", default="float32", help="the tensors' type: float32 (default), bfloat16 or float16")
    export.set_defaults(func=cmd_convert_hf_export)
    imported = convert.add_parser("hf-import", help="a Hugging Face Llama folder to a stratagem model folder",
                                  description="Read a Hugging Face Llama folder (config.json, safetensors weights) and "
                                              "write OUT/model.toml (the [model] section of a config) and "
                                              "OUT/weights.safetensors (the model's state dict).")
    imported.add_argument("folder", help="a Hugging Face Llama folder")
    imported.add_argument("--out", required=True, help="the folder to write (new or empty)")
    imported.set_defaults(func=cmd_convert_hf_import)
    deepspeed = convert.add_parser("deepspeed", help="a DeepSpeed checkpoint (engine.save_checkpoint) to a stratagem one",
                                   description="Read DeepSpeed's checkpoint DS_DIR/TAG (ZeRO 1, 2 or 3) with DeepSpeed's "
                                               "own tools and write its weights, Adam's moments and step N as the "
                                               "stratagem checkpoint OUT_STEP_DIR (.../step-N) of --config, the "
                                               "config the DeepSpeed run trained. DeepSpeed does not save the rest: "
                                               "the schedule, the optimizer's settings and the data position are "
                                               "those of a run of --config after N steps (its data is read to find "
                                               "the position).")
    deepspeed.add_argument("ds_dir", metavar="DS_DIR", help="the folder DeepSpeed saved into (latest, global_stepN/)")
    deepspeed.add_argument("out", metavar="OUT_STEP_DIR",
                           help="the new checkpoint directory, e.g. runs/NAME/checkpoints/step-N")
    deepspeed.add_argument("--config", required=True,
                           help="a .toml file or the name of a shipped config; overrides --section.key=value follow")
    deepspeed.add_argument("--tag", default=None,
                           help="the checkpoint to read, e.g. global_step1000 (default: the one DS_DIR/latest names)")
    deepspeed.set_defaults(func=cmd_convert_deepspeed, takes_overrides=True)

    profile = sub.add_parser("profile", help="measure this machine for the planner: layer times, collectives, memory",
                             description="Measure, on --ranks local ranks at once (gloo on CPUs), the forward and "
                                         "backward time of every layer type of the model (with and without "
                                         "activation checkpointing), the head, the optimizer step and the "
                                         "collectives, and write a JSON profile. A profile of this machine that "
                                         "already covers the model is reused unless --force.")
    profile.add_argument("--model", default=DEFAULT_CONFIG, metavar="FLAVOR_OR_CONFIG",
                         help="a model flavor or a config (default: demo)")
    profile.add_argument("--ranks", type=int, default=4, help="local ranks to measure on (default 4)")
    profile.add_argument("--seq-len", type=int, default=0,
                         help="tokens per sequence (default: the config's data.seq_len)")
    profile.add_argument("--out", default=None, metavar="PATH",
                         help="the profile file (default: profiles/<hostname>-<ranks>r-<model shape>.json)")
    profile.add_argument("--force", action="store_true", help="measure again even if a matching profile exists")
    profile.set_defaults(func=cmd_profile, takes_overrides=True)

    plan = sub.add_parser("plan", help="write, check and show parallel plans (plan.json)").add_subparsers(
        dest="plan_command", required=True)
    show = plan.add_parser("show", help="print a plan: world, pipeline, predicted figures and a per-layer table")
    show.add_argument("plan", help="a plan .json file")
    show.add_argument("--model", default=None, metavar="FLAVOR_OR_CONFIG",
                      help="check the plan against this model and show its layer types")
    show.set_defaults(func=cmd_plan_show, takes_overrides=True)
    check = plan.add_parser("check", help="validate a plan against a model (and a world size)",
                            description="Validate a plan against a model flavor or config: stages, degrees, "
                                        "the layer types' shardable sizes. Exit status 0 if it is usable, 2 if not.")
    check.add_argument("plan", help="a plan .json file")
    check.add_argument("--model", required=True, metavar="FLAVOR_OR_CONFIG")
    check.add_argument("--world", type=int, default=None, metavar="N",
                       help="the job's number of ranks: must be the plan's world_size")
    check.set_defaults(func=cmd_plan_check, takes_overrides=True)
    new = plan.add_parser("new", help="write a plan giving every layer the same layout",
                          description="Write a uniform plan: PP even pipeline stages of WORLD / PP ranks, each "
                                      "layer on a (WORLD / PP / TP) x TP data x tensor mesh.")
    new.add_argument("--model", required=True, metavar="FLAVOR_OR_CONFIG")
    new.add_argument("--world", type=int, required=True, metavar="N", help="number of ranks")
    new.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    new.add_argument("--pp", type=int, default=1, help="pipeline degree (default 1)")
    new.add_argument("--dp", choices=DP_KINDS, default=None,
                     help="data-parallel kind: ddp replicated, zero2 sharded grads and optimizer, "
                          "fsdp fully sharded (default ddp)")
    new.add_argument("--tp-impl", choices=TP_IMPLS, default="dtensor",
                     help="tensor-parallel layers: dtensor (every layer type) or megatron (megatron-core's, "
                          "attention and mlp; default dtensor)")
    new.add_argument("--zero-stage", type=int, choices=ZERO_STAGES, default=None,
                     help="a DeepSpeed plan instead: the whole model under ZeRO stage 1, 2 or 3 over all ranks")
    new.add_argument("--offload-optimizer", action="store_true",
                     help="DeepSpeed: optimizer states and their update in host memory")
    new.add_argument("--offload-params", action="store_true", help="DeepSpeed stage 3: parameters in host memory")
    new.add_argument("--offload-ratio", type=float, default=1.0,
                     help="DeepSpeed stage 3 with --offload-optimizer: share of the update on the host (default 1)")
    new.add_argument("--deepspeed-config", default="", metavar="JSON",
                     help="DeepSpeed: your DeepSpeed JSON, laid over the generated one")
    new.add_argument("--ep", type=int, default=1, help="expert-parallel degree of the moe layers (default 1)")
    new.add_argument("--checkpoint", choices=CHECKPOINTS, default="none", help="activation checkpointing")
    new.add_argument("--virtual-stages", type=int, default=1, help="model stages per pipeline rank (default 1)")
    new.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    new.add_argument("--micro-batch-size", type=int, default=None,
                     help="sequences per micro-batch over a stage's data-parallel ranks (default: one per rank)")
    new.add_argument("--micro-batches", type=int, default=None, help="micro-batches per step (default: PP)")
    new.add_argument("--out", required=True, help="the plan file to write")
    new.add_argument("--force", action="store_true", help="replace an existing --out")
    new.set_defaults(func=cmd_plan_new, takes_overrides=True)

    search = plan.add_parser("search", help="find the fastest per-layer plan for a cluster or this machine's profile",
                             description="Search, under the cost model, the plan (pipeline, schedule, micro-batches, "
                                         "stage boundaries and per layer tp, dp kind, checkpointing, ep), or a "
                                         "whole-model DeepSpeed ZeRO plan (stage, optimizer and parameter offload), "
                                         "with the shortest predicted step that fits in memory; print it per layer "
                                         "with its predictions beside the best of each engine and the best uniform "
                                         "plan's, and why its engine.")
    search.add_argument("--model", default=DEFAULT_CONFIG, metavar="FLAVOR_OR_CONFIG",
                        help="a model flavor or a config (default: demo)")
    search.add_argument("--cluster", required=True, metavar="SPEC|PROFILE",
                        help="a built-in cluster (h100-sxm, a100-80g), a spec file (.toml/.json) or a profile "
                             "JSON from stratagem profile")
    search.add_argument("--nodes", type=int, default=None, help="nodes of the cluster spec (default: the spec's)")
    search.add_argument("--world", type=int, default=0, help="ranks to plan for (default: the whole cluster)")
    search.add_argument("--global-batch-tokens", type=int, default=0,
                        help="tokens per optimizer step (default: the config's train.global_batch_tokens)")
    search.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: the config's)")
    search.add_argument("--precision", choices=("fp32", "bf16-mixed"), default="fp32",
                        help="fp32: this runtime's float32 AdamW (16 bytes/parameter, 4-byte activations); "
                             "bf16-mixed: bf16 weights and activations, fp32 master and moments (default fp32)")
    search.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES), metavar="ENGINE",
                        help="the engines whose plans to search: native (per-layer plans of this runtime) and "
                             "deepspeed (whole-model ZeRO 1-3 with offload); default both")
    search.add_argument("--out", default=None, help="write the plan here")
    search.add_argument("--force", action="store_true", help="replace an existing --out")
    search.set_defaults(func=cmd_plan_search, takes_overrides=True)

    submit = sub.add_parser("submit", help="submit a training run to a scheduler").add_subparsers(
        dest="submit_command", required=True)
    slurm = submit.add_parser("slurm", help="submit a run as a slurm batch job that checkpoints and requeues "
                                            "itself at its time limit",
                              description="Render the batch script (slurm/train.sbatch: one srun task per rank, "
                                          "--signal=B:USR1 before the time limit, --requeue), write the job's "
                                          "config, plan and script into the run directory and sbatch it. Every "
                                          "start resumes from the run's newest complete checkpoint.")
    _config_argument(slurm)
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--ranks-per-node", type=int, default=1, help="tasks (ranks) per node (default 1)")
    _slurm_job_arguments(slurm)
    slurm.add_argument("--plan", default=None, metavar="PLAN_JSON",
                       help="the parallel layout (default: data parallelism over all ranks)")
    slurm.set_defaults(func=cmd_submit_slurm, takes_overrides=True)

    ray = submit.add_parser("ray", help="submit a run to a Ray cluster, trained by Ray Train workers",
                            description="Write the job's config and plan into the run directory and submit it "
                                        "through Ray's job submission API; the job runs a TorchTrainer whose "
                                        "workers are the run's ranks and restart from the newest checkpoint "
                                        "when one dies.")
    _config_argument(ray)
    ray.add_argument("--address", required=True, help="the cluster's dashboard address, e.g. http://127.0.0.1:8265")
    ray.add_argument("--workers", type=int, default=2, help="Ray Train workers, one rank each (default 2)")
    ray.add_argument("--plan", default=None, metavar="PLAN_JSON",
                     help="the parallel layout (default: data parallelism over the workers)")
    ray.add_argument("--follow", action="store_true", help="print the job's logs until it ends")
    ray.set_defaults(func=cmd_submit_ray, takes_overrides=True)

    scaling = sub.add_parser("scaling", help="scaling-law ladders and fits").add_subparsers(
        dest="scaling_command", required=True)
    ladder = scaling.add_parser("ladder", help="design a sweep of model sizes x compute budgets (IsoFLOP)",
                                description="Write OUT/ladder.json and one config per run (OUT/configs) from a "
                                            "base config: sizes spanning --span decades of non-embedding N, each "
                                            "budget spent by every size that gets enough steps. With "
                                            "train.schedule = wsd every size trains once and the smaller budgets "
                                            "are decay branches from its checkpoints.")
    _config_argument(ladder)
    ladder.add_argument("--budget", type=float, nargs="+", required=True, metavar="FLOPS",
                        help="compute budgets in training FLOPs, e.g. 2.5e11 5e11 1e12")
    ladder.add_argument("--family", default="", metavar="FLAVOR",
                        help="the model family: a flavor whose shape is the smallest rung (default: the config's model)")
    ladder.add_argument("--sizes", type=int, default=5, help="model sizes (default 5)")
    ladder.add_argument("--span", type=float, default=1.5, help="decades of N from smallest to largest (default 1.5)")
    ladder.add_argument("--out", required=True, help="the ladder's folder")
    ladder.set_defaults(func=cmd_scaling_ladder, takes_overrides=True)

    run = scaling.add_parser("run", help="train a ladder's runs, here one after another or as a slurm array",
                             description="Train every run of the ladder in OUT (main runs before their decay "
                                         "branches), skipping finished runs and resuming partial ones; or with "
                                         "--slurm submit an array job with one task per size, with --ray one Ray "
                                         "job per size.")
    run.add_argument("out", help="the ladder's folder (stratagem scaling ladder --out)")
    run.add_argument("--only", nargs="+", default=[], metavar="RUN", help="train only these runs")
    run.add_argument("--size", type=int, default=None, help="train one size's runs (a slurm array task)")
    run.add_argument("--slurm", action="store_true", help="submit the ladder as a slurm array job")
    run.add_argument("--ray", default="", metavar="ADDRESS",
                     help="submit one Ray job per size to the cluster at ADDRESS (its dashboard, e.g. "
                          "http://127.0.0.1:8265)")
    run.add_argument("--follow", action="store_true", help="with --ray: print the jobs' logs until they end")
    _slurm_job_arguments(run)
    run.set_defaults(func=cmd_scaling_run)

    fit = scaling.add_parser("fit", help="fit scaling laws to run directories or a table; write a report",
                             description="Approach 3 (L = E + A/N^alpha + B/D^beta, Huber on log loss, L-BFGS "
                                         "from a grid, bootstrap intervals), approach 2 (IsoFLOP parabolas) and "
                                         "approach 1 (envelope of training curves), compute-optimal allocation; "
                                         "writes OUT/report.md, OUT/fit.json and PNG plots.")
    fit.add_argument("sources", nargs="+", metavar="RUNS_OR_TABLE",
                     help="run directories, folders of runs (a ladder's OUT/runs), or CSV/JSONL tables with "
                          "columns params, tokens, loss (flops, run, family, weight optional)")
    fit.add_argument("--out", required=True, help="the report's folder")
    fit.add_argument("--params", default="non_embedding", choices=("total", "non_embedding", "active"),
                     help="which parameter count is N (default non_embedding; active for MoE)")
    fit.add_argument("--points", default="auto", choices=("auto", "all", "final", "decay-ends"),
                     help="which points approach 3 and 2 fit (default auto: the ends of decays if any run "
                          "decays, else all)")
    fit.add_argument("--loss", default="eval_loss", choices=("eval_loss", "loss"),
                     help="runs: the held-out loss (default) or the training loss")
    fit.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    fit.add_argument("--grid", default="default", choices=("default", "hoffmann"),
                     help="starts of L-BFGS: default 675, hoffmann 4500")
    fit.add_argument("--pin", action="append", default=[], metavar="NAME=VALUE",
                     help="hold a parameter of the law, e.g. --pin E=1.69 (repeatable)")
    fit.add_argument("--target-flops", type=float, default=None,
                     help="the budget to allocate (default 100 x the largest compute fitted)")
    fit.add_argument("--mix-tokenizers", action="store_true",
                     help="fit runs of different tokenizers together (their losses are not comparable)")
    fit.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    fit.set_defaults(func=cmd_scaling_fit)

    config = sub.add_parser("config", help="print the resolved config (after flavor and overrides)")
    config.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    config.set_defaults(func=cmd_config, takes_overrides=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    overrides = _split_overrides(parser, extra)
    try:
        return args.func(args, overrides)
    except StratagemError as err:
        print(f"stratagem: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stratagem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
