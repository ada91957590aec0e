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
            yield rec


def prepare_tokenizer(spec: JobSpec, train_records: list[dict[str, Any]], out_dir: Path):
    """The job's tokenizer, saved to out_dir."""
    from .model.tokenizer import BiomedGPTTokenizer
    from .tasks import get_task

    t = spec.model.tokenizer
    if t.path:
        tok = BiomedGPTTokenizer.from_pretrained(t.path)
    elif t.vocab:
        tok = BiomedGPTTokenizer.from_bpe_files(t.vocab, t.merges)
    else:
        task = get_task(spec.data.task)
        texts = []
        for rec in train_records:
            ex = task.example(rec)
            texts += [ex.instruction, ex.target]
        tok = BiomedGPTTokenizer.train(texts, vocab_size=t.train_vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


def model_config_for(spec: JobSpec, vocab_size: int) -> dict[str, Any]:
    from .model import BiomedGPTConfig

    if spec.model.init:
        cfg = BiomedGPTConfig.from_pretrained(spec.model.init)
    else:
        overrides = dict(spec.model.overrides)
        overrides["vocab_size"] = vocab_size
        if spec.trainer.dropout is not None:
            overrides["dropout"] = spec.trainer.dropout
        cfg = BiomedGPTConfig.from_size(spec.model.size, **overrides)
    if cfg.vocab_size != vocab_size:
        raise ValueError(f"{spec.source}: model.init has a vocabulary of {cfg.vocab_size} ids but the tokenizer has "
                         f"{vocab_size}; give the tokenizer that belongs to the initial checkpoint")
    return json.loads(cfg.to_json_string(use_diff=False))


def _dir_bytes(directory: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.name}": p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# -- the job --------------------------------------------------------------------------------------


def run_training(spec: JobSpec, *, num_cpus: int | None = None) -> RunResult:
    """Train (or resume) the spec's run; export and evaluate the result."""
    import ray

    from .data.stream import list_shards
    from .train.checkpoints import export_checkpoint
    from .train.ray_trainer import fit

    assert spec.data is not None
    run_dir = Path(spec.run_dir)
    if "://" in spec.output.storage and not spec.output.storage.startswith("file://"):
        raise ValueError(f"{spec.source}: output.storage: remote run storage for the local runner arrives with "
                         "the cluster training work; use a local path here")
    run_dir.mkdir(parents=True, exist_ok=True)
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
    answers = sorted({str(r.get("answer", "")).strip().lower() for r in train_recs if r.get("answer") is not None})
    (run_dir / "assets" / "answers.json").write_text(json.dumps(answers, indent=0))
    model_config = model_config_for(spec, len(tok))

    started = ensure_ray(num_cpus)
    try:
        groups = [(list_shards(spec.data.shards, r.dataset, r.split), r.weight) for r in spec.data.train]
        t = spec.trainer
        assets = _dir_bytes(tok_dir, "tokenizer")
        assets["answers.json"] = (run_dir / "assets" / "answers.json").read_bytes()
        config = {
            "trainer": {k: getattr(t, k) for k in (
                "strategy", "use_gpu", "precision", "batch_size", "grad_accumulation", "max_steps", "lr",
                "warmup_ratio", "weight_decay", "adam_betas", "adam_eps", "clip_grad_norm", "label_smoothing",
                "seed", "checkpoint_every", "checkpoint_format", "log_every")},
            "model_config": model_config,
            "init_dir": spec.model.init,
            "log_dir": str((run_dir / "logs").resolve()),
            "torch_threads": t.torch_threads or (max(1, int(t.cpus_per_worker)) if not t.use_gpu else 4),
            "data": {
                "groups": groups,
                "shuffle_buffer": spec.data.shuffle_buffer,
                "preprocess": dict(task_name=spec.data.task, tokenizer_dir=str(tok_dir.resolve()),
                                   image_size=spec.model.image_size, max_source_length=spec.data.max_source_length,
                                   max_target_length=spec.data.max_target_length),
            },
            "checkpoint_meta": {"run": spec.name, "team": spec.team, "size": spec.model.size,
                                "model_config": model_config, "task": spec.data.task,
                                "image_size": spec.model.image_size,
                                "max_source_length": spec.data.max_source_length,
                                "train_data": [f"{r.dataset}/{r.split}" for r in spec.data.train]},
            "assets": assets,
        }
        say(f"training: {t.workers} worker(s), {t.strategy}, {t.max_steps} steps of batch {t.batch_size} per worker"
            f" -> {run_dir}")
        result = fit(config, run_name=spec.name, storage=str(run_dir.parent.resolve()),
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
        from .evaluate.predict import evaluate_model_dir

        res.evaluation = evaluate_model_dir(export_dir, spec, out_dir=run_dir / "eval")
    (run_dir / "result.json").write_text(json.dumps(res.__dict__, indent=2, default=str))
    return res


def run(spec: JobSpec) -> RunResult:
    """Admit the spec (cluster/tenants.yaml: datasets the team may read, prefixes it may write),
    then run it."""
    from .tenancy import admit, load_tenants

    admit(spec, load_tenants())
    if spec.kind in ("finetune", "pretrain"):
        return run_training(spec)
    if spec.kind == "evaluate":
        from .evaluate.predict import evaluate_model_dir

        if not spec.model.init:
            raise ValueError(f"{spec.source}: model.init: an evaluate job needs the model directory to evaluate")
        out = Path(spec.run_dir) / "eval"
        return RunResult(run_dir=spec.run_dir, export_dir=spec.model.init,
                         evaluation=evaluate_model_dir(Path(spec.model.init), spec, out_dir=out))
    raise ValueError(f"{spec.source}: kind {spec.kind!r} is run with `biomedgpt serve SPEC`")
