"""`minigpt5 generate` and `minigpt5 chat`: stream an answer to the terminal and save it as a document.
(`minigpt5 gateway` registers here too; it lives in `gateway/`.)

Exit codes: 0 ok, 1 other error, 2 invalid argument or bad image, 3 server unreachable, 4 server
overloaded, 5 timeout, 130 interrupted. Errors are one line on stderr: "error: ...".
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import TextIO

from .client import DEFAULT_TIMEOUT_S, Client
from .connection import DEFAULT_PORTS, PROTOCOLS, TOKEN_ENV
from .contract import PARAMETERS
from .conversation import Conversation
from .document import SAVE_FORMATS, Document
from .errors import InvalidArgument, MiniGPT5Error
from .events import Event, ImageEvent, ImageStart, TextDelta
from .preprocess import PREPROCESS_MODES

EXIT_INTERRUPTED = 130
CHAT_HELP = "Type a message. /image PATH_OR_URL attaches an image to the next one; /save DIR; /quit."


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `generate`, `chat` and `gateway`; each sets ``handler``: ``sys.exit(args.handler(args))``."""
    generate = subparsers.add_parser(
        "generate",
        help="one answer: stream it, then save it as a document",
        description="Stream MiniGPT-5's answer (text and images) and save it as Markdown, HTML or JSON.",
    )
    generate.add_argument("--prompt", required=True, help="the message")
    _add_common_options(generate, out_default="minigpt5-out")
    generate.set_defaults(handler=run_generate)

    chat = subparsers.add_parser(
        "chat",
        help="a multi-turn conversation read from stdin",
        description="Talk turn by turn; earlier text and images (generated ones too) are sent back as context. "
        + CHAT_HELP,
    )
    _add_common_options(chat, out_default=None)
    chat.set_defaults(handler=run_chat)

    from .gateway.command import add_gateway_command  # standard library only until it runs

    add_gateway_command(subparsers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minigpt5", description="Client of the MiniGPT-5 server.")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def run_generate(args: argparse.Namespace) -> int:
    printer = StreamPrinter()
    try:
        client = _client(args)
        events = []
        for event in client.stream(args.prompt, args.image, **_generation_params(args)):
            printer.show(event)
            events.append(event)
        printer.finish()
        path = Document.from_events(events).save(args.out, args.format)
    except MiniGPT5Error as error:
        printer.finish()
        return _report(error)
    except OSError as error:  # writing the document
        return _report(error)
    except KeyboardInterrupt:
        printer.finish()
        return EXIT_INTERRUPTED
    print(f"saved {path}", file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """Reads one message per line. Interactive: a bad image or argument is reported and the chat goes
    on. Piped: any error ends the chat with its exit code."""
    interactive = sys.stdin.isatty()
    conversation = Conversation(args.preprocess)
    pending_images = list(args.image)
    try:
        client = _client(args)
        if interactive:
            print(CHAT_HELP, file=sys.stderr)
        while True:
            if interactive:
                print("you> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return 0
            message = line.strip()
            command, _, argument = message.partition(" ")
            if not message:
                continue
            if command in ("/quit", "/exit"):
                return 0
            if command == "/image" and argument.strip():
                pending_images.append(argument.strip())
            elif command == "/save":
                out_dir = argument.strip() or args.out or "minigpt5-chat"
                print(f"saved {conversation.to_document().save(out_dir, args.format)}", file=sys.stderr)
            elif command.startswith("/"):
                print(f"not a command: {message}. {CHAT_HELP}", file=sys.stderr)
            else:
                images, pending_images = pending_images, []
                try:
                    _chat_turn(client, conversation, message, images, args)
                except InvalidArgument as error:
                    if not interactive:
                        raise
                    _report(error)
                if args.out:
                    conversation.to_document().save(args.out, args.format)
    except MiniGPT5Error as error:
        return _report(error)
    except OSError as error:
        return _report(error)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _chat_turn(
    client: Client, conversation: Conversation, message: str, images: list[str], args: argparse.Namespace
) -> None:
    printer = StreamPrinter()
    try:
        for event in client.stream(message, images, history=conversation, **_generation_params(args)):
            printer.show(event)
    finally:
        printer.finish()


class StreamPrinter:
    """Text to stdout as it arrives; "[generating image N …]" on stderr while an image is decoded.

    On a terminal the status line counts the seconds until the image arrives; elsewhere (logs,
    pipes) each image gets a start line and a done line.
    """

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None):
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.live = self.err.isatty()
        self.shared_terminal = self.live and self.out.isatty()  # then notes must start on a fresh line
        self._lock = threading.Lock()
        self._text_open = False  # stdout text without its final newline yet
        self._status: tuple[int, float] | None = None  # (image number, start) of the open live status line
        self._starts: list[float] = []  # start time of each announced image
        self._images_done = 0
        self._finished = False
        self._ticker: threading.Thread | None = None

    def show(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, TextDelta):
                self._close_status()
                self.out.write(event.text)
                self.out.flush()
                self._text_open = not event.text.endswith("\n")
            elif isinstance(event, ImageStart):
                self._starts.append(time.monotonic())
                self._note_image_start(len(self._starts))
            elif isinstance(event, ImageEvent):
                self._images_done += 1
                self._note_image_done(self._images_done)

    def finish(self) -> None:
        """Close any status line and end the text's last line."""
        with self._lock:
            self._finished = True
            self._close_status()
            if self._text_open:
                self.out.write("\n")
                self.out.flush()
                self._text_open = False

    def _note_image_start(self, number: int) -> None:
        self._close_status()
        self._break_text_line()
        self.err.write(f"[generating image {number} …]")
        if self.live:
            self._status = (number, time.monotonic())
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, daemon=True)
                self._ticker.start()
        else:
            self.err.write("\n")
        self.err.flush()

    def _note_image_done(self, number: int) -> None:
        started = self._starts[number - 1] if number <= len(self._starts) else time.monotonic()
        done = f"[image {number} ready after {time.monotonic() - started:.1f} s]"
        if self._status is not None and self._status[0] == number:
            self.err.write("\r" + done.ljust(40) + "\n")  # overwrite the live status line
            self._status = None
        else:
            self._close_status()
            self._break_text_line()
            self.err.write(done + "\n")
        self.err.flush()

    def _close_status(self) -> None:
        if self._status is not None:
            self.err.write("\n")
            self.err.flush()
            self._status = None

    def _break_text_line(self) -> None:
        if self.shared_terminal and self._text_open:
            self.out.write("\n")
            self.out.flush()
            self._text_open = False

    def _tick(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                if self._finished:
                    return
                if self._status is not None:
                    number, started = self._status
                    self.err.write(f"\r[generating image {number} … {time.monotonic() - started:.0f} s]")
                    self.err.flush()


def _add_common_options(parser: argparse.ArgumentParser, out_default: str | None) -> None:
    server = parser.add_argument_group("server")
    server.add_argument(
        "--url",
        metavar="[SCHEME://]HOST:PORT",
        help=f"server address (default localhost:{DEFAULT_PORTS['grpc']} for grpc, "
        f"localhost:{DEFAULT_PORTS['http']} for http); the scheme grpc://, grpcs:// (TLS), "
        f"http:// or https:// sets the protocol",
    )
    server.add_argument("--protocol", choices=PROTOCOLS, default=None, help="default: the URL's scheme, else grpc")
    server.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"limit for each answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    server.add_argument(
        "--ca-cert",
        metavar="PEM",
        help="CA certificate(s) to verify the server's TLS certificate with (default: the system's)",
    )
    server.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra header for every request (repeatable), e.g. for a proxy in front",
    )
    server.add_argument(
        "--token",
        default=None,
        help=f"bearer token sent as `authorization: Bearer ...` (default: ${TOKEN_ENV}; prefer the "
        f"variable, a flag shows in `ps`)",
    )
    server.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="send a request refused as busy up to N more times, with growing jittered pauses, "
        "as long as no part of the answer came (default 0)",
    )

    inputs = parser.add_argument_group("input and output")
    inputs.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH_OR_URL",
        help="an image for the (first) message; repeat for several, in prompt order",
    )
    inputs.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        default="pad",
        help="pad to a white square (upstream demo, default) or centre-crop",
    )
    inputs.add_argument(
        "--out",
        default=out_default,
        metavar="DIR",
        help=f"where to write the document (default: {out_default or 'not saved'})",
    )
    inputs.add_argument("--format", choices=SAVE_FORMATS, default="md", help="document format (default md)")

    generation = parser.add_argument_group("generation (default: the server's)")
    generation.add_argument("--max-tokens", type=int)
    generation.add_argument("--temperature", type=float)
    generation.add_argument("--top-p", type=float)
    generation.add_argument("--top-k", type=int)
    generation.add_argument("--repetition-penalty", type=float)
    generation.add_argument("--seed", type=int, help="same seed, same text and images")
    generation.add_argument(
        "--force-image",
        action="store_true",
        default=None,
        help="make sure the answer contains --max-images images (default one)",
    )
    generation.add_argument(
        "--force-image-mode",
        choices=("first", "end"),
        help="where a forced image goes: first (before the text, upstream's default) or "
        "end (where the answer would end)",
    )
    generation.add_argument("--max-images", type=int, help="images per answer (server default 1)")
    generation.add_argument("--guidance-scale", type=float)
    generation.add_argument("--steps", type=int, dest="num_inference_steps", help="diffusion steps")
    generation.add_argument("--scheduler", choices=("pndm", "dpm"))


def _generation_params(args: argparse.Namespace) -> dict:
    return {keyword: getattr(args, keyword) for keyword in PARAMETERS}


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.url,
        args.protocol,
        args.timeout,
        args.preprocess,
        ca_cert=args.ca_cert,
        headers=_headers(args.header),
        token=args.token,
        retries=args.retries,
    )


def _headers(flags: list[str]) -> dict[str, str]:
    headers = {}
    for flag in flags:
        name, sep, value = flag.partition("=")
        if not sep or not name.strip():
            raise InvalidArgument(f"--header {flag!r}: expected NAME=VALUE")
        headers[name.strip()] = value
    return headers


def _report(error: Exception) -> int:
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return getattr(error, "exit_code", 1)
