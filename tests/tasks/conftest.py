"""Fixtures for the task tests: a small byte-level BPE in the BiomedGPT layout (codes and bins
included) trained on the pretraining prompts and a few biomedical sentences."""

from __future__ import annotations

import pytest

CORPUS = [
    " what does the image describe?", ' does the image describe " the heart is normal "?',
    ' which region does the text " liver lesion " describe?', " what does the region describe? region:",
    ' what is the complete text of " the lungs are clear "?', " what is the image in the middle part?",
    " what are the objects in the image?", " the heart is normal in size and the lungs are clear",
    " no acute cardiopulmonary disease", " liver lesion", " lung nodule", " soft tissue", " yes", " no",
    " is there a pleural effusion?", " the patient was admitted with chest pain and shortness of breath",
]


@pytest.fixture(scope="session")
def pretrain_tokenizer():
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer

    return BiomedGPTTokenizer.train(CORPUS * 3, vocab_size=400)


@pytest.fixture(scope="session")
def pretrain_tokenizer_dir(pretrain_tokenizer, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("pretrain-tokenizer")
    pretrain_tokenizer.save_pretrained(out)
    return str(out)
