"""Conversion of official BiomedGPT/OFA checkpoints into our state dict.

Two naming schemes exist: the fairseq original (`attn_ln`, `encoder_attn`, `ffn_layernorm`, ...) and
the OFA Hugging Face port, whose names ours are. Some entries follow from the config and may be
present or absent in a source: the tied copies of the token embedding, the integer `*_rp_bucket`
tables, the decoder's `image_position_idx` (1026 entries in fairseq, 1025 in the port) and fairseq's
`version` buffers. When present they are checked against what the config implies; every other
source key must map onto exactly one of ours, or the conversion fails listing the missing and
unexpected keys.
"""

from __future__ import annotations

import argparse
import io
import re
from typing import Any, Mapping

import torch

from . import safe_pickle
from .configuration import FIXED_OFA_FLAGS, RESNET_LAYERS, BiomedGPTConfig
from .modeling import decoder_image_position_ids, image_bucket_table, token_bucket_table


class CheckpointMismatchError(ValueError):
    """A source state dict does not map one to one onto the model."""


# fairseq name -> our (= HF-port) name
_FAIRSEQ_TO_OURS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(encoder\.layers\.\d+)\.attn_ln\."), r"\1.self_attn_mid_layer_norm."),
    (re.compile(r"^(decoder\.layers\.\d+)\.self_attn_ln\."), r"\1.self_attn_mid_layer_norm."),
    (re.compile(r"^(decoder\.layers\.\d+)\.cross_attn_ln\."), r"\1.cross_attn_mid_layer_norm."),
    (re.compile(r"^(decoder\.layers\.\d+)\.encoder_attn_layer_norm\."), r"\1.cross_attn_layer_norm."),
    (re.compile(r"^(decoder\.layers\.\d+)\.encoder_attn\."), r"\1.cross_attn."),
    (re.compile(r"^((?:en|de)coder\.layers\.\d+)\.ffn_layernorm\."), r"\1.ffn_layer_norm."),
]
_OURS_TO_FAIRSEQ: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(encoder\.layers\.\d+)\.self_attn_mid_layer_norm\."), r"\1.attn_ln."),
    (re.compile(r"^(decoder\.layers\.\d+)\.self_attn_mid_layer_norm\."), r"\1.self_attn_ln."),
    (re.compile(r"^(decoder\.layers\.\d+)\.cross_attn_mid_layer_norm\."), r"\1.cross_attn_ln."),
    (re.compile(r"^(decoder\.layers\.\d+)\.cross_attn_layer_norm\."), r"\1.encoder_attn_layer_norm."),
    (re.compile(r"^(decoder\.layers\.\d+)\.cross_attn\."), r"\1.encoder_attn."),
    (re.compile(r"^((?:en|de)coder\.layers\.\d+)\.ffn_layer_norm\."), r"\1.ffn_layernorm."),
]

TIED_ALIASES = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
CANONICAL_EMBEDDING = "encoder.embed_tokens.weight"


def fairseq_to_ours(name: str) -> str:
    for pattern, repl in _FAIRSEQ_TO_OURS:
        name, n = pattern.subn(repl, name)
        if n:
            return name
    return name


def ours_to_fairseq(name: str) -> str:
    for pattern, repl in _OURS_TO_FAIRSEQ:
        name, n = pattern.subn(repl, name)
        if n:
            return name
    return name


def is_fairseq_naming(keys: list[str]) -> bool:
    marks = (".attn_ln.", ".encoder_attn.", ".ffn_layernorm.", ".self_attn_ln.", ".cross_attn_ln.")
    return any(m in k for k in keys for m in marks) or any(k.endswith(".version") for k in keys)


def derived_entries(config: BiomedGPTConfig) -> dict[str, torch.Tensor]:
    """The integer entries a source may carry that follow from the config alone (HF-port form)."""
    token = token_bucket_table(config.token_bucket_size, config.max_position_embeddings)
    image = image_bucket_table(config.image_bucket_size)
    return {
        "encoder.token_rp_bucket": token,
        "encoder.image_rp_bucket": image,
        "decoder.token_rp_bucket": token,
        "decoder.image_rp_bucket": image,
        "decoder.image_position_idx": decoder_image_position_ids(
            config.code_image_size, config.image_bucket_size, config.max_position_embeddings + 1),
    }


def reference_key_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every key of the reference (HF-port) state dict with its shape: our parameters and buffers,
    the tied aliases, and the derived integer tables."""
    config = model.config
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, v in derived_entries(config).items():
        shapes[k] = tuple(v.shape)
    return shapes


def _check_derived(key: str, value: torch.Tensor, expected: torch.Tensor, source: str) -> None:
    value = value.to(torch.long)
    if key == "decoder.image_position_idx":
        # fairseq has 1026 entries, the port 1025; they agree on the common prefix.
        n = min(value.numel(), expected.numel())
        if value.dim() != 1 or n < expected.numel() - 1 or not torch.equal(value[:n], expected[:n]):
            raise CheckpointMismatchError(
                f"{source}: {key} (shape {tuple(value.shape)}) does not match the config's image positions "
                f"(code_image_size/image_bucket_size); wrong config for these weights?")
        return
    if tuple(value.shape) != tuple(expected.shape) or not torch.equal(value, expected):
        raise CheckpointMismatchError(
            f"{source}: {key} (shape {tuple(value.shape)}) differs from the table implied by the config "
            f"(shape {tuple(expected.shape)}); check token_bucket_size/image_bucket_size/max_position_embeddings")


def convert_state_dict(
    source_sd: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Map an official state dict (either naming) onto `model`'s keys; check derived entries.

    Returns a state dict with exactly `model.state_dict()`'s keys, in the model's dtypes.
    Raises CheckpointMismatchError listing missing and unexpected keys, or shape mismatches.
    """
    keys = list(source_sd.keys())
    if keys and all(k.startswith("model.") for k in keys):
        source_sd = {k[len("model."):]: v for k, v in source_sd.items()}
        keys = list(source_sd.keys())
    fairseq = is_fairseq_naming(keys)
    renamed: dict[str, torch.Tensor] = {}
    for k, v in source_sd.items():
        new = fairseq_to_ours(k) if fairseq else k
        if new in renamed:
            raise CheckpointMismatchError(f"{source}: keys {k!r} and another both map to {new!r}")
        renamed[new] = v

    derived = derived_entries(model.config)
    for key in ("encoder.version", "decoder.version"):
        renamed.pop(key, None)
    for key, expected in derived.items():
        if key in renamed:
            _check_derived(key, renamed.pop(key), expected, source)

    if CANONICAL_EMBEDDING not in renamed:
        for alias in TIED_ALIASES:
            if alias in renamed:
                renamed[CANONICAL_EMBEDDING] = renamed[alias]
                break
    for alias in TIED_ALIASES:
        if alias in renamed:
            tied = renamed.pop(alias)
            canonical = renamed.get(CANONICAL_EMBEDDING)
            if canonical is not None and (tied.shape != canonical.shape or not torch.equal(tied.float(), canonical.float())):
                raise CheckpointMismatchError(
                    f"{source}: {alias} differs from {CANONICAL_EMBEDDING}; BiomedGPT ties them (untied "
                    "embeddings are not supported)")

    target = {k: v for k, v in model.state_dict().items() if k not in TIED_ALIASES}
    missing = sorted(set(target) - set(renamed))
    unexpected = sorted(set(renamed) - set(target))
    if missing or unexpected:
        lines = [f"{source}: the state dict does not match the model ({len(missing)} missing, "
                 f"{len(unexpected)} unexpected keys; naming: {'fairseq' if fairseq else 'Hugging Face port'})"]
        if missing:
            lines.append("missing: " + ", ".join(missing[:40]) + (" ..." if len(missing) > 40 else ""))
        if unexpected:
            lines.append("unexpected: " + ", ".join(unexpected[:40]) + (" ..." if len(unexpected) > 40 else ""))
        raise CheckpointMismatchError("\n".join(lines))
    bad = [f"{k}: source {tuple(renamed[k].shape)} vs model {tuple(target[k].shape)}"
           for k in target if tuple(renamed[k].shape) != tuple(target[k].shape)]
    if bad:
        raise CheckpointMismatchError(f"{source}: shape mismatches (wrong config for these weights?):\n" + "\n".join(bad))
    out = {k: renamed[k].to(target[k].dtype) for k in target}
    for alias in TIED_ALIASES:
        out[alias] = out[CANONICAL_EMBEDDING]
    return out


# ----------------------------------------------------------------------------------------------
# fairseq checkpoints (.pt pickles)
# ----------------------------------------------------------------------------------------------

def load_fairseq_checkpoint(path: str) -> dict[str, Any]:
    """Load a fairseq `.pt` checkpoint as a dict (`model`, `cfg`/`args`, `extra_state`), without fairseq.

    The pickle is read by an unpickler that resolves exact (module, name) pairs only
    (`safe_pickle.fairseq_allowed`: tensors, argparse Namespaces, ordered dicts, numpy scalars); classes
    of fairseq's own namespaces become inert placeholders, and any other global is refused with a
    ForbiddenGlobalError naming it and the file. No code the checkpoint names ever runs.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    module = safe_pickle.restricted(safe_pickle.fairseq_allowed(), safe_pickle.FAIRSEQ_PLACEHOLDER_ROOTS)
    return safe_pickle.naming_source(path, lambda: torch.load(io.BytesIO(data), map_location="cpu",
                                                              weights_only=False, pickle_module=module))


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, argparse.Namespace):
        return vars(obj)
    if hasattr(obj, "__dict__"):
        return dict(vars(obj))
    return {}


def fairseq_model_args(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The model arguments of a fairseq checkpoint (`cfg.model`, else the legacy `args`)."""
    cfg = _as_dict(ckpt.get("cfg"))
    model_args = _as_dict(cfg.get("model"))
    if not model_args:
        model_args = _as_dict(ckpt.get("args"))
    return model_args


def config_from_fairseq_args(args: Mapping[str, Any], vocab_size: int, source: str) -> BiomedGPTConfig:
    """Build our config from fairseq/OFA model arguments; refuse architecture variants we do not run."""

    def need(name: str) -> Any:
        if args.get(name) is None:
            raise ValueError(f"{source}: the checkpoint's model arguments lack {name!r}; pass --config CONFIG.json")
        return args[name]

    normformer_flags = {k: bool(args.get(k, False)) for k in ("scale_attn", "scale_fc", "scale_heads")}
    if len(set(normformer_flags.values())) != 1:
        raise ValueError(f"{source}: mixed NormFormer flags {normformer_flags}; only all-on or all-off is supported")
    fixed = {
        "encoder_normalize_before": args.get("encoder_normalize_before"),
        "decoder_normalize_before": args.get("decoder_normalize_before"),
        "layernorm_embedding": args.get("layernorm_embedding"),
        "patch_layernorm_embedding": args.get("patch_layernorm_embedding"),
        "code_layernorm_embedding": args.get("code_layernorm_embedding"),
        "add_type_embedding": args.get("add_type_embedding"),
        "scale_embedding": None if args.get("no_scale_embedding") is None else not args["no_scale_embedding"],
        "entangle_position_embedding": args.get("entangle_position_embedding"),
    }
    for flag, value in fixed.items():
        if value is not None and bool(value) != FIXED_OFA_FLAGS[flag]:
            raise ValueError(f"{source}: model argument {flag}={value!r} is not supported "
                             f"(BiomedGPT uses {FIXED_OFA_FLAGS[flag]!r})")
    if args.get("disable_entangle") is False:
        raise ValueError(f"{source}: the checkpoint was trained without --disable-entangle (decoder positions "
                         "added to token embeddings); BiomedGPT checkpoints disable it and only that is supported")
    resnet_type = need("resnet_type")
    if resnet_type not in RESNET_LAYERS:
        raise ValueError(f"{source}: resnet_type {resnet_type!r} is not one of {sorted(RESNET_LAYERS)}")
    d_model = int(need("encoder_embed_dim"))
    if int(args.get("decoder_embed_dim", d_model)) != d_model:
        raise ValueError(f"{source}: encoder and decoder widths differ; BiomedGPT shares one embedding")
    return BiomedGPTConfig(
        vocab_size=vocab_size,
        max_position_embeddings=int(args.get("max_source_positions") or 1024),
        d_model=d_model,
        encoder_layers=int(need("encoder_layers")),
        decoder_layers=int(need("decoder_layers")),
        encoder_attention_heads=int(need("encoder_attention_heads")),
        decoder_attention_heads=int(need("decoder_attention_heads")),
        encoder_ffn_dim=int(need("encoder_ffn_embed_dim")),
        decoder_ffn_dim=int(args.get("decoder_ffn_embed_dim") or need("encoder_ffn_embed_dim")),
        activation_function=str(args.get("activation_fn") or "gelu"),
        dropout=float(args.get("dropout", 0.1) or 0.0),
        attention_dropout=float(args.get("attention_dropout", 0.0) or 0.0),
        activation_dropout=float(args.get("activation_dropout", 0.0) or 0.0),
        encoder_drop_path_rate=float(args.get("encoder_drop_path_rate", 0.0) or 0.0),
        decoder_drop_path_rate=float(args.get("decoder_drop_path_rate", 0.0) or 0.0),
        resnet_drop_path_rate=float(args.get("resnet_drop_path_rate", 0.0) or 0.0),
        resnet_type=resnet_type,
        normformer=normformer_flags["scale_attn"],
        token_bucket_size=int(need("token_bucket_size")),
        image_bucket_size=int(need("image_bucket_size")),
        attn_scale_factor=float(args.get("attn_scale_factor") or 2.0),
        code_image_size=int(args.get("code_image_size") or 128),
    )
