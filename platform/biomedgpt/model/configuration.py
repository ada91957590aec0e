"""BiomedGPT model configuration and the named sizes.

The field names follow the OFA Hugging Face port's `config.json`, so an OFA/BiomedGPT config converts
by renaming nothing; the architecture flags that every released checkpoint shares (pre-LayerNorm,
NormFormer extras, type embeddings, no embedding scaling, disentangled positions) are fixed, and the
converter refuses a config that asks for something else.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

# OFA's "resnetNN" names: stem + three Bottleneck stages (no layer4), 1024 channels at stride 16.
RESNET_LAYERS: dict[str, list[int]] = {
    "resnet18": [2, 2, 2],  # only used by the OFA reference fixtures
    "resnet50": [3, 4, 6],
    "resnet101": [3, 4, 23],
    "resnet152": [3, 8, 36],
}

# Named sizes. small/medium/base are the released BiomedGPT checkpoints (33M / 93M / 182M unique
# parameters); large/xlarge are the follow-on OFA sizes. "demo" is far smaller than any released
# size, for the end-to-end demo and tests on 2 CPU cores.
SIZES: dict[str, dict[str, Any]] = {
    "demo": dict(d_model=64, ffn_dim=128, heads=4, encoder_layers=2, decoder_layers=2, resnet="resnet18"),
    "small": dict(d_model=256, ffn_dim=1024, heads=4, encoder_layers=4, decoder_layers=4, resnet="resnet50"),
    "medium": dict(d_model=512, ffn_dim=2048, heads=8, encoder_layers=4, decoder_layers=4, resnet="resnet101"),
    "base": dict(d_model=768, ffn_dim=3072, heads=12, encoder_layers=6, decoder_layers=6, resnet="resnet101"),
    "large": dict(d_model=1024, ffn_dim=4096, heads=16, encoder_layers=12, decoder_layers=12, resnet="resnet152"),
    "xlarge": dict(d_model=1280, ffn_dim=5120, heads=16, encoder_layers=24, decoder_layers=12, resnet="resnet152"),
}

# Flags of the OFA config that our implementation fixes to one value (the value every BiomedGPT
# checkpoint was trained with). A source config with another value cannot be reproduced faithfully.
FIXED_OFA_FLAGS: dict[str, Any] = {
    "encoder_normalize_before": True,
    "decoder_normalize_before": True,
    "layernorm_embedding": True,
    "patch_layernorm_embedding": True,
    "code_layernorm_embedding": True,
    "add_type_embedding": True,
    "scale_embedding": False,
    "entangle_position_embedding": False,
    "share_decoder_input_output_embed": True,
}


class BiomedGPTConfig(PretrainedConfig):
    """Configuration of the BiomedGPT (OFA) encoder-decoder.

    Sizes are in elements (d_model, FFN width) and counts (layers, heads). Positions enter only as
    attention biases: `token_bucket_size` relative text buckets, `image_bucket_size` squared image
    positions (patch grid at most image_bucket_size x image_bucket_size).
    """

    model_type = "biomedgpt"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "encoder_attention_heads",
    }

    def __init__(
        self,
        vocab_size: int = 59457,
        max_position_embeddings: int = 1024,
        d_model: int = 256,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        encoder_attention_heads: int = 4,
        decoder_attention_heads: int = 4,
        encoder_ffn_dim: int = 1024,
        decoder_ffn_dim: int = 1024,
        activation_function: str = "gelu",
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        encoder_drop_path_rate: float = 0.1,
        decoder_drop_path_rate: float = 0.1,
        resnet_drop_path_rate: float = 0.0,
        resnet_type: str = "resnet50",
        resnet_layers: list[int] | None = None,
        normformer: bool = True,
        token_bucket_size: int = 256,
        image_bucket_size: int = 42,
        attn_scale_factor: float = 2.0,
        code_image_size: int = 128,
        init_std: float = 0.02,
        use_cache: bool = True,
        pad_token_id: int = 1,
        bos_token_id: int = 0,
        eos_token_id: int = 2,
        decoder_start_token_id: int = 0,
        forced_eos_token_id: int | None = None,
        is_encoder_decoder: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        if resnet_layers is None:
            if resnet_type not in RESNET_LAYERS:
                raise ValueError(
                    f"resnet_type {resnet_type!r} is not one of {sorted(RESNET_LAYERS)}; "
                    "give resnet_layers=[n1, n2, n3] for another depth"
                )
            resnet_layers = list(RESNET_LAYERS[resnet_type])
        if len(resnet_layers) != 3:
            raise ValueError(f"resnet_layers must list 3 stage depths, got {resnet_layers}")
        for name, dim, heads in (
            ("encoder", d_model, encoder_attention_heads),
            ("decoder", d_model, decoder_attention_heads),
        ):
            if dim % heads:
                raise ValueError(f"d_model {dim} is not divisible by {name}_attention_heads {heads}")
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.d_model = d_model
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.num_hidden_layers = encoder_layers
        self.encoder_attention_heads = encoder_attention_heads
        self.decoder_attention_heads = decoder_attention_heads
        self.encoder_ffn_dim = encoder_ffn_dim
        self.decoder_ffn_dim = decoder_ffn_dim
        self.activation_function = activation_function
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.encoder_drop_path_rate = encoder_drop_path_rate
        self.decoder_drop_path_rate = decoder_drop_path_rate
        self.resnet_drop_path_rate = resnet_drop_path_rate
        self.resnet_type = resnet_type
        self.resnet_layers = list(resnet_layers)
        self.normformer = normformer
        self.token_bucket_size = token_bucket_size
        self.image_bucket_size = image_bucket_size
        self.attn_scale_factor = attn_scale_factor
        self.code_image_size = code_image_size
        self.init_std = init_std
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
            forced_eos_token_id=forced_eos_token_id,
            is_encoder_decoder=is_encoder_decoder,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> "BiomedGPTConfig":
        """The config of a named size (see `SIZES`), with optional field overrides."""
        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
        s = SIZES[size]
        fields: dict[str, Any] = dict(
            d_model=s["d_model"],
            encoder_ffn_dim=s["ffn_dim"],
            decoder_ffn_dim=s["ffn_dim"],
            encoder_attention_heads=s["heads"],
            decoder_attention_heads=s["heads"],
            encoder_layers=s["encoder_layers"],
            decoder_layers=s["decoder_layers"],
            resnet_type=s["resnet"],
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_ofa_config(cls, ofa: dict[str, Any], source: str = "config.json") -> "BiomedGPTConfig":
        """Translate an OFA Hugging Face-port `config.json` (as a dict) into our config.

        Raises ValueError naming `source` and the field when the source asks for an architecture
        variant we do not implement.
        """
        ofa = copy.deepcopy(ofa)
        for flag, expected in FIXED_OFA_FLAGS.items():
            if flag in ofa and ofa[flag] is not None and bool(ofa[flag]) != expected:
                raise ValueError(
                    f"{source}: field {flag!r} is {ofa[flag]!r}; BiomedGPT checkpoints use {expected!r} "
                    "and this implementation supports only that"
                )
        for flag in ("encoder_layerdrop", "decoder_layerdrop"):
            if float(ofa.get(flag) or 0.0) != 0.0:
                raise ValueError(f"{source}: field {flag!r} must be 0 (LayerDrop is not supported)")
        known = {
            "vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "decoder_layers",
            "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
            "activation_function", "dropout", "attention_dropout", "activation_dropout",
            "encoder_drop_path_rate", "decoder_drop_path_rate", "resnet_drop_path_rate", "resnet_type",
            "normformer", "token_bucket_size", "image_bucket_size", "attn_scale_factor",
            "code_image_size", "init_std", "pad_token_id", "bos_token_id", "eos_token_id",
            "decoder_start_token_id",
        }
        fields = {k: v for k, v in ofa.items() if k in known and v is not None}
        return cls(**fields)

    def to_fairseq_like(self) -> dict[str, Any]:
        """The OFA-port config fields this config corresponds to (for model cards and checks)."""
        out = {k: getattr(self, k) for k in (
            "vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "decoder_layers",
            "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
            "resnet_type", "token_bucket_size", "image_bucket_size", "attn_scale_factor", "code_image_size",
        )}
        out.update(FIXED_OFA_FLAGS)
        return out
