"""The JSON result of a bench run, built section by section under a wall-clock budget.

A section that raises is recorded as {"error": ...} and the run goes on (one failure must not lose a
whole device run); a section that the budget cannot fit is recorded as {"skipped": "budget"}. With
`--out`, the JSON file is rewritten after every section, so a run killed from outside still leaves
everything it measured.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from .timing import log


class Report:
    def __init__(self, bench: str, *, budget_s: float | None = None, skip=(), out: Path | None = None):
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.skip = set(skip)
        self.out = out
        self.errors = 0
        self.data: dict = {"bench": bench}

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def fits(self, estimate_s: float) -> bool:
        return self.budget_s is None or self.elapsed_s + estimate_s <= self.budget_s

    def set(self, path: tuple, value) -> None:
        node = self.data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    def section(self, path: tuple, fn, *, group: str | None = None, estimate_s: float = 0.0, required: bool = False):
        """Run `fn()` and store its result at `path`; None when skipped or failed. A `required`
        section (the build) runs whatever the budget and the skip list say."""
        name = ".".join(path)
        if not required and (group in self.skip or name in self.skip):
            self.set(path, {"skipped": "flag"})
            return None
        if not required and not self.fits(estimate_s):
            self.set(
                path, {"skipped": "budget", "estimate_s": round(estimate_s, 1), "elapsed_s": round(self.elapsed_s, 1)}
            )
            log(f"{name}: skipped, would overrun the {self.budget_s:.0f} s budget (estimate {estimate_s:.0f} s)")
            return None
        log(f"{self.elapsed_s:7.1f} s  {name} ...")
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, and the exit code says so
            traceback.print_exc(file=sys.stderr)
            self.errors += 1
            self.set(path, {"error": f"{type(exc).__name__}: {exc}"[:2000]})
            _release_cuda_memory()
            result = None
        else:
            self.set(path, result)
        self.save()
        return result

    def save(self) -> None:
        if self.out is None:
            return
        self.data["elapsed_s"] = round(self.elapsed_s, 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.out)

    def finish(self) -> int:
        """Print the one JSON object to stdout; exit code 1 if any section failed."""
        self.data["elapsed_s"] = round(self.elapsed_s, 2)
        self.data["errors"] = self.errors
        self.save()
        json.dump(self.data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 1 if self.errors else 0


def _release_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
