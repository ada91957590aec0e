"""The BiomedGPT (OFA) encoder-decoder as a Hugging Face `PreTrainedModel`.

Readable top to bottom: position-bias tables, attention, encoder and decoder layers, the encoder
(image patches then text), the decoder (text or image-code tokens), and the model with its LM head.
It computes what the official fairseq implementation computes (see tests/model/test_ofa_fixtures.py)
and carries the parameter names of the OFA Hugging Face port; `state_dict_adapter.py` converts the
fairseq names. Tensors are batch-first throughout. No parallelism and no I/O live here: the sharding
policy wraps `BiomedGPTEncoderLayer`, `BiomedGPTDecoderLayer` and `ResNetBackbone` (see
`sharding_units`).
"""

from __future__ import annotations

import dataclasses

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import ModelOutput, Seq2SeqLMOutput

# transformers 5.2x names the decoder's key/value cache `cache` (in outputs and in the kwargs generate()
# passes); earlier 5.x releases, still on some GPU images, name it `past_key_values`. Both are served.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(Seq2SeqLMOutput)} else "past_key_values"

from .configuration import BiomedGPTConfig
from .resnet import Bottleneck, ResNetBackbone, drop_path, linear_rates

# ----------------------------------------------------------------------------------------------
# Position-bias bucket tables (pure functions of the config; computed once per process and device)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def token_bucket_table(bucket_size: int, max_position: int) -> torch.Tensor:
    """(max_position, max_position) relative text-distance buckets in [0, 2*bucket_size-2].

    Distances within +-(bucket_size/2) keep their own bucket; longer ones share log-spaced buckets.
    """
    context = torch.arange(max_position, dtype=torch.long, device="cpu")[:, None]
    memory = torch.arange(max_position, dtype=torch.long, device="cpu")[None, :]
    relative = context - memory
    sign = torch.sign(relative)
    mid = bucket_size // 2
    abs_pos = torch.where((relative < mid) & (relative > -mid), mid - 1, relative.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    log_pos = log_pos.int()
    bucket = torch.where(abs_pos.le(mid), relative, log_pos * sign).long()
    return bucket + bucket_size - 1


@functools.lru_cache(maxsize=8)
def image_bucket_table(bucket_size: int) -> torch.Tensor:
    """(bucket_size^2+1, bucket_size^2+1) buckets of 2-D offsets between image positions.

    Position 0 is the "no image position" slot (the decoder's BOS); its row, column and diagonal use
    the three extra buckets at the end of the table.
    """
    num_rel = (2 * bucket_size - 1) ** 2 + 3
    coords = torch.stack(torch.meshgrid(torch.arange(bucket_size, device="cpu"),
                                        torch.arange(bucket_size, device="cpu"), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += bucket_size - 1
    rel[:, :, 1] += bucket_size - 1
    rel[:, :, 0] *= 2 * bucket_size - 1
    table = torch.zeros((bucket_size * bucket_size + 1,) * 2, dtype=rel.dtype)
    table[1:, 1:] = rel.sum(-1)
    table[0, 0:] = num_rel - 3
    table[0:, 0] = num_rel - 2
    table[0, 0] = num_rel - 1
    return table


def decoder_image_position_ids(code_image_size: int, image_bucket_size: int, length: int) -> torch.Tensor:
    """Image position of each decoder step when decoding image codes: 0 for BOS, then the VQGAN
    code grid (code_image_size/8 square) row-major, then a filler position for longer sequences."""
    window = code_image_size // 8
    grid = torch.arange(window)[None, :] + torch.arange(window)[:, None] * image_bucket_size + 1
    ids = torch.cat([torch.tensor([0]), grid.reshape(-1)])
    filler = min(1024, image_bucket_size ** 2)  # OFA's fixed filler position
    if length > ids.numel():
        ids = torch.cat([ids, torch.full((length - ids.numel(),), filler, dtype=torch.long)])
    return ids[:length]


class _DeviceTables:
    """Per-device copies of the integer bucket tables (kept out of the state dict: they follow from
    the config, and as buffers they would cost ~66 MB of int64 in every checkpoint)."""

    def __init__(self, config: BiomedGPTConfig) -> None:
        self.config = config
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._cache:
            c = self.config
            # Built as ordinary tensors even when first asked for under torch.inference_mode (the predictor's
            # mode): the tables are cached for the whole process, and a training step that later indexes an
            # inference tensor fails ("Inference tensors cannot be saved for backward").
            with torch.inference_mode(False):
                if name == "token":
                    table = token_bucket_table(c.token_bucket_size, c.max_position_embeddings)
                elif name == "image":
                    table = image_bucket_table(c.image_bucket_size)
                elif name == "code_positions":
                    table = decoder_image_position_ids(c.code_image_size, c.image_bucket_size,
                                                       c.max_position_embeddings + 1)
                else:
                    raise KeyError(name)
                self._cache[key] = table.to(device)
        return self._cache[key]


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


class BiomedGPTAttention(nn.Module):
    """Multi-head attention with an additive bias (positions + masks), OFA's logit scale
    (head_dim * attn_scale_factor)^-0.5 and NormFormer's learnable per-head output scale `c_attn`.
    Runs on `torch.nn.functional.scaled_dot_product_attention`."""

    def __init__(self, embed_dim: int, num_heads: int, scale_factor: float, dropout: float,
                 scale_heads: bool, layer_idx: int, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = float(self.head_dim * scale_factor) ** -0.5
        self.dropout = dropout
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.c_attn = nn.Parameter(torch.ones(num_heads)) if scale_heads else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_bias: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, Tq, C); attn_bias (B, H, Tq, Tk) additive, masks included."""
        q = self._heads(self.q_proj(hidden_states))
        if self.is_cross_attention:
            assert key_value_states is not None
            layer_cache = cache.cross_attention_cache if isinstance(cache, EncoderDecoderCache) else None
            if layer_cache is not None and cache.is_updated.get(self.layer_idx, False):
                k = layer_cache.layers[self.layer_idx].keys
                v = layer_cache.layers[self.layer_idx].values
            else:
                k = self._heads(self.k_proj(key_value_states))
                v = self._heads(self.v_proj(key_value_states))
                if layer_cache is not None:
                    k, v = layer_cache.update(k, v, self.layer_idx)
                    cache.is_updated[self.layer_idx] = True
        else:
            k = self._heads(self.k_proj(hidden_states))
            v = self._heads(self.v_proj(hidden_states))
            if cache is not None:
                self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
                k, v = self_cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias.to(q.dtype),
            dropout_p=self.dropout if self.training else 0.0, scale=self.scaling,
        )
        if self.c_attn is not None:
            out = out * self.c_attn.view(1, -1, 1, 1).to(out.dtype)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.embed_dim))


def _mask_keys(bias: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
    """Fill the bias of padding keys (B, Tk bool) with the most negative finite value (a row with every
    key masked then averages instead of producing NaN)."""
    if key_padding is None:
        return bias
    return bias.masked_fill(key_padding[:, None, None, :], torch.finfo(bias.dtype).min)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class BiomedGPTEncoderLayer(nn.Module):
    """Pre-LayerNorm encoder layer with NormFormer extras (mid attention LN, FFN LN, head scales)."""

    def __init__(self, config: BiomedGPTConfig, layer_idx: int, drop_path_rate: float) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = BiomedGPTAttention(d, config.encoder_attention_heads, config.attn_scale_factor,
                                            config.attention_dropout, config.normformer, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn_mid_layer_norm = nn.LayerNorm(d) if config.normformer else None
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.ffn_layer_norm = nn.LayerNorm(config.encoder_ffn_dim) if config.normformer else None
        self.final_layer_norm = nn.LayerNorm(d)
        self.activation = _activation(config.activation_function)
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.self_attn_layer_norm(x), attn_bias)
        if self.self_attn_mid_layer_norm is not None:
            h = self.self_attn_mid_layer_norm(h)
        x = x + _residual(h, self.dropout, self.drop_path_rate, self.training)
        h = F.dropout(self.activation(self.fc1(self.final_layer_norm(x))), self.activation_dropout, self.training)
        if self.ffn_layer_norm is not None:
            h = self.ffn_layer_norm(h)
        return x + _residual(self.fc2(h), self.dropout, self.drop_path_rate, self.training)


class BiomedGPTDecoderLayer(nn.Module):
    """Pre-LayerNorm decoder layer: causal self-attention, cross-attention, FFN (NormFormer extras)."""

    def __init__(self, config: BiomedGPTConfig, layer_idx: int, drop_path_rate: float) -> None:
        super().__init__()
        d = config.d_model
        heads = config.decoder_attention_heads
        self.self_attn = BiomedGPTAttention(d, heads, config.attn_scale_factor, config.attention_dropout,
                                            config.normformer, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn_mid_layer_norm = nn.LayerNorm(d) if config.normformer else None
        self.cross_attn = BiomedGPTAttention(d, heads, config.attn_scale_factor, config.attention_dropout,
                                             config.normformer, layer_idx, is_cross_attention=True)
        self.cross_attn_layer_norm = nn.LayerNorm(d)
        self.cross_attn_mid_layer_norm = nn.LayerNorm(d) if config.normformer else None
        self.fc1 = nn.Linear(d, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d)
        self.ffn_layer_norm = nn.LayerNorm(config.decoder_ffn_dim) if config.normformer else None
        self.final_layer_norm = nn.LayerNorm(d)
        self.activation = _activation(config.activation_function)
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, encoder_states: torch.Tensor, self_bias: torch.Tensor,
                cross_bias: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        h = self.self_attn(self.self_attn_layer_norm(x), self_bias, cache=cache)
        if self.self_attn_mid_layer_norm is not None:
            h = self.self_attn_mid_layer_norm(h)
        x = x + _residual(h, self.dropout, self.drop_path_rate, self.training)
        h = self.cross_attn(self.cross_attn_layer_norm(x), cross_bias, key_value_states=encoder_states, cache=cache)
        if self.cross_attn_mid_layer_norm is not None:
            h = self.cross_attn_mid_layer_norm(h)
        x = x + _residual(h, self.dropout, self.drop_path_rate, self.training)
        h = F.dropout(self.activation(self.fc1(self.final_layer_norm(x))), self.activation_dropout, self.training)
        if self.ffn_layer_norm is not None:
            h = self.ffn_layer_norm(h)
        return x + _residual(self.fc2(h), self.dropout, self.drop_path_rate, self.training)


def _residual(h: torch.Tensor, dropout: float, drop_path_rate: float, training: bool) -> torch.Tensor:
    return drop_path(F.dropout(h, dropout, training), drop_path_rate, training)


def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"activation_function {name!r} is not supported (gelu, relu)")


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------


@dataclass
class BiomedGPTEncoderOutput(ModelOutput):
    """Encoder output. `padding_mask` (B, L) is True at padding (masked patches, pad tokens);
    `position_embeddings` (B, L, C) are the normalised positions the decoder's cross-attention
    bias uses; `hidden_states` holds the input of every layer and the last layer's output."""

    last_hidden_state: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    position_embeddings: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class BiomedGPTEncoder(nn.Module):
    """Encoder over [image patches ; text tokens]. Positions enter only as attention biases."""

    main_input_name = "input_ids"

    def __init__(self, config: BiomedGPTConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        d = config.d_model
        self.config = config
        self.padding_idx = config.pad_token_id
        self.num_heads = config.encoder_attention_heads
        self.embed_tokens = embed_tokens
        self.embed_images = ResNetBackbone(config.resnet_layers, config.resnet_drop_path_rate)
        self.image_proj = nn.Linear(ResNetBackbone.out_channels, d)
        self.type_embedding = nn.Embedding(2, d)
        self.layernorm_embedding = nn.LayerNorm(d)
        self.patch_layernorm_embedding = nn.LayerNorm(d)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, d)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size ** 2 + 1, d)
        self.pos_ln = nn.LayerNorm(d)
        self.image_pos_ln = nn.LayerNorm(d)
        self.pos_scaling = float(d / self.num_heads * config.attn_scale_factor) ** -0.5
        self.pos_q_linear = nn.Linear(d, d)
        self.pos_k_linear = nn.Linear(d, d)
        rates = linear_rates(config.encoder_drop_path_rate, config.encoder_layers)
        self.layers = nn.ModuleList(BiomedGPTEncoderLayer(config, i, rates[i]) for i in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        n_tok = 2 * config.token_bucket_size - 1
        n_img = (2 * config.image_bucket_size - 1) ** 2 + 3
        self.token_rel_pos_table_list = nn.ModuleList(nn.Embedding(n_tok, self.num_heads) for _ in range(config.encoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(nn.Embedding(n_img, self.num_heads) for _ in range(config.encoder_layers))
        self.tables = _DeviceTables(config)
        self.dropout = config.dropout

    def image_patches(self, patch_images: torch.Tensor, sample_patch_num: int | None = None,
                      generator: torch.Generator | None = None, sample_patch_rows: torch.Tensor | None = None):
        """ResNet features of the images as patches: (B, P, 1024) features and (B, P) position ids, and the
        (B, P) padding of patches left out (or None).

        `sample_patch_num` (OFA's): each image keeps that many patches, in a random order (`generator`).
        Without `sample_patch_rows` every image is sampled and P = sample_patch_num (OFA's gather); with it
        (B,) bool, only those rows are, and P stays the whole grid: a sampled row holds its sampled patches
        first and the rest, masked as padding, after them (so rows that are not sampled, e.g. pretraining's
        image infilling beside its image-text rows, keep every patch in the same batch)."""
        feats = self.embed_images(patch_images)
        b, _, h, w = feats.shape
        bucket = self.config.image_bucket_size
        if h > bucket or w > bucket:
            raise ValueError(
                f"image of {patch_images.shape[-2]}x{patch_images.shape[-1]} px gives a {h}x{w} patch grid; "
                f"the model supports at most {bucket}x{bucket} patches ({bucket * 16} px per side)"
            )
        pos = (torch.arange(w, device=feats.device)[None, :]
               + torch.arange(h, device=feats.device)[:, None] * bucket + 1).reshape(-1)
        pos = pos[None, :].expand(b, h * w)
        patches = feats.flatten(2).transpose(1, 2)
        if sample_patch_num is not None and sample_patch_num < h * w:
            perms = torch.stack([torch.randperm(h * w, generator=generator, device="cpu") for _ in range(b)])
            if sample_patch_rows is None:
                order = perms[:, :sample_patch_num].to(feats.device)
                left_out = None
            else:
                rows = sample_patch_rows.bool().cpu()
                order = torch.where(rows[:, None], perms, torch.arange(h * w)[None, :]).to(feats.device)
                left_out = (rows[:, None] & (torch.arange(h * w)[None, :] >= sample_patch_num)).to(feats.device)
            patches = patches.gather(1, order[:, :, None].expand(-1, -1, patches.size(2)))
            pos = pos.gather(1, order)
            return patches, pos, left_out
        return patches, pos, None

    def forward(
        self,
        input_ids: torch.Tensor,
        patch_images: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        sample_patch_num: int | None = None,
        sample_patch_rows: torch.Tensor | None = None,
        **kwargs,
    ) -> BiomedGPTEncoderOutput:
        """input_ids (B, T) text ids; patch_images (B, 3, H, W) or None for text-only input;
        patch_masks (B,) bool, False = this sample has no image (its patches are masked)."""
        bsz, text_len = input_ids.shape
        text_padding = input_ids.eq(self.padding_idx)
        if attention_mask is not None:
            text_padding = text_padding | ~attention_mask.bool()
        x = self.embed_tokens(input_ids) + self.type_embedding.weight[0]
        x = F.dropout(self.layernorm_embedding(x), self.dropout, self.training)
        pos = self.pos_ln(self.embed_positions(torch.arange(text_len, device=input_ids.device)))[None].expand(bsz, -1, -1)
        padding = text_padding
        num_patches = 0
        if patch_images is not None:
            patches, image_pos_ids, left_out = self.image_patches(patch_images, sample_patch_num,
                                                                   sample_patch_rows=sample_patch_rows)
            num_patches = patches.size(1)
            img = self.image_proj(patches.to(x.dtype)) + self.type_embedding.weight[1]
            img = F.dropout(self.patch_layernorm_embedding(img), self.dropout, self.training)
            x = torch.cat([img, x], dim=1)
            image_padding = torch.zeros(bsz, num_patches, dtype=torch.bool, device=x.device)
            if patch_masks is not None:
                image_padding = image_padding | ~patch_masks.bool().to(x.device)[:, None]
            if left_out is not None:  # patches a sampled row leaves out: masked, as if absent
                image_padding = image_padding | left_out
            padding = torch.cat([image_padding, text_padding], dim=1)
            image_pos = self.image_pos_ln(self.embed_image_positions(image_pos_ids))
            pos = torch.cat([image_pos, pos], dim=1)
        x = x * (1 - padding[:, :, None].to(x.dtype))

        length = x.size(1)
        h = self.num_heads
        pos_q = self.pos_q_linear(pos).view(bsz, length, h, -1).transpose(1, 2) * self.pos_scaling
        pos_k = self.pos_k_linear(pos).view(bsz, length, h, -1).transpose(1, 2)
        abs_bias = pos_q @ pos_k.transpose(2, 3)

        token_rp = self.tables.get("token", x.device)[:text_len, :text_len]
        if num_patches:
            image_rp = self.tables.get("image", x.device)
            image_rp = image_rp[image_pos_ids[:, :, None], image_pos_ids[:, None, :]]  # (B, P, P)
        hidden_states = [] if output_hidden_states else None
        for idx, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            bias = abs_bias.clone()
            bias[:, :, num_patches:, num_patches:] += F.embedding(
                token_rp, self.token_rel_pos_table_list[idx].weight).permute(2, 0, 1)[None]
            if num_patches:
                bias[:, :, :num_patches, :num_patches] += F.embedding(
                    image_rp, self.image_rel_pos_table_list[idx].weight).permute(0, 3, 1, 2)
            x = layer(x, _mask_keys(bias, padding))
        if hidden_states is not None:
            hidden_states.append(x)
        x = self.layer_norm(x)
        return BiomedGPTEncoderOutput(
            last_hidden_state=x, padding_mask=padding, position_embeddings=pos,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )


# ----------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------


class BiomedGPTDecoder(nn.Module):
    """Decoder over text tokens or image-code tokens (`code_masks`, one flag per sample)."""

    def __init__(self, config: BiomedGPTConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        d = config.d_model
        self.config = config
        self.padding_idx = config.pad_token_id
        self.num_heads = config.decoder_attention_heads
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = nn.LayerNorm(d)
        self.code_layernorm_embedding = nn.LayerNorm(d)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, d)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size ** 2 + 1, d)
        self.pos_ln = nn.LayerNorm(d)
        self.image_pos_ln = nn.LayerNorm(d)
        self.pos_scaling = float(d / self.num_heads * config.attn_scale_factor) ** -0.5
        self.self_pos_q_linear = nn.Linear(d, d)
        self.self_pos_k_linear = nn.Linear(d, d)
        self.cross_pos_q_linear = nn.Linear(d, d)
        self.cross_pos_k_linear = nn.Linear(d, d)
        rates = linear_rates(config.decoder_drop_path_rate, config.decoder_layers)
        self.layers = nn.ModuleList(BiomedGPTDecoderLayer(config, i, rates[i]) for i in range(config.decoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        n_tok = 2 * config.token_bucket_size - 1
        n_img = (2 * config.image_bucket_size - 1) ** 2 + 3
        self.token_rel_pos_table_list = nn.ModuleList(nn.Embedding(n_tok, self.num_heads) for _ in range(config.decoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(nn.Embedding(n_img, self.num_heads) for _ in range(config.decoder_layers))
        self.output_projection = nn.Linear(d, config.vocab_size, bias=False)
        self.output_projection.weight = embed_tokens.weight
        self.tables = _DeviceTables(config)
        self.dropout = config.dropout

    def _rows(self, code_masks: torch.Tensor | None, bsz: int, device: torch.device) -> torch.Tensor:
        if code_masks is None:
            return torch.zeros(bsz, dtype=torch.bool, device=device)
        code_masks = code_masks.to(device=device, dtype=torch.bool).reshape(-1)
        if code_masks.numel() != bsz:
            raise ValueError(f"code_masks has {code_masks.numel()} flags for a batch of {bsz}; give one per sample")
        return code_masks

    def _per_row(self, code: torch.Tensor, text_value: torch.Tensor, code_value: torch.Tensor) -> torch.Tensor:
        """Pick the code-row value for samples flagged in `code` (B,), the text value otherwise."""
        shape = (-1,) + (1,) * (text_value.dim() - 1)
        return torch.where(code.view(shape), code_value, text_value)

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_output: BiomedGPTEncoderOutput,
        code_masks: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """input_ids (B, Tnew): the new decoder tokens (all of them without a cache). Returns the
        final normalised hidden states (B, Tnew, C) and, when asked, every layer's input and the last
        layer's output."""
        bsz, new_len = input_ids.shape
        device = input_ids.device
        past = cache.get_seq_length() if cache is not None else 0
        total = past + new_len
        if total > self.config.max_position_embeddings:
            raise ValueError(f"decoder sequence of {total} tokens exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        code = self._rows(code_masks, bsz, device)
        any_code = bool(code.any())
        all_code = bool(code.all())
        h = self.num_heads

        # Positions of every step so far (keys) and of the new steps (queries).
        text_pos = self.pos_ln(self.embed_positions(torch.arange(total, device=device)))[None].expand(bsz, -1, -1)
        pos = text_pos
        if any_code:
            code_pos_ids = self.tables.get("code_positions", device)[:total]
            image_pos = self.image_pos_ln(self.embed_image_positions(code_pos_ids))[None].expand(bsz, -1, -1)
            pos = image_pos if all_code else self._per_row(code, text_pos, image_pos)
        q_pos = pos[:, past:]
        self_bias = (self.self_pos_q_linear(q_pos).view(bsz, new_len, h, -1).transpose(1, 2) * self.pos_scaling) @ \
            self.self_pos_k_linear(pos).view(bsz, total, h, -1).transpose(1, 2).transpose(2, 3)
        src_pos = encoder_output.position_embeddings
        cross_bias = (self.cross_pos_q_linear(q_pos).view(bsz, new_len, h, -1).transpose(1, 2) * self.pos_scaling) @ \
            self.cross_pos_k_linear(src_pos).view(bsz, src_pos.size(1), h, -1).transpose(1, 2).transpose(2, 3)
        cross_bias = _mask_keys(cross_bias, encoder_output.padding_mask)
        causal = torch.ones(new_len, total, dtype=torch.bool, device=device).triu(past + 1)
        self_bias = self_bias.masked_fill(causal, torch.finfo(self_bias.dtype).min)
        key_padding = None
        if attention_mask is not None and attention_mask.size(-1) == total:
            key_padding = ~attention_mask.bool()
        elif input_ids.eq(self.padding_idx).any():
            key_padding = torch.zeros(bsz, total, dtype=torch.bool, device=device)
            key_padding[:, past:] = input_ids.eq(self.padding_idx)

        token_rp = self.tables.get("token", device)[past:total, :total]
        if any_code:
            cp = self.tables.get("code_positions", device)[:total]
            image_rp = self.tables.get("image", device)[cp[past:, None], cp[None, :]]

        x = self.embed_tokens(input_ids)
        if all_code:
            x = self.code_layernorm_embedding(x)
        elif any_code:
            x = self._per_row(code, self.layernorm_embedding(x), self.code_layernorm_embedding(x))
        else:
            x = self.layernorm_embedding(x)
        x = F.dropout(x, self.dropout, self.training)

        encoder_states = encoder_output.last_hidden_state
        hidden_states = [] if output_hidden_states else None
        for idx, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            text_rel = F.embedding(token_rp, self.token_rel_pos_table_list[idx].weight).permute(2, 0, 1)[None]
            if any_code:
                image_rel = F.embedding(image_rp, self.image_rel_pos_table_list[idx].weight).permute(2, 0, 1)[None]
                rel = image_rel if all_code else self._per_row(code, text_rel.expand(bsz, -1, -1, -1),
                                                               image_rel.expand(bsz, -1, -1, -1))
            else:
                rel = text_rel
            bias = _mask_keys(self_bias + rel, key_padding)
            x = layer(x, encoder_states, bias, cross_bias, cache)
        if hidden_states is not None:
            hidden_states.append(x)
        return self.layer_norm(x), (tuple(hidden_states) if hidden_states is not None else None)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class BiomedGPTPreTrainedModel(PreTrainedModel):
    config_class = BiomedGPTConfig
    config: BiomedGPTConfig
    base_model_prefix = "biomedgpt"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["BiomedGPTEncoderLayer", "BiomedGPTDecoderLayer", "ResNetBackbone"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [
        r"encoder\.version", r"decoder\.version", r".*_rp_bucket", r"decoder\.image_position_idx",
    ]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """OFA's initialisation for from-scratch training: normal(0, d^-0.5) embeddings, zero relative
        position tables, Xavier attention projections (gain 1/sqrt(2) for q/k/v), Kaiming convs.
        Uses transformers' guarded init functions, so weights loaded from a checkpoint are kept."""
        super()._init_weights(module)
        d = self.config.d_model
        if isinstance(module, BiomedGPTAttention):
            for proj in (module.q_proj, module.k_proj, module.v_proj):
                init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
            init.xavier_uniform_(module.out_proj.weight)
            if module.c_attn is not None:
                init.ones_(module.c_attn)
        elif isinstance(module, (BiomedGPTEncoder, BiomedGPTDecoder)):
            for table in list(module.token_rel_pos_table_list) + list(module.image_rel_pos_table_list):
                init.zeros_(table.weight)
            for emb in (module.embed_positions, module.embed_image_positions):
                init.normal_(emb.weight, mean=0.0, std=d ** -0.5)
            if isinstance(module, BiomedGPTEncoder):
                init.normal_(module.type_embedding.weight, mean=0.0, std=d ** -0.5)
                init.xavier_uniform_(module.image_proj.weight)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class BiomedGPTForConditionalGeneration(BiomedGPTPreTrainedModel, GenerationMixin):
    """BiomedGPT encoder-decoder with the tied output projection.

    `forward(input_ids, patch_images, patch_masks, decoder_input_ids, code_masks)` returns `.logits`
    (B, T, vocab); `generate()` from transformers works with the key/value cache.
    """

    _tied_weights_keys = {
        "decoder.embed_tokens.weight": "encoder.embed_tokens.weight",
        "decoder.output_projection.weight": "encoder.embed_tokens.weight",
    }

    def __init__(self, config: BiomedGPTConfig) -> None:
        super().__init__(config)
        embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = BiomedGPTEncoder(config, embed_tokens)
        self.decoder = BiomedGPTDecoder(config, embed_tokens)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embed_tokens = value
        self.decoder.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder.output_projection

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.decoder.output_projection = value

    def get_encoder(self, modality: str | None = None) -> BiomedGPTEncoder:
        return self.encoder

    def get_decoder(self) -> BiomedGPTDecoder:
        return self.decoder

    def sharding_units(self) -> list[nn.Module]:
        """The modules a sharding policy wraps one by one (then the root): every encoder and decoder
        layer and the image backbone."""
        return [self.encoder.embed_images, *self.encoder.layers, *self.decoder.layers]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        patch_images: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        code_masks: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BiomedGPTEncoderOutput | tuple | None = None,
        cache: Cache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        sample_patch_num: int | None = None,
        sample_patch_rows: torch.Tensor | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """Teacher-forced or incremental forward pass.

        input_ids (B, S) source text; patch_images (B, 3, H, W) float pixels or None; patch_masks (B,)
        bool; decoder_input_ids (B, T) (only the new tokens when `cache` holds the past);
        code_masks (B,) bool, True where the decoder tokens are image codes; labels (B, T) target ids
        with -100 ignored (decoder_input_ids default to labels shifted right behind BOS).
        """
        output_hidden_states = bool(output_hidden_states)
        if cache is None and kwargs.get("past_key_values") is not None:
            cache = kwargs["past_key_values"]  # generate() of transformers releases before the rename
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids (or labels) are required")
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("input_ids (or encoder_outputs) are required")
            encoder_outputs = self.encoder(input_ids, patch_images=patch_images, patch_masks=patch_masks,
                                           attention_mask=attention_mask, output_hidden_states=output_hidden_states,
                                           sample_patch_num=sample_patch_num, sample_patch_rows=sample_patch_rows)
        elif not isinstance(encoder_outputs, BiomedGPTEncoderOutput):
            raise TypeError("encoder_outputs must be the BiomedGPTEncoderOutput returned by model.encoder")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and labels is None
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        if not use_cache:
            cache = None
        hidden, decoder_hidden_states = self.decoder(
            decoder_input_ids, encoder_outputs, code_masks=code_masks, attention_mask=decoder_attention_mask,
            cache=cache, output_hidden_states=output_hidden_states,
        )
        logits = self.decoder.output_projection(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            decoder_hidden_states=decoder_hidden_states,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            **{_CACHE_FIELD: cache},
        )


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, start_token_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: BOS then the labels without their last token (-100 -> pad)."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_token_id
    return shifted.masked_fill(shifted.eq(-100), pad_token_id)
