"""The service's HTTP routes, as a client sees them (the contract the tests hold it to)."""

from __future__ import annotations

SINGLE = "/evaluator/v1/evaluation/single"
UPLOAD = "/evaluator/v1/evaluation/single/upload"
BATCH = "/evaluator/v1/evaluation/batch"
RANK = "/evaluator/v1/evaluation/rank"
EMBED_IMAGE = "/evaluator/v1/embeddings/image"
EMBED_TEXT = "/evaluator/v1/embeddings/text"
HEALTH = "/evaluator/health"
METRICS = "/evaluator/metrics"
DEMO = "/evaluator/demo"
