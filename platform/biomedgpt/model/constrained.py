"""Answer-constrained decoding: a prefix tree (trie) over candidate answers.

Closed-set tasks (VQA with an answer list, classification, NLI) decode in one of two ways, as the
official recipes do:
- generation under the trie (`AnswerTrie.prefix_allowed_tokens_fn` given to `generate()`): at every
  step only tokens that continue some candidate are allowed, so only a candidate can come out;
- scoring (`score_candidates`): every candidate is scored by the sum of its tokens' log-probabilities,
  each step's distribution renormalised over the tokens the trie allows there (OFA's "all candidates"
  evaluation); the argmax is the prediction.
Candidates are token-id sequences ending with EOS (`AnswerTrie.from_texts` builds them from text).

Multi-label answers (a list of class names, e.g. ChestMNIST's findings) have their own constraint,
`MultiLabelTrie`: one class name, then either EOS or the separator (",") and a class name later in
class order, and so on (no repeats, class order, as the targets are written), or the single answer for
none ("no finding") then EOS. `label_list_probabilities` gives every class a probability of being
listed, judged where the model's own answer would list it (the per-class scores of ROC AUC).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Sequence

import torch

from .modeling import BiomedGPTEncoderOutput, BiomedGPTForConditionalGeneration
from .routing import sample_rows


class PrefixConstraint(ABC):
    """What a decoding constraint gives `generate()`: subclasses say which tokens may follow a prefix
    (`next_tokens`) and which token ends an answer (`eos_token_id`)."""

    eos_token_id: int

    @abstractmethod
    def next_tokens(self, prefix: Sequence[int]) -> list[int]:
        """The tokens allowed after `prefix` (empty when the prefix is off the constraint)."""

    def prefix_allowed_tokens_fn(self, decoder_start_len: int = 1) -> Callable[[int, torch.Tensor], list[int]]:
        """A `prefix_allowed_tokens_fn` for `generate()`: the decoder prefix minus its start token(s)."""

        def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            tokens = self.next_tokens(input_ids[decoder_start_len:].tolist())
            # An off-constraint prefix cannot arise under the constraint; end it rather than fail.
            return tokens or [self.eos_token_id]

        return allowed


class AnswerTrie(PrefixConstraint):
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



#: (sample, candidate) rows the decoder scores in one call: bounds the logits one scoring call allocates
SCORE_CHUNK_ROWS = 256


@torch.no_grad()
def score_candidates(
    model: BiomedGPTForConditionalGeneration,
    trie: AnswerTrie,
    input_ids: torch.Tensor,
    patch_images: torch.Tensor | None = None,
    patch_masks: torch.Tensor | None = None,
    constrain: bool = True,
    normalize: bool = False,
    chunk_size: int = SCORE_CHUNK_ROWS,
) -> torch.Tensor:
    """Log-probability of every candidate for every sample: (B, num_candidates), float32, on the
    inputs' device.

    Each candidate is teacher-forced after BOS; with `constrain`, each step's log-softmax runs only
    over the tokens the trie allows there. `normalize` divides by the candidate length in tokens.
    The encoder runs once per sample; the decoder runs over samples x candidates together, at most
    `chunk_size` (sample, candidate) rows per call (one call for a batch of serving requests).
    """
    device = input_ids.device
    bsz = input_ids.size(0)
    enc = model.encoder(input_ids, patch_images=patch_images, patch_masks=patch_masks)
    cands = trie.candidates
    n = len(cands)
    max_len = max(len(c) for c in cands)
    pad = model.config.pad_token_id
    targets = torch.full((n, max_len), pad, dtype=torch.long)
    valid = torch.zeros(n, max_len, dtype=torch.bool)
    # Per step, the ids the trie allows (padded with -1): a (N, L, K) index instead of a vocab-wide mask.
    allowed_lists = [[trie.next_tokens(c[:i]) for i in range(len(c))] for c in cands]
    k_max = max(len(a) for steps in allowed_lists for a in steps)
    allowed = torch.full((n, max_len, k_max), -1, dtype=torch.long)
    for i, cand in enumerate(cands):
        targets[i, : len(cand)] = torch.tensor(cand)
        valid[i, : len(cand)] = True
        for j, ids in enumerate(allowed_lists[i]):
            allowed[i, j, : len(ids)] = torch.tensor(ids)
    dec_in = torch.cat([torch.full((n, 1), model.config.decoder_start_token_id), targets[:, :-1]], dim=1)
    dec_in = dec_in.masked_fill(~torch.cat([torch.ones(n, 1, dtype=torch.bool), valid[:, :-1]], 1), pad)
    targets, valid, allowed, dec_in = (t.to(device) for t in (targets, valid, allowed, dec_in))
    out = torch.empty(bsz * n, dtype=torch.float32, device=device)
    for start in range(0, bsz * n, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, bsz * n), device=device)
        b, c = rows // n, rows % n
        rep = BiomedGPTEncoderOutput(last_hidden_state=enc.last_hidden_state[b], padding_mask=enc.padding_mask[b],
                                     position_embeddings=enc.position_embeddings[b])
        with sample_rows(b):  # per-sample adapters follow each row's sample (model/routing.py)
            logits = model(decoder_input_ids=dec_in[c], encoder_outputs=rep, use_cache=False).logits.float()
        target_logit = logits.gather(-1, targets[c][..., None]).squeeze(-1)
        if constrain:
            idx = allowed[c]
            norm = torch.logsumexp(logits.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf")), dim=-1)
        else:
            norm = torch.logsumexp(logits, dim=-1)
        v = valid[c]
        total = (target_logit - norm).masked_fill(~v, 0.0).sum(-1)
        out[rows] = total / v.sum(-1) if normalize else total
    return out.view(bsz, n)


class _Node:
    """A node of a prefix tree over token sequences: children by token id, and the index of the item
    whose tokens end here (None where none does)."""

    __slots__ = ("children", "end")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.end: int | None = None


#: `MultiLabelTrie.continuation`'s item for the end of an answer (EOS)
END = -1


class MultiLabelTrie(PrefixConstraint):
    """The token sequences of multi-label answers (see the module docstring), as a state machine.

    `names[i]`: the tokens of class i as it appears in an answer (`tokenizer.encode_text(name)`), in
    class order; `separator`: the tokens between two names; `none`: the tokens of the answer for none.
    Item `num_classes` stands for that answer in `continuation` and in `label_list_probabilities`'
    columns. Construction fails where an answer could be read two ways (equal names, or a name that
    continues with the separator's first token where it may also end).
    """

    def __init__(self, names: Sequence[Sequence[int]], separator: Sequence[int], none: Sequence[int],
                 eos_token_id: int, pad_token_id: int = 1) -> None:
        self.names = [tuple(int(t) for t in n) for n in names]
        self.separator = tuple(int(t) for t in separator)
        self.none = tuple(int(t) for t in none)
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        if not self.names:
            raise ValueError("no class names given")
        if not self.separator or not self.none or not all(self.names):
            raise ValueError("a class name, the separator or the answer for none has no tokens")
        for seq in (*self.names, self.separator, self.none):
            if eos_token_id in seq or pad_token_id in seq:
                raise ValueError(f"token sequence {seq} contains EOS or padding")
        seen: dict[tuple[int, ...], int] = {}
        for i, seq in enumerate([*self.names, self.none]):
            if seq in seen:
                raise ValueError(f"items {seen[seq]} and {i} have the same tokens {seq}: an answer could not be read back")
            seen[seq] = i
        # roots[k + 1]: the prefix tree of the items that may come after class k (k = -1: the first item,
        # where the answer for none is one of them)
        self.roots: list[_Node] = []
        for after in range(-1, len(self.names)):
            root = _Node()
            items = [(j, self.names[j]) for j in range(after + 1, len(self.names))]
            if after == -1:
                items.append((len(self.names), self.none))
            for j, seq in items:
                node = root
                for tok in seq:
                    node = node.children.setdefault(tok, _Node())
                node.end = j
            self.roots.append(root)
        for i in range(len(self.names) - 1):  # the separator may follow class i here
            node = self._end_node(i)
            if self.separator[0] in node.children:
                raise ValueError(f"class {i}: a longer class name continues it with the separator's first token "
                                 f"{self.separator[0]}, so an answer could not be read back")

    @classmethod
    def from_texts(cls, tokenizer, names: Sequence[str], none: str, separator: str = ", ") -> "MultiLabelTrie":
        """Build from class names (in class order), the answer for none and the text that joins names,
        encoded exactly as the targets are: the separator's tokens are read off `encode_text` of
        two-name answers, and every pair of classes and the list of all of them must encode as the
        concatenation of their parts (else ValueError naming the pair)."""
        enc = tokenizer.encode_text
        seqs = [list(enc(n)) for n in names]
        sep: list[int] | None = None
        checks = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
        for i, j in checks or [(0, 0)]:
            full = list(enc(f"{names[i]}{separator}{names[j]}"))
            a, b = seqs[i], seqs[j]
            middle = full[len(a): len(full) - len(b)]
            if full[: len(a)] != a or full[len(full) - len(b):] != b or not middle or (sep is not None and middle != sep):
                raise ValueError(f"{names[i]!r}{separator!r}{names[j]!r} does not encode as the tokens of its parts "
                                 "(the tokenizer merges across the separator): these names cannot be listed")
            sep = middle
        assert sep is not None
        everything = list(enc(separator.join(names)))
        expected = [t for k, s in enumerate(seqs) for t in ([*sep, *s] if k else s)]
        if everything != expected:
            raise ValueError(f"the list of all {len(names)} class names does not encode as the tokens of its parts")
        return cls(seqs, sep, enc(none), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def max_length(self) -> int:
        """Tokens of the longest answer, EOS included (every class listed)."""
        listed = sum(len(n) for n in self.names) + (len(self.names) - 1) * len(self.separator)
        return max(listed, len(self.none)) + 1

    def _end_node(self, i: int) -> _Node:
        node = self.roots[0]
        for tok in self.names[i]:
            node = node.children[tok]
        return node

    def _walk(self, prefix: Sequence[int]) -> tuple[str, Any, int, list[int]] | None:
        """The state after `prefix`: (mode, node or separator position, last class listed, classes
        listed so far), mode in item | separator | done; None when the prefix is no answer's."""
        mode, node, last, listed = "item", self.roots[0], -1, []
        pos = 0
        for i, tok in enumerate(prefix):
            tok = int(tok)
            if mode == "done":
                if tok in (self.pad_token_id, self.eos_token_id):
                    continue
                return None
            if mode == "separator":
                if tok != self.separator[pos]:
                    return None
                pos += 1
                if pos == len(self.separator):
                    mode, node = "item", self.roots[last + 1]
                continue
            if tok == self.eos_token_id and node.end is not None:
                if node.end < self.num_classes:
                    listed.append(node.end)
                mode = "done"
            elif tok == self.separator[0] and node.end is not None and node.end < self.num_classes - 1 \
                    and tok not in node.children:
                last = node.end
                listed.append(last)
                mode, pos = "separator", 1
                if pos == len(self.separator):
                    mode, node = "item", self.roots[last + 1]
            elif tok in node.children:
                node = node.children[tok]
            else:
                return None
        return mode, (node if mode == "item" else pos), last, listed

    def next_tokens(self, prefix: Sequence[int]) -> list[int]:
        """Token ids that may follow `prefix` (answer tokens so far, without BOS); after EOS only
        padding, as generate() pads finished rows; [] for a prefix that is no answer's."""
        state = self._walk(prefix)
        if state is None:
            return []
        mode, where, _, _ = state
        if mode == "done":
            return [self.pad_token_id]
        if mode == "separator":
            return [self.separator[where]]
        allowed = list(where.children)
        if where.end is not None:
            allowed.append(self.eos_token_id)
            if where.end < self.num_classes - 1:
                allowed.append(self.separator[0])
        return allowed

    def parse(self, tokens: Sequence[int]) -> list[int]:
        """The classes (indices, in order) an answer's tokens list; [] for the answer for none. Tokens
        after EOS are ignored; an answer cut short keeps the classes complete by then; tokens that
        are no answer's end the reading."""
        tokens = [int(t) for t in tokens]
        for cut in range(len(tokens), -1, -1):
            state = self._walk(tokens[:cut])
            if state is not None:
                break
        mode, where, _, listed = state
        if mode == "item" and where.end is not None and where.end < self.num_classes:
            listed = listed + [where.end]  # cut short right after a complete name
        return listed

    def tokens(self, classes: Sequence[int]) -> list[int]:
        """The answer listing `classes` (ascending indices), without EOS."""
        if not classes:
            return list(self.none)
        out: list[int] = []
        for k, c in enumerate(classes):
            out += [*self.separator, *self.names[c]] if k else list(self.names[c])
        return out

    def continuation(self, before: Sequence[int], item: int) -> tuple[list[int], int]:
        """(tokens, start): the answer that lists the classes `before` (ascending), then `item`, and the
        position from which the tokens are about `item`. `item`: a class index after those of `before`
        (its separator included when `before` lists something), `num_classes` (the answer for none,
        with EOS; `before` must be empty) or `END` (EOS after `before`, which must list something)."""
        before = sorted(set(before))
        prefix = self.tokens(before) if before else []
        if item == self.num_classes:
            if before:
                raise ValueError("the answer for none cannot follow a class")
            return [*self.none, self.eos_token_id], 0
        if item == END:
            if not before:
                raise ValueError("an answer cannot end before its first item")
            return [*prefix, self.eos_token_id], len(prefix)
        if before and item <= before[-1]:
            raise ValueError(f"class {item} cannot follow class {before[-1]} (class order)")
        return ([*prefix, *self.separator, *self.names[item]] if before else list(self.names[item])), len(prefix)



@torch.no_grad()
def score_continuations(
    model: BiomedGPTForConditionalGeneration,
    trie: MultiLabelTrie,
    encoder_outputs: BiomedGPTEncoderOutput,
    rows: Sequence[tuple[int, Sequence[int], int]],
    chunk_size: int = 64,
) -> torch.Tensor:
    """Log-probabilities (R,) float32 of answer tokens given the ones before them: row (b, tokens,
    start) teacher-forces `tokens` after BOS for sample b of `encoder_outputs` and sums the
    log-probabilities of tokens[start:], each step's log-softmax running over the tokens the trie
    allows there (as `score_candidates` with `constrain`)."""
    enc = encoder_outputs
    device = enc.last_hidden_state.device
    pad = model.config.pad_token_id
    out = torch.empty(len(rows), dtype=torch.float32, device=device)
    for first in range(0, len(rows), chunk_size):
        chunk = rows[first:first + chunk_size]
        n, max_len = len(chunk), max(len(seq) for _, seq, _ in chunk)
        targets = torch.full((n, max_len), pad, dtype=torch.long)
        scored = torch.zeros(n, max_len, dtype=torch.bool)
        allowed_lists = [[trie.next_tokens(seq[:i]) if i >= start else [] for i in range(len(seq))]
                         for _, seq, start in chunk]
        k_max = max(1, max(len(a) for steps in allowed_lists for a in steps))
        allowed = torch.full((n, max_len, k_max), -1, dtype=torch.long)
        for r, (_, seq, start) in enumerate(chunk):
            targets[r, : len(seq)] = torch.tensor(list(seq))
            scored[r, start: len(seq)] = True
            for j, ids in enumerate(allowed_lists[r]):
                allowed[r, j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        dec_in = torch.cat([torch.full((n, 1), model.config.decoder_start_token_id), targets[:, :-1]], dim=1)
        samples = torch.tensor([b for b, _, _ in chunk], device=device)
        rep = BiomedGPTEncoderOutput(
            last_hidden_state=enc.last_hidden_state.index_select(0, samples),
            padding_mask=enc.padding_mask.index_select(0, samples),
            position_embeddings=enc.position_embeddings.index_select(0, samples),
        )
        with sample_rows(samples):
            logits = model(decoder_input_ids=dec_in.to(device), encoder_outputs=rep, use_cache=False).logits.float()
        target_logit = logits.gather(-1, targets.to(device)[..., None]).squeeze(-1)
        idx = allowed.to(device)
        norm = torch.logsumexp(logits.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf")), dim=-1)
        keep = scored.to(device)
        # positions not scored (the prefix, padding) may have no allowed token: zero, not inf - inf
        out[first: first + n] = torch.where(keep, target_logit - norm.masked_fill(~keep, 0.0), 0.0).sum(-1)
    return out


@torch.no_grad()
def label_list_probabilities(
    model: BiomedGPTForConditionalGeneration,
    trie: MultiLabelTrie,
    input_ids: torch.Tensor,
    patch_images: torch.Tensor | None = None,
    patch_masks: torch.Tensor | None = None,
    listed: Sequence[Sequence[int]] | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Per-class probabilities of multi-label answers: (B, num_classes + 1), float32 in [0, 1].

    Each class is judged where the model's own answer (`listed[b]`, the classes it generated; empty:
    the answer for none) would list it: after the listed classes that come before it. There the
    model either lists it or goes on as its answer does (with the next listed class after it, or the
    end: EOS, or the answer for none when nothing comes before it). Column c is the probability of
    the first of these two continuations against the second, P(c) / (P(c) + P(the answer's own
    continuation)), each the product of its tokens' probabilities under the trie (`score_continuations`).
    So a class is always weighed against one alternative, whatever the classes around it (its first-
    item probability would fall with every finding listed before it). These are sequence
    probabilities, as in single-label scoring, not the token-by-token choices of greedy generation:
    where names are single tokens and the answer greedy, a listed class scores >= 0.5 and an unlisted
    one <= 0.5, except the last of several listed classes (weighed against ending the answer, with
    the separator before it counted against it); with names of several tokens, greedy generation
    follows name prefixes that several classes share, and more may differ. Column num_classes: the answer for none against the answer's first class
    (or, when the answer is none, the likeliest first class). The encoder runs once per sample; rows
    shared by several classes are scored once.
    """
    bsz = input_ids.size(0)
    listed = listed if listed is not None else [[] for _ in range(bsz)]
    n = trie.num_classes
    enc = model.encoder(input_ids, patch_images=patch_images, patch_masks=patch_masks)
    rows: dict[tuple[int, tuple[int, ...], int], int] = {}

    def row(b: int, before: list[int], item: int) -> int:
        seq, start = trie.continuation(before, item)
        return rows.setdefault((b, tuple(seq), start), len(rows))

    pairs: list[list[tuple[int, int | list[int]]]] = []
    for b in range(bsz):
        answer = sorted(set(int(i) for i in listed[b]))
        sample = []
        for c in range(n):
            before = [i for i in answer if i < c]
            after = [i for i in answer if i > c]
            sample.append((row(b, before, c), row(b, before, after[0] if after else (END if before else n))))
        alternative = [row(b, [], answer[0])] if answer else [row(b, [], c) for c in range(n)]
        sample.append((row(b, [], n), alternative))
        pairs.append(sample)
    logp = score_continuations(model, trie, enc, [(b, list(seq), start) for b, seq, start in rows], chunk_size)
    out = torch.empty(bsz, n + 1, dtype=torch.float32, device=logp.device)
    for b, sample in enumerate(pairs):
        for c, (item, alt) in enumerate(sample):
            other = logp[alt] if isinstance(alt, int) else logp[alt].max()
            out[b, c] = torch.sigmoid(logp[item] - other)
    return out


@torch.no_grad()
def decode_label_lists(
    model: BiomedGPTForConditionalGeneration,
    trie: MultiLabelTrie,
    input_ids: torch.Tensor,
    patch_images: torch.Tensor | None = None,
    patch_masks: torch.Tensor | None = None,
    *,
    beam_size: int = 1,
    max_new_tokens: int = 16,
    length_penalty: float = 1.0,
) -> tuple[list[list[int]], torch.Tensor]:
    """Multi-label answers of a batch, as evaluation and serving decode them: generation under `trie`
    (with room for every class whatever `max_new_tokens` says), each answer read back as its class
    indices (empty: the answer for none), and `label_list_probabilities` of those answers (B, classes + 1)."""
    kwargs: dict[str, Any] = dict(input_ids=input_ids, num_beams=beam_size, do_sample=False,
                                  max_new_tokens=max(max_new_tokens, trie.max_length),
                                  prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn())
    if patch_images is not None:
        kwargs.update(patch_images=patch_images, patch_masks=patch_masks)
    if beam_size > 1:
        kwargs.update(length_penalty=length_penalty, early_stopping=True)
    seqs = model.generate(**kwargs)
    listed = [trie.parse(row[1:]) for row in seqs.tolist()]
    probs = label_list_probabilities(model, trie, input_ids, patch_images=patch_images, patch_masks=patch_masks,
                                     listed=listed)
    return listed, probs.float().cpu()


def best_candidates(trie: AnswerTrie, scores: torch.Tensor) -> list[tuple[int, ...]]:
    """The highest-scoring candidate sequence of each row of `score_candidates`' output."""
    return [trie.candidates[i] for i in scores.argmax(-1).tolist()]
