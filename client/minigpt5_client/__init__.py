"""Thin client for MiniGPT-5 served on Triton: pre-processing, gRPC/HTTP streaming, documents. No torch.

Importing the package loads PIL and numpy only; tritonclient (and grpc/aiohttp) load when a client of
that protocol is created, so the server can use `minigpt5_client.preprocess` without them.
"""

from .client import AsyncClient, Client
from .conversation import Conversation
from .document import SAVE_FORMATS, Document
from .errors import ImageError, InvalidArgument, MiniGPT5Error, Overloaded, ServerError, ServerUnreachable, Timeout
from .events import Event, Final, ImageEvent, ImageStart, TextDelta
from .preprocess import load_image, preprocess_image, preprocess_images

__all__ = [
    "AsyncClient",
    "Client",
    "Conversation",
    "Document",
    "SAVE_FORMATS",
    "ImageError",
    "InvalidArgument",
    "MiniGPT5Error",
    "Overloaded",
    "ServerError",
    "ServerUnreachable",
    "Timeout",
    "Event",
    "Final",
    "ImageEvent",
    "ImageStart",
    "TextDelta",
    "load_image",
    "preprocess_image",
    "preprocess_images",
]
