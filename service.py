"""`bentoml serve service:Evaluator` (and the bentofile's entry point).

The services are put together in the ``clip_service`` package: ``Evaluator``
(``clip_service.evaluator``) is the public HTTP front end, ``Scorer`` (``clip_service.scorer``)
the model worker it depends on. Tracing, BentoML's bounded request metrics and the
request-header deadline are installed here, at import, before BentoML builds any app.
"""

from clip_runtime.settings import get_settings
from clip_service.bentoml_adapter import (
    bound_request_metric_paths,
    install_bentoml_fixes,
    limit_header_time,
    setup_tracing,
)
from clip_service.evaluator import ROUTES, Evaluator
from clip_service.scorer import Scorer

install_bentoml_fixes()  # before the arbiter starts and any Scorer client exists
setup_tracing()
limit_header_time(get_settings().header_timeout_s)
bound_request_metric_paths(set(ROUTES))

__all__ = ["Evaluator", "Scorer"]
