"""Locust load tests for the served model `minigpt5` (docs/LOADTEST.md).

- `locustfile.py`: the Locust users (gRPC streaming, HTTP /generate_stream), the SLO gate, the reports.
- `cost.py`: the cost arithmetic (pure, no Locust).
- `slo.py`: the request mix and the SLO gate's verdict (pure, no Locust).
"""
