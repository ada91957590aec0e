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
    "ResNetBackbone",
]
