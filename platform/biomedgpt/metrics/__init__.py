"""The metrics of the BiomedGPT paper's tasks: pure functions over predictions and references, below
the task families (tasks/ asks them for its scores) and free of the rest of the package.

| task               | function                  | metrics                                                      |
|--------------------|---------------------------|--------------------------------------------------------------|
| vqa                | `vqa_accuracy`            | accuracy, closed_accuracy, open_accuracy (exact match)       |
| caption            | `caption_metrics`         | bleu_1..bleu_4, meteor, rouge_l, cider_d (pycocoevalcap's)   |
| classify, nli      | `classification_metrics`  | accuracy, macro_f1                                           |
| summarize          | `summarization_metrics`   | rouge1, rouge2, rougeL F1 with stemming (rouge-score's)      |

All are fractions in [0, 1] except CIDEr-D, which is on the conventional scale (x10: 1.227 is the
"122.7" that papers print). Each function is documented in its module. Nothing is imported here, so
that a module's heavy backend (torchmetrics, NLTK, Java for METEOR) loads only where it is used.
"""
