"""Adapters in the serving engine (no Ray): one base with three registry adapters loaded; a mixed batch of
requests for the three adapters and the base, every task's decoding (candidate scoring, multi-label lists, beam
search), answers each request as the same adapter loaded alone with peft in this process does; a merged export
answers as its adapter; the adapter LRU keeps counts and bytes within limits and never evicts the running batch."""

from __future__ import annotations

import numpy as np
import pytest
from serve_helpers import make_adapter_checkpoint, make_model_dir

from biomedgpt.serve.engine import LoadedModel, Query, ensure_adapters, evict_adapters, load_model, run_batch
from biomedgpt.serve.registry import Registry

DEPT = "stanford-like-radiology"
CHEST = ["atelectasis", "cardiomegaly", "effusion"]


@pytest.fixture(scope="module")
def published(tmp_path_factory, demo_tokenizer_dir):
    root = tmp_path_factory.mktemp("adapter-engine")
    reg = Registry(str(root / "registry"))
    base = reg.export(make_model_dir(root / "base-src", demo_tokenizer_dir, seed=11), DEPT, "base")
    base_dir = reg.local_dir(base)
    adapters = {}
    for i in range(3):
        ckpt = make_adapter_checkpoint(root / "runs" / f"lora-{i}", base_dir, seed=100 + i, base_id=base.id)
        entry = reg.export(ckpt, DEPT, f"lora-{i}")
        adapters[entry.id] = reg.local_dir(entry)
    merged = reg.local_dir(reg.export(make_adapter_checkpoint(root / "runs" / "lora-m", base_dir, seed=100,
                                                              base_id=base.id), DEPT, "merged", merge=True))
    return reg, base_dir, adapters, merged


def queries(adapter: str | None, i: int) -> list[Query]:
    """One request of every decoding the engine has (what the ingress would prepare), for `adapter`."""
    g = np.random.default_rng(i)
    image = g.standard_normal((3, 64, 64)).astype(np.float32)
    return [
        Query("vqa", f"what does the image show in region {i}?", image, ("yes", "no", "left lung", "ct"), adapter=adapter),
        Query("classify", "what disease does the image show?", image, ("normal", "pneumonia", "effusion"),
              adapter=adapter),
        Query("classify", "what findings does the image show?", image, (*CHEST, "no finding"), multi_label=True,
              adapter=adapter),
        Query("caption", "what does the image describe?", image, adapter=adapter),
        Query("nli", f"can the premise 'the lung is clear {i}' conclude the hypothesis 'no effusion'?", None,
              ("entailment", "neutral", "contradiction"), adapter=adapter),
    ]


def alone(base_dir, adapter_dir, qs: list[Query]) -> list[dict]:
    """The same queries through the adapter loaded alone with peft (its active adapter; no routing)."""
    from peft import PeftModel

    lm = load_model(base_dir, "alone")
    PeftModel.from_pretrained(lm.predictor.model, str(adapter_dir), is_trainable=False).eval()
    return run_batch(lm, [Query(**{**q.__dict__, "adapter": None}) for q in qs])


def same(a: dict, b: dict) -> None:
    assert a["answer"] == b["answer"] and a.get("labels") == b.get("labels") and a["decoding"] == b["decoding"]
    if a["scores"] is not None:
        assert [s["candidate"] for s in a["scores"]] == [s["candidate"] for s in b["scores"]]
        np.testing.assert_allclose([s["log_prob"] for s in a["scores"]], [s["log_prob"] for s in b["scores"]],
                                   atol=1e-4)


def test_a_mixed_batch_answers_each_request_as_its_adapter_alone(published):
    reg, base_dir, adapters, merged = published
    lm = load_model(base_dir, f"{DEPT}/base@1")
    assert ensure_adapters(lm, adapters) == list(adapters)
    ids = [*adapters, None]  # three adapters and the base itself, in one batch
    batch = [q for i, a in enumerate(ids) for q in queries(a, i)]
    served = run_batch(lm, batch)
    assert all("error" not in r for r in served)
    per = len(queries(None, 0))
    base_only = load_model(base_dir, "plain")
    for i, a in enumerate(ids):
        mine = served[i * per:(i + 1) * per]
        expected = alone(base_dir, adapters[a], queries(None, i)) if a else run_batch(base_only, queries(None, i))
        for got, want in zip(mine, expected):
            same(got, want)
    # the adapters change the answers (else the test would prove nothing)
    plain = run_batch(base_only, queries(None, 0))
    differs = [r["scores"][0]["log_prob"] != p["scores"][0]["log_prob"] for r, p in zip(served[:per], plain)
               if r["scores"]]
    assert all(differs)
    # a merged export answers as its adapter (lora-0's weights: same seed)
    merged_lm = load_model(merged, "merged")
    for got, want in zip(run_batch(merged_lm, queries(None, 0)), served[:per]):
        same(got, want)


def test_the_adapter_lru_keeps_counts_and_bytes_and_spares_the_batch(published):
    reg, base_dir, adapters, _ = published
    ids = list(adapters)
    lm = load_model(base_dir, f"{DEPT}/base@1")
    ensure_adapters(lm, {ids[0]: adapters[ids[0]], ids[1]: adapters[ids[1]]})
    one = lm.adapter_bytes() // 2
    assert one > 0 and lm.predictor.adapters.sizes[ids[0]] == one
    ensure_adapters(lm, {ids[0]: adapters[ids[0]]})  # used again: lora-1 is now the least recently used
    ensure_adapters(lm, {ids[2]: adapters[ids[2]]})
    assert evict_adapters([lm], 2, 10 * one, keep={ids[2]}) == [ids[1]]
    assert list(lm.adapter_meta) == [ids[0], ids[2]]
    assert evict_adapters([lm], 5, one, keep={ids[2]}) == [ids[0]]  # bytes: room for one
    assert evict_adapters([lm], 0, 0, keep={ids[2]}) == []  # the running batch's adapter stays
    # an evicted adapter loads again and answers as before
    first = run_batch(lm, queries(ids[2], 1)[:1])
    ensure_adapters(lm, {ids[0]: adapters[ids[0]]})
    again = run_batch(lm, [*queries(ids[0], 0)[:1], *queries(ids[2], 1)[:1]])
    same(again[1], first[0])
    with pytest.raises(KeyError):
        run_batch(lm, queries(ids[1], 0)[:1])


def test_further_adapters_are_added_layer_by_layer_and_answer_as_alone(published, monkeypatch):
    """Only the first adapter goes through peft's PeftModel.from_pretrained; further plain LoRA adapters are added to
    the LoRA layers it made, and unloaded from them, without peft's load_adapter/delete_adapter (which walk every
    parameter of the model per adapter: their cost grows with the adapters resident) and without a layer's
    `update_layer` (which sets every adapter already in the layer again), and answer as alone."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    reg, base_dir, adapters, _ = published
    ids = list(adapters)
    lm = load_model(base_dir, f"{DEPT}/base@1")
    ensure_adapters(lm, {ids[0]: adapters[ids[0]]})

    def refused(*args, **kwargs):
        raise AssertionError("peft's whole-model walk or update_layer was used")

    monkeypatch.setattr(PeftModel, "load_adapter", refused)
    monkeypatch.setattr(PeftModel, "delete_adapter", refused)
    monkeypatch.setattr(LoraLayer, "update_layer", refused)
    ensure_adapters(lm, {ids[1]: adapters[ids[1]], ids[2]: adapters[ids[2]]})
    sizes = lm.predictor.adapters.sizes
    assert sizes[ids[1]] == sizes[ids[2]] == sizes[ids[0]] > 0
    assert evict_adapters([lm], 2, 10 * sizes[ids[0]], keep={ids[0], ids[2]}) == [ids[1]]
    served = run_batch(lm, queries(ids[2], 2)[:2])
    monkeypatch.undo()  # the reference loads the adapter alone with peft itself
    for got, want in zip(served, alone(base_dir, adapters[ids[2]], queries(None, 2)[:2])):
        same(got, want)


def test_the_batched_lora_step_answers_as_each_adapter_alone_and_forgets_unloaded_ones(published, tmp_path,
                                                                                      monkeypatch):
    """A mixed batch's LoRA layers answer in one batched step (`AdapterSet.route`: peft's per-adapter mixed-batch
    forward is never called): each row's logits are those of its adapter loaded alone with peft (to float
    rounding; adapters of rank 4 and 2 side by side), a row without adapter is the base's; unloading an adapter
    drops the stacked weights that held it, later batches stack only the adapters still loaded and still answer
    as alone, and the unloaded id is refused."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear

    from biomedgpt.model.adapters import Stacked

    reg, base_dir, adapters, _ = published
    small = reg.export(make_adapter_checkpoint(tmp_path / "lora-r2", base_dir, seed=7, rank=2,
                                               base_id=f"{DEPT}/base@1"), DEPT, "lora-r2")
    dirs = {**adapters, small.id: reg.local_dir(small)}
    ids = list(dirs)
    lm = load_model(base_dir, f"{DEPT}/base@1")
    ensure_adapters(lm, dirs)
    p, aset = lm.predictor, lm.predictor.adapters
    rows = [ids[0], ids[3], None, ids[1], ids[0], ids[2]]
    g = np.random.default_rng(3)
    inputs = p.inputs([f"what does region {i} show?" for i in range(len(rows))],
                      [g.standard_normal((3, 64, 64)).astype(np.float32) for _ in rows])
    dec = torch.randint(4, int(p.model.config.vocab_size), (len(rows), 5), generator=torch.Generator().manual_seed(0))

    def logits(model) -> torch.Tensor:
        with torch.inference_mode():
            return model(**inputs, decoder_input_ids=dec).logits

    def alone(adapter_id) -> torch.Tensor:
        model = load_model(base_dir, "alone").predictor.model
        if adapter_id is not None:
            PeftModel.from_pretrained(model, str(dirs[adapter_id]), is_trainable=False).eval()
        return logits(model)

    def mixed(batch) -> torch.Tensor:
        with aset.route(batch):
            return logits(p.model)

    def refused(*args, **kwargs):
        raise AssertionError("peft's per-adapter mixed-batch forward was used")

    with monkeypatch.context() as m:
        m.setattr(LoraLinear, "_mixed_batch_forward", refused)
        served = mixed(rows)
    expected = {a: alone(a) for a in set(rows)}
    for i, a in enumerate(rows):
        torch.testing.assert_close(served[i], expected[a][i], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(served[0], expected[None][0], atol=1e-3)  # the adapters change the logits
    names = {aset.names[a] for a in ids}
    batch, stacks = aset._stacks
    assert set(batch) == names and any(isinstance(s, Stacked) and s.a.shape[0] == 3 * 4 + 2 for s in stacks.values())

    gone = aset.names[ids[1]]
    evict_adapters([lm], 3, 2**30, keep={ids[0], ids[2], ids[3]})
    assert ids[1] not in aset and aset._stacks is None
    assert not any(gone in layer.lora_A for layer in aset._lora_layers().values())
    rest = [ids[0], ids[3], None, ids[2], ids[0], ids[2]]
    with monkeypatch.context() as m:
        m.setattr(LoraLinear, "_mixed_batch_forward", refused)
        served = mixed(rest)
    assert gone not in aset._stacks[0]
    for i, a in enumerate(rest):
        torch.testing.assert_close(served[i], expected[a][i] if a in expected else alone(a)[i], atol=1e-4, rtol=1e-4)
    with pytest.raises(KeyError):
        mixed([ids[1], None, None, None, None, None])
