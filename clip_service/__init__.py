"""The BentoML side of the CLIP-score service.

Data flows one way: ``front_end`` (HTTP: validate, decode, queue) -> ``model_worker`` (the model
process: batchable APIs over the engine) -> ``clip_runtime`` (the engine). ``evaluator`` puts
the front end's service together, ``schemas`` holds the wire types, ``http_errors`` the one
mapping from a domain error to an HTTP answer, ``middleware`` and ``admission`` what runs before
the handlers, ``observability`` metrics, traces and logs, and ``bentoml_adapter`` every reach
into BentoML's private API.
"""
