"""Load on the serving application (Ray Serve on 127.0.0.1, started and stopped here): throughput and latency
at concurrency 1, 8 and 32, batched against unbatched at concurrency 32, and the latency of a model swap.

Setup: a fresh registry with demo-size VQA models (64 px images) of one department, a tenants file with a
fresh API key for it, and two applications on the same Serve:
- `batched`: the serving spec's defaults: `@serve.batch(max_batch_size=16, wait 10 ms)`, two models per
  replica (LRU), one model replica (0.5 CPU, 1 torch thread);
- `unbatched`: the same with `max_batch_size: 1`.
Clients are asyncio HTTP connections (aiohttp) in this process, each sending `POST /v1/vqa` (JSON, a
64x64 PNG in base64, a question, the model id) back to back for `--seconds` per run after a warm-up.
The main workload is open-ended VQA: models without an answer list decode by beam search (5 beams, up
to 16 tokens), the decoding of open questions and, like captioning and summarisation, generation.
At concurrency 32 the two apps run in `--pairs` alternating pairs (batched, then unbatched, back to back):
a drift in the machine's speed between pairs then moves both sides of a pair's ratio, and the speedup
is the median of the pairs' ratios; the "32" and "unbatched_32" entries are the runs of median throughput
(errors summed over all runs). The closed-set workload (a model with 4 candidate answers, scored under
the trie: one encoder pass and one decoder pass over the candidates) is measured too at concurrency 32,
batched and unbatched. Errors are non-200 answers and failed connections. Model swap: with models A and
B resident, a request for C must load C (evicting the least recently used), then A again; its latency
against a warm request.

The table is printed first; the LAST line is one JSON object:
    {"1": {"throughput", "p50_ms", "p99_ms", "errors", "batched_speedup"}, "8": {...}, "32": {...},
     "unbatched_32": {...}, "pairs_32": [{"batched", "unbatched", "mean_batch", "speedup"}, ...],
     "batched_speedup": x, "closed_set_32": {"batched", "unbatched", "batched_speedup"},
     "model_swap": {...}, "setup": {...}}
(batched_speedup at concurrency 32 = the median pair's batched / unbatched throughput; null at 1 and 8,
where only the batched app is measured).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]
DEPARTMENT = "stanford-like-radiology"
ANSWERS = ["yes", "no", "left lung", "ct"]


def make_models(root: Path) -> tuple[str, list[str]]:
    """A registry with three demo-size open-ended VQA models and one closed-set one (answers.json); returns
    (registry URL, [open a, open b, open c, closed])."""
    import torch

    from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer
    from biomedgpt.serve.registry import Registry
    from biomedgpt.tasks import get_task

    task = get_task("vqa")
    texts = [task.instruction({"question": q}) for q in
             ("is there a fracture?", "which lung is affected?", "is this a ct scan?", "is the heart enlarged?")]
    tok = BiomedGPTTokenizer.train(texts * 20 + [" " + a for a in ANSWERS] * 20, vocab_size=300)
    reg = Registry(str(root / "registry"))
    ids = []
    for i, name in enumerate(("vqa-a", "vqa-b", "vqa-c", "vqa-closed")):
        out = root / "src" / name
        torch.manual_seed(i)
        cfg = BiomedGPTConfig.from_size("demo", vocab_size=len(tok))
        BiomedGPTForConditionalGeneration(cfg).save_pretrained(out)
        tok.save_pretrained(out)
        if name == "vqa-closed":
            (out / "answers.json").write_text(json.dumps(ANSWERS))
        (out / "training.json").write_text(json.dumps({"run": name, "task": "vqa", "size": "demo", "image_size": 64,
                                                       "max_source_length": 32, "train_data": ["vqa_rad/train"]}))
        ids.append(reg.export(out, DEPARTMENT, name).id)
    return reg.url, ids


def make_tenants(root: Path) -> tuple[Path, str]:
    import yaml

    from biomedgpt.tenancy import hash_api_key, new_api_key

    key = new_api_key("serve-load")
    data = yaml.safe_load((REPO / "cluster" / "tenants.yaml").read_text())
    data["institutions"]["stanford-like"]["departments"]["radiology"]["apiKeys"].append(
        {"id": "serve-load", "hash": hash_api_key(key)})
    data["datasetSpecs"] = str(REPO / "datasets_spec")  # the copy lives elsewhere: access classes from the repo
    path = root / "tenants.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, key


def spec_dict(name: str, registry: str, tenants: Path, port: int, max_batch: int, route: str, threads: int,
              wait_s: float) -> dict:
    return {"kind": "serve", "name": name, "registry": registry, "tenants": str(tenants), "route_prefix": route,
            "http": {"host": "127.0.0.1", "port": port}, "ingress": {"replicas": 1, "num_cpus": 0.25},
            "models": {"max_models_per_replica": 2, "num_cpus": 0.5, "torch_threads": threads, "max_ongoing_requests": 128,
                       "batch": {"max_batch_size": max_batch, "wait_timeout_s": wait_s},
                       "autoscaling": {"min_replicas": 1, "max_replicas": 1}}}


def request_bodies(model: str, n: int = 64) -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(buf, "PNG")
        out.append(json.dumps({"question": f"is there an abnormality in region {i}?", "model": model,
                               "image": base64.b64encode(buf.getvalue()).decode()}).encode())
    return out


ROLES = (("model", ("BiomedGPTModels", "FloorModel")), ("ingress", ("BiomedGPTIngress", "FloorIngress")),
         ("proxy", ("ProxyActor",)))


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role's processes on this machine: the model replicas,
    the ingress replicas, Serve's HTTP proxy, this process (the load generator) and everything else."""
    import psutil

    out = dict.fromkeys([r for r, _ in ROLES] + ["client", "other"], 0.0)
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        role = "client" if proc.info["pid"] == me else next(
            (r for r, names in ROLES if any(n in cmd for n in names)), "other")
        out[role] += times.user + times.system
    return out


def cpu_use(before: dict[str, float], after: dict[str, float], seconds: float, requests: int) -> dict:
    cores = {r: round((after[r] - before[r]) / seconds, 2) for r in before}
    per_request = {r: round(1000 * (after[r] - before[r]) / max(requests, 1), 2) for r in before}
    return {"cores": cores, "ms_per_request": per_request}


async def one(session, url: str, body: bytes, headers: dict) -> tuple[bool, float]:
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            ok = resp.status == 200
    except Exception:  # connection failures count as errors
        ok = False
    return ok, (time.perf_counter() - t0) * 1000


async def load(url: str, key: str, bodies: list[bytes], concurrency: int, seconds: float, warmup: float) -> dict:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=120)
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        state = {"measure": False, "stop": False}

        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while not state["stop"]:
                ok, ms = await one(session, url, bodies[i % len(bodies)], headers)
                i += concurrency
                if state["measure"] and not state["stop"]:
                    if ok:
                        lat.append(ms)
                    else:
                        errors += 1

        tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        await asyncio.sleep(warmup)
        state["measure"] = True
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        state["stop"] = True
        elapsed = time.perf_counter() - t0
        cpu1 = cpu_seconds()
        await asyncio.gather(*tasks)
    lat.sort()

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else float("nan")

    return {"throughput": round(len(lat) / elapsed, 2), "p50_ms": pct(0.50), "p99_ms": pct(0.99), "errors": errors,
            "requests": len(lat), "cpu": cpu_use(cpu0, cpu1, elapsed, len(lat))}


def floor_app(image_size: int = 64):
    """Serve's own cost per request: the same path as the real app (HTTP proxy -> a FastAPI ingress that parses
    the JSON body and decodes the base64 image -> a handle call with a (3, size, size) float32 array -> a model
    deployment), with no model, auth or image decoding (0.1 CPU each in Ray's accounting, so that all three apps
    fit in the 2 CPUs; the processes are not limited by it)."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="FloorModel", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=128)
    class FloorModel:
        async def infer(self, image) -> dict:
            return {"answer": "", "scores": None, "decoding": "beam", "shape": list(image.shape)}

    class FloorIngress:
        def __init__(self, model) -> None:
            self.model = model

        async def vqa(self, request) -> dict:
            import numpy as np

            body = json.loads(await request.body())
            base64.b64decode(body["image"])
            return await self.model.infer.remote(np.zeros((3, image_size, image_size), np.float32))

    # a real annotation object, not this module's postponed string "Request", which the replica could not resolve
    FloorIngress.vqa.__annotations__ = {"request": Request, "return": dict}
    api.post("/v1/vqa")(FloorIngress.vqa)
    ingress = serve.deployment(name="FloorIngress", ray_actor_options={"num_cpus": 0.1},
                               max_ongoing_requests=128)(serve.ingress(api)(FloorIngress))
    return ingress.bind(FloorModel.bind())


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput, with every run's errors summed into it."""
    run = dict(sorted(runs, key=lambda r: r["throughput"])[len(runs) // 2])
    run["errors"] = sum(r["errors"] for r in runs)
    run["runs"] = len(runs)
    return run


def timed_post(url: str, key: str, body: bytes) -> float:
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {key}",
                                                          "Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as resp:
        resp.read()
        assert resp.status == 200
    return (time.perf_counter() - t0) * 1000


def model_swap(base: str, key: str, ids: list[str], rounds: int) -> dict:
    """Latency of requests that must load a model (not among the replica's 2 resident ones) against warm ones."""
    a, b, c = ids[:3]
    body = {m: request_bodies(m, 1)[0] for m in (a, b, c)}
    url = base + "/v1/vqa"
    swaps, warm = [], []
    for _ in range(rounds):
        timed_post(url, key, body[a])
        timed_post(url, key, body[b])               # resident: a, b
        warm += [timed_post(url, key, body[b]) for _ in range(3)]
        swaps.append(timed_post(url, key, body[c]))  # loads c, evicts a
        swaps.append(timed_post(url, key, body[a]))  # loads a again, evicts b
    return {"swap_ms_median": round(statistics.median(swaps), 1), "swap_ms_max": round(max(swaps), 1),
            "warm_ms_median": round(statistics.median(warm), 1), "swaps": len(swaps)}


async def measure(base: str, key: str, ids: list[str], args: argparse.Namespace, results: dict) -> dict:
    """Every load level, the closed-set runs and the model swap, in one event loop (with Serve's throughput-
    optimised mode, deployment handles route on the caller's loop). Returns the batched replica's stats."""
    from ray import serve

    try:
        return await _measure(base, key, ids, args, results)
    finally:
        await serve.shutdown_async()  # on this loop: the handles' routers live here


async def _measure(base: str, key: str, ids: list[str], args: argparse.Namespace, results: dict) -> dict:
    from ray import serve

    models = serve.get_deployment_handle("BiomedGPTModels", app_name="batched")
    bodies = request_bodies(ids[0])
    for c in (1, 8):
        await models.reset_stats.remote()
        results[str(c)] = await load(base + "/v1/vqa", key, bodies, c, args.seconds, args.warmup)
        level = await models.stats.remote()
        results[str(c)]["mean_batch"] = round(level["requests"] / max(level["batches"], 1), 1)
        print(f"  batched   c={c:<3} {results[str(c)]}", file=sys.stderr, flush=True)
    # Concurrency 32, batched against unbatched: alternating runs, each pair back to back, so that a drift
    # of the machine's speed (other tenants of the host) hits both sides of a ratio alike.
    batched_runs, unbatched_runs = [], []
    for i in range(args.pairs):
        await models.reset_stats.remote()
        run = await load(base + "/v1/vqa", key, bodies, 32, args.seconds, args.warmup)
        level = await models.stats.remote()
        run["mean_batch"] = round(level["requests"] / max(level["batches"], 1), 1)
        batched_runs.append(run)
        unbatched_runs.append(await load(base + "/unbatched/v1/vqa", key, bodies, 32, args.seconds, args.warmup))
        print(f"  c=32 pair {i + 1}: batched {batched_runs[-1]}, unbatched {unbatched_runs[-1]}", file=sys.stderr,
              flush=True)
    results["32"] = median_run(batched_runs)
    results["unbatched_32"] = median_run(unbatched_runs)
    results["pairs_32"] = [{"batched": b["throughput"], "unbatched": u["throughput"], "mean_batch": b["mean_batch"],
                            "speedup": round(b["throughput"] / max(u["throughput"], 1e-9), 2)}
                           for b, u in zip(batched_runs, unbatched_runs)]
    results["floor_32"] = await load(base + "/floor/v1/vqa", key, bodies, 32, args.seconds, args.warmup)
    print(f"  floor (Serve alone) c=32  {results['floor_32']}", file=sys.stderr, flush=True)
    closed = request_bodies(ids[3])
    closed_runs: dict = {}
    for label, url in (("batched", base), ("unbatched", base + "/unbatched")):
        closed_runs[label] = await load(url + "/v1/vqa", key, closed, 32, args.seconds, args.warmup)
        print(f"  closed-set {label} c=32  {closed_runs[label]}", file=sys.stderr, flush=True)
    closed_runs["batched_speedup"] = round(closed_runs["batched"]["throughput"] /
                                           max(closed_runs["unbatched"]["throughput"], 1e-9), 2)
    results["closed_set_32"] = closed_runs
    stats = await models.stats.remote()
    # the swap timings are sequential blocking requests: run them off the loop
    results["model_swap"] = await asyncio.to_thread(model_swap, base, key, ids, args.swap_rounds)
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level (default 3)")
    parser.add_argument("--torch-threads", type=int, default=1, help="compute threads of each model replica (default 1)")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="the batched app's @serve.batch max_batch_size (default 16, the serving spec's default)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long a batch waits to fill (@serve.batch batch_wait_timeout_s, default 10 ms)")
    parser.add_argument("--pairs", type=int, default=3,
                        help="alternating batched/unbatched runs at concurrency 32 (default 3); the speedup is the "
                             "median of the pairs' ratios")
    parser.add_argument("--swap-rounds", type=int, default=3, help="model-swap rounds (2 swaps each)")
    args = parser.parse_args()

    from biomedgpt.serve.spec import apply_serve_ray_env

    apply_serve_ray_env()  # as `biomedgpt serve` does, before Ray starts
    import ray
    from ray import serve

    from biomedgpt.demo import wait_healthy
    from biomedgpt.session import ensure_ray, free_port
    from biomedgpt.serve.app import build_app_from_spec
    from biomedgpt.spec import serve_spec_from_dict

    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    registry, ids = make_models(tmp)
    tenants, key = make_tenants(tmp)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ensure_ray(num_cpus=2)
    results: dict = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, batch, route in (("batched", args.max_batch_size, "/"), ("unbatched", 1, "/unbatched")):
            spec = serve_spec_from_dict(spec_dict(name, registry, tenants, port, batch, route, args.torch_threads,
                                                 args.batch_wait_ms / 1000), f"<serve_load {name}>")
            serve.run(build_app_from_spec(spec), name=name, route_prefix=route, blocking=False)
        serve.run(floor_app(), name="floor", route_prefix="/floor", blocking=False)
        wait_healthy(base, timeout=300)
        wait_healthy(base + "/unbatched", timeout=300)
        for url in (base, base + "/unbatched"):  # load the model in both apps' replicas
            timed_post(url + "/v1/vqa", key, request_bodies(ids[0], 1)[0])
        stats = asyncio.run(measure(base, key, ids, args, results))
    finally:
        if "model_swap" not in results:  # measure() shuts Serve down itself on its loop
            serve.shutdown()
        ray.shutdown()
    speedup = statistics.median(p["speedup"] for p in results["pairs_32"])
    for c in ("1", "8"):
        results[c]["batched_speedup"] = None
    results["32"]["batched_speedup"] = speedup
    results["batched_speedup"] = speedup
    results["setup"] = {"model": "demo size, 64 px; open-ended VQA (beam 5, <= 16 tokens)",
                        "endpoint": "POST /v1/vqa (JSON)",
                        "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms, "max_models_per_replica": 2,
                        "model_replicas": 1, "torch_threads": args.torch_threads, "largest_batch_seen": stats["max_batch"],
                        "seconds_per_run": args.seconds, "pairs_32": args.pairs, "wall_s": round(time.time() - t_start, 1)}

    rows = [("app", "concurrency", "req/s", "p50 ms", "p99 ms", "errors")]
    for c in ("1", "8", "32"):
        r = results[c]
        rows.append(("batched", c, f"{r['throughput']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", str(r["errors"])))
    r = results["unbatched_32"]
    rows.append(("unbatched", "32", f"{r['throughput']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", str(r["errors"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows))
    roles = ["model", "ingress", "proxy", "client", "other"]
    cpu_rows = [("CPU at concurrency 32, ms per request (cores)", *roles, "total")]
    for label, r in (("batched", results["32"]), ("unbatched", results["unbatched_32"]),
                     ("Serve alone (no model, " + f"{results['floor_32']['throughput']:.0f} req/s)", results["floor_32"])):
        ms, cores = r["cpu"]["ms_per_request"], r["cpu"]["cores"]
        cpu_rows.append((label, *[f"{ms[k]:.1f} ({cores[k]:.2f})" for k in roles],
                         f"{sum(ms.values()):.1f} ({sum(cores.values()):.2f})"))
    widths = [max(len(row[i]) for row in cpu_rows) for i in range(len(cpu_rows[0]))]
    print("\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cpu_rows))
    cs = results["closed_set_32"]
    rows2 = [("closed-set (4 answers, scored)", "32", f"{cs['batched']['throughput']:.1f}",
              f"{cs['unbatched']['throughput']:.1f}", f"{cs['batched_speedup']:.2f}x",
              str(cs["batched"]["errors"] + cs["unbatched"]["errors"]))]
    print("  ".join(rows2[0][:1]) + f": batched {rows2[0][2]} req/s, unbatched {rows2[0][3]} req/s at concurrency 32 "
          f"({rows2[0][4]}), errors {rows2[0][5]}")
    sw = results["model_swap"]
    pairs = ", ".join(f"{p['batched']:.1f}/{p['unbatched']:.1f} = {p['speedup']:.2f}x" for p in results["pairs_32"])
    print(f"batched / unbatched at concurrency 32, {len(results['pairs_32'])} alternating pairs: {pairs}")
    print(f"batched / unbatched throughput at concurrency 32 (median of the pairs): {speedup:.2f}x (target >= 3x: "
          f"{'met' if speedup >= 3 else 'NOT met'}); largest batch {stats['max_batch']}")
    print(f"model swap (load a model not in the replica's LRU): median {sw['swap_ms_median']:.0f} ms, max "
          f"{sw['swap_ms_max']:.0f} ms, against {sw['warm_ms_median']:.0f} ms warm ({sw['swaps']} swaps)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
