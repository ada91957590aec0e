"""The metrics of the BiomedGPT paper's tasks, in one place.

| task               | function                  | metrics                                                      |
|--------------------|---------------------------|--------------------------------------------------------------|
| vqa                | `vqa_accuracy`            | accuracy, closed_accuracy, open_accuracy (exact match)       |
| caption            | `caption_metrics`         | bleu_1..bleu_4, meteor, rouge_l, cider_d (pycocoevalcap's)   |
| classify, nli      | `classification_metrics`  | accuracy, macro_f1                                           |
| summarize          | `summarization_metrics`   | rouge1, rouge2, rougeL F1 with stemming (rouge-score's)      |

All are fractions in [0, 1] except CIDEr-D, which is on the conventional scale (x10: 1.227 is the
"122.7" that papers print). Each function is documented in its module.
"""

from .caption import bleu, caption_metrics, cider_d, rouge_l
from .classify import classification_metrics, normalize_label
from .ptb_tokenizer import coco_tokenize
from .summarize import summarization_metrics
from .vqa import normalize_answer, vqa_accuracy

__all__ = [
    "bleu",
    "caption_metrics",
    "cider_d",
    "classification_metrics",
    "coco_tokenize",
    "normalize_answer",
    "normalize_label",
    "rouge_l",
    "summarization_metrics",
    "vqa_accuracy",
]
