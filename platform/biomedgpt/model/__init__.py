"""The BiomedGPT network (OFA encoder-decoder): config, layers, generation glue, tokenizer and
checkpoint adapters. Imports nothing from Ray or Lightning."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration import SIZES, BiomedGPTConfig
from .modeling import (
    BiomedGPTAttention,
    BiomedGPTDecoder,
    BiomedGPTDecoderLayer,
    BiomedGPTEncoder,
    BiomedGPTEncoderLayer,
    BiomedGPTEncoderOutput,
    BiomedGPTForConditionalGeneration,
    BiomedGPTPreTrainedModel,
)
from .resnet import ResNetBackbone
from .tokenizer import BiomedGPTTokenizer, bin_ids_to_box, bin_tokens_to_box, box_to_bin_ids, box_to_bin_tokens

AutoConfig.register(BiomedGPTConfig.model_type, BiomedGPTConfig, exist_ok=True)
AutoModel.register(BiomedGPTConfig, BiomedGPTForConditionalGeneration, exist_ok=True)
AutoModelForSeq2SeqLM.register(BiomedGPTConfig, BiomedGPTForConditionalGeneration, exist_ok=True)

__all__ = [
    "SIZES",
    "BiomedGPTAttention",
    "BiomedGPTConfig",
    "BiomedGPTDecoder",
    "BiomedGPTDecoderLayer",
    "BiomedGPTEncoder",
    "BiomedGPTEncoderLayer",
    "BiomedGPTEncoderOutput",
    "BiomedGPTForConditionalGeneration",
    "BiomedGPTPreTrainedModel",
    "BiomedGPTTokenizer",
    "ResNetBackbone",
    "bin_ids_to_box",
    "bin_tokens_to_box",
    "box_to_bin_ids",
    "box_to_bin_tokens",
]
