"""The BentoML side of the CLIP-score service.

Data flows one way: ``front_end`` (HTTP: validate, decode, queue) -> ``model_worker`` (the model
process: batches through the engine) -> ``clip_runtime`` (the engine). The wiring modules
``evaluator`` and ``scorer`` build the two services from the settings and the model store; they
are the only modules whose import reads either. ``schemas`` holds the wire types,
``http_errors`` the one mapping from a domain error to an HTTP answer, ``middleware`` and
``admission`` what runs before the handlers, ``observability`` metrics, traces and logs, and
``bentoml_adapter`` every reach into BentoML's private API.
"""
