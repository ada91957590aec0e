"""Answer-constrained decoding: a prefix tree (trie) over candidate answers.

Closed-set tasks (VQA with an answer list, classification, NLI) decode in one of two ways, as the
official recipes do:
- generation under the trie (`AnswerTrie.prefix_allowed_tokens_fn` given to `generate()`): at every
  step only tokens that continue some candidate are allowed, so only a candidate can come out;
- scoring (`score_candidates`): every candidate is scored by the sum of its tokens' log-probabilities,
  each step's distribution renormalised over the tokens the trie allows there (OFA's "all candidates"
  evaluation); the argmax is the prediction.
Candidates are token-id sequences ending with EOS (`AnswerTrie.from_texts` builds them from text).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from .modeling import BiomedGPTEncoderOutput, BiomedGPTForConditionalGeneration


class AnswerTrie:
    """Prefix tree over candidate token sequences (each ending with the EOS id)."""

    def __init__(self, candidates: Iterable[Sequence[int]], eos_token_id: int, pad_token_id: int = 1) -> None:
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.root: dict[int, dict] = {}
        self.candidates: list[tuple[int, ...]] = []
        seen: set[tuple[int, ...]] = set()
        for cand in candidates:
            seq = tuple(int(t) for t in cand)
            if not seq:
                raise ValueError("an answer candidate is empty")
            if seq[-1] != eos_token_id:
                seq = seq + (eos_token_id,)
            if eos_token_id in seq[:-1]:
                raise ValueError(f"candidate {seq} contains EOS before its end")
            if seq in seen:
                continue
            seen.add(seq)
            self.candidates.append(seq)
            node = self.root
            for tok in seq:
                node = node.setdefault(tok, {})
        if not self.candidates:
            raise ValueError("no answer candidates given")

    @classmethod
    def from_texts(cls, tokenizer, answers: Iterable[str]) -> "AnswerTrie":
        """Build from answer strings, encoded as the targets are (`tokenizer.encode_text`, then EOS)."""
        encode = getattr(tokenizer, "encode_text", None)
        seqs = []
        for text in answers:
            ids = encode(text) if encode is not None else tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]
            seqs.append(list(ids) + [tokenizer.eos_token_id])
        return cls(seqs, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.candidates)

    def next_tokens(self, prefix: Sequence[int]) -> list[int]:
        """Token ids that may follow `prefix` (answer tokens so far, without BOS). Once a candidate is
        complete (EOS emitted) only padding may follow, as generate() pads finished rows."""
        node = self.root
        for i, tok in enumerate(prefix):
            tok = int(tok)
            if tok == self.eos_token_id or (tok == self.pad_token_id and i > 0 and int(prefix[i - 1]) in (self.eos_token_id, self.pad_token_id)):
                return [self.pad_token_id]
            if tok not in node:
                return []
            node = node[tok]
        return list(node.keys())

    def prefix_allowed_tokens_fn(self, decoder_start_len: int = 1) -> Callable[[int, torch.Tensor], list[int]]:
        """A `prefix_allowed_tokens_fn` for `generate()`: the decoder prefix minus its start token(s)."""

        def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            tokens = self.next_tokens(input_ids[decoder_start_len:].tolist())
            # An off-trie prefix cannot arise under this constraint; end it rather than fail.
            return tokens or [self.eos_token_id]

        return allowed


@torch.no_grad()
def score_candidates(
    model: BiomedGPTForConditionalGeneration,
    trie: AnswerTrie,
    input_ids: torch.Tensor,
    patch_images: torch.Tensor | None = None,
    patch_masks: torch.Tensor | None = None,
    constrain: bool = True,
    normalize: bool = False,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Log-probability of every candidate for every sample: (B, num_candidates), float32.

    Each candidate is teacher-forced after BOS; with `constrain`, each step's log-softmax runs only
    over the tokens the trie allows there. `normalize` divides by the candidate length in tokens.
    The encoder runs once per sample; candidates go through the decoder in chunks of `chunk_size`.
    """
    device = input_ids.device
    bsz = input_ids.size(0)
    enc = model.encoder(input_ids, patch_images=patch_images, patch_masks=patch_masks)
    cands = trie.candidates
    max_len = max(len(c) for c in cands)
    pad = model.config.pad_token_id
    targets = torch.full((len(cands), max_len), pad, dtype=torch.long)
    valid = torch.zeros(len(cands), max_len, dtype=torch.bool)
    # Per step, the ids the trie allows (padded with -1): a (N, L, K) index instead of a vocab-wide mask.
    allowed_lists = [[trie.next_tokens(c[:i]) for i in range(len(c))] for c in cands]
    k_max = max(len(a) for steps in allowed_lists for a in steps)
    allowed = torch.full((len(cands), max_len, k_max), -1, dtype=torch.long)
    for i, cand in enumerate(cands):
        targets[i, : len(cand)] = torch.tensor(cand)
        valid[i, : len(cand)] = True
        for j, ids in enumerate(allowed_lists[i]):
            allowed[i, j, : len(ids)] = torch.tensor(ids)
    dec_in = torch.cat([torch.full((len(cands), 1), model.config.decoder_start_token_id), targets[:, :-1]], dim=1)
    dec_in = dec_in.masked_fill(~torch.cat([torch.ones(len(cands), 1, dtype=torch.bool), valid[:, :-1]], 1), pad)
    scores = torch.empty(bsz, len(cands), dtype=torch.float32, device=device)
    for start in range(0, len(cands), chunk_size):
        sl = slice(start, min(start + chunk_size, len(cands)))
        n = sl.stop - sl.start
        for b in range(bsz):
            rep = BiomedGPTEncoderOutput(
                last_hidden_state=enc.last_hidden_state[b : b + 1].expand(n, -1, -1),
                padding_mask=enc.padding_mask[b : b + 1].expand(n, -1),
                position_embeddings=enc.position_embeddings[b : b + 1].expand(n, -1, -1),
            )
            logits = model(decoder_input_ids=dec_in[sl].to(device), encoder_outputs=rep, use_cache=False).logits.float()
            target_logit = logits.gather(-1, targets[sl].to(device)[..., None]).squeeze(-1)
            if constrain:
                idx = allowed[sl].to(device)
                sub = logits.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf"))
                norm = torch.logsumexp(sub, dim=-1)
            else:
                norm = torch.logsumexp(logits, dim=-1)
            v = valid[sl].to(device)
            tok = (target_logit - norm).masked_fill(~v, 0.0)
            total = tok.sum(-1)
            if normalize:
                total = total / v.sum(-1)
            scores[b, sl] = total
    return scores


def best_candidates(trie: AnswerTrie, scores: torch.Tensor) -> list[tuple[int, ...]]:
    """The highest-scoring candidate sequence of each row of `score_candidates`' output."""
    return [trie.candidates[i] for i in scores.argmax(-1).tolist()]
