"""Arguments of `minigpt5 weights convert`. Imports nothing heavy: torch loads only when the command runs."""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import UPSTREAM_LORA_ALPHA


def add_convert_arguments(parser) -> None:
    parser.description = (
        "Convert the upstream MiniGPT-5 files into a weights directory (manifest.json, tokenizer/, one "
        "safetensors per module). Stage 2 is applied over stage 1 with its LoRA merged. Every source key must "
        "match a conversion rule and every tensor the model needs must be supplied; otherwise the keys are "
        "listed by name and nothing is written. Pickles are opened with torch.load(weights_only=True) only."
    )
    files = parser.add_argument_group("upstream files")
    files.add_argument(
        "--stage1",
        type=Path,
        required=True,
        metavar="FILE.ckpt",
        help="MiniGPT-5 stage-1 Lightning checkpoint (e.g. stage1_cc3m.ckpt)",
    )
    files.add_argument(
        "--stage2",
        type=Path,
        metavar="FILE.ckpt",
        help="MiniGPT-5 stage-2 checkpoint (stage2_vist.ckpt or stage2_mmdialog.ckpt), applied over stage 1",
    )
    files.add_argument(
        "--vicuna",
        type=Path,
        required=True,
        metavar="DIR",
        help="Vicuna-7B (V0) transformers folder: config.json, tokenizer, model*.safetensors or pytorch_model*.bin",
    )
    files.add_argument(
        "--blip2",
        type=Path,
        required=True,
        metavar="PATH",
        help="LAVIS blip2_pretrained_flant5xxl.pth (Q-Former, query_tokens, ln_vision"
        "[, visual_encoder]) or a transformers BLIP-2 folder",
    )
    files.add_argument(
        "--eva-vit",
        type=Path,
        metavar="FILE",
        help="LAVIS eva_vit_g.pth; not needed when --blip2 holds the vision encoder",
    )
    files.add_argument(
        "--minigpt4-proj",
        type=Path,
        required=True,
        metavar="FILE",
        help="MiniGPT-4 7B checkpoint with llama_proj.* (prerained_minigpt4_7b.pth)",
    )
    files.add_argument(
        "--sd",
        type=Path,
        required=True,
        metavar="DIR",
        help="diffusers Stable Diffusion 2.1-base folder (unet/ and vae/ are used)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="weights directory to create (new or empty)"
    )
    out.add_argument(
        "--prompt-format",
        choices=["vist", "mmdialog"],
        default=None,
        help="training format of the stage-2 checkpoint: prompt layout and system prompt "
        "(default: mmdialog if the --stage2 file name contains 'mmdialog', else vist)",
    )
    out.add_argument(
        "--bos",
        choices=["<s>", "</s>"],
        default=None,
        help="BOS the prompts start with (default: the one the checkpoint was trained with, "
        '</s> for vist, <s> for mmdialog; docs/CONVERT.md, "BOS and prompt format")',
    )
    out.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="stored dtype (default fp16)")
    out.add_argument(
        "--preset",
        choices=["full", "tiny"],
        default="full",
        help="architecture of the parts without a config file (LAVIS vision + Q-Former, mapper); "
        "default: full, the real MiniGPT-5",
    )
    out.add_argument(
        "--lora-alpha",
        type=float,
        default=UPSTREAM_LORA_ALPHA,
        help="stage-2 LoRA alpha; the rank r is read from the lora_A shapes (default 16, upstream's)",
    )
    out.add_argument(
        "--allow-unknown",
        action="store_true",
        help="skip keys without a conversion rule with a warning instead of failing",
    )
    parser.set_defaults(handler=_run)


def _run(args) -> int:
    from .convert import ConversionError, ConvertOptions, convert

    try:
        report = convert(ConvertOptions.from_namespace(args), progress=True)
    except ConversionError as err:
        print(f"minigpt5 weights convert: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    return 0
