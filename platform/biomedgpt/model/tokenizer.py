"""BiomedGPT / OFA tokenizer: GPT-2 byte-level BPE in the BART (fairseq) layout, plus image codes and
coordinate bins.

Vocabulary layout (ids), with the real BART ``vocab.json``/``merges.txt`` (59,457 ids in total)::

    0 <s>   1 <pad>   2 </s>   3 <unk>        fairseq specials
    4 .. 50263                                byte-level BPE tokens (GPT-2 merges)
    50264 <mask>                              last entry of the BART vocab.json
    50265 .. 58456  <code_0> .. <code_8191>   VQGAN image codes   (code_offset = 50265)
    58457 .. 59456  <bin_0>  .. <bin_999>     quantised coordinates (bin_offset = 58457)

In general ``code_offset = id(<mask>) + 1`` and ``bin_offset = code_offset + num_codes``, so a BPE
vocabulary of another size (e.g. one made with :meth:`BiomedGPTTokenizer.train`) keeps the same
shape.

Text is encoded like OFA does it: ``" " + text.strip()`` (byte-level BPE with a prefix space, so
the first word gets the ``Ġ`` form as every other word). Code and bin tokens are whole tokens
written separated by spaces (``"<bin_12> <bin_300>"``); the whitespace around them is absorbed,
so ``" what is <bin_12> <bin_300>"`` encodes to the BPE ids of ``" what is"`` followed by exactly
the two bin ids.

A box ``(x0, y0, x1, y1)`` with coordinates normalised to [0, 1] (fractions of the image width /
height) is written ``"<bin_a> <bin_b> <bin_c> <bin_d>"`` with ``a = round(x0 * (num_bins - 1))``
etc. (Python's round, i.e. round-half-to-even), and read back as ``a / (num_bins - 1)``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import fsspec
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .configuration import BiomedGPTConfig

__all__ = [
    "BiomedGPTTokenizer",
    "bin_ids_to_box",
    "bin_tokens_to_box",
    "box_to_bin_ids",
    "box_to_bin_tokens",
]

BOS_TOKEN = "<s>"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
MASK_TOKEN = "<mask>"
# fairseq dictionary order of the specials at the start of the vocabulary
FAIRSEQ_SPECIALS: tuple[str, ...] = (BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
GPT2_EOT_TOKEN = "<|endoftext|>"

DEFAULT_NUM_CODES = 8192
DEFAULT_NUM_BINS = 1000

VOCAB_FILES_NAMES = {"vocab_file": "vocab.json", "merges_file": "merges.txt", "tokenizer_file": "tokenizer.json"}

_CODE_OR_BIN_RE = re.compile(r"<(?:code|bin)_\d+>")
_BIN_TOKEN_RE = re.compile(r"<bin_(\d+)>")
# specials that must not be learned as BPE pieces when training from raw text
_TRAIN_STRIP_RE = re.compile(r"<(?:code|bin)_\d+>|<s>|</s>|<pad>|<unk>|<mask>")

_BYTE_ALPHABET: frozenset[str] = frozenset(pre_tokenizers.ByteLevel.alphabet())


def code_token(i: int) -> str:
    """Token string of image code ``i`` (``"<code_i>"``)."""
    return f"<code_{i}>"


def bin_token(i: int) -> str:
    """Token string of coordinate bin ``i`` (``"<bin_i>"``)."""
    return f"<bin_{i}>"


# --------------------------------------------------------------------------------------------------
# Reading and checking the BART-layout vocab.json / merges.txt
# --------------------------------------------------------------------------------------------------


def _read_text(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file from a local path or any fsspec URL (file://, s3://, http(s)://)."""
    with fsspec.open(os.fspath(path), "rt", encoding="utf-8") as f:
        return f.read()


def _load_vocab_json(path: str | os.PathLike[str]) -> dict[str, int]:
    source = os.fspath(path)
    text = _read_text(source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not a valid JSON vocab.json ({e})") from e
    return _check_bart_vocab(data, source)


def _check_bart_vocab(data: Any, source: str) -> dict[str, int]:
    """Validate a BART/fairseq-layout vocabulary and return it ordered by id, `<mask>` last.

    `<mask>` is appended (id = len(vocab)) when absent. Raises ValueError naming `source` on any
    problem.
    """
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{source}: expected a non-empty JSON object mapping token -> id, got {type(data).__name__}")
    for token, idx in data.items():
        if not isinstance(token, str) or isinstance(idx, bool) or not isinstance(idx, int):
            raise ValueError(f"{source}: entry {token!r}: {idx!r} is not a token -> integer id pair")
    if BOS_TOKEN not in data and PAD_TOKEN not in data and GPT2_EOT_TOKEN in data:
        raise ValueError(
            f"{source} looks like a raw GPT-2 vocab.json (it has {GPT2_EOT_TOKEN!r} but no {BOS_TOKEN!r}/"
            f"{PAD_TOKEN!r} entries). BiomedGPT/OFA need the BART (fairseq) layout vocab.json, as shipped "
            f"with the Hugging Face BART or OFA checkpoints (e.g. facebook/bart-base): <s>=0, <pad>=1, "
            f"</s>=2, <unk>=3, the BPE tokens, then <mask> as the last entry."
        )
    by_id: dict[int, str] = {}
    for token, idx in data.items():
        if idx in by_id:
            raise ValueError(f"{source}: id {idx} is used by both {by_id[idx]!r} and {token!r}")
        by_id[idx] = token
    n = len(by_id)
    for expected in range(n):
        if expected not in by_id:
            raise ValueError(f"{source}: ids must be 0..{n - 1} without gaps, but id {expected} is missing")
    for expected_id, token in enumerate(FAIRSEQ_SPECIALS):
        if data.get(token) != expected_id:
            raise ValueError(
                f"{source}: expected {token!r} at id {expected_id} (BART/fairseq layout: <s>=0, <pad>=1, "
                f"</s>=2, <unk>=3), found {data.get(token, 'no such entry')!r}"
            )
    if MASK_TOKEN in data and data[MASK_TOKEN] != n - 1:
        raise ValueError(f"{source}: {MASK_TOKEN!r} must be the last entry (id {n - 1}), found id {data[MASK_TOKEN]}")
    extra = [t for t in data if _CODE_OR_BIN_RE.fullmatch(t)]
    if extra:
        raise ValueError(
            f"{source}: contains code/bin tokens (e.g. {extra[0]!r}); vocab.json must hold only the BPE "
            f"vocabulary with the specials and <mask>: the tokenizer appends the code and bin tokens itself"
        )
    missing = sorted(_BYTE_ALPHABET.difference(data))
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} of the 256 byte-level symbols are missing (e.g. {missing[0]!r}); "
            f"this is not a GPT-2 byte-level BPE vocabulary"
        )
    vocab = {by_id[i]: i for i in range(n)}
    if MASK_TOKEN not in vocab:
        vocab[MASK_TOKEN] = n
    return vocab


def _parse_merges_txt(text: str, source: str) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r\n")
        if lineno == 1 and line.startswith("#version"):
            continue
        if not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{source}: line {lineno}: expected two space-separated symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _check_merges(merges: Sequence[Sequence[str]], vocab: dict[str, int], source: str) -> list[tuple[str, str]]:
    checked: list[tuple[str, str]] = []
    for n, merge in enumerate(merges, start=1):
        if isinstance(merge, str):
            parts = merge.split(" ")
        else:
            parts = list(merge)
        if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise ValueError(f"{source}: merge {n}: expected a pair of symbols, got {merge!r}")
        left, right = parts
        for token in (left, right, left + right):
            if token not in vocab:
                raise ValueError(
                    f"{source}: merge {n} ({left!r} {right!r}) uses {token!r}, which is not in the vocabulary"
                )
        checked.append((left, right))
    return checked


def _load_merges_txt(path: str | os.PathLike[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    source = os.fspath(path)
    return _check_merges(_parse_merges_txt(_read_text(source), source), vocab, source)


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


class BiomedGPTTokenizer(PreTrainedTokenizerFast):
    """BiomedGPT (OFA) tokenizer: byte-level BPE in the BART layout + image codes + coordinate bins.

    Build it with :meth:`from_bpe_files` (BART/OFA ``vocab.json`` + ``merges.txt``), :meth:`train`
    (a new BPE from text) or :meth:`from_pretrained` (a directory written by ``save_pretrained``).
    ``__call__``/``encode`` add ``<s> ... </s>`` (pairs: ``<s> A </s> </s> B </s>``, as BART);
    :meth:`encode_text` / :meth:`encode_source` give OFA's text ids / model source ids.

    Code and bin tokens are special added tokens: ``decode(..., skip_special_tokens=True)`` drops
    them, otherwise they are decoded as ``" <bin_12>"`` (preceded by one space), so the decoded
    text encodes back to the same ids.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    model = BPE

    def __init__(
        self,
        vocab: dict[str, int] | str | None = None,
        merges: Sequence[Sequence[str]] | str | None = None,
        num_codes: int = DEFAULT_NUM_CODES,
        num_bins: int = DEFAULT_NUM_BINS,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        unk_token: str = UNK_TOKEN,
        pad_token: str = PAD_TOKEN,
        mask_token: str = MASK_TOKEN,
        add_prefix_space: bool = True,
        **kwargs: Any,
    ) -> None:
        """Build from an in-memory BART-layout ``vocab`` (token -> id) and ``merges`` (pairs).

        ``vocab``/``merges`` may also be paths/URLs (what ``from_pretrained`` passes when a folder
        has only vocab.json + merges.txt). Prefer :meth:`from_bpe_files` / :meth:`train`.
        """
        vocab_file = kwargs.get("vocab_file")
        merges_file = kwargs.get("merges_file")
        if vocab is None and vocab_file is not None:
            vocab = vocab_file
        if merges is None and merges_file is not None:
            merges = merges_file
        if vocab is None or merges is None:
            raise ValueError(
                "BiomedGPTTokenizer needs a BART-layout vocabulary and merges: use "
                "BiomedGPTTokenizer.from_bpe_files(vocab_json, merges_txt), BiomedGPTTokenizer.train(...) "
                "or BiomedGPTTokenizer.from_pretrained(directory)"
            )
        if isinstance(vocab, (str, os.PathLike)):
            vocab = _load_vocab_json(vocab)
        else:
            vocab = _check_bart_vocab(dict(vocab), "vocab")
        if isinstance(merges, (str, os.PathLike)):
            merges = _load_merges_txt(merges, vocab)
        else:
            merges = _check_merges(merges, vocab, "merges")
        for name, value in (("num_codes", num_codes), ("num_bins", num_bins)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if str(mask_token) not in vocab:
            raise ValueError(f"mask_token {str(mask_token)!r} is not in the vocabulary")

        # set before super().__init__, which probes attributes named like its kwargs
        self._num_codes = num_codes
        self._num_bins = num_bins

        backend = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        )
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        # the fairseq specials and <mask> already have ids in the BPE vocab: they keep them
        backend.add_special_tokens(
            [AddedToken(str(t), special=True, normalized=False) for t in (bos_token, pad_token, eos_token, unk_token)]
            + [AddedToken(str(mask_token), special=True, lstrip=True, normalized=False)]
        )
        # codes then bins get consecutive new ids right after the BPE vocab (i.e. after <mask>)
        code_offset = backend.get_vocab_size(with_added_tokens=True)
        backend.add_special_tokens(
            [_whole_token(code_token(i)) for i in range(num_codes)]
            + [_whole_token(bin_token(i)) for i in range(num_bins)]
        )
        self._tokenizer = backend
        self._code_offset = code_offset
        self._bin_offset = code_offset + num_codes

        kwargs.pop("vocab_file", None)
        kwargs.pop("merges_file", None)
        kwargs.pop("add_bos_token", None)
        kwargs.pop("add_eos_token", None)
        kwargs.pop("post_processor", None)  # rebuilt below
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(
            num_codes=num_codes,
            num_bins=num_bins,
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            mask_token=mask_token,
            add_prefix_space=add_prefix_space,
            **kwargs,
        )
        bos, eos = str(bos_token), str(eos_token)
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            pair=f"{bos} $A {eos} {eos} $B:1 {eos}:1",
            special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
        )
        self._should_update_post_processor = False
        self._check_layout()

    def _check_layout(self) -> None:
        backend = self._tokenizer
        for token, expected in ((code_token(0), self._code_offset), (bin_token(0), self._bin_offset)):
            if self._num_codes == 0 and token.startswith("<code"):
                continue
            if self._num_bins == 0 and token.startswith("<bin"):
                continue
            if backend.token_to_id(token) != expected:
                raise RuntimeError(f"{token} got id {backend.token_to_id(token)}, expected {expected}")
        expected_size = self._bin_offset + self._num_bins
        if backend.get_vocab_size(with_added_tokens=True) != expected_size:
            raise RuntimeError(
                f"vocabulary has {backend.get_vocab_size(with_added_tokens=True)} ids, expected {expected_size}"
            )

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_bpe_files(
        cls,
        vocab: str | os.PathLike[str],
        merges: str | os.PathLike[str],
        num_codes: int = DEFAULT_NUM_CODES,
        num_bins: int = DEFAULT_NUM_BINS,
        **kwargs: Any,
    ) -> BiomedGPTTokenizer:
        """Build from the BART/OFA ``vocab.json`` and ``merges.txt`` (local paths or fsspec URLs).

        ``vocab.json`` must be in the BART (fairseq) layout: ``<s>``=0, ``<pad>``=1, ``</s>``=2,
        ``<unk>``=3, the byte-level BPE tokens, and ``<mask>`` as the last entry (appended if
        absent). A raw GPT-2 ``vocab.json`` is rejected. ``num_codes`` code tokens follow
        ``<mask>``, then ``num_bins`` bin tokens; the real BART files give 59,457 ids.

        Raises:
            ValueError: a malformed file (the message names the file and the problem).
        """
        vocab_dict = _load_vocab_json(vocab)
        merges_list = _load_merges_txt(merges, vocab_dict)
        return cls(vocab=vocab_dict, merges=merges_list, num_codes=num_codes, num_bins=num_bins, **kwargs)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        num_codes: int = DEFAULT_NUM_CODES,
        num_bins: int = DEFAULT_NUM_BINS,
        min_frequency: int = 2,
        **kwargs: Any,
    ) -> BiomedGPTTokenizer:
        """Train a byte-level BPE from scratch on ``texts`` and lay it out like BART/OFA.

        Args:
            texts: training sentences; each is used as ``" " + text.strip()`` (as encoded), with any
                special/code/bin token strings removed first.
            vocab_size: number of BPE tokens, i.e. the 256 byte-level symbols plus the merges.
                It excludes the 4 specials, ``<mask>``, codes and bins, so the total vocabulary is
                ``4 + vocab_size + 1 + num_codes + num_bins``. Must be >= 256. On a small corpus
                the trainer may stop with fewer merges (no pair reaches ``min_frequency``); the
                BPE part is then smaller and everything after it moves down accordingly (check
                ``mask_token_id`` / ``code_offset``).
            num_codes: number of ``<code_i>`` tokens.
            num_bins: number of ``<bin_i>`` tokens.
            min_frequency: minimum count of a pair to be merged.

        The result is deterministic for the same input.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < len(_BYTE_ALPHABET):
            raise ValueError(
                f"vocab_size counts the {len(_BYTE_ALPHABET)} byte-level symbols plus merges, "
                f"so it must be an integer >= {len(_BYTE_ALPHABET)}, got {vocab_size!r}"
            )
        bpe = Tokenizer(BPE(dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
        trainer = BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=False,
            special_tokens=[],
            initial_alphabet=sorted(_BYTE_ALPHABET),
        )

        def prepared() -> Iterable[str]:
            for text in texts:
                if not isinstance(text, str):
                    raise TypeError(f"train() expects strings, got {type(text).__name__}")
                yield " " + _TRAIN_STRIP_RE.sub(" ", text).strip()

        bpe.train_from_iterator(prepared(), trainer=trainer)
        model_state = json.loads(bpe.to_str())["model"]
        trained = sorted(model_state["vocab"].items(), key=lambda kv: kv[1])
        vocab = {token: i for i, token in enumerate(FAIRSEQ_SPECIALS)}
        for token, _ in trained:
            vocab[token] = len(vocab)
        vocab[MASK_TOKEN] = len(vocab)
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_state["merges"]]
        return cls(vocab=vocab, merges=merges, num_codes=num_codes, num_bins=num_bins, **kwargs)

    # ---------------------------------------------------------------- layout

    @property
    def num_codes(self) -> int:
        """Number of image code tokens ``<code_0>``..``<code_{num_codes-1}>``."""
        return self._num_codes

    @property
    def num_bins(self) -> int:
        """Number of coordinate bin tokens ``<bin_0>``..``<bin_{num_bins-1}>``."""
        return self._num_bins

    @property
    def code_offset(self) -> int:
        """Id of ``<code_0>`` (= id of ``<mask>`` + 1)."""
        return self._code_offset

    @property
    def bin_offset(self) -> int:
        """Id of ``<bin_0>`` (= ``code_offset + num_codes``)."""
        return self._bin_offset

    def code_id(self, i: int) -> int:
        """Token id of image code ``i`` (0 <= i < num_codes)."""
        if isinstance(i, bool) or not 0 <= int(i) < self._num_codes or int(i) != i:
            raise ValueError(f"code index must be an integer in [0, {self._num_codes}), got {i!r}")
        return self._code_offset + int(i)

    def bin_id(self, i: int) -> int:
        """Token id of coordinate bin ``i`` (0 <= i < num_bins)."""
        if isinstance(i, bool) or not 0 <= int(i) < self._num_bins or int(i) != i:
            raise ValueError(f"bin index must be an integer in [0, {self._num_bins}), got {i!r}")
        return self._bin_offset + int(i)

    def is_code_id(self, token_id: int) -> bool:
        """Whether ``token_id`` is one of the image code tokens."""
        return self._code_offset <= int(token_id) < self._code_offset + self._num_codes

    def is_bin_id(self, token_id: int) -> bool:
        """Whether ``token_id`` is one of the coordinate bin tokens."""
        return self._bin_offset <= int(token_id) < self._bin_offset + self._num_bins

    # ---------------------------------------------------------------- OFA-style encoding

    def _encode_plain(self, text: str) -> list[int]:
        """Backend encode without specials, truncation or padding (restores the backend state)."""
        backend = self._tokenizer
        truncation, padding = backend.truncation, backend.padding
        if truncation is not None:
            backend.no_truncation()
        if padding is not None:
            backend.no_padding()
        try:
            return backend.encode(text, add_special_tokens=False).ids
        finally:
            if truncation is not None:
                backend.enable_truncation(**truncation)
            if padding is not None:
                backend.enable_padding(**padding)

    def encode_text(self, text: str, max_length: int | None = None) -> list[int]:
        """OFA text ids: the ids of ``" " + text.strip()``, without ``<s>``/``</s>``.

        ``max_length`` (tokens) keeps the first ``max_length`` ids.
        """
        if max_length is not None and max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        ids = self._encode_plain(" " + text.strip())
        return ids if max_length is None else ids[:max_length]

    def encode_source(self, text: str, max_length: int | None = None) -> list[int]:
        """Model source ids ``[bos] + encode_text(text) + [eos]``.

        ``max_length`` (tokens, >= 2) bounds the whole sequence; the text ids are truncated so
        ``<s>`` and ``</s>`` are always kept.
        """
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 to keep <s> and </s>, got {max_length}")
        ids = self.encode_text(text, None if max_length is None else max_length - 2)
        return [self.bos_token_id, *ids, self.eos_token_id]

    def tokenize(
        self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs: Any
    ) -> list[str]:
        # The backend reports added tokens with the whitespace they absorbed (" <bin_1> "); return
        # the vocabulary strings instead so convert_tokens_to_ids(tokenize(x)) works.
        encoding = self._encode_plus(text=text, text_pair=pair, add_special_tokens=add_special_tokens, **kwargs)
        return self.convert_ids_to_tokens(encoding["input_ids"])

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if isinstance(token_ids, dict):
            token_ids = token_ids["input_ids"]
        ids = [int(i) for i in token_ids]
        if not any(self.is_code_id(i) or self.is_bin_id(i) for i in ids):
            return super()._decode(ids, skip_special_tokens, clean_up_tokenization_spaces, **kwargs)
        # decode text runs with the backend; write code/bin tokens as " <bin_i>" so they stay
        # space-separated whole tokens (OFA's convention) and the text re-encodes to the same ids
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            if self.is_code_id(i) or self.is_bin_id(i):
                if run:
                    pieces.append(super()._decode(run, skip_special_tokens, clean_up_tokenization_spaces, **kwargs))
                    run = []
                if not skip_special_tokens:
                    pieces.append(" " + self._tokenizer.id_to_token(i))
            else:
                run.append(i)
        if run:
            pieces.append(super()._decode(run, skip_special_tokens, clean_up_tokenization_spaces, **kwargs))
        return "".join(pieces)

    # ---------------------------------------------------------------- saving

    def bpe_vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """The BART-layout BPE vocabulary (specials, BPE tokens, ``<mask>``) and the merges."""
        state = json.loads(self._tokenizer.to_str())["model"]
        vocab = dict(sorted(state["vocab"].items(), key=lambda kv: kv[1]))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
        return vocab, merges  # type: ignore[return-value]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, str]:
        """Write the BART-style ``vocab.json`` (with specials and ``<mask>``) and ``merges.txt``."""
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        vocab_path = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
        merges_path = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["merges_file"])
        vocab, merges = self.bpe_vocab_and_merges()
        with open(vocab_path, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
            f.write("\n")
        with open(merges_path, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            for left, right in merges:
                f.write(f"{left} {right}\n")
        return vocab_path, merges_path

    def _save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        file_names: tuple[str, ...],
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
    ) -> tuple[str, ...]:
        file_names = super()._save_pretrained(
            save_directory, file_names, legacy_format=legacy_format, filename_prefix=filename_prefix
        )
        return file_names + self.save_vocabulary(str(save_directory), filename_prefix=filename_prefix)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(name_or_path={self.name_or_path!r}, len={len(self)}, "
            f"bpe_size={self.vocab_size}, mask_token_id={self.mask_token_id}, code_offset={self._code_offset}, "
            f"num_codes={self._num_codes}, bin_offset={self._bin_offset}, num_bins={self._num_bins}, "
            f"model_max_length={self.model_max_length}, special_tokens={self.special_tokens_map})"
        )


def _whole_token(content: str) -> AddedToken:
    # lstrip/rstrip: the spaces around a code/bin token belong to it, so "a <bin_1> <bin_2> b"
    # gives "Ġa", <bin_1>, <bin_2>, "Ġb" with no stray "Ġ" tokens
    return AddedToken(content, special=True, lstrip=True, rstrip=True, normalized=False)


AutoTokenizer.register(BiomedGPTConfig, tokenizer_class=BiomedGPTTokenizer, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# Boxes <-> bin tokens
# --------------------------------------------------------------------------------------------------


def _check_num_bins(num_bins: int) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")


def _box_to_bin_indices(box: Sequence[float], num_bins: int) -> list[int]:
    _check_num_bins(num_bins)
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError) as e:
        raise ValueError(f"box must be 4 numbers (x0, y0, x1, y1), got {box!r}") from e
    if len(values) != 4:
        raise ValueError(f"box must be 4 numbers (x0, y0, x1, y1), got {len(values)}: {box!r}")
    for name, v in zip(("x0", "y0", "x1", "y1"), values):
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"box coordinate {name}={v!r} is outside [0, 1] (coordinates must be normalised)")
    x0, y0, x1, y1 = values
    if x1 < x0:
        raise ValueError(f"box has x1={x1!r} < x0={x0!r}")
    if y1 < y0:
        raise ValueError(f"box has y1={y1!r} < y0={y0!r}")
    return [round(v * (num_bins - 1)) for v in values]


def box_to_bin_tokens(box: Sequence[float], num_bins: int = DEFAULT_NUM_BINS) -> str:
    """Write a box as bin tokens.

    Args:
        box: ``(x0, y0, x1, y1)`` normalised to [0, 1] (fractions of image width/height), with
            x0 <= x1 and y0 <= y1.
        num_bins: number of bins; coordinate ``v`` goes to bin ``round(v * (num_bins - 1))``
            (Python round: half to even).

    Returns:
        ``"<bin_a> <bin_b> <bin_c> <bin_d>"``.

    Raises:
        ValueError: a coordinate outside [0, 1] / not finite, x1 < x0 or y1 < y0 (names the value).
    """
    return " ".join(bin_token(i) for i in _box_to_bin_indices(box, num_bins))


def _parse_bin_tokens(tokens_or_str: str | Sequence[str]) -> list[int]:
    if isinstance(tokens_or_str, str):
        text = tokens_or_str
        leftover = _BIN_TOKEN_RE.sub("", text)
        if leftover.strip():
            raise ValueError(f"expected only bin tokens like '<bin_12>', got {text!r}")
        return [int(m) for m in _BIN_TOKEN_RE.findall(text)]
    indices = []
    for token in tokens_or_str:
        match = _BIN_TOKEN_RE.fullmatch(token.strip()) if isinstance(token, str) else None
        if match is None:
            raise ValueError(f"expected a bin token like '<bin_12>', got {token!r}")
        indices.append(int(match.group(1)))
    return indices


def bin_tokens_to_box(tokens_or_str: str | Sequence[str], num_bins: int = DEFAULT_NUM_BINS) -> tuple[float, ...]:
    """Read a box back from 4 bin tokens.

    Args:
        tokens_or_str: ``"<bin_a> <bin_b> <bin_c> <bin_d>"`` (whitespace optional) or a list of 4
            token strings.
        num_bins: number of bins; bin ``i`` maps to ``i / (num_bins - 1)``.

    Returns:
        ``(x0, y0, x1, y1)`` normalised to [0, 1]. The order of the corners is not checked
        (a generated box may be inverted).

    Raises:
        ValueError: not exactly 4 bin tokens, other text, or a bin index >= num_bins.
    """
    _check_num_bins(num_bins)
    indices = _parse_bin_tokens(tokens_or_str)
    if len(indices) != 4:
        raise ValueError(f"expected 4 bin tokens (x0, y0, x1, y1), got {len(indices)}: {tokens_or_str!r}")
    for i in indices:
        if i >= num_bins:
            raise ValueError(f"bin index {i} is out of range for num_bins={num_bins}")
    return tuple(i / (num_bins - 1) for i in indices)


def box_to_bin_ids(box: Sequence[float], tokenizer: BiomedGPTTokenizer) -> list[int]:
    """Token ids of the 4 bin tokens of ``box`` ((x0, y0, x1, y1) normalised to [0, 1]).

    Same quantisation as :func:`box_to_bin_tokens` with ``tokenizer.num_bins`` bins.
    """
    return [tokenizer.bin_id(i) for i in _box_to_bin_indices(box, tokenizer.num_bins)]


def bin_ids_to_box(ids: Sequence[int], tokenizer: BiomedGPTTokenizer) -> tuple[float, ...]:
    """Box ``(x0, y0, x1, y1)`` normalised to [0, 1] from 4 bin token ids (any int sequence).

    Raises:
        ValueError: not exactly 4 ids, or an id that is not a bin token.
    """
    _check_num_bins(tokenizer.num_bins)
    values = [int(i) for i in ids]
    if len(values) != 4:
        raise ValueError(f"expected 4 bin ids (x0, y0, x1, y1), got {len(values)}: {values}")
    for i in values:
        if not tokenizer.is_bin_id(i):
            raise ValueError(
                f"id {i} is not a bin token id (bins are {tokenizer.bin_offset}.."
                f"{tokenizer.bin_offset + tokenizer.num_bins - 1})"
            )
    return tuple((i - tokenizer.bin_offset) / (tokenizer.num_bins - 1) for i in values)
