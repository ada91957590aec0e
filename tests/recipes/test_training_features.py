"""The fine-tuning features of the LightningModule (train/module.py), each shown on a tiny model on CPU:
constrained label smoothing, per-example loss weights, drop-worst, decoder-input noise, frozen token
embeddings and the EMA of the weights."""

from __future__ import annotations

import json
import types

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from biomedgpt.model import BiomedGPTConfig
from biomedgpt.train.module import EMA, BiomedGPTModule, CandidateTrie, sequence_loss

VOCAB = 64


def tiny_config() -> dict:
    cfg = BiomedGPTConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, resnet_type="resnet18",
                          dropout=0.0, encoder_drop_path_rate=0.0, decoder_drop_path_rate=0.0)
    return json.loads(cfg.to_json_string(use_diff=False))


def batch_of(labels: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lab = torch.tensor(labels)
    dec = torch.cat([torch.zeros(len(labels), 1, dtype=torch.long), lab[:, :-1].clamp(min=1)], 1)
    dec[lab == -100] = 1
    dec[:, 0] = 0
    n = len(labels)
    return {"input_ids": torch.randint(4, VOCAB, (n, 6), generator=g), "patch_images": torch.zeros(n, 3, 32, 32),
            "patch_masks": torch.zeros(n, dtype=torch.bool), "decoder_input_ids": dec, "labels": lab}


# ---------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------


def implied_target(logits: torch.Tensor, labels: torch.Tensor, **kw) -> torch.Tensor:
    """The target distribution q of a one-token cross-entropy: d loss / d logits = softmax - q (over the
    scored tokens), so q = p - grad, with p the softmax over the scored tokens."""
    logits = logits.clone().requires_grad_(True)
    loss, n = sequence_loss(logits, labels, **kw)
    assert n == 1
    loss.backward()
    scored = logits.detach()
    if kw.get("allowed") is not None:
        scored = scored.masked_fill(~kw["allowed"], float("-inf"))
    return (F.softmax(scored, -1) - logits.grad)[0, 0]


def test_restricted_smoothing_puts_zero_mass_outside_the_candidates():
    # candidates (label sequences): "10 11 </s>", "10 12 </s>", "13 </s>"; the target is the first one
    trie = CandidateTrie([[10, 11, 2], [10, 12, 2], [13, 2]])
    labels = torch.tensor([[10, 11, 2]])
    allowed = trie.allowed_mask(labels, VOCAB)
    assert allowed[0, 0].nonzero().flatten().tolist() == [10, 13]
    assert allowed[0, 1].nonzero().flatten().tolist() == [11, 12]
    assert allowed[0, 2].nonzero().flatten().tolist() == [2]
    logits = torch.randn(1, 3, VOCAB, generator=torch.Generator().manual_seed(0))
    eps = 0.1
    # second position: the target 11 gets 1 - eps, the only other candidate token (12) eps, nothing else
    q = implied_target(logits[:, 1:2], labels[:, 1:2], epsilon=eps, allowed=allowed[:, 1:2])
    expected = torch.zeros(VOCAB)
    expected[11], expected[12] = 1 - eps, eps
    torch.testing.assert_close(q, expected, atol=1e-6, rtol=0)
    # unrestricted smoothing spreads eps over the whole vocabulary instead
    q_all = implied_target(logits[:, 1:2], labels[:, 1:2], epsilon=eps)
    assert q_all[11].item() == pytest.approx(1 - eps, abs=1e-6)
    assert (q_all[torch.arange(VOCAB) != 11] > 0).all()
    assert q_all[40].item() == pytest.approx(eps / (VOCAB - 1), abs=1e-6)
    # a position where the candidates allow only the target (</s> here) is plain (1 - eps) x NLL
    loss, _ = sequence_loss(logits[:, 2:3], labels[:, 2:3], epsilon=eps, allowed=allowed[:, 2:3])
    assert loss.item() == pytest.approx((1 - eps) * 0.0, abs=1e-6)  # softmax over one token: NLL 0


def test_a_target_outside_the_candidates_is_scored_unconstrained():
    trie = CandidateTrie([[10, 11, 2]])
    labels = torch.tensor([[10, 20, 2, -100]])
    allowed = trie.allowed_mask(labels, VOCAB)
    assert allowed[0, 0].sum() == 1 and allowed[0, 1:].all()
    logits = torch.randn(1, 4, VOCAB)
    ref = F.cross_entropy(logits[0, 1:3], labels[0, 1:3], reduction="sum")  # position 0: only 10 allowed, NLL 0
    loss, n = sequence_loss(logits, labels, allowed=allowed)
    assert n == 3 and loss.item() == pytest.approx(ref.item() / 3, rel=1e-5)


def test_plain_loss_is_token_cross_entropy_and_weights_scale_examples():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, VOCAB, generator=g)
    labels = torch.tensor([[5, 6, 2], [7, 2, -100]])
    loss, n = sequence_loss(logits, labels)
    assert n == 5
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100))
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="none")
    weighted, _ = sequence_loss(logits, labels, weights=torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(weighted, (2 * per_token[:3].sum() + per_token[3:5].sum()) / 5)


def test_drop_worst_drops_the_highest_token_losses():
    # 8 target tokens whose losses are known: token i gets logit gap i, so its loss falls with i
    labels = torch.tensor([[3, 3, 3, 3], [3, 3, 3, 3]])
    logits = torch.zeros(2, 4, VOCAB)
    gaps = torch.arange(8, dtype=torch.float).reshape(2, 4)
    logits[..., 3] = gaps
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    loss, n = sequence_loss(logits, labels, drop_worst_ratio=0.25)  # keep int(8 * 0.75) = 6 tokens
    assert n == 6
    # the two worst are the tokens with the smallest gaps (0 and 1, both in the first example)
    torch.testing.assert_close(loss, per_token[2:].mean())


def module(**kw) -> BiomedGPTModule:
    m = BiomedGPTModule(tiny_config(), seed=0, **kw)
    m.configure_model()
    return m


def at_step(m: BiomedGPTModule, step: int) -> BiomedGPTModule:
    m._trainer = types.SimpleNamespace(global_step=step, global_rank=0)  # what the loss reads of the trainer
    return m


def test_module_drops_worst_only_after_drop_worst_after_steps():
    m = module(drop_worst_ratio=0.5, drop_worst_after=3)
    b = batch_of([[5, 6, 7, 2], [8, 9, 2, -100]])
    with torch.no_grad():
        logits = m.model(input_ids=b["input_ids"], patch_images=b["patch_images"], patch_masks=b["patch_masks"],
                         decoder_input_ids=b["decoder_input_ids"], use_cache=False).logits
        full, _ = sequence_loss(logits, b["labels"])
        dropped, _ = sequence_loss(logits, b["labels"], drop_worst_ratio=0.5)
        assert dropped < full
        assert at_step(m, 3).loss(b).item() == pytest.approx(full.item(), rel=1e-5)  # not after 3 steps yet
        assert at_step(m, 4).loss(b).item() == pytest.approx(dropped.item(), rel=1e-5)


def test_decoder_noise_replaces_the_ratio_of_target_tokens_with_text_tokens():
    m = at_step(module(decoder_noise=0.3, noise_vocab_end=40), 7)
    dec = torch.randint(4, 40, (64, 33))
    dec[:, 0] = 0
    dec[:32, 25:] = 1  # padding
    noisy = m.noisy_decoder_inputs(dec, batch_idx=0)
    assert (noisy[:, 0] == 0).all() and (noisy[:32, 25:] == 1).all()  # BOS and padding untouched
    changed = (noisy != dec).float()
    eligible = torch.ones_like(dec, dtype=torch.bool)
    eligible[:, 0] = False
    eligible[:32, 25:] = False
    rate = changed[eligible].mean().item()
    # a replaced token equals the old one with probability 1/36: the observed rate is ~0.3 * 35/36
    assert 0.25 < rate < 0.33, rate
    assert ((noisy >= 4) & (noisy < 40))[eligible].all()
    assert torch.equal(m.noisy_decoder_inputs(dec, batch_idx=0), noisy)  # reproducible for a resumed run
    assert not torch.equal(m.noisy_decoder_inputs(dec, batch_idx=1), noisy)
    assert torch.equal(module().noisy_decoder_inputs(dec), dec)  # off by default


# ---------------------------------------------------------------------------------------------------
# Training a few steps: frozen embeddings, EMA
# ---------------------------------------------------------------------------------------------------


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})


def train(m: BiomedGPTModule, steps: int, callbacks=()) -> None:
    batches = [batch_of([[5 + i, 6, 7, 2], [8, 9 + i, 2, -100]], seed=i) for i in range(steps)]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(m, train_dataloaders=Batches(batches))


class Batches:
    """An iterable of ready batches (a plain list would be taken for a dataset of samples)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_frozen_token_embeddings_do_not_move_while_the_rest_trains():
    m = module(freeze_token_embeddings=True, lr=1e-2, warmup_ratio=0.0)
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    emb = m.model.get_input_embeddings().weight.detach().clone()
    train(m, 3)
    assert torch.equal(m.model.get_input_embeddings().weight, emb)
    assert torch.equal(m.model.decoder.output_projection.weight, emb)  # tied: frozen with it
    moved = [n for n, p in m.model.named_parameters() if not torch.equal(p, before[n])]
    assert any("layers.0" in n for n in moved) and "encoder.embed_tokens.weight" not in moved
    opt_params = {id(p) for g in m.trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(m.model.get_input_embeddings().weight) not in opt_params


def test_ema_equals_the_manual_moving_average_of_the_weights():
    decay = 0.6
    m = module(ema_decay=decay, lr=1e-2, warmup_ratio=0.0)
    start = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    snaps = Snapshots()
    train(m, 4, [snaps])
    assert len(snaps.weights) == 4
    manual = dict(start)
    for w in snaps.weights:
        manual = {n: decay * manual[n] + (1 - decay) * w[n] for n in manual}
    ema = m.ema.weights()
    for n, v in manual.items():
        torch.testing.assert_close(ema[n], v, atol=1e-6, rtol=1e-5, msg=n)
    last = snaps.weights[-1]
    assert any(not torch.allclose(ema[n], last[n]) for n in last)  # not just the current weights
    # BatchNorm running statistics (floating buffers) are averaged too; they are in the module's state
    assert any(k.startswith("ema.") and "running_mean" in k for k in m.state_dict())
    assert isinstance(m.ema, EMA)
