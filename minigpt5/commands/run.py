"""`minigpt5 run`: the whole model in this process; text streams to the terminal, the interleaved
result is written as Markdown + PNGs and as JSON (the same Document format `minigpt5 generate` writes)."""

from __future__ import annotations

import sys

import numpy as np


def run(args) -> int:
    from minigpt5_client.contract import PARAMETERS
    from minigpt5_client.document import Document
    from minigpt5_client.errors import ImageError
    from minigpt5_client.preprocess import encode_png, preprocess_images

    from ..pipeline import MiniGPT5Pipeline
    from ..request import InvalidRequest
    from ..weights.tiny import resolve_weights

    try:
        images = preprocess_images(args.image, "crop" if args.crop else "pad") if args.image else None
        pipeline = MiniGPT5Pipeline(
            resolve_weights(args.weights),
            device=args.device,
            dtype=args.dtype,
            vision_dtype=args.vision_dtype,
            image_dtype=args.image_dtype,
        )
        params = {tensor.name: getattr(args, keyword) for keyword, tensor in PARAMETERS.items()}
        params["force_image"] = args.force_image or None  # the flag's absence means the default
        result = pipeline.run(args.prompt, images, on_text=_print_now, on_image_step=DiffusionProgress(), **params)
    except (InvalidRequest, ImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    if result.usage is None:
        raise RuntimeError("the answer ended without its usage")
    segments = [encode_png(s) if isinstance(s, np.ndarray) else s for s in result.segments]
    document = Document(segments, result.usage.as_dict(), result.finish_reason)
    for fmt in ("md", "json"):
        path = document.save(args.out, fmt)
        print(f"wrote {path}", file=sys.stderr)
    usage = result.usage
    print(
        f"{usage.completion_tokens} tokens ({usage.sampled_tokens} sampled, {usage.vokens} vokens), "
        f"{usage.images} image(s), "
        f"finish: {result.finish_reason}, seed {usage.seed}",
        file=sys.stderr,
    )
    return 0


def _print_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class DiffusionProgress:
    """One progress bar per generated image on stderr, fed by the image decoder's (step, steps) callback."""

    def __init__(self, file=None):
        self.file = file or sys.stderr
        self.images = 0
        self.bar = None

    def __call__(self, step: int, steps: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.images += 1
            self.bar = tqdm(total=steps, desc=f"image {self.images}", unit="step", file=self.file, leave=True)
        self.bar.update(step - self.bar.n)
        if step >= steps:
            self.bar.close()
            self.bar = None
