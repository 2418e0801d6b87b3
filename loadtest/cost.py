"""What a measured throughput costs: per 1,000 tokens, per 1,000 requests, and users per server.

Pure arithmetic, no Locust: the locustfile feeds it the run's totals, tests feed it hand-computed cases.

The model (docs/LOADTEST.md, "Cost"):

    tokens/s T      measured: completion tokens (text + vokens) of the completed requests / wall time
    requests/s R    measured: completed requests / wall time
    C               --gpu-hourly-usd: what one server (one GPU) costs per hour, busy or idle
    u               --target-utilization: the average share of the measured throughput a server
                    delivers over a month (traffic has peaks and troughs; servers keep headroom)
    H               730 hours per month (365 * 24 / 12)
    K               --tokens-per-user: tokens one user consumes per month (the seed: 7,000)

    USD per 1,000 tokens      = C / (T * 3600 * u) * 1000
    USD per 1,000 requests    = C / (R * 3600 * u) * 1000
    tokens per server-month   = T * 3600 * H * u
    monthly users per server  = floor(tokens per server-month / K)
    servers for N users       = ceil(N * K / tokens per server-month)
    break-even tokens/s       = C * 1000 / (target USD per 1,000 tokens * 3600 * u)

T is the server's capacity only if the run drove it to its limit: measure at the highest user count
that still passes the SLO gate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

HOURS_PER_MONTH = 730.0  # 365 days * 24 hours / 12 months
SECONDS_PER_HOUR = 3600.0

# The seed's promise: under 2 s per query, about $0.15 per 1,000 tokens, 100,000 monthly users
# at 7,000 tokens per user per month.
SEED_USD_PER_1K_TOKENS = 0.15
SEED_MONTHLY_USERS = 100_000
SEED_TOKENS_PER_USER_MONTH = 7_000


@dataclass(frozen=True)
class CostAssumptions:
    """The inputs that are not measured. Defaults: the seed's figures, a 50% utilised server."""

    gpu_hourly_usd: float = 2.50  # one server with one GPU, per hour; set your provider's price
    target_utilization: float = 0.5
    tokens_per_user_month: float = SEED_TOKENS_PER_USER_MONTH
    monthly_users: int = SEED_MONTHLY_USERS
    target_usd_per_1k_tokens: float = SEED_USD_PER_1K_TOKENS
    hours_per_month: float = HOURS_PER_MONTH

    def __post_init__(self):
        if not self.gpu_hourly_usd >= 0:
            raise ValueError(f"gpu_hourly_usd must be >= 0, got {self.gpu_hourly_usd}")
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"target_utilization must be in (0, 1], got {self.target_utilization}")
        if not self.tokens_per_user_month > 0:
            raise ValueError(f"tokens_per_user_month must be > 0, got {self.tokens_per_user_month}")
        if not self.monthly_users >= 0:
            raise ValueError(f"monthly_users must be >= 0, got {self.monthly_users}")
        if not self.target_usd_per_1k_tokens > 0:
            raise ValueError(f"target_usd_per_1k_tokens must be > 0, got {self.target_usd_per_1k_tokens}")
        if not self.hours_per_month > 0:
            raise ValueError(f"hours_per_month must be > 0, got {self.hours_per_month}")


@dataclass(frozen=True)
class CostReport:
    """Cost figures for one measured throughput. None where the throughput is zero (nothing to divide by)."""

    tokens_per_s: float
    requests_per_s: float
    assumptions: CostAssumptions
    usd_per_1k_tokens: float | None
    usd_per_1k_requests: float | None
    tokens_per_server_month: float
    users_per_server: int
    servers_for_monthly_users: int | None
    usd_per_server_month: float
    usd_per_month_for_monthly_users: float | None
    break_even_tokens_per_s: float
    meets_target_usd_per_1k_tokens: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The report as printed at the end of a run."""
        a = self.assumptions
        lines = [
            f"measured: {self.tokens_per_s:,.1f} tokens/s (text + vokens), {self.requests_per_s:,.2f} requests/s",
            f"assumed:  ${a.gpu_hourly_usd:,.2f} per server-hour, {a.target_utilization:.0%} average utilisation, "
            f"{a.hours_per_month:g} h/month, {a.tokens_per_user_month:,.0f} tokens per user per month",
        ]
        if self.usd_per_1k_tokens is None:
            lines.append("cost:     no completed tokens: nothing to price")
            return lines
        verdict = "meets" if self.meets_target_usd_per_1k_tokens else "MISSES"
        lines += [
            f"cost:     ${self.usd_per_1k_tokens:.5f} per 1,000 tokens ({verdict} the ${a.target_usd_per_1k_tokens:g} "
            f"target; break-even at {self.break_even_tokens_per_s:,.1f} tokens/s), "
            f"${_money(self.usd_per_1k_requests)} per 1,000 requests",
            f"capacity: one server carries {self.users_per_server:,} monthly users; {a.monthly_users:,} users need "
            f"{self.servers_for_monthly_users:,} server(s) at ${self.usd_per_server_month:,.0f} each per month "
            f"(${self.usd_per_month_for_monthly_users:,.0f}/month)",
        ]
        return lines


def compute_cost(tokens_per_s: float, requests_per_s: float, assumptions: CostAssumptions) -> CostReport:
    """The cost figures for a server that delivers ``tokens_per_s`` and ``requests_per_s`` at full load."""
    if tokens_per_s < 0 or requests_per_s < 0:
        raise ValueError(f"throughputs must be >= 0, got {tokens_per_s} tokens/s, {requests_per_s} requests/s")
    a = assumptions
    # What one server delivers on average: its measured throughput, scaled by the utilisation.
    tokens_per_hour = tokens_per_s * SECONDS_PER_HOUR * a.target_utilization
    requests_per_hour = requests_per_s * SECONDS_PER_HOUR * a.target_utilization
    tokens_per_server_month = tokens_per_hour * a.hours_per_month
    users_per_server = math.floor(tokens_per_server_month / a.tokens_per_user_month)
    usd_per_server_month = a.gpu_hourly_usd * a.hours_per_month
    usd_per_1k_tokens = a.gpu_hourly_usd / tokens_per_hour * 1000 if tokens_per_hour > 0 else None
    usd_per_1k_requests = a.gpu_hourly_usd / requests_per_hour * 1000 if requests_per_hour > 0 else None
    if tokens_per_server_month > 0:
        servers = math.ceil(a.monthly_users * a.tokens_per_user_month / tokens_per_server_month)
        usd_per_month = servers * usd_per_server_month
    else:
        servers = usd_per_month = None
    break_even = a.gpu_hourly_usd * 1000 / (a.target_usd_per_1k_tokens * SECONDS_PER_HOUR * a.target_utilization)
    return CostReport(
        tokens_per_s=tokens_per_s,
        requests_per_s=requests_per_s,
        assumptions=a,
        usd_per_1k_tokens=usd_per_1k_tokens,
        usd_per_1k_requests=usd_per_1k_requests,
        tokens_per_server_month=tokens_per_server_month,
        users_per_server=users_per_server,
        servers_for_monthly_users=servers,
        usd_per_server_month=usd_per_server_month,
        usd_per_month_for_monthly_users=usd_per_month,
        break_even_tokens_per_s=break_even,
        meets_target_usd_per_1k_tokens=usd_per_1k_tokens is not None
        and usd_per_1k_tokens <= a.target_usd_per_1k_tokens,
    )


def rates(tokens: int, requests: int, wall_s: float) -> tuple[float, float]:
    """(tokens/s, requests/s) of a run; zero for a run without duration."""
    if wall_s <= 0:
        return 0.0, 0.0
    return tokens / wall_s, requests / wall_s


def _money(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.4f}" if value < 1 else f"{value:,.2f}"
