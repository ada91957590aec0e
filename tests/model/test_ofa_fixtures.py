"""Our network, loaded with the OFA reference weights, reproduces every reference case within 1e-4."""

from __future__ import annotations


import pytest
import torch

from biomedgpt.model import BiomedGPTEncoderOutput
from biomedgpt.model.convert import build_model

ATOL = 1e-4
CODE_START, CODE_END = 50265, 58457


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.2e} > {atol:.0e}"


def check_logit_summaries(logits: torch.Tensor, ref: dict, prefix: str) -> None:
    """Compare the fixture's summaries of full-vocabulary logits (B, T, V)."""
    cols = ref["vocab_cols"]
    close(logits[..., cols], ref[f"{prefix}logits_at_cols"], f"{prefix}logits_at_cols")
    close(logits.max(-1).values, ref[f"{prefix}logits_max"], f"{prefix}logits_max")
    close(torch.logsumexp(logits.double(), -1), ref[f"{prefix}logits_lse"], f"{prefix}logits_lse")
    vocab = logits.size(-1)
    # The sum over 59,457 logits: compare its per-element mean to the same tolerance.
    close(logits.double().sum(-1) / vocab, ref[f"{prefix}logits_sum"] / vocab, f"{prefix}logits_sum/V")
    assert torch.equal(logits.argmax(-1), ref[f"{prefix}logits_argmax"]), f"{prefix}logits_argmax differs"


@pytest.fixture(scope="module")
def case_a(ofa_case):
    return ofa_case("a_image_text")


@pytest.mark.parametrize("naming", ["hf_port", "fairseq"])
def test_image_text_case_both_namings(naming, micro_config, micro_hf_state_dict, micro_fairseq_state_dict, case_a):
    sd = micro_hf_state_dict if naming == "hf_port" else micro_fairseq_state_dict
    model = build_model(micro_config, sd, naming)
    a = case_a
    with torch.no_grad():
        out = model(input_ids=a["input_ids"], patch_images=a["patch_images"], patch_masks=a["patch_masks"],
                    decoder_input_ids=a["decoder_input_ids"], output_hidden_states=True, use_cache=False)
        features = model.encoder.embed_images(a["patch_images"][:1])
        enc = model.encoder(a["input_ids"], patch_images=a["patch_images"], patch_masks=a["patch_masks"])
    close(features, a["resnet_features_row0"], "resnet_features_row0")
    assert len(out.encoder_hidden_states) == micro_config.encoder_layers + 1
    for i, h in enumerate(out.encoder_hidden_states):
        close(h, a[f"encoder_hidden_states.{i}"], f"encoder_hidden_states.{i}")
    close(out.encoder_last_hidden_state, a["encoder_last_hidden_state"], "encoder_last_hidden_state")
    assert torch.equal(enc.padding_mask, a["encoder_padding_mask"])
    close(enc.position_embeddings, a["encoder_position_embedding"], "encoder_position_embedding")
    assert len(out.decoder_hidden_states) == micro_config.decoder_layers + 1
    for i, h in enumerate(out.decoder_hidden_states):
        close(h, a[f"decoder_hidden_states.{i}"], f"decoder_hidden_states.{i}")
    close(out.logits, a["logits"], "logits")
    check_logit_summaries(out.logits, a, "")


def test_text_only_case(micro_model, ofa_case):
    b = ofa_case("b_text_only")
    with torch.no_grad():
        out = micro_model(input_ids=b["input_ids"], decoder_input_ids=b["decoder_input_ids"],
                          output_hidden_states=True, use_cache=False)
        hidden, _ = micro_model.decoder(b["decoder_input_ids"], micro_model.encoder(b["input_ids"]))
    for i, h in enumerate(out.encoder_hidden_states):
        close(h, b[f"encoder_hidden_states.{i}"], f"encoder_hidden_states.{i}")
    close(out.encoder_last_hidden_state, b["encoder_last_hidden_state"], "encoder_last_hidden_state")
    close(hidden, b["decoder_final_hidden"], "decoder_final_hidden")
    check_logit_summaries(out.logits, b, "")


def test_masked_image_is_ignored(micro_model, ofa_case, case_a):
    """fairseq's text-only convention: images present but patch_masks False gives the text-only result
    (the HF port ignored the flag; fairseq is right)."""
    b = ofa_case("b_text_only")
    noise = torch.randn_like(case_a["patch_images"])
    with torch.no_grad():
        masked = micro_model(input_ids=b["input_ids"], patch_images=noise, patch_masks=torch.tensor([False, False]),
                             decoder_input_ids=b["decoder_input_ids"], use_cache=False)
    check_logit_summaries(masked.logits, b, "")


def test_one_masked_row_does_not_change_the_other(micro_model, case_a):
    a = case_a
    with torch.no_grad():
        both = micro_model(input_ids=a["input_ids"], patch_images=a["patch_images"], patch_masks=torch.tensor([True, True]),
                           decoder_input_ids=a["decoder_input_ids"], use_cache=False).logits
        row1_off = micro_model(input_ids=a["input_ids"], patch_images=a["patch_images"],
                               patch_masks=torch.tensor([True, False]),
                               decoder_input_ids=a["decoder_input_ids"], use_cache=False).logits
    close(row1_off[0], both[0], "row 0 unaffected by row 1's mask")
    assert (row1_off[1] - both[1]).abs().max() > 1e-3, "masking row 1's image changed nothing"


@pytest.mark.parametrize("variant", ["all_code", "mixed"])
def test_code_decoding_case(variant, micro_model, ofa_case):
    c = ofa_case("c_code")
    p = f"{variant}."
    with torch.no_grad():
        enc = micro_model.encoder(c["input_ids"], patch_images=c["patch_images"], patch_masks=c["patch_masks"])
        out = micro_model(encoder_outputs=enc, decoder_input_ids=c[p + "decoder_input_ids"],
                          code_masks=c[p + "code_masks"], use_cache=False, output_hidden_states=True)
        hidden, _ = micro_model.decoder(c[p + "decoder_input_ids"], enc, code_masks=c[p + "code_masks"])
    close(enc.last_hidden_state, c["encoder_last_hidden_state"], "encoder_last_hidden_state")
    close(hidden, c[p + "decoder_final_hidden"], p + "decoder_final_hidden")
    check_logit_summaries(out.logits, c, p)
    if variant == "all_code":
        for i, h in enumerate(out.decoder_hidden_states):
            close(h, c[f"{p}decoder_hidden_states.{i}"], f"{p}decoder_hidden_states.{i}")
        close(out.logits[..., CODE_START:CODE_END], c[p + "logits_code_region"], p + "logits_code_region")


def greedy_steps(model, enc: BiomedGPTEncoderOutput, steps: int, code_masks, cached: bool, restrict_codes: bool):
    """Greedy decoding by hand; returns tokens (B, steps+1), final hidden (B, steps, C), logits (B, steps, V)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    bsz = enc.last_hidden_state.size(0)
    tokens = torch.zeros(bsz, 1, dtype=torch.long)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if cached else None
    hiddens, logits_all = [], []
    for _ in range(steps):
        new = tokens[:, -1:] if cached else tokens
        hidden, _ = model.decoder(new, enc, code_masks=code_masks, cache=cache)
        logits = model.decoder.output_projection(hidden)[:, -1]
        hiddens.append(hidden[:, -1])
        logits_all.append(logits)
        pick = logits
        if restrict_codes:
            pick = torch.full_like(logits, float("-inf"))
            pick[:, CODE_START:CODE_END] = logits[:, CODE_START:CODE_END]
        tokens = torch.cat([tokens, pick.argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(hiddens, 1), torch.stack(logits_all, 1)


@pytest.mark.parametrize("mode", ["text", "code"])
@pytest.mark.parametrize("cached", [True, False])
def test_incremental_greedy_decoding(mode, cached, micro_model, ofa_case):
    d = ofa_case("d_incremental")
    ids = d["input_ids"] if mode == "text" else d[f"{mode}.input_ids"]
    code_masks = d["code.code_masks"] if mode == "code" else None
    with torch.no_grad():
        enc = micro_model.encoder(ids, patch_images=d["patch_images"], patch_masks=d["patch_masks"])
        tokens, hidden, logits = greedy_steps(micro_model, enc, 8, code_masks, cached, restrict_codes=(mode == "code"))
    assert torch.equal(tokens, d[f"{mode}.tokens"]), f"{mode} tokens {tokens.tolist()} != {d[f'{mode}.tokens'].tolist()}"
    p = f"{mode}.{'cached' if cached else 'uncached'}."
    close(hidden, d[p + "decoder_final_hidden"], p + "decoder_final_hidden")
    cols = d["vocab_cols"]
    close(logits[..., cols], d[p + "logits_at_cols"], p + "logits_at_cols")
    close(logits.max(-1).values, d[p + "logits_max"], p + "logits_max")
    close(torch.logsumexp(logits.double(), -1), d[p + "logits_lse"], p + "logits_lse")


def test_generate_greedy_matches_reference(micro_model, ofa_case):
    """transformers' generate() with the key/value cache gives the reference greedy tokens and logits."""
    d = ofa_case("d_incremental")
    with torch.no_grad():
        text = micro_model.generate(input_ids=d["input_ids"], patch_images=d["patch_images"], patch_masks=d["patch_masks"],
                                    max_new_tokens=8, num_beams=1, do_sample=False, use_cache=True,
                                    output_logits=True, return_dict_in_generate=True)
        code = micro_model.generate(input_ids=d["code.input_ids"], patch_images=d["patch_images"],
                                    patch_masks=d["patch_masks"], code_masks=d["code.code_masks"],
                                    max_new_tokens=8, num_beams=1, do_sample=False, use_cache=True,
                                    prefix_allowed_tokens_fn=lambda b, ids: list(range(CODE_START, CODE_END)))
    assert torch.equal(text.sequences, d["text.tokens"])
    logits = torch.stack(text.logits, 1)
    close(logits[..., d["vocab_cols"]], d["text.cached.logits_at_cols"], "generate logits_at_cols")
    assert torch.equal(code, d["code.tokens"])
