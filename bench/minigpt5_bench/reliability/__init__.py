"""`minigpt5-bench reliability`: bad inputs, overload, timeouts, disconnects, crashed stubs
and a soak, against real tritonservers of its own. Prints one JSON object (docs/RELIABILITY.md).

  main server   (max_inflight_requests=--limit, request_timeout_s=--timeout-s, a random admin key)
    inputs       every input class of docs/LIMITS.md over gRPC streaming, HTTP /generate and
                 /generate_stream (SSE), plus /infer and gRPC ModelInfer (refused for a decoupled model)
    security     the restricted APIs without / with the admin header, inference still open
    overload     closed loops of `limit` clients, then of --clients clients (the excess is refused):
                 admitted p95 over the at-limit p95, rejection latency; one HTTP burst
    timeout      a request longer than request_timeout_s, over gRPC and HTTP
    disconnect   a gRPC stream cancelled and an SSE connection closed mid-answer: time and decoder
                 steps until the request stops, in-flight gauge, the next request
    soak         --soak-clients clients for --soak-s seconds (text, SSE, image, input image): failures,
                 RSS of tritonserver + its stubs after the warm-up and at the end
  crash server  per --crash-models: kill -9 of that model's stub under light load; what the clients,
                health and the watchdog (minigpt5/launcher/process.py) do; then a restart (recovery)
  http_body     a trivial one-model repository: how Triton 2.51's HTTP frontend takes request bodies
                around 4 MiB (it dies above; a documented limit, not ours to fix)

The section functions take any object with `http_url`, `grpc_url`, `metrics_url` and `process` (a
TritonProcess): a LocalServer (minigpt5/launcher/local.py), as the tests' servers are; the tests call them.
"""
