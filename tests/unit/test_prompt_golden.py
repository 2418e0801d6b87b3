"""Golden prompts: for the same turns, our rendered prompt string and token ids equal what upstream's code
builds (eric-ai-lab/MiniGPT-5; file:line cited at each expected string).

Upstream builds a prompt string in dataloader.py, tokenises it whole with special tokens recognised and
no BOS (`llama_tokenizer(instruction, add_special_tokens=False)`, mini_gpt5.py:290) and prepends the
tokenizer's BOS in `input_warp` (mini_gpt5.py:182-189), splicing the images at `<ImageHere>`. We
tokenise the text between image slots piece by piece (so that user text cannot inject special ids);
the tests check that both give the same ids.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from minigpt5.config import PROMPT_FORMATS
from minigpt5.prompt import IMAGE, Turn, parse_history, prompt_token_ids, render_pieces, render_text
from minigpt5.request import InvalidRequest, build_request
from minigpt5.stages import PromptBuilder
from minigpt5.tokenizer import add_minigpt5_tokens
from minigpt5.weights.layout import MANIFEST, WeightsDir, make_manifest

# dataloader.py:236-237 (VISTDataset system_prompt1) and :318-319 (MMDialogDataset system_prompt)
VIST_SYSTEM = (
    "Give the following images in <Img>ImageContent</Img> format. You will be able to see the images "
    "once I provide it to you. Please understanding images and generate story."
)
MMDIALOG_SYSTEM = (
    "Give the following images in <Img>ImageContent</Img> format. You will be able to see the "
    "images once I provide it to you. Please generate conversations with appropriate images."
)
C1 = "my sister arrived early to help me with the family bar bq."  # examples/playground.py:68's captions
C2 = "every one else arrived soon after."

# (turns as our API takes them, the string upstream's code builds for the same turns)
VIST_CASES = {
    # dataloader.py:239 human_prompts1[0] with prompt "" (first story step, :260-262), :267-268
    "generation, no story yet": (
        [Turn("human", f"Generate an image with the scene description: {C2}")],
        VIST_SYSTEM + f"###Human: Generate an image with the scene description: {C2} ###Assistant:",
    ),
    # dataloader.py:243 human_prompts2[0]; prompt = "<Img><ImageHere></Img>".join([C1, C2]) +
    # "<Img><ImageHere></Img>\n" (:260-262); source = system_prompt1 + it (:282-283)
    "story with images after their captions": (
        [Turn("human", f"{C1}<image>{C2}<image>Tell me the next scene with image.", 2)],
        VIST_SYSTEM + f"###Human:{C1}<Img><ImageHere></Img>{C2}<Img><ImageHere></Img>\n"
        " Tell me the next scene with image. ###Assistant:",
    ),
    # dataloader.py:248 human_prompts3[0]: an image inside the instruction (:293-294)
    "image understanding": (
        [Turn("human", f"{C1} <image> {C2} <image>\nTell me the next scene description by this image: <image>", 3)],
        VIST_SYSTEM + f"###Human:{C1}<Img><ImageHere></Img>{C2}<Img><ImageHere></Img>\n"
        " Tell me the next scene description by this image: <Img><ImageHere></Img> ###Assistant:",
    ),
    # images without markers: a story of empty captions, "<Img><ImageHere></Img>".join([""]) + block + "\n"
    "images without markers": (
        [Turn("human", "Tell me the next scene with image.", 1)],
        VIST_SYSTEM + "###Human:<Img><ImageHere></Img>\n Tell me the next scene with image. ###Assistant:",
    ),
}

MMDIALOG_CASES = {
    # dataloader.py:371-413: step_prompt = history + ["###Assistant:"]; turns f"###Human: {text}" /
    # f"###Assistant: {text}" (:389, :394), each image after its turn's text (:401-402, :408-410);
    # sources = ' '.join([system_prompt] + items) (:405-413)
    "three turns, an image in the first": (
        [
            Turn("human", "hi, what do you think of my new car?", 1),
            Turn("assistant", "Looks great! Is it electric?"),
            Turn("human", "Yes it is, want to see the inside?"),
        ],
        MMDIALOG_SYSTEM + " ###Human: hi, what do you think of my new car? <Img><ImageHere></Img> ###Assistant: "
        "Looks great! Is it electric? ###Human: Yes it is, want to see the inside? ###Assistant:",
    ),
    # not an upstream layout (upstream's turns hold one image, after the text): the same join rule applied
    # to a turn whose markers put two images mid-text
    "markers place the images": (
        [Turn("human", "this one <image> or this one <image>?", 2)],
        MMDIALOG_SYSTEM + " ###Human: this one <Img><ImageHere></Img> or this one <Img><ImageHere></Img> ?"
        " ###Assistant:",
    ),
    "an assistant image fed back": (
        [Turn("human", "Show me a beach."), Turn("assistant", "Here you are.", 1), Turn("human", "Now at night.")],
        MMDIALOG_SYSTEM + " ###Human: Show me a beach. ###Assistant: Here you are. <Img><ImageHere></Img>"
        " ###Human: Now at night. ###Assistant:",
    ),
}


def test_system_prompts_are_upstreams():
    assert PROMPT_FORMATS == {"vist": VIST_SYSTEM, "mmdialog": MMDIALOG_SYSTEM}


@pytest.mark.parametrize("case", sorted(VIST_CASES))
def test_vist_strings_equal_upstreams(case):
    turns, expected = VIST_CASES[case]
    assert render_text(render_pieces("vist", VIST_SYSTEM, turns)) == expected


@pytest.mark.parametrize("case", sorted(MMDIALOG_CASES))
def test_mmdialog_strings_equal_upstreams(case):
    turns, expected = MMDIALOG_CASES[case]
    assert render_text(render_pieces("mmdialog", MMDIALOG_SYSTEM, turns)) == expected


def upstream_ids(tokenizer, text: str, bos: str) -> list[int]:
    """mini_gpt5.py:290 (whole string, special tokens recognised, no BOS) + :182-189 (BOS first)."""
    return [tokenizer.convert_tokens_to_ids(bos)] + tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def mmdialog_weights(tiny_weights, tmp_path_factory):
    """The tiny weights with a manifest for an MMDialog checkpoint (as the converter writes it)."""
    out = tmp_path_factory.mktemp("mmdialog")
    for item in tiny_weights.iterdir():
        if item.name != MANIFEST:
            (out / item.name).symlink_to(item)
    weights = WeightsDir(tiny_weights)
    manifest = make_manifest(weights.arch, weights.tokenizer(), prompt_format="mmdialog")
    manifest["architecture"] = weights.arch
    (out / MANIFEST).write_text(json.dumps(manifest))
    return WeightsDir(out)


def test_bos_follows_the_checkpoint(tiny_weights, mmdialog_weights):
    vist = WeightsDir(tiny_weights)
    assert vist.prompt_format[0] == "vist" and vist.tokens["bos"] == "</s>"  # first-release VIST/stage-1
    assert mmdialog_weights.prompt_format == ("mmdialog", MMDIALOG_SYSTEM) and mmdialog_weights.tokens["bos"] == "<s>"


def _request(builder_weights, turns):
    """The turns as a request sends them: earlier turns in `history`, all images in order."""
    images = np.zeros((sum(t.num_images for t in turns), 224, 224, 3), dtype=np.uint8)
    history = [{"role": t.role, "text": t.text, "num_images": t.num_images} for t in turns[:-1]]
    return build_request(turns[-1].text, images, parse_history(json.dumps(history)), defaults=builder_weights.defaults)


@pytest.mark.parametrize(
    "fmt,case", [("vist", c) for c in sorted(VIST_CASES)] + [("mmdialog", c) for c in sorted(MMDIALOG_CASES)]
)
def test_token_ids_equal_upstreams(tiny_weights, mmdialog_weights, fmt, case):
    weights = WeightsDir(tiny_weights) if fmt == "vist" else mmdialog_weights
    turns, expected = (VIST_CASES if fmt == "vist" else MMDIALOG_CASES)[case]
    builder = PromptBuilder(weights)
    ids = builder.prompt_ids(_request(weights, turns))
    # The BOS of the checkpoint's era: "</s>" in the first release (mini_gpt5.py:25, 52-53 at commit 77bcb64),
    # the tokenizer's "<s>" since commit 21308c1, which the re-released MMDialog checkpoint was trained with.
    assert ids == upstream_ids(builder.tokenizer, expected, {"vist": "</s>", "mmdialog": "<s>"}[fmt])
    assert ids.count(weights.tokens["image_placeholder"]) == sum(t.num_images for t in turns)


def test_sentencepiece_style_tokenizer_gives_upstreams_ids_too():
    """Vicuna's tokenizer is SentencePiece: every text chunk gets a leading "▁" (transformers' LlamaTokenizer
    with legacy=True, as upstream loads it, mini_gpt4.py:90; the fast converter does the same with its
    Prepend normaliser). A tokenizer built that way shows piecewise = whole-string tokenisation there too."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    corpus = [VIST_SYSTEM, MMDIALOG_SYSTEM, C1, C2, "###Human: ###Assistant: <Img></Img> Tell me the next scene."]
    raw.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    tokenizer = add_minigpt5_tokens(
        PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    )
    placeholder = tokenizer.convert_tokens_to_ids("<ImageHere>")
    for fmt, system, cases in (("vist", VIST_SYSTEM, VIST_CASES), ("mmdialog", MMDIALOG_SYSTEM, MMDIALOG_CASES)):
        for turns, expected in cases.values():
            pieces = render_pieces(fmt, system, turns)
            ours = prompt_token_ids(tokenizer, pieces, tokenizer.convert_tokens_to_ids("</s>"), placeholder)
            assert ours == upstream_ids(tokenizer, expected, "</s>")
    after = ours[ours.index(placeholder) + 1]
    assert tokenizer.convert_ids_to_tokens(after).startswith("▁")  # the chunk's dummy prefix, as upstream's


# ---- markers and escaping ---------------------------------------------------------------------------


def test_escaped_marker_and_typed_placeholders_stay_text(tiny_weights):
    weights = WeightsDir(tiny_weights)
    builder = PromptBuilder(weights)
    request = _request(weights, [Turn("human", r"type \<image> or <ImageHere> or [IMG0] as text")])
    pieces = builder.pieces(request)
    assert IMAGE not in pieces
    assert "<image> or <ImageHere> or [IMG0] as text" in render_text(pieces)
    ids = builder.prompt_ids(request)
    special = set(weights.tokens["vokens"]) | {weights.tokens["image_placeholder"]}
    assert not special & set(ids)


@pytest.mark.parametrize(
    "text,images,message",
    [
        ("a <image> b <image>", 1, "text_input: 2 <image> markers but the turn has 1 images"),
        ("a <image>", 0, "text_input: 1 <image> markers but the turn has 0 images"),
    ],
)
def test_marker_count_must_match_the_turns_images(tiny_weights, text, images, message):
    with pytest.raises(InvalidRequest) as info:
        _request(WeightsDir(tiny_weights), [Turn("human", text, images)])
    assert message in str(info.value)


def test_history_markers_are_checked_per_turn(tiny_weights):
    weights = WeightsDir(tiny_weights)
    with pytest.raises(InvalidRequest, match=r"history\[0\]: 1 <image> markers but the turn has 2 images"):
        _request(weights, [Turn("human", "look <image>", 2), Turn("human", "and?")])
