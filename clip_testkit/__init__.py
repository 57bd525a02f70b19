"""What the tests, the benchmark script and the load tests share: a `bentoml serve` subprocess
with random-init models, deterministic test images, open_clip's reference computation, the
service's routes and Prometheus text parsing.

Not part of the service: the bentofile does not ship it and no product module imports it.
"""
