"""generate() on our model: greedy, beam search, no_repeat_ngram_size, length_penalty; and
answer-constrained decoding (trie generation and candidate scoring), on random weights."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.model.constrained import (AnswerTrie, MultiLabelTrie, best_candidates, score_candidates,
                                        label_list_probabilities)

EOS, PAD, BOS = 2, 1, 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = BiomedGPTConfig(vocab_size=600, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, resnet_type="resnet18",
                             dropout=0.0, encoder_drop_path_rate=0.0, decoder_drop_path_rate=0.0)
    m = BiomedGPTForConditionalGeneration(config).eval()
    with torch.no_grad():  # random relative-position tables too (they start at zero)
        for table in list(m.encoder.token_rel_pos_table_list) + list(m.decoder.token_rel_pos_table_list):
            table.weight.normal_(0, 0.5)
    return m


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 600, (3, 9), generator=g)
    ids[:, 0], ids[:, -1] = BOS, EOS
    ids[2, -3:] = PAD
    images = torch.randn(3, 3, 64, 64, generator=g)
    return dict(input_ids=ids, patch_images=images, patch_masks=torch.tensor([True, True, False]))


def sequence_logprob(model, inputs, seqs: torch.Tensor) -> torch.Tensor:
    """Teacher-forced sum of log-probabilities of seqs[:, 1:] (up to and including EOS)."""
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=seqs[:, :-1], use_cache=False).logits
    lp = F.log_softmax(logits.float(), -1).gather(-1, seqs[:, 1:, None]).squeeze(-1)
    alive = torch.ones_like(lp, dtype=torch.bool)
    for t in range(1, lp.size(1)):
        alive[:, t] = alive[:, t - 1] & seqs[:, t].ne(EOS)  # count through the first EOS
    return (lp * alive).sum(-1)


def test_greedy_with_and_without_cache_agree(model, inputs):
    kw = dict(max_new_tokens=10, num_beams=1, do_sample=False)
    cached = model.generate(**inputs, use_cache=True, **kw)
    uncached = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert cached[:, 0].eq(BOS).all()


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(model, inputs):
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, length_penalty=0.0, eos_token_id=EOS)
    greedy = model.generate(**inputs, num_beams=1, **kw)
    beam = model.generate(**inputs, num_beams=5, **kw)
    assert torch.equal(beam, model.generate(**inputs, num_beams=5, use_cache=False, **kw)), "cache reorder broke beams"
    assert (sequence_logprob(model, inputs, beam) >= sequence_logprob(model, inputs, greedy) - 1e-4).all()


def test_beam_scores_follow_length_penalty(model, inputs):
    for lp in (0.7, 2.0):
        out = model.generate(**inputs, num_beams=4, max_new_tokens=8, do_sample=False, length_penalty=lp,
                             output_scores=True, return_dict_in_generate=True)
        seqs = out.sequences
        gen_len = torch.tensor([(row[1:] != PAD).sum().item() for row in seqs])  # generated tokens incl. EOS
        expected = sequence_logprob(model, inputs, seqs) / (gen_len.float() ** lp)
        torch.testing.assert_close(out.sequences_scores, expected, atol=1e-4, rtol=1e-4)


def test_no_repeat_ngram_size(model, inputs):
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, num_beams=1)
    free = model.generate(**inputs, **kw)

    def bigrams(row):
        toks = row.tolist()
        return [tuple(toks[i:i + 2]) for i in range(len(toks) - 1)]

    assert any(len(set(bigrams(r))) < len(bigrams(r)) for r in free), "random model should repeat without the constraint"
    constrained = model.generate(**inputs, no_repeat_ngram_size=2, **kw)
    for row in constrained:
        assert len(set(bigrams(row))) == len(bigrams(row))


def make_candidates(n: int = 40, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    stems = [[rng.randrange(4, 600) for _ in range(rng.randint(1, 3))] for _ in range(8)]
    cands = []
    while len(cands) < n:
        c = list(rng.choice(stems)) + [rng.randrange(4, 600) for _ in range(rng.randint(0, 3))]
        if c not in cands:
            cands.append(c)
    return cands  # shared prefixes, different lengths, one a prefix of another sometimes


def test_trie_next_tokens():
    trie = AnswerTrie([[5, 6], [5, 7, 8], [9]], eos_token_id=EOS, pad_token_id=PAD)
    assert sorted(trie.next_tokens([])) == [5, 9]
    assert sorted(trie.next_tokens([5])) == [6, 7]
    assert trie.next_tokens([5, 6]) == [EOS]
    assert trie.next_tokens([5, 6, EOS]) == [PAD]
    assert trie.next_tokens([4]) == []
    with pytest.raises(ValueError, match="no answer candidates"):
        AnswerTrie([], eos_token_id=EOS)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_trie_constrained_generation_only_yields_candidates(model, inputs, num_beams):
    cands = make_candidates()
    trie = AnswerTrie(cands, eos_token_id=EOS, pad_token_id=PAD)
    for seed in range(3):  # several random models' worth of preferences: perturb the inputs
        ids = inputs["input_ids"].roll(seed, dims=1)
        out = model.generate(input_ids=ids, patch_images=inputs["patch_images"], patch_masks=inputs["patch_masks"],
                             num_beams=num_beams, max_new_tokens=8, do_sample=False,
                             prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn())
        for row in out.tolist():
            answer = row[1:row.index(EOS)] if EOS in row else row[1:]
            assert answer in cands, f"{answer} is not a candidate"


def test_candidate_scoring_matches_teacher_forcing(model, inputs):
    cands = make_candidates(25)
    trie = AnswerTrie(cands, eos_token_id=EOS, pad_token_id=PAD)
    unconstrained = score_candidates(model, trie, chunk_size=7, constrain=False, **inputs)
    assert unconstrained.shape == (3, len(trie))
    for i, cand in enumerate(trie.candidates):
        seqs = torch.tensor([[BOS, *cand]] * 3)
        torch.testing.assert_close(unconstrained[:, i], sequence_logprob(model, inputs, seqs), atol=1e-4, rtol=1e-4)
    constrained = score_candidates(model, trie, **inputs)
    # renormalising over the allowed tokens can only raise each step's probability
    assert (constrained >= unconstrained - 1e-5).all()
    # and the constrained scores form a distribution over the candidates (the trie partitions the mass)
    torch.testing.assert_close(torch.logsumexp(constrained, -1), torch.zeros(3), atol=1e-4, rtol=0)
    best = best_candidates(trie, constrained)
    assert all(b in trie.candidates for b in best)


# --- multi-label answers: class names in class order joined by a separator, or the answer for none ------

# classes 0..3 (class 3 extends class 0's tokens), separator [12], the answer for none [13, 14]
LIST_NAMES, SEP, NONE = [[5, 6], [7], [8, 9, 10], [5, 6, 11]], [12], [13, 14]


def list_trie() -> MultiLabelTrie:
    return MultiLabelTrie(LIST_NAMES, SEP, NONE, eos_token_id=EOS, pad_token_id=PAD)


def all_answers(trie: MultiLabelTrie, prefix: tuple[int, ...] = ()) -> set[tuple[int, ...]]:
    """Every token sequence the trie allows, walked from `next_tokens` (each ends with EOS)."""
    out: set[tuple[int, ...]] = set()
    for tok in trie.next_tokens(list(prefix)):
        out |= {prefix} if tok == PAD else all_answers(trie, prefix + (tok,))
    return out


def test_multilabel_trie_allows_exactly_the_ordered_lists():
    import itertools

    trie = list_trie()
    assert sorted(trie.next_tokens([])) == [5, 7, 8, 13]
    assert sorted(trie.next_tokens([5, 6])) == sorted([11, EOS, 12])  # class 0 ends (or goes on as class 3)
    assert sorted(trie.next_tokens([5, 6, 12])) == [5, 7, 8]  # classes 1, 2, 3 (the answer for none only first)
    assert sorted(trie.next_tokens([8, 9, 10])) == sorted([EOS, 12])  # class 3 comes later
    assert sorted(trie.next_tokens([8, 9, 10, 12])) == [5]  # only class 3 is after class 2
    assert trie.next_tokens([5, 6, 11]) == [EOS]  # the last class: nothing may follow
    assert trie.next_tokens([13, 14]) == [EOS] and trie.next_tokens([13, 14, EOS]) == [PAD]
    assert trie.next_tokens([7, 12, 7]) == [] and trie.next_tokens([13, 14, 12]) == []  # repeat; none is alone
    expected = {tuple(NONE) + (EOS,)}
    for r in range(1, 5):
        for classes in itertools.combinations(range(4), r):
            expected.add(tuple(trie.tokens(classes)) + (EOS,))
    answers = all_answers(trie)
    assert answers == expected and len(answers) == 2 ** 4
    for answer in answers:
        classes = trie.parse(answer)
        assert classes == sorted(set(classes)) and tuple(trie.tokens(classes)) + (EOS,) == answer
    assert trie.parse([8, 9, 10, 12, 5]) == [2]  # cut short inside a name: the complete ones
    assert trie.parse([7, 12, 8, 9, 10]) == [1, 2] and trie.parse([13, 14, EOS, PAD]) == []
    assert trie.max_length == 2 + 1 + 3 + 3 + 3 * 1 + 1


def test_multilabel_trie_refuses_answers_that_read_two_ways():
    with pytest.raises(ValueError, match="items 0 and 2 have the same tokens"):
        MultiLabelTrie([[5], [6], [5]], SEP, NONE, eos_token_id=EOS)
    with pytest.raises(ValueError, match="class 0: a longer class name continues it with the separator"):
        MultiLabelTrie([[5], [5, 12, 6], [7]], SEP, NONE, eos_token_id=EOS)
    with pytest.raises(ValueError, match="contains EOS"):
        MultiLabelTrie([[5, EOS]], SEP, NONE, eos_token_id=EOS)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_multilabel_generation_only_yields_valid_lists(model, inputs, num_beams):
    trie = list_trie()
    valid = all_answers(trie)
    for seed in range(3):
        ids = inputs["input_ids"].roll(seed, dims=1)
        out = model.generate(input_ids=ids, patch_images=inputs["patch_images"], patch_masks=inputs["patch_masks"],
                             num_beams=num_beams, max_new_tokens=trie.max_length, do_sample=False,
                             prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn())
        for row in out.tolist():
            answer = tuple(row[1:row.index(EOS) + 1])
            assert answer in valid, f"{answer} is no valid list"


def test_multilabel_probabilities_weigh_each_class_against_the_answer(model, inputs):
    trie = MultiLabelTrie(LIST_NAMES[:3], SEP, NONE, eos_token_id=EOS, pad_token_id=PAD)  # no name extends another
    probs = label_list_probabilities(model, trie, listed=[[], [1], [0, 2]], chunk_size=4, **inputs)
    assert probs.shape == (3, 4) and ((probs >= 0) & (probs <= 1)).all()
    # first-item log-probabilities: the single-answer trie over the classes and none gives them (its EOS
    # step is forced)
    first = score_candidates(model, AnswerTrie([*LIST_NAMES[:3], NONE], eos_token_id=EOS, pad_token_id=PAD), **inputs)

    def close(a, b):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    def next_token_probs(sample: int, prefix: list[int], allowed: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(**{k: v[sample:sample + 1] for k, v in inputs.items()},
                           decoder_input_ids=torch.tensor([[BOS, *prefix]]), use_cache=False).logits[0, -1]
        return torch.softmax(logits[allowed].float(), -1)

    sig = torch.sigmoid
    # answer none: each class against the answer for none; none against the likeliest first class
    close(probs[0, :3], sig(first[0, :3] - first[0, 3]))
    close(probs[0, 3], sig(first[0, 3] - first[0, :3].max()))
    # answer [1]: class 0 against starting with class 1, class 1 against none, none against class 1,
    # class 2 (after class 1, the only class left then) against ending the answer
    close(probs[1, 0], sig(first[1, 0] - first[1, 1]))
    close(probs[1, 1], sig(first[1, 1] - first[1, 3]))
    close(probs[1, 3], sig(first[1, 3] - first[1, 1]))
    close(probs[1, 2], next_token_probs(1, [7], [EOS, 12])[1])
    # answer [0, 2]: class 1 against class 2 after "class 0 ,": the separator cancels, the first token decides
    close(probs[2, 1], next_token_probs(2, [5, 6, 12], [7, 8])[0])
    close(probs[2, 0], sig(first[2, 0] - first[2, 2]))


def test_multilabel_probabilities_agree_with_a_greedy_answer_of_one_token_names(model, inputs):
    trie = MultiLabelTrie([[5], [7], [8], [11], [20]], SEP, NONE, eos_token_id=EOS, pad_token_id=PAD)
    answers = []
    for seed in range(4):
        ids = inputs["input_ids"].roll(seed, dims=1)
        out = model.generate(input_ids=ids, patch_images=inputs["patch_images"], patch_masks=inputs["patch_masks"],
                             num_beams=1, max_new_tokens=trie.max_length, do_sample=False,
                             prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn())
        listed = [trie.parse(row[1:]) for row in out.tolist()]
        probs = label_list_probabilities(model, trie, ids, inputs["patch_images"], inputs["patch_masks"], listed=listed)
        for answer, row in zip(listed, probs.tolist()):
            answers.append(tuple(answer))
            for c in range(5):
                if c not in answer:
                    assert row[c] <= 0.5 + 1e-6, (answer, row)
                elif c != answer[-1] or len(answer) == 1:  # the last of several: weighed against the end
                    assert row[c] >= 0.5 - 1e-6, (answer, row)
            assert (row[5] >= 0.5 - 1e-6) if not answer else (row[5] <= 0.5 + 1e-6)
    assert len(set(answers)) > 1 and any(len(a) > 1 for a in answers)  # the inputs give different answers
