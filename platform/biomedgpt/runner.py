"""`biomedgpt run SPEC`: carry out a validated job spec.

finetune/pretrain: build missing shards (when the spec names native sources) -> tokenizer -> Ray
Data stream -> Ray Train (Lightning, FSDP2 or DDP) with step checkpoints in `<storage>/<team>/<name>/`
-> export of the latest checkpoint to `<run>/export/` -> evaluation on the spec's splits
(`<run>/eval/`). Running the same spec again resumes from the latest checkpoint.
evaluate: a model directory x the spec's datasets -> metrics. serve: see `biomedgpt serve`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .spec import JobSpec


def say(msg: str) -> None:
    print(f"[biomedgpt] {msg}", flush=True)


@dataclass
class RunResult:
    run_dir: str
    checkpoint: str | None = None
    export_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)


# -- Ray ------------------------------------------------------------------------------------------


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Connect to the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local Ray on
    127.0.0.1 with its dashboard (Ray Train needs it). Returns True when this call started Ray."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return True
    port = free_port()
    # Train workers ask the dashboard's state API whether the controller lives (FIELD_NOTES): they get
    # its address through the runtime env only, so nothing started later by this process inherits it.
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                                       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}},
             log_to_driver=True, configure_logging=False)
    return True


# Ports Ray components take by default; an ephemeral port handed to Ray must not be one of them.
RAY_DEFAULT_PORTS = frozenset({6379, 8076, 8265, 10001, 44217, 44227, 52365, 52366, 62365})


def multi_label_meta(train_recs: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"multi_label": True, "classes": [...]}` (class order) when the training records include multi-label
    classification ones (ChestMNIST), else {}: serving decodes such a model's label set as a list."""
    from .tasks.classify import multi_label_classes

    classes = multi_label_classes(train_recs)
    return {"multi_label": True, "classes": classes} if classes else {}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that no Ray component claims by default."""
    import socket

    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


# -- data -----------------------------------------------------------------------------------------


def build_missing_shards(spec: JobSpec) -> None:
    """Convert the native sources listed in `data.build` whose shards are not complete yet."""
    from .data.build import build_shards

    assert spec.data is not None
    for dataset, source in spec.data.build.items():
        say(f"shards: {dataset} from {source} -> {spec.data.shards}")
        build_shards(dataset, source, spec.data.shards, shard_max_samples=spec.data.shard_max_samples)


def records(shards_root: str, dataset: str, split: str) -> Iterator[dict[str, Any]]:
    """Decoded shard records (json fields, plus `_image` bytes when present) of one split."""
    from .data.shards import read_shard
    from .data.stream import list_shards

    for shard in list_shards(shards_root, dataset, split):
        for sample in read_shard(shard.url):
            rec = json.loads(sample["json"])
            rec["_image"] = sample.get("jpg") or sample.get("png")
            if sample.get("codes.npy") is not None and "codes" not in rec:
                rec["codes"] = sample["codes.npy"]  # VQGAN codes (image infilling) as .npy bytes
            yield rec


def prepare_tokenizer(spec: JobSpec, train_records: list[dict[str, Any]], out_dir: Path):
    """The job's tokenizer, saved to out_dir."""
    from .model.tokenizer import BiomedGPTTokenizer
    from .train.recipe import TaskExamples, local_dir, local_file

    t = spec.model.tokenizer
    if t.path:
        tok = BiomedGPTTokenizer.from_pretrained(local_dir(t.path))
    elif t.vocab:
        tok = BiomedGPTTokenizer.from_bpe_files(local_file(t.vocab), local_file(t.merges))
    else:
        examples = TaskExamples(spec.data.task)  # the spec's family, or each record's own
        texts = []
        for rec in train_records:
            _, ex = examples.example(rec)
            texts += [ex.instruction, ex.target]
        tok = BiomedGPTTokenizer.train(texts, vocab_size=t.train_vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


def model_config_for(spec: JobSpec, vocab_size: int) -> dict[str, Any]:
    from .model import BiomedGPTConfig

    overrides = dict(spec.model.overrides)
    if spec.trainer.dropout is not None:
        overrides["dropout"] = spec.trainer.dropout
    if spec.model.init:
        from .train.recipe import local_dir

        # the initial checkpoint's architecture; overrides (dropout, drop-path rates) apply on top
        cfg = BiomedGPTConfig.from_pretrained(local_dir(spec.model.init), **overrides)
    else:
        overrides["vocab_size"] = vocab_size
        cfg = BiomedGPTConfig.from_size(spec.model.size, **overrides)
    if cfg.vocab_size != vocab_size:
        raise ValueError(f"{spec.source}: model.init has a vocabulary of {cfg.vocab_size} ids but the tokenizer has "
                         f"{vocab_size}; give the tokenizer that belongs to the initial checkpoint")
    return json.loads(cfg.to_json_string(use_diff=False))


def _dir_bytes(directory: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.name}": p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# -- the job --------------------------------------------------------------------------------------


def run_training(spec: JobSpec, *, num_cpus: int | None = None) -> RunResult:
    """Train (or resume) the spec's run; export and evaluate the result. One Ray session serves the
    training and the evaluation after it (when this call starts Ray, it stops it at the end)."""
    import ray

    started = ensure_ray(num_cpus)
    try:
        return _train_export_evaluate(spec, num_cpus=num_cpus)
    finally:
        if started:
            ray.shutdown()


def _train_export_evaluate(spec: JobSpec, *, num_cpus: int | None = None) -> RunResult:
    import ray

    from .data.stream import list_shards
    from .modeldir import export_checkpoint
    from .train.ray_trainer import fit

    assert spec.data is not None
    from .data import storage as st

    # The run lives at run_url (local or object storage). Ray Train writes checkpoints there itself;
    # everything else (assets, logs, report, export, evaluation) is made in run_dir, which is run_url
    # when that is local, else a staging folder uploaded to run_url as the job goes.
    run_url = spec.run_dir
    remote = not st.is_local(run_url)
    run_dir = staging_dir(spec) if remote else st.local_path(run_url)
    run_dir.mkdir(parents=True, exist_ok=True)
    if remote:
        pulled = st.download_dir(st.join(run_url, "logs"), run_dir / "logs")
        if pulled:
            say(f"storage: resuming {run_url}: {pulled} log file(s) of earlier attempts fetched")
    (run_dir / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
    t0 = time.time()
    if spec.data.build:
        build_missing_shards(spec)
    train_recs = [r for ref in spec.data.train for r in records(spec.data.shards, ref.dataset, ref.split)]
    say(f"data: {len(train_recs)} training records from "
        + ", ".join(f"{r.dataset}/{r.split}" for r in spec.data.train))
    tok_dir = run_dir / "assets" / "tokenizer"
    tok = prepare_tokenizer(spec, train_recs, tok_dir)
    say(f"tokenizer: {len(tok)} ids (saved to {tok_dir})")
    from .train.recipe import answer_candidates, candidate_label_ids, mixing_weights, steps_for_epochs

    # answer candidates of the constrained tasks: the trie of evaluation and of constrained training
    candidates = answer_candidates(spec.data.task, train_recs)
    answers = sorted({a for task_answers in candidates.values() for a in task_answers})
    (run_dir / "assets" / "answers.json").write_text(json.dumps(answers, indent=0))
    (run_dir / "assets" / "candidates.json").write_text(json.dumps(candidates, indent=1))
    model_config = model_config_for(spec, len(tok))

    started = ensure_ray(num_cpus)
    try:
        shard_lists = [list_shards(spec.data.shards, r.dataset, r.split) for r in spec.data.train]
        weights = mixing_weights(spec.data.train, shard_lists, spec.data.group_ratios)
        groups = list(zip(shard_lists, weights))
        t = spec.trainer
        from .data.stream import ErrorBudget

        budget = ErrorBudget(spec.data.max_bad_samples, spec.data.max_bad_fraction)
        max_steps = t.max_steps or steps_for_epochs(groups, t.epochs, world=t.workers, batch_size=t.batch_size,
                                                    grad_accumulation=t.grad_accumulation, seed=t.seed, budget=budget)
        if t.epochs is not None:
            say(f"schedule: {t.epochs:g} epoch(s) = {max_steps} optimizer steps (from the manifests' sample counts)")
        assets = _dir_bytes(tok_dir, "tokenizer")
        assets["answers.json"] = (run_dir / "assets" / "answers.json").read_bytes()
        assets["candidates.json"] = (run_dir / "assets" / "candidates.json").read_bytes()
        constrained = [a for task_answers in candidates.values() for a in task_answers]
        config = {
            "trainer": dict({k: getattr(t, k) for k in (
                "strategy", "use_gpu", "precision", "batch_size", "grad_accumulation", "lr",
                "warmup_ratio", "weight_decay", "adam_betas", "adam_eps", "clip_grad_norm", "label_smoothing",
                "seed", "checkpoint_every", "checkpoint_format", "log_every", "drop_worst_ratio", "drop_worst_after",
                "decoder_noise", "freeze_token_embeddings")},
                max_steps=max_steps, ema_decay=t.ema.decay if t.ema.enabled else None,
                # OFA's noise and smoothing tokens are text tokens: ids below the first image code
                noise_vocab_end=tok.code_offset if tok.num_codes else len(tok),
                constraint_candidates=candidate_label_ids(tok, constrained, spec.data.max_target_length)
                if t.label_smoothing_candidates and constrained else None),
            "model_config": model_config,
            "init_dir": spec.model.init,
            "log_dir": str((run_dir / "logs").resolve()),
            # on object storage, rank 0 uploads its logs here at every checkpoint and at the end
            "log_url": st.join(run_url, "logs") if remote else None,
            "torch_threads": t.torch_threads or (max(1, int(t.cpus_per_worker)) if not t.use_gpu else 4),
            "data": {
                "groups": groups,
                "shuffle_buffer": spec.data.shuffle_buffer,
                "preprocess": dict(task_name=spec.data.task, tokenizer_dir=str(tok_dir.resolve()),
                                   image_size=spec.model.image_size, max_source_length=spec.data.max_source_length,
                                   max_target_length=spec.data.max_target_length,
                                   augment=spec.data.augment.to_config(),
                                   # the pretraining family draws each record's objective from the seed
                                   task_options={"seed": t.seed} if spec.data.task == "pretrain" else None),
                "error_budget": {"max_bad_samples": spec.data.max_bad_samples,
                                 "max_bad_fraction": spec.data.max_bad_fraction},
            },
            "checkpoint_meta": {"run": spec.name, "team": spec.team, "size": spec.model.size,
                                "model_config": model_config, "task": spec.data.task, "ema": t.ema.enabled,
                                "image_size": spec.model.image_size,
                                "max_source_length": spec.data.max_source_length,
                                "train_data": [f"{r.dataset}/{r.split}" for r in spec.data.train],
                                **multi_label_meta(train_recs)},
            "assets": assets,
            # evaluation during training (evaluate.every_n_steps > 0), planned here: the workers only decode
            "evaluate": _training_eval_config(spec, answers),
        }
        say(f"training: {t.workers} worker(s), {t.strategy}, {max_steps} steps of batch {t.batch_size} per worker"
            f" -> {run_url}")
        if remote:
            st.upload_dir(run_dir, run_url)  # spec.json and assets beside the checkpoints from the start
        parent = run_url.rsplit("/", 1)[0] if remote else str(run_dir.parent.resolve())
        result = fit(config, run_name=spec.name, storage=parent,
                     workers=t.workers, use_gpu=t.use_gpu, cpus_per_worker=t.cpus_per_worker,
                     max_failures=t.max_failures, num_to_keep=t.num_to_keep)
    finally:
        if started:
            ray.shutdown()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    train_seconds = time.time() - t0
    say(f"training done in {train_seconds:.0f} s; latest checkpoint {result.checkpoint.path}")
    if remote:
        st.download_dir(st.join(run_url, "logs"), run_dir / "logs")
    from .train.report import write_report

    final = write_report(run_dir, extra={"seconds": round(train_seconds, 1)})
    say(f"report: {run_dir / 'report.md'} (loss {final.get('first_loss', float('nan')):.3f} -> "
        f"{final.get('train/loss', float('nan')):.3f}; curves in loss.png, lr.png)")
    export_dir = run_dir / "export"
    with result.checkpoint.as_directory() as ckpt_dir:
        if export_dir.exists():
            shutil.rmtree(export_dir)
        export_checkpoint(ckpt_dir, export_dir)
    say(f"exported model to {export_dir}")
    res = RunResult(run_dir=str(run_dir), checkpoint=result.checkpoint.path, export_dir=str(export_dir),
                    metrics=dict(result.metrics or {}))
    if spec.evaluate.enabled and (spec.data.eval or spec.data.train):
        from .evaluate.job import run_evaluation

        res.evaluation = run_evaluation(spec, str(export_dir), run_dir / "eval")
    if remote:
        scheme = run_url.split("://", 1)[0]
        res.run_dir, res.export_dir = run_url, st.join(run_url, "export")
        res.checkpoint = f"{scheme}://{result.checkpoint.path}"
    (run_dir / "result.json").write_text(json.dumps(res.__dict__, indent=2, default=str))
    if remote:
        n = st.upload_dir(run_dir, run_url)
        say(f"storage: {n} file(s) of the report, export and evaluation uploaded to {run_url}")
    return res


def _training_eval_config(spec: JobSpec, answers: list[str]) -> dict[str, Any] | None:
    from .evaluate.job import training_eval_config

    return training_eval_config(spec, model_answers=answers)


def staging_dir(spec: JobSpec) -> Path:
    """The local folder where a run on object storage makes its files before uploading them
    ($BIOMEDGPT_STAGING, default <tmp>/biomedgpt-staging/<team>/<name>)."""
    base = Path(os.environ.get("BIOMEDGPT_STAGING") or Path(tempfile.gettempdir()) / "biomedgpt-staging")
    return base / spec.team / spec.name


def run(spec: JobSpec) -> RunResult:
    """Admit the spec (cluster/tenants.yaml: datasets the team may read, prefixes it may write),
    then run it."""
    from .tenancy import admit, load_tenants

    if spec.kind == "serve":
        raise ValueError(f"{spec.source}: a serving spec is run with `biomedgpt serve {spec.source}` "
                         "(or deployed with `biomedgpt serve-config`), not `biomedgpt run`")
    admit(spec, load_tenants())
    if spec.kind in ("finetune", "pretrain"):
        return run_training(spec)
    if spec.kind == "evaluate":
        from .evaluate.job import run_evaluate_job

        return run_evaluate_job(spec)  # model.init x data.eval -> <run>/results.{md,json}, report.html
    raise ValueError(f"{spec.source}: unknown job kind {spec.kind!r}")
