"""tritonserver's output, copied line by line to where it goes (a log file or our stderr) while the
model loading it reports is followed: Triton opens its HTTP and gRPC ports only once every model
has loaded, so its log is the only place that says, meanwhile, which models are still loading."""

from __future__ import annotations

import re
import threading

# Triton's INFO lines (on unless --log-info=false), e.g. `... model_lifecycle.cc:473] "loading: vision_encoder:1"`
_LOADING = re.compile(rb'"loading: ([^:"]+):\d+"')
_LOADED = re.compile(rb"successfully loaded '([^']+)'")
_FAILED = re.compile(rb"failed to load '([^']+)'")


class LogFollower:
    """Copies `stream` (tritonserver's stdout + stderr) to `sink` (a binary file) in a thread and keeps
    the model-loading state the lines report."""

    def __init__(self, stream, sink, owns_sink: bool = False):
        self.stream, self.sink, self.owns_sink = stream, sink, owns_sink
        self.loading: set[str] = set()
        self.loaded: set[str] = set()
        self.failed: set[str] = set()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._copy, name="minigpt5-triton-log", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        for line in iter(self.stream.readline, b""):
            self._follow(line)
            try:
                self.sink.write(line)
                self.sink.flush()
            except (OSError, ValueError):  # sink closed (interpreter exit, log file removed): keep draining
                pass
        self.stream.close()
        if self.owns_sink:
            self.sink.close()

    def _follow(self, line: bytes) -> None:
        for pattern, seen in ((_LOADING, self.loading), (_LOADED, self.loaded), (_FAILED, self.failed)):
            match = pattern.search(line)
            if match:
                with self._lock:
                    seen.add(match[1].decode(errors="replace"))

    def state(self, models: list[str]) -> str:
        """`models` in words: which are loaded, loading, failed or not started yet."""
        with self._lock:
            loaded, failed = self.loaded & set(models), self.failed & set(models)
            loading = sorted((self.loading & set(models)) - loaded - failed)
            waiting = sorted(set(models) - self.loading - loaded - failed)
        parts = [
            f"loading {', '.join(loading)}" if loading else "",
            f"waiting {', '.join(waiting)}" if waiting else "",
            f"failed {', '.join(sorted(failed))}" if failed else "",
            f"loaded {', '.join(sorted(loaded))}" if loaded else "",
        ]
        return "; ".join(p for p in parts if p) or "no model reported yet"

    def close(self, timeout: float = 5.0) -> None:
        self.thread.join(timeout)
