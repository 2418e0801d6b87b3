"""The request mix and the SLO gate's verdict. Pure, no Locust: the locustfile feeds it the run's stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# What a simulated user asks for (docs/LOADTEST.md, "Request mix"):
#   text       a text prompt, no image in, no image forced (the model may still draw one)
#   image_in   a text prompt with one image to look at
#   image_out  a text prompt with force_image: the answer must contain a generated image
KINDS = ("text", "image_in", "image_out")
DEFAULT_MIX = "text=2,image_in=1,image_out=1"


def parse_mix(spec: str) -> dict[str, float]:
    """``"text=2,image_in=1,image_out=1"`` -> relative weights of every kind (absent kinds weigh 0)."""
    weights = dict.fromkeys(KINDS, 0.0)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, equals, value = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r} in --mix {spec!r}; known: {', '.join(KINDS)}")
        try:
            weight = float(value) if equals else 1.0
        except ValueError:
            raise ValueError(f"weight of {kind!r} in --mix {spec!r} is not a number: {value!r}") from None
        if not weight >= 0:
            raise ValueError(f"weight of {kind!r} in --mix {spec!r} must be >= 0, got {value}")
        weights[kind] = weight
    if not sum(weights.values()) > 0:
        raise ValueError(f"--mix {spec!r} gives no request kind a positive weight")
    return weights


@dataclass(frozen=True)
class SloTargets:
    """The gate. A latency target of 0 turns that check off; --max-fail-ratio 1 turns the failure check off."""

    p95_ms: float = 2000.0  # end-to-end time of the completed answers, all protocols (the E2E rows)
    ttft_p95_ms: float = 2000.0  # time to first token of the completed answers, all protocols (TTFT rows)
    max_fail_ratio: float = 0.01  # failed / all requests (Locust's "Aggregated" row)

    def __post_init__(self):
        if self.p95_ms < 0 or self.ttft_p95_ms < 0:
            raise ValueError("latency targets must be >= 0 (0 turns a check off)")
        if not 0 <= self.max_fail_ratio <= 1:
            raise ValueError(f"max_fail_ratio must be in [0, 1], got {self.max_fail_ratio}")


@dataclass(frozen=True)
class Check:
    name: str
    target: float
    measured: float | None
    passed: bool

    def line(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        measured = "none" if self.measured is None else f"{self.measured:g}"
        relation = ">=" if self.name == "completed requests" else "<="
        return f"{verdict}  {self.name}: {measured} (target {relation} {self.target:g})"


def evaluate(
    targets: SloTargets, *, requests: int, failures: int, e2e_p95_ms: float | None, ttft_p95_ms: float | None
) -> list[Check]:
    """The gate's checks; the run passes when every one passes. A run without a completed request fails."""
    fail_ratio = failures / requests if requests else None
    checks = [Check("completed requests", 1, requests - failures, requests - failures >= 1)]
    if targets.p95_ms > 0:
        checks.append(
            Check(
                "p95 end-to-end ms", targets.p95_ms, e2e_p95_ms, e2e_p95_ms is not None and e2e_p95_ms <= targets.p95_ms
            )
        )
    if targets.ttft_p95_ms > 0:
        checks.append(
            Check(
                "p95 time to first token ms",
                targets.ttft_p95_ms,
                ttft_p95_ms,
                ttft_p95_ms is not None and ttft_p95_ms <= targets.ttft_p95_ms,
            )
        )
    checks.append(
        Check(
            "failure ratio",
            targets.max_fail_ratio,
            fail_ratio,
            fail_ratio is not None and fail_ratio <= targets.max_fail_ratio,
        )
    )
    return checks


def verdict(targets: SloTargets, checks: list[Check]) -> dict:
    return {"passed": all(c.passed for c in checks), "targets": asdict(targets), "checks": [asdict(c) for c in checks]}
