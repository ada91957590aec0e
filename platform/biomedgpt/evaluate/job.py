"""The evaluation job: one model x a list of datasets (each with its own task) -> predictions, metrics,
a results table (results.md, results.json) and an HTML report (report.html).

1. Plan (driver, before any model is loaded): each dataset's task and metrics from its dataset spec
   (`datasets_spec/<name>.yaml`; records name their task too), its shards, the answer candidates of
   its policy (`candidates.py`) and its decoding (the task's `decode_plan`). Every problem of every
   dataset is reported at once, naming the dataset and split.
2. Predict (Ray): `evaluate.concurrency` actors, each loading the model once (shipped through Ray's
   object store, so workers on other nodes need no shared disk) into a `biomedgpt.inference.Predictor`
   on `evaluate.device` in `evaluate.dtype`, take whole shards from a queue and return their
   predictions (and image thumbnails of the first shard for the report).
3. Score (driver): the predictions and references are written as the JSON Lines files that
   `biomedgpt score` reads and scored by the same function (`score.score_predictions`), so the job's
   metrics are by construction those of `biomedgpt score --task T --predictions P --references R` on
   its files.

Outputs in `out_dir`: predictions/<dataset>-<split>.jsonl, references/<dataset>-<split>.jsonl,
results.json, results.md, report.html and metrics.json ({"<dataset>/<split>": metrics}).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..modeldir import CONFIG, MODEL_FILES, WEIGHTS, export_checkpoint, materialise, read_model_meta
from ..console import Progress, libraries_to_file
from ..session import RunResult, ensure_ray, keep_ray_logs, say, staging_dir
from ..tasks import DecodePlan, evaluated_task_names, get_task
from .candidates import (Candidates, EvaluationError, answer_candidates, list_split_shards, load_dataset_spec_or_none,
                         shard_records)
from .score import score_predictions


@dataclass
class EvalEntry:
    """One dataset split to evaluate and how."""

    dataset: str
    split: str
    task: str
    shard_urls: list[str]
    shard_samples: list[int]
    limit: int
    plan: DecodePlan
    metric_names: list[str]
    image_size: int
    candidates: Candidates = field(repr=False, default_factory=lambda: Candidates(None, "none"))

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.split}"

    @property
    def stem(self) -> str:
        return f"{self.dataset}-{self.split}"

    def units(self) -> list[tuple[str, int | None]]:
        """(shard url, how many of its samples) in order, honouring the cap."""
        out: list[tuple[str, int | None]] = []
        left = self.limit or None
        for url, n in zip(self.shard_urls, self.shard_samples):
            if left is not None and left <= 0:
                break
            take = n if left is None else min(n, left)
            out.append((url, None if take == n else take))
            if left is not None:
                left -= take
        return out

    @property
    def count(self) -> int:
        return sum(n if take is None else take for (_, take), n in zip(self.units(), self.shard_samples))


# -- 1. plan ----------------------------------------------------------------------------------------


def selected_refs(spec) -> list[Any]:
    """The DatasetRefs `evaluate.splits` selects: "train" = data.train, other names = data.eval entries
    of that split (in the order of the spec)."""
    refs: list[Any] = []
    for split in spec.evaluate.splits:
        chosen = spec.data.train if split == "train" else [r for r in spec.data.eval if r.split == split]
        for r in chosen:
            if all((r.dataset, r.split) != (x.dataset, x.split) for x in refs):
                refs.append(r)
    return refs


def plan_entries(spec, refs: list[Any] | None = None, *, model_answers: list[str] | None = None,
                 limit: int | None = None) -> list[EvalEntry]:
    """Plan every selected dataset (see the module docstring); raises one EvaluationError listing every
    dataset that cannot be evaluated."""
    ev = spec.evaluate
    refs = selected_refs(spec) if refs is None else refs
    if not refs:
        say(f"evaluate: evaluate.splits {ev.splits} select no dataset of data.train / data.eval: nothing to evaluate")
        return []
    entries, problems = [], []
    for ref in refs:
        where = f"{ref.dataset}/{ref.split}"
        try:
            dspec = load_dataset_spec_or_none(ref.dataset)
            shards = list_split_shards(spec.data.shards, ref.dataset, ref.split)
            if not shards:
                raise EvaluationError(f"{where}: the split under {spec.data.shards} has no samples")
            first = next(shard_records(spec.data.shards, ref.dataset, ref.split, images=False))
            task = dspec.task if dspec is not None else first.get("task")
            if first.get("task") and task != first["task"]:
                raise EvaluationError(f"{where}: datasets_spec/{ref.dataset}.yaml says task {task!r} but its records "
                                      f"say {first['task']!r}")
            family = get_task(task) if task in evaluated_task_names() else None
            if family is None and any(ref is r for r in spec.data.train) and \
                    all((ref.dataset, ref.split) != (r.dataset, r.split) for r in spec.data.eval):
                say(f"evaluate: {where} skipped: its task {task!r} is a pretraining objective without an evaluation")
                continue
            if family is None:
                raise EvaluationError(f"{where}: task {task!r} has no evaluation (tasks evaluated: "
                                      f"{', '.join(evaluated_task_names())})")
            family.example(first)  # a record the task family cannot read fails here, not in a worker
            cands = answer_candidates(ref.dataset, task, dspec, spec.data.shards, model_answers)
            multi_label = family.multi_label(first)
            if cands.multi_label is not None and cands.multi_label != multi_label:
                raise EvaluationError(
                    f"{where}: the dataset's classes are {'multi-label' if cands.multi_label else 'single-label'} "
                    f"but its records' label_name is {'a list' if multi_label else 'one class name'}: rebuild the "
                    "shards with the dataset's converter")
            plan = family.decode_plan(cands.values, mode=ev.mode, decoding=ev.decoding, beam_size=ev.beam_size,
                                      max_new_tokens=ev.max_new_tokens, multi_label=multi_label)
            metric_names = list(dspec.metrics) if dspec is not None else list(family.default_metrics)
            entries.append(EvalEntry(ref.dataset, ref.split, task, [s.url for s in shards], [s.samples for s in shards],
                                     ev.max_samples if limit is None else limit, plan, metric_names,
                                     ev.image_sizes.get(task, spec.model.image_size), cands))
        except (EvaluationError, ValueError, StopIteration) as err:
            problems.append(f"{where}: {err}" if not str(err).startswith(where) else str(err))
    if problems:
        raise EvaluationError(f"{spec.source}: cannot evaluate:\n  " + "\n  ".join(problems))
    return entries


# -- the model --------------------------------------------------------------------------------------


def resolve_model_dir(source: str, workdir: Path) -> Path:
    """A model directory for `source`: a model directory (export/convert output) as it is; a run
    directory's export/ (or its latest checkpoint); a run checkpoint exported into `workdir`; a
    URL (s3://...) downloaded first."""
    from ..data import storage

    if not storage.is_local(source):
        local = workdir / "download"
        if storage.download_dir(source, local) == 0:
            raise EvaluationError(f"{source}: nothing to download (not a model directory or checkpoint)")
        source = str(local)
    path = storage.local_path(source) if source.startswith("file://") else Path(source)
    if (path / CONFIG).is_file():
        return path
    if (path / "export" / CONFIG).is_file():
        return path / "export"
    checkpoint = path
    if not (path / "biomedgpt.json").is_file():
        checkpoints = sorted(p for p in path.glob("checkpoint-*") if (p / "biomedgpt.json").is_file()) if path.is_dir() else []
        if not checkpoints:
            raise EvaluationError(f"{source}: not a model directory (no config.json), run directory (no export/ "
                                  "or checkpoint-*/) or run checkpoint (no biomedgpt.json)")
        checkpoint = checkpoints[-1]
    say(f"evaluate: exporting checkpoint {checkpoint} for evaluation")
    return export_checkpoint(checkpoint, workdir / "model")


def model_bundle(model_dir: Path, tokenizer_spec: Any, workdir: Path) -> dict[str, bytes]:
    """The files an evaluation worker needs (model + tokenizer), as bytes. The tokenizer: the one the
    spec names (path, or vocab + merges), else the model directory's own."""
    from ..model.tokenizer import BiomedGPTTokenizer

    files = {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file() and p.name in MODEL_FILES}
    if WEIGHTS not in files:
        raise EvaluationError(f"{model_dir}: no {WEIGHTS}")
    if tokenizer_spec is not None and tokenizer_spec.path:
        tok = BiomedGPTTokenizer.from_pretrained(tokenizer_spec.path)
    elif tokenizer_spec is not None and tokenizer_spec.vocab:
        tok = BiomedGPTTokenizer.from_bpe_files(tokenizer_spec.vocab, tokenizer_spec.merges)
    else:
        try:
            tok = BiomedGPTTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as err:
            raise EvaluationError(f"{model_dir}: no tokenizer files in the model directory and none named by "
                                  f"model.tokenizer ({err})") from None
    tok_dir = workdir / "tokenizer"
    tok.save_pretrained(tok_dir)
    files.update({f"tokenizer/{p.name}": p.read_bytes() for p in sorted(tok_dir.iterdir()) if p.is_file()})
    cfg = json.loads(files[CONFIG])
    if cfg.get("vocab_size") != len(tok):
        raise EvaluationError(f"{model_dir}: the model has a vocabulary of {cfg.get('vocab_size')} ids but the "
                              f"tokenizer has {len(tok)}: give the tokenizer that belongs to the model")
    return files


# -- 2. predict (Ray actors) ------------------------------------------------------------------------


def thumbnail(data: bytes, size: int = 160) -> str:
    """A base64 JPEG thumbnail (a data: URL) of image bytes."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))
    img = img.convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class EvalWorker:
    """One Ray actor: loads the model once (on `device` in `dtype`), then predicts whole shards."""

    def __init__(self, bundle: dict[str, bytes], settings: dict[str, Any]) -> None:
        # torch and the model code load in the actors only: the driver plans and scores without them
        import torch

        from ..inference import Predictor

        torch.set_num_threads(max(1, int(settings.get("threads", 1))))
        self.dir = Path(tempfile.mkdtemp(prefix="biomedgpt-eval-"))
        model_dir, tok_dir = materialise(bundle, self.dir)
        self.predictor = Predictor.from_model_dir(model_dir, tokenizer_dir=tok_dir, device=settings["device"],
                                                  dtype=settings["dtype"], image_size=settings["image_size"],
                                                  max_source_length=settings["max_source_length"],
                                                  batch_size=settings["batch_size"])

    def run(self, unit: dict[str, Any]) -> dict[str, Any]:
        from ..data.shards import read_shard

        t0 = time.perf_counter()
        recs = []
        for sample in read_shard(unit["url"]):
            if unit["take"] is not None and len(recs) >= unit["take"]:
                break
            rec = json.loads(sample["json"])
            rec["_image"] = sample.get("jpg") or sample.get("png")
            recs.append(rec)
        preds = self.predictor.predict(unit["plan"], recs, image_size=unit["image_size"])
        thumbs = {}
        for rec, pred in zip(recs[: unit["thumbnails"]], preds):
            if rec.get("_image"):
                try:
                    thumbs[pred["id"]] = thumbnail(rec["_image"])
                except Exception as err:  # a report without one image is still a report
                    thumbs[pred["id"]] = f"error: {err}"
        return {"entry": unit["entry"], "order": unit["order"], "predictions": preds, "thumbnails": thumbs,
                "seconds": time.perf_counter() - t0}

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def predict_entries(entries: list[EvalEntry], bundle: dict[str, bytes], settings: dict[str, Any], *,
                    concurrency: int, cpus_per_worker: float, use_gpu: bool,
                    report_samples: int) -> tuple[list[list[dict]], list[dict[str, str]], float, int]:
    """Predictions of every entry (in shard order), thumbnails, seconds and the number of actors used
    (`concurrency`, or fewer when there are fewer shards or the cluster has room for fewer)."""
    import ray
    from ray.util import ActorPool

    units = []
    for i, e in enumerate(entries):
        for j, (url, take) in enumerate(e.units()):
            units.append({"entry": i, "order": j, "url": url, "take": take, "plan": e.plan, "image_size": e.image_size,
                          "thumbnails": report_samples if j == 0 else 0})
    n_actors = max(1, min(concurrency, len(units)))
    # Never more actors than the cluster can place now: an actor left pending would hold its shard forever.
    resources = ray.cluster_resources()
    fit = int(resources.get("GPU", 0)) if use_gpu else int(resources.get("CPU", 0) // cpus_per_worker)
    if fit < 1:
        raise EvaluationError(f"evaluate: the Ray cluster has no room for one evaluation actor "
                              f"({'1 GPU' if use_gpu else f'{cpus_per_worker:g} CPU'}; cluster: {resources})")
    if fit < n_actors:
        say(f"evaluate: {n_actors} actors asked, the cluster has room for {fit}: using {fit}")
        n_actors = fit
    bundle_ref = ray.put(bundle)
    worker_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0)(EvalWorker)
    actors = [worker_cls.remote(bundle_ref, settings) for _ in range(n_actors)]
    t0 = time.perf_counter()
    chunks: dict[int, dict[int, list[dict]]] = {i: {} for i in range(len(entries))}
    thumbs: list[dict[str, str]] = [{} for _ in entries]
    total = sum(e.count for e in entries)
    try:
        pool = ActorPool(actors)
        with Progress(total, "evaluate", unit="sample", after_s=0) as bar:  # every evaluation says it ran
            for res in pool.map_unordered(lambda actor, unit: actor.run.remote(unit), units):
                chunks[res["entry"]][res["order"]] = res["predictions"]
                thumbs[res["entry"]].update(res["thumbnails"])
                bar.update(len(res["predictions"]))
    finally:
        for a in actors:
            try:
                ray.get(a.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 (an actor that died is gone anyway)
                pass
            ray.kill(a)
    preds = [[p for j in sorted(chunks[i]) for p in chunks[i][j]] for i in range(len(entries))]
    return preds, thumbs, time.perf_counter() - t0, n_actors


# -- 3. score ---------------------------------------------------------------------------------------


def reported(task: str, metric_names: list[str], metrics: dict[str, Any]) -> dict[str, Any]:
    """The dataset spec's metric names with their values (None when a metric could not be computed)."""
    keys = get_task(task).spec_metrics
    return {name: metrics.get(keys.get(name, name)) for name in metric_names}


# -- the job ----------------------------------------------------------------------------------------


def describe(e: EvalEntry) -> str:
    how = e.plan.method if e.plan.method == "free" else f"{e.plan.method} over {len(e.plan.candidates)} candidates"
    return f"{e.key} ({e.task}, {e.count} samples, {how})"


def run_evaluation(spec, model_source: str, out_dir: str | Path, *, num_cpus: int | None = None) -> dict[str, Any]:
    """Evaluate `model_source` on the datasets `spec.evaluate.splits` selects; writes the outputs named
    in the module docstring to out_dir; returns {"<dataset>/<split>": metrics}."""
    import ray

    from .report import write_html_report, write_results_markdown

    ev = spec.evaluate
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="biomedgpt-eval-") as tmp:
        model_dir = resolve_model_dir(str(model_source), Path(tmp))
        answers = read_model_meta(model_dir).answers
        entries = plan_entries(spec, model_answers=list(answers) if answers else None)
        if not entries:
            return {}
        say(f"evaluate: {model_source} on " + ", ".join(describe(e) for e in entries))
        tokenizer_spec = spec.model.tokenizer if spec.kind == "evaluate" else None
        bundle = model_bundle(model_dir, tokenizer_spec, Path(tmp))
    settings = {"image_size": spec.model.image_size, "max_source_length": spec.data.max_source_length,
                "batch_size": ev.batch_size, "threads": max(1, int(ev.cpus_per_worker)), "device": ev.device,
                "dtype": ev.dtype}
    started = ensure_ray(num_cpus)
    try:
        preds, thumbs, predict_seconds, workers = predict_entries(
            entries, bundle, settings, concurrency=ev.concurrency, cpus_per_worker=ev.cpus_per_worker,
            use_gpu=ev.use_gpu, report_samples=ev.report_samples)
    finally:
        if started:
            keep_ray_logs(out / "logs")
            ray.shutdown()
    del bundle

    meteor = None
    if ev.meteor and any(get_task(e.task).needs_meteor for e in entries):
        from ..metrics.meteor import Meteor  # starts the METEOR jar: only when a dataset is scored with it

        meteor = Meteor()
    results, flat = [], {}
    try:
        for e, p in zip(entries, preds):
            pred_path, ref_path = out / "predictions" / f"{e.stem}.jsonl", out / "references" / f"{e.stem}.jsonl"
            m = score_predictions(e.task, p, pred_path, ref_path, meteor=meteor if meteor is not None else False,
                                  candidates=e.candidates, metric_names=e.metric_names)
            flat[e.key] = m
            plan = asdict(e.plan)
            plan["candidates"] = len(e.plan.candidates) if e.plan.candidates else 0
            results.append({"dataset": e.dataset, "split": e.split, "task": e.task, "count": len(p),
                            "image_size": e.image_size,
                            "decoding": plan, "candidate_policy": e.candidates.policy, "metrics": m,
                            "reported": reported(e.task, e.metric_names, m),
                            "predictions": str(pred_path.relative_to(out)), "references": str(ref_path.relative_to(out))})
    finally:
        if meteor is not None:
            meteor.close()
    summary = {"model": str(model_source), "job": spec.name, "team": spec.team, "mode": ev.mode,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "seconds": round(time.time() - t0, 1), "predict_seconds": round(predict_seconds, 1),
               "workers": workers,
               "image_size": spec.model.image_size, "max_source_length": spec.data.max_source_length,
               "datasets": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "metrics.json").write_text(json.dumps(flat, indent=2))
    write_results_markdown(summary, out / "results.md")
    write_html_report(summary, preds, thumbs, out / "report.html", samples=ev.report_samples)
    say(f"evaluate: {len(entries)} dataset(s) in {summary['seconds']:.0f} s -> {out / 'results.md'}, "
        f"{out / 'report.html'}")
    return flat


def training_eval_config(spec, model_answers: list[str] | None = None) -> dict[str, Any] | None:
    """What the evaluation during training needs (picklable, for the Ray Train workers), or None when
    `evaluate.every_n_steps` is 0: the planned datasets capped at `max_samples_during_training`.
    (`evaluate.enabled` is about the evaluation after training; this one runs whenever every_n_steps > 0.)"""
    ev = spec.evaluate
    if not ev.every_n_steps:
        return None
    entries = plan_entries(spec, model_answers=model_answers, limit=ev.max_samples_during_training)
    if not entries:
        return None
    return {"every_n_steps": ev.every_n_steps, "batch_size": ev.batch_size, "meteor": ev.meteor, "dtype": ev.dtype,
            "image_size": spec.model.image_size, "max_source_length": spec.data.max_source_length,
            "entries": [{"dataset": e.dataset, "split": e.split, "task": e.task, "units": e.units(), "plan": e.plan,
                         "metric_names": e.metric_names, "image_size": e.image_size} for e in entries]}


def run_evaluate_job(spec, *, num_cpus: int | None = None):
    """`biomedgpt run` of a kind-evaluate spec: `model.init` on the `data.eval` datasets; the outputs go
    to the run directory `<output.storage>/<team>/<name>/` (staged locally and uploaded when that is
    object storage). Returns the runner's RunResult."""
    from ..data import storage as st

    run_url = spec.run_dir
    remote = not st.is_local(run_url)
    out = staging_dir(spec) if remote else st.local_path(run_url)
    out.mkdir(parents=True, exist_ok=True)
    if libraries_to_file(out / "logs" / "driver.log"):
        say(f"logs: Ray's and torch's own logs go to {out / 'logs'} (--verbose shows them here)")
    (out / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
    flat = run_evaluation(spec, spec.model.init, out, num_cpus=num_cpus)
    result = RunResult(run_dir=run_url, export_dir=spec.model.init, evaluation=flat)
    (out / "result.json").write_text(json.dumps(result.__dict__, indent=2, default=str))
    if remote:
        n = st.upload_dir(out, run_url)
        say(f"storage: {n} evaluation file(s) uploaded to {run_url}")
    return result
