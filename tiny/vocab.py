"""The caption grammar's vocabulary and a CLIP tokenizer, built in memory, that maps every grammar word to one token.

CLIP's byte-level BPE always has the 256 byte characters, so it never fails on an unknown word: it would silently
spell it out in characters the model never saw. `check_prompt` therefore rejects out-of-vocabulary words by name.
"""

import re

from transformers import CLIPTokenizer

from ..errors import InvalidParameterError
from . import data

MAX_LENGTH = 24  # longest caption is 20 words, plus <|startoftext|> and <|endoftext|>
FILLER = ("a", "and", "on", "the", "at", "in", "background")
WORDS = tuple(sorted(set(FILLER) | set(data.SHAPES) | set(data.COLOURS) | set(data.BACKGROUNDS)
                     | set(data.POSITIONS) | set(data.SIZES)))


def bytes_to_unicode():
    """GPT-2/CLIP's byte -> printable character table (transformers 5 no longer exports it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merges_for(word):
    """Left-to-right merge chain that builds `word</w>` from its characters: c i, ci r, cir c, ..."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merges, prefix = [], pieces[0]
    for piece in pieces[1:]:
        merges.append((prefix, piece))
        prefix += piece
    return merges


def build_tokenizer():
    """A CLIPTokenizer whose vocab is the specials, the byte characters (plain and word-final) and the grammar words."""
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    # Longer words first: BPE applies the lowest-ranked pair present, so a short word's merge (t o, from "top")
    # must not outrank the chain of a longer word containing it ("bottom").
    for word in sorted(WORDS, key=len, reverse=True):
        for a, b in _merges_for(word):
            if (a, b) not in merges:
                merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def prompt_words(prompt):
    return re.findall(r"[a-z]+", prompt.lower())


def check_prompt(prompt):
    """Raise InvalidParameterError naming every word outside the grammar; return the prompt unchanged otherwise."""
    if not isinstance(prompt, str):
        raise InvalidParameterError(f"prompt must be a string, got {type(prompt).__name__}")
    unknown = sorted(set(w for w in prompt_words(prompt) if w not in WORDS))
    if unknown:
        raise InvalidParameterError(
            f"prompt {prompt!r} has words outside the NimbleDiff-Tiny vocabulary: {unknown}; "
            f"valid words: {list(WORDS)}")
    if len(prompt_words(prompt)) > MAX_LENGTH - 2:
        raise InvalidParameterError(f"prompt {prompt!r} has more than {MAX_LENGTH - 2} words")
    return prompt


# Fewer tokens than this and a CLIP tokenizer's vocabulary is a closed word list (this grammar: ~600 tokens, of which
# 512 are byte characters), not a BPE over open text (CLIP's 49,408).
CLOSED_VOCAB_SIZE = 5000


def unknown_words(text, vocab) -> list:
    """Words of `text` a closed-vocabulary CLIP tokenizer (its `get_vocab()`) has no whole-word token for; it would
    spell them out in byte tokens its text encoder never saw. Always [] for an open vocabulary."""
    if len(vocab) >= CLOSED_VOCAB_SIZE:
        return []
    return sorted({w for w in prompt_words(text) if w + "</w>" not in vocab})


def check_words(texts, vocab, what="prompt"):
    """Raise InvalidParameterError naming the unknown words of any text, with the words the vocabulary has."""
    for text in texts:
        unknown = unknown_words(text, vocab)
        if unknown:
            words = sorted(k[:-4] for k in vocab if k.endswith("</w>") and len(k) > 5 and k[:-4].isalpha())
            raise InvalidParameterError(f"{what} {text!r} has words outside this model's vocabulary: {unknown}; "
                                        f"valid words: {words}")
