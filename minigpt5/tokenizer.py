"""Tokenizer handling: loading, the offline tiny tokenizer, untrusted-text encoding, streaming detokenisation."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .config import IMAGE_PLACEHOLDER, SYSTEM_PROMPT, VOKEN_TOKENS

# Text the tiny byte-level BPE is trained on: enough to give it real merges, offline and deterministic.
_TINY_CORPUS = [
    SYSTEM_PROMPT,
    "###Human: <Img><ImageHere></Img> Tell me a story about this picture. ###Assistant:",
    "Once upon a time, a little girl walked through the forest with her dog. The sun was shining and "
    "the birds were singing. She found a small house made of bread and sugar, and she knocked on the door.",
    "The family went to the beach. They built a sand castle, swam in the sea and ate ice cream. "
    "In the evening they watched the sunset together and walked home happy.",
    "A cat sits on a red sofa next to a window. Outside it is raining, and the city lights are on.",
    "What is in the image? Describe the scene, the people, the colours and the weather.",
    "0123456789 .,;:!?'\"()-[]{}<>/#*+=_@&%$",
]


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A small byte-level BPE with LLaMA's BOS/EOS/UNK plus the MiniGPT-5 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return add_minigpt5_tokens(fast)


def add_minigpt5_tokens(tokenizer):
    """Add `[IMG0]`…`[IMG7]` and `<ImageHere>` as special tokens (no-op for those already present)."""
    missing = [t for t in (*VOKEN_TOKENS, IMAGE_PLACEHOLDER) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def special_token_ids(tokenizer) -> dict:
    """Ids resolved from the tokenizer (never hard-coded): vokens, placeholder, BOS candidates, EOS."""
    ids = tokenizer.convert_tokens_to_ids([*VOKEN_TOKENS, IMAGE_PLACEHOLDER, "<s>", "</s>"])
    return {
        "vokens": ids[:8],
        "image_placeholder": ids[8],
        "bos": {"<s>": ids[9], "</s>": ids[10]},
        "eos": tokenizer.eos_token_id,
    }


def encode_untrusted(tokenizer, text: str) -> list[int]:
    """Token ids for user text: special-token strings (`[IMG0]`, `<ImageHere>`, `</s>`) stay plain text."""
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


class StreamingDetokenizer:
    """Turns a growing list of text token ids into text deltas (the prefix/read-offset method of TGI):
    a delta is released only when it no longer ends in an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._prefix_key: tuple[int, int] | None = None
        self._prefix_text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        delta = self._delta(self.ids)
        if delta:
            self._prefix, self._read = self._read, len(self.ids)
        return delta

    def peek(self, token_id: int) -> str:
        """The delta `push(token_id)` would release, without pushing it."""
        return self._delta(self.ids + [token_id])

    def _delta(self, ids: list[int]) -> str:
        if self._prefix_key != (self._prefix, self._read):  # the prefix only changes when text is released
            self._prefix_key = (self._prefix, self._read)
            self._prefix_text = self.tokenizer.decode(ids[self._prefix : self._read])
        prefix_text = self._prefix_text
        full_text = self.tokenizer.decode(ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            return full_text[len(prefix_text) :]
        return ""


def word_level_tokenizer(base_vocab: int) -> PreTrainedTokenizerFast:
    """A stand-in for LLaMA's tokenizer with its vocabulary size, for random weights and benches:
    <unk>/<s>/</s>, the words t3 … t{base_vocab-1}, then the MiniGPT-5 special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, base_vocab)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return add_minigpt5_tokens(fast)
