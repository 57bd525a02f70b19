"""`bentoml serve service:Evaluator` (and the bentofile's entry point).

The services live in the ``clip_service`` package: ``Evaluator`` is the public HTTP front end,
``Scorer`` the model worker it depends on. Tracing and BentoML's bounded request metrics are
installed here, at import, before BentoML builds any app.
"""

from clip_service.bentoml_adapter import (
    bound_request_metric_paths,
    install_bentoml_fixes,
    setup_tracing,
)
from clip_service.frontend import ROUTES, Evaluator
from clip_service.worker import Scorer

install_bentoml_fixes()  # before the arbiter starts and any Scorer client exists
setup_tracing()
bound_request_metric_paths(set(ROUTES))

__all__ = ["Evaluator", "Scorer"]
