"""What the tests, the scripts and the load tests share: a `bentoml serve` subprocess with
random-init models, deterministic test images, open_clip's reference computation, the service's
routes, Prometheus text parsing, the load generator and the percentile rule.

Not part of the service: neither the wheel nor the bentofile ships it and no product module
imports it; its users run from the repository root (``python -m scripts.benchmark``).
"""
