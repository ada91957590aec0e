"""`biomedgpt run SPEC`: carry out a validated job spec.

finetune/pretrain: admit -> build missing shards (when the spec names native sources) -> plan (records,
tokenizer, mixing, steps: train/plan.py) -> fit on Ray Train (Lightning, FSDP2 or DDP) with step
checkpoints in `<storage>/<team>/<name>/` -> report -> export of the latest checkpoint to `<run>/export/`
-> evaluation on the spec's splits (`<run>/eval/`). Running the same spec again resumes from the latest
checkpoint. evaluate: a model directory x the spec's datasets (evaluate/job.py). serve: `biomedgpt serve`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from .audit import audited_admit
from .console import libraries_to_file
from .data import storage as st
from .data.build import build_shards
from .evaluate.job import run_evaluate_job, run_evaluation
from .modeldir import export_checkpoint, merge_adapter
from .session import RunResult, ensure_ray, keep_ray_logs, localize, say, staging_dir
from .spec import JobSpec
from .tenancy import load_tenants
from .train.plan import plan_training
from .train.recipe import local_dir
from .train.report import write_report


def run(spec: Any) -> RunResult:
    """Admit the spec (cluster/tenants.yaml: datasets the team may read, prefixes it may write),
    then run it."""
    if spec.kind == "serve":
        raise ValueError(f"{spec.source}: a serving spec is run with `biomedgpt serve {spec.source}` "
                         "(or deployed with `biomedgpt serve-config`), not `biomedgpt run`")
    spec = localize(spec)  # relative paths -> absolute, once, here: every process of the job opens the same files
    audited_admit("run", spec, load_tenants())  # the decision goes to the audit trail either way
    if spec.kind in ("finetune", "pretrain"):
        return run_training(spec)
    if spec.kind == "evaluate":
        return run_evaluate_job(spec)  # model.init x data.eval -> <run>/results.{md,json}, report.html
    raise ValueError(f"{spec.source}: unknown job kind {spec.kind!r}")


def run_training(spec: JobSpec, *, num_cpus: int | None = None) -> RunResult:
    """Train (or resume) the spec's run; export and evaluate the result. One Ray session serves the
    training and the evaluation after it (when this call starts Ray, it stops it at the end)."""
    # The run lives at its URL (local or object storage). Ray Train writes checkpoints there itself;
    # everything else (assets, logs, report, export, evaluation) is made in run_dir, which is the URL's
    # folder when that is local, else a staging folder uploaded to the URL as the job goes.
    run_dir = st.local_path(spec.run_dir) if st.is_local(spec.run_dir) else staging_dir(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    if libraries_to_file(run_dir / "logs" / "driver.log"):
        say(f"logs: Ray's, Lightning's and torch's own logs go to {run_dir / 'logs'} (--verbose shows them here)")
    started = ensure_ray(num_cpus)
    import ray  # after ensure_ray: Ray reads its environment when imported

    try:
        return _train_export_evaluate(spec, run_dir)
    finally:
        if started:
            keep_ray_logs(run_dir / "logs")
            ray.shutdown()


def _train_export_evaluate(spec: JobSpec, run_dir: Path) -> RunResult:
    # imports Ray: only once ensure_ray has set its environment
    from .train.progress import ProgressView
    from .train.ray_trainer import fit

    assert spec.data is not None
    run_url = spec.run_dir
    remote = not st.is_local(run_url)
    if remote and (pulled := st.download_dir(st.join(run_url, "logs"), run_dir / "logs")):
        say(f"storage: resuming {run_url}: {pulled} log file(s) of earlier attempts fetched")
    (run_dir / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
    t0 = time.time()
    for dataset, source in spec.data.build.items():  # native sources whose shards are not complete yet
        say(f"shards: {dataset} from {source} -> {spec.data.shards}")
        build_shards(dataset, source, spec.data.shards, shard_max_samples=spec.data.shard_max_samples)
    plan = plan_training(spec, run_dir, log_url=st.join(run_url, "logs") if remote else None,
                         storage=run_url.rsplit("/", 1)[0] if remote else None)
    t = plan.trainer
    say(f"training: {t.workers} worker(s), {t.strategy}, {plan.max_steps} steps of batch {t.batch_size} per worker"
        f" -> {run_url}")
    if remote:
        st.upload_dir(run_dir, run_url)  # spec.json and assets beside the checkpoints from the start
    with ProgressView(plan.max_steps) as view:  # the workers' progress, drawn here
        result = fit(plan, progress=view.inbox)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    train_seconds = time.time() - t0
    say(f"training done in {train_seconds:.0f} s; latest checkpoint {result.checkpoint.path}")

    if remote:
        st.download_dir(st.join(run_url, "logs"), run_dir / "logs")
    final = write_report(run_dir, extra={"seconds": round(train_seconds, 1)})
    say(f"report: {run_dir / 'report.md'} (loss {final.get('first_loss', float('nan')):.3f} -> "
        f"{final.get('train/loss', float('nan')):.3f}; curves in loss.png, lr.png)")
    export_dir = run_dir / "export"
    with result.checkpoint.as_directory() as ckpt_dir:
        if export_dir.exists():
            shutil.rmtree(export_dir)
        export_checkpoint(ckpt_dir, export_dir)
    evaluated = export_dir
    if plan.adapter:
        say(f"exported adapter to {export_dir} (base {plan.adapter['base']['id'] or plan.adapter['base']['init']})")
        if spec.evaluate.enabled and (spec.data.eval or spec.data.train):
            # evaluation reads model directories: the adapter folded into its base (the same outputs, to 1e-5)
            evaluated = merge_adapter(export_dir, local_dir(spec.model.init), run_dir / "eval-model")
    else:
        say(f"exported model to {export_dir}")
    res = RunResult(run_dir=str(run_dir), checkpoint=result.checkpoint.path, export_dir=str(export_dir),
                    metrics=dict(result.metrics or {}))
    if spec.evaluate.enabled and (spec.data.eval or spec.data.train):
        res.evaluation = run_evaluation(spec, str(evaluated), run_dir / "eval")
    if remote:
        res.run_dir, res.export_dir = run_url, st.join(run_url, "export")
        res.checkpoint = f"{run_url.split('://', 1)[0]}://{result.checkpoint.path}"
    (run_dir / "result.json").write_text(json.dumps(res.__dict__, indent=2, default=str))
    if remote:
        say(f"storage: {st.upload_dir(run_dir, run_url)} file(s) of the report, export and evaluation uploaded "
            f"to {run_url}")
    return res
