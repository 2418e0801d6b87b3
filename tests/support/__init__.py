"""Code the tests share: the fake `triton_python_backend_utils` (fake_pb_utils), raw protocol helpers
(serving_helpers), tritonserver on free ports (servers), the metric names the deployment files use
(deploy_metrics), synthetic upstream checkpoint files (upstream_fixtures)."""
