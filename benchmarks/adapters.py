"""Department adapters on the serving application (Ray Serve on 127.0.0.1, started and stopped here): adapter swap
against full-model swap, a batch mixing 8 adapters against the same batch on one merged model, replica memory with
64 adapters resident against the base alone, errors (issue 18, item 5).

Setup, made here (nothing downloaded): a fresh registry with one department's demo-size open-ended VQA base (64 px
images), LoRA adapters of it (rank `--rank`, default 4, on the default targets: q/k/v/out_proj and fc1/fc2 of every
encoder and decoder layer; random weights, B not zero, so every adapter changes the answers; the 8 of the mixed
batch share one set of weights, that of the merged model, so that every batch decodes as long as the merged
model's and only the adapter path differs), published through
`Registry.export` as an adapter run's checkpoint is; a full model of the same size for every swap; and one adapter merged
into its base (`registry export --merge`). One serving app (`benchmarks/serve_load.py`'s settings: one model replica
of 0.5 CPU and 1 torch thread, `@serve.batch` of at most 16 waiting 10 ms), three full models per replica and
at most 64 adapters, clients in this process over HTTP (`POST /v1/vqa`, JSON, a 64x64 PNG, beam 5 up to 16 tokens).

- Swap: a request for a version not resident on the replica, loaded from the registry (a version never asked
  before: the registry's manifest checked, then loaded), against a warm request of its kind: `swap ms` = its
  latency minus the median latency of requests for a resident version of the same kind. Adapters: a fresh adapter
  of the resident base (added to its peft LoRA layers), against a resident adapter of the base.
  Full models: a fresh full model (the replica's LRU of 3 evicts the least recently used, never the base).
  Medians of `--swaps` each, alternating.
- Mixed batch: one batch of 16 requests naming 8 adapters of the base (2 each), run as a replica runs a batch
  (`serve.engine.run_batch`, each sample through its own adapter) in this process, against the same 16 requests
  on the merged model; `--engine-reps` alternating pairs, the ratio (`mixed_batch_ratio`) is the median pair's
  merged time / adapters time. Served end to end too (`mixed_served_ratio`): concurrency 32 over HTTP, each
  request naming one of the 8 adapters (`i % 8`), which the replica batches together, against the same requests
  naming the merged model, in `--pairs` alternating pairs (closed-loop HTTP throughput on this shared host moves
  by 2-3x between runs: the in-process pairs are the measure, the served ones show it holds end to end).
  `--engine-size small` times the in-process pairs at that size too (base, 8 adapters and the merged model made
  alike), to show how the adapters' share of a batch changes with the model's width.
- Memory: the replica's model memory (bytes of the base's parameters and buffers, plus the adapters' weights the
  replica reports) with 64 adapters resident against the base alone; and the replica process's resident set (RSS)
  before any model, with the base, and with the 64 adapters (its growth over the empty replica, for comparison).
- Errors: non-200 answers and failed connections over every request above.

The table is printed first; the LAST line is one JSON object with `adapter_swap_ms`, `full_swap_ms`,
`mixed_batch_ratio`, `memory_ratio_64`, `errors` (and `swap_ratio`, `mixed_served_ratio` and the details:
`swap`, `mixed_batch`, `mixed_served`, `memory`, `setup`).
Targets: adapter swap <= 0.1x full swap; mixed batch >= 0.7x merged; memory with 64 adapters <= 1.3x the base.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_load  # noqa: E402  (the load generator, tenants file and request bodies of the serving benchmark)
from serve_load import DEPARTMENT, load, make_tenants, request_bodies, timed_post  # noqa: E402

N_RESIDENT = 64
N_MIXED = 8


def make_registry(root: Path, rank: int, n_adapters: int, n_fulls: int, size: str = "demo") -> dict:
    """The registry (see the module docstring; `n_adapters` adapters, `n_fulls` full models besides the base, of the
    named size); returns its URL and the ids of every version by role."""
    import torch

    from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from biomedgpt.model.adapters import DEFAULT_TARGETS, add_lora, sha256_file
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer
    from biomedgpt.serve.registry import Registry
    from biomedgpt.tasks import get_task

    task = get_task("vqa")
    texts = [task.instruction({"question": q}) for q in
             ("is there a fracture?", "which lung is affected?", "is this a ct scan?", "is the heart enlarged?")]
    tok = BiomedGPTTokenizer.train(texts * 20 + [" " + a for a in serve_load.ANSWERS] * 20, vocab_size=300)
    reg = Registry(str(root / "registry"))
    training = {"task": "vqa", "size": size, "image_size": 64, "max_source_length": 32,
                "train_data": ["vqa_rad/train"]}

    def full_model(name: str, seed: int) -> str:
        out = root / "src" / name
        torch.manual_seed(seed)
        BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_size(size, vocab_size=len(tok))).save_pretrained(out)
        tok.save_pretrained(out)
        (out / "training.json").write_text(json.dumps({"run": name, **training}))
        return reg.export(out, DEPARTMENT, name).id

    base = full_model("base", 0)
    base_entry = reg.resolve(base)
    base_dir = reg.local_dir(base_entry)
    cfg = BiomedGPTConfig.from_pretrained(base_dir)
    sha = sha256_file(base_dir / "model.safetensors")
    adapter = {"method": "lora", "rank": rank, "alpha": 2.0 * rank, "dropout": 0.0,
               "target_modules": list(DEFAULT_TARGETS), "trainable": []}

    def checkpoint(name: str, seed: int) -> Path:
        """An adapter run's checkpoint as the trainer writes it (the trainable state, naming the base)."""
        model = BiomedGPTForConditionalGeneration(cfg)
        add_lora(model, lora_config_of(adapter))
        g = torch.Generator().manual_seed(seed)
        state = {f"model.{n}": torch.randn(p.shape, generator=g) * 0.3 for n, p in model.named_parameters()
                 if p.requires_grad}
        ckpt = root / "runs" / name / "checkpoint-00000010"
        (ckpt / "assets" / "tokenizer").mkdir(parents=True)
        torch.save({"state_dict": state, "global_step": 10}, ckpt / "lightning.ckpt")
        meta = {"run": name, "team": DEPARTMENT, "model_config": json.loads(cfg.to_json_string(use_diff=False)),
                "step": 10, "metrics": {}, "format": "full", "adapter": adapter,
                "base": {"init": str(base_dir), "id": base, "sha256": sha}, **training}
        (ckpt / "biomedgpt.json").write_text(json.dumps(meta))
        tok.save_pretrained(ckpt / "assets" / "tokenizer")
        return ckpt

    t0 = time.time()
    adapters = []
    for i in range(n_adapters):
        # the 8 adapters of the mixed batch carry lora-000's weights (distinct versions, the same answers as the
        # merged model): a mixed batch then decodes exactly as long as the merged one, only the adapter path differs
        seed = 1000 if i < N_MIXED else 1000 + i
        adapters.append(reg.export(checkpoint(f"lora-{i:03d}", seed), DEPARTMENT, f"lora-{i:03d}").id)
    merged = reg.export(root / "runs" / "lora-000" / "checkpoint-00000010", DEPARTMENT, "lora-000-merged",
                        merge=True).id
    fulls = [full_model(f"full-{i}", 100 + i) for i in range(n_fulls)]
    print(f"  registry: base, {len(adapters)} adapters, 1 merged, {len(fulls)} full models "
          f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    adapter_bytes = (reg.local_dir(reg.resolve(adapters[0])) / "adapter_model.safetensors").stat().st_size
    return {"url": reg.url, "base": base, "adapters": adapters, "merged": merged, "fulls": fulls,
            "base_bytes": model_bytes(base_dir), "adapter_file_bytes": adapter_bytes,
            "base_file_bytes": (base_dir / "model.safetensors").stat().st_size}


def lora_config_of(adapter: dict):
    from biomedgpt.model.adapters import lora_config

    return lora_config(adapter["rank"], adapter["alpha"], adapter["dropout"], adapter["target_modules"])


def model_bytes(model_dir: Path) -> int:
    """Bytes of a model directory's parameters and buffers once loaded (tied weights counted once)."""
    from biomedgpt.model import BiomedGPTForConditionalGeneration

    model = BiomedGPTForConditionalGeneration.from_pretrained(model_dir, use_safetensors=True)
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def replica_rss() -> int:
    """Resident set (bytes) of the model replica's process."""
    import psutil

    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        if "BiomedGPTModels" in " ".join(proc.info["cmdline"] or []) and proc.info["memory_info"]:
            return proc.info["memory_info"].rss
    raise RuntimeError("no BiomedGPTModels replica process found")


def spec_dict(registry: str, tenants: Path, port: int, threads: int) -> dict:
    spec = serve_load.spec_dict("adapters", registry, tenants, port, 16, "/", threads, 0.01)
    # three full models: the base stays resident while fresh full models come and go (each evicts the least
    # recently used one, never the base, which every swap round asks first)
    spec["models"].update(max_models_per_replica=3, max_adapters_per_replica=N_RESIDENT, max_adapter_bytes=2**30)
    return spec


class Errors:
    def __init__(self) -> None:
        self.count = 0

    def post(self, url: str, key: str, body: bytes) -> float | None:
        try:
            return timed_post(url, key, body)
        except Exception as err:  # a non-200 answer or a failed connection
            self.count += 1
            detail = err.read()[:300] if hasattr(err, "read") else b""
            print(f"  error: {type(err).__name__}: {err} {detail!r}", file=sys.stderr, flush=True)
            return None


def swaps(url: str, key: str, reg: dict, n: int, errors: Errors) -> dict:
    """Alternating: a fresh adapter of the resident base, then a fresh full model, each after 3 warm requests of its
    own kind (a resident adapter of the base; the resident full model); a swap costs its latency minus the median
    warm latency of its kind."""
    body = {m: request_bodies(m, 1)[0] for m in [reg["base"], *reg["fulls"], *reg["adapters"]]}
    fresh_adapters = reg["adapters"][N_RESIDENT:]
    resident_adapter = reg["adapters"][0]
    fulls = reg["fulls"]
    adapter_lat, full_lat, warm_adapter, warm_full = [], [], [], []
    warm_model = fulls[0]
    errors.post(url, key, body[warm_model])  # resident: the base (with adapters) and fulls[0]
    for i in range(n):
        warm_adapter += [errors.post(url, key, body[resident_adapter]) for _ in range(3)]
        adapter_lat.append(errors.post(url, key, body[fresh_adapters[i]]))  # loads an adapter onto the base
        warm_full += [errors.post(url, key, body[warm_model]) for _ in range(3)]
        new = fulls[1 + i]
        full_lat.append(errors.post(url, key, body[new]))  # loads a full model, evicting the least recently used
        warm_model = new
    warm_a = statistics.median(x for x in warm_adapter if x is not None)
    warm_f = statistics.median(x for x in warm_full if x is not None)
    a = [x - warm_a for x in adapter_lat if x is not None]
    f = [x - warm_f for x in full_lat if x is not None]
    return {"adapter_swap_ms": round(statistics.median(a), 1), "full_swap_ms": round(statistics.median(f), 1),
            "adapter_request_ms": [round(x, 1) for x in adapter_lat if x is not None],
            "full_request_ms": [round(x, 1) for x in full_lat if x is not None],
            "warm_adapter_ms": round(warm_a, 1), "warm_full_ms": round(warm_f, 1), "swaps": n}


async def mixed(base_url: str, key: str, reg: dict, args: argparse.Namespace) -> dict:
    """Concurrency 32 over HTTP: requests naming 8 adapters of the base (interleaved) against the same requests
    naming the merged model; alternating pairs."""
    from ray import serve

    models = serve.get_deployment_handle("BiomedGPTModels", app_name="adapters")
    eight = reg["adapters"][:N_MIXED]
    per_adapter = {a: request_bodies(a, 64) for a in eight}
    bodies_mixed = [per_adapter[eight[i % N_MIXED]][i] for i in range(64)]  # the same images as the merged ones
    bodies_merged = request_bodies(reg["merged"], 64)
    url = base_url + "/v1/vqa"
    pairs = []
    for i in range(args.pairs):
        await models.reset_stats.remote()
        a = await load(url, key, bodies_mixed, 32, args.seconds, args.warmup)
        sa = await models.stats.remote()
        await models.reset_stats.remote()
        m = await load(url, key, bodies_merged, 32, args.seconds, args.warmup)
        sm = await models.stats.remote()
        pair = {"adapters": a["throughput"], "merged": m["throughput"],
                "ratio": round(a["throughput"] / max(m["throughput"], 1e-9), 3),
                "mean_batch_adapters": round(sa["requests"] / max(sa["batches"], 1), 1),
                "mean_batch_merged": round(sm["requests"] / max(sm["batches"], 1), 1),
                "p50_ms_adapters": a["p50_ms"], "p50_ms_merged": m["p50_ms"],
                "errors": a["errors"] + m["errors"]}
        pairs.append(pair)
        print(f"  served pair {i + 1}: {pair}", file=sys.stderr, flush=True)
    ratio = statistics.median(p["ratio"] for p in pairs)
    return {"ratio": ratio, "pairs": pairs, "errors": sum(p["errors"] for p in pairs)}


def engine_batch(reg: dict, reps: int, threads: int) -> dict:
    """In this process, without Serve: one batch of 16 open-ended VQA queries (2 for each of 8 adapters) through the
    base with the 8 adapters loaded (`serve.engine.run_batch`, as a replica runs a batch), against the same 16
    queries through the merged model; alternating, `reps` pairs after a warm-up; the ratio is the median pair's
    merged seconds / adapters seconds (throughput of the mixed batch against the merged one)."""
    import numpy as np
    import torch

    from biomedgpt.serve.engine import Query, ensure_adapters, load_model, run_batch
    from biomedgpt.serve.registry import Registry
    from biomedgpt.tasks import get_task

    torch.set_num_threads(threads)
    registry = Registry(reg["url"])

    def local(model_id: str) -> Path:
        return registry.local_dir(registry.resolve(model_id))

    base = load_model(local(reg["base"]), reg["base"], threads=threads)
    eight = reg["adapters"][:N_MIXED]
    ensure_adapters(base, {a: local(a) for a in eight})
    merged = load_model(local(reg["merged"]), reg["merged"], threads=threads)
    task = get_task("vqa")
    g = np.random.default_rng(0)
    images = [g.standard_normal((3, 64, 64)).astype(np.float32) for _ in range(16)]

    def queries(adapters: list) -> list:
        return [Query("vqa", task.instruction({"question": f"is there an abnormality in region {i}?"}), images[i],
                      adapter=adapters[i]) for i in range(16)]

    mixed_q, merged_q = queries([eight[i % N_MIXED] for i in range(16)]), queries([None] * 16)
    answers = {"adapters": run_batch(base, mixed_q), "merged": run_batch(merged, merged_q)}  # warm-up
    pairs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run_batch(base, mixed_q)
        t_mixed = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_batch(merged, merged_q)
        t_merged = time.perf_counter() - t0
        pairs.append((t_mixed, t_merged))
    ratios = sorted(m / a for a, m in pairs)
    words = {k: round(statistics.mean(len(str(r["answer"]).split()) for r in v), 2) for k, v in answers.items()}
    same = [a["answer"] for a in answers["adapters"]] == [m["answer"] for m in answers["merged"]]
    return {"ratio": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
            "adapters_batch_ms": round(1000 * statistics.median(a for a, _ in pairs), 1),
            "merged_batch_ms": round(1000 * statistics.median(m for _, m in pairs), 1),
            "answer_words": words, "same_answers": same, "batch": 16, "reps": reps}


async def measure(base_url: str, key: str, reg: dict, args: argparse.Namespace, errors: Errors) -> dict:
    from ray import serve

    try:
        return await _measure(base_url, key, reg, args, errors)
    finally:
        await serve.shutdown_async()  # on this loop: the handles' routers live here


async def _measure(base_url: str, key: str, reg: dict, args: argparse.Namespace, errors: Errors) -> dict:
    from ray import serve

    models = serve.get_deployment_handle("BiomedGPTModels", app_name="adapters")
    url = base_url + "/v1/vqa"
    out: dict = {}
    # memory: the empty replica, the base alone, the base with 64 adapters (loaded by requests naming them)
    rss_empty = replica_rss()
    await asyncio.to_thread(errors.post, url, key, request_bodies(reg["base"], 1)[0])
    rss_base = replica_rss()
    for adapter_id in reg["adapters"][:N_RESIDENT]:
        await asyncio.to_thread(errors.post, url, key, request_bodies(adapter_id, 1)[0])
    stats = await models.stats.remote()
    rss_64 = replica_rss()
    resident = (stats.get("adapters") or {}).get(reg["base"], [])
    adapter_bytes = int((stats.get("adapter_bytes") or {}).get(reg["base"], 0))
    out["memory"] = {"adapters_resident": len(resident), "base_bytes": reg["base_bytes"],
                     "adapter_bytes_64": adapter_bytes,
                     "ratio": round((reg["base_bytes"] + adapter_bytes) / reg["base_bytes"], 3),
                     "rss_empty_mb": round(rss_empty / 2**20, 1), "rss_base_mb": round(rss_base / 2**20, 1),
                     "rss_64_mb": round(rss_64 / 2**20, 1),
                     "rss_ratio_over_empty": round((rss_64 - rss_empty) / max(rss_base - rss_empty, 1), 3)}
    print(f"  memory: {out['memory']}", file=sys.stderr, flush=True)
    out["mixed"] = await mixed(base_url, key, reg, args)
    out["swap"] = await asyncio.to_thread(swaps, url, key, reg, args.swaps, errors)
    print(f"  swap: {out['swap']}", file=sys.stderr, flush=True)
    final = await models.stats.remote()
    out["adapter_load_s"] = final.get("adapter_load_s", [])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of the adapters (default 4)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per throughput run (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each run (default 3)")
    parser.add_argument("--pairs", type=int, default=3, help="alternating adapters/merged runs (default 3)")
    parser.add_argument("--swaps", type=int, default=6, help="adapter and full-model swaps measured (default 6 each)")
    parser.add_argument("--engine-reps", type=int, default=10,
                        help="alternating mixed/merged batches timed in this process (default 10)")
    parser.add_argument("--engine-size", default=None,
                        help="also time the mixed batch in this process at this named size (e.g. small)")
    parser.add_argument("--torch-threads", type=int, default=1, help="compute threads of the model replica")
    args = parser.parse_args()

    from biomedgpt.serve.spec import apply_serve_ray_env

    apply_serve_ray_env()  # as `biomedgpt serve` does, before Ray starts
    import ray
    from ray import serve

    from biomedgpt.demo import wait_healthy
    from biomedgpt.serve.app import build_app_from_spec
    from biomedgpt.session import ensure_ray, free_port
    from biomedgpt.spec import serve_spec_from_dict

    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="adapters-bench-"))
    reg = make_registry(tmp, args.rank, N_RESIDENT + args.swaps, args.swaps + 1)  # a fresh version for every swap
    tenants, key = make_tenants(tmp)
    engine = engine_batch(reg, args.engine_reps, args.torch_threads)
    print(f"  engine batch: {engine}", file=sys.stderr, flush=True)
    at_size = None
    if args.engine_size:  # the same batch at a larger size: the adapters' share of the work shrinks with the width
        small = make_registry(tmp / args.engine_size, args.rank, N_MIXED, 0, size=args.engine_size)
        at_size = dict(engine_batch(small, args.engine_reps, args.torch_threads), size=args.engine_size)
        print(f"  engine batch, {args.engine_size} size: {at_size}", file=sys.stderr, flush=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    errors = Errors()
    ensure_ray(num_cpus=2)
    results: dict = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        spec = serve_spec_from_dict(spec_dict(reg["url"], tenants, port, args.torch_threads), "<adapters bench>")
        serve.run(build_app_from_spec(spec), name="adapters", route_prefix="/", blocking=False)
        wait_healthy(base_url, timeout=300)
        results = asyncio.run(measure(base_url, key, reg, args, errors))
    finally:
        if "swap" not in results:
            serve.shutdown()
        ray.shutdown()

    sw, mx, mem = results["swap"], results["mixed"], results["memory"]
    total_errors = errors.count + mx["errors"]
    summary = {"adapter_swap_ms": sw["adapter_swap_ms"], "full_swap_ms": sw["full_swap_ms"],
               "swap_ratio": round(sw["adapter_swap_ms"] / max(sw["full_swap_ms"], 1e-9), 3),
               "mixed_batch_ratio": engine["ratio"], "mixed_served_ratio": mx["ratio"],
               "memory_ratio_64": mem["ratio"], "errors": total_errors,
               "swap": sw, "mixed_batch": engine, "mixed_batch_at_size": at_size, "mixed_served": mx, "memory": mem,
               "replica_adapter_load_ms_median": round(1000 * statistics.median(results["adapter_load_s"]), 1)
               if results["adapter_load_s"] else None,
               "setup": {"model": "demo size, 64 px; open-ended VQA (beam 5, <= 16 tokens)", "rank": args.rank,
                         "targets": "q/k/v/out_proj, fc1, fc2 of every layer",
                         "adapter_file_bytes": reg["adapter_file_bytes"], "base_file_bytes": reg["base_file_bytes"],
                         "model_replicas": 1, "torch_threads": args.torch_threads, "max_batch_size": 16,
                         "batch_wait_ms": 10, "max_models_per_replica": 3, "max_adapters_per_replica": N_RESIDENT,
                         "concurrency": 32, "seconds_per_run": args.seconds, "pairs": args.pairs,
                         "wall_s": round(time.time() - t_start, 1)}}

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    rows = [("measure", "adapters", "full / merged", "ratio", "target"),
            ("swap, ms over a warm request (median)", f"{sw['adapter_swap_ms']:.1f}", f"{sw['full_swap_ms']:.1f}",
             f"{summary['swap_ratio']:.3f}", f"<= 0.1 ({verdict(summary['swap_ratio'] <= 0.1)})"),
            ("batch of 16, 8 adapters vs merged: batches/s (median)",
             f"{1000 / engine['adapters_batch_ms']:.2f}", f"{1000 / engine['merged_batch_ms']:.2f}",
             f"{engine['ratio']:.3f}", f">= 0.7 ({verdict(engine['ratio'] >= 0.7)})"),
            ("served at concurrency 32, req/s (median pair)",
             f"{statistics.median(p['adapters'] for p in mx['pairs']):.1f}",
             f"{statistics.median(p['merged'] for p in mx['pairs']):.1f}", f"{mx['ratio']:.3f}", "(end to end)"),
            (f"model memory, MB ({mem['adapters_resident']} adapters vs base alone)",
             f"{(mem['base_bytes'] + mem['adapter_bytes_64']) / 2**20:.1f}", f"{mem['base_bytes'] / 2**20:.1f}",
             f"{mem['ratio']:.3f}", f"<= 1.3 ({verdict(mem['ratio'] <= 1.3)})")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                    for r in rows))
    print(f"warm requests: a resident adapter {sw['warm_adapter_ms']:.0f} ms, a resident full model "
          f"{sw['warm_full_ms']:.0f} ms; adapter swap requests {sw['adapter_request_ms']} ms, full-model swap "
          f"requests {sw['full_request_ms']} ms; adapter load on the replica median "
          f"{summary['replica_adapter_load_ms_median']} ms")
    print(f"mixed batch in the engine: merged/adapters time per pair {engine['ratios']}; mean answer words "
          f"{engine['answer_words']}")
    if at_size:
        print(f"mixed batch in the engine at {at_size['size']} size: {at_size['adapters_batch_ms']:.0f} ms against "
              f"{at_size['merged_batch_ms']:.0f} ms merged, ratio {at_size['ratio']:.3f} (pairs {at_size['ratios']})")
    print("served pairs (adapters/merged req/s, mean batch): " + ", ".join(
        f"{p['adapters']:.1f}/{p['merged']:.1f} = {p['ratio']:.2f}x (batch {p['mean_batch_adapters']}/"
        f"{p['mean_batch_merged']})" for p in mx["pairs"]))
    print(f"replica RSS: empty {mem['rss_empty_mb']} MB, base {mem['rss_base_mb']} MB, base + "
          f"{mem['adapters_resident']} adapters {mem['rss_64_mb']} MB (growth over the empty replica: "
          f"{mem['rss_ratio_over_empty']:.2f}x); adapter file {reg['adapter_file_bytes'] / 1024:.0f} KB, base weights "
          f"{reg['base_file_bytes'] / 2**20:.1f} MB; rank {args.rank}")
    print(f"errors: {total_errors}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
