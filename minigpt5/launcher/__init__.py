"""Launching tritonserver on the MiniGPT-5 model repository: where the binary comes from (binary.py),
the served copy of the repository (repository.py), the process, its readiness, drain and watchdog
(process.py, drain.py, log.py), what the models read from the launcher (contract.py), and servers on
free local ports for the tests and benches (local.py)."""
