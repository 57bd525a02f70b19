"""The BentoML side of the CLIP-score service.

Data flows one way: ``frontend`` (HTTP: validate, decode, queue) -> ``worker`` (the model
process: batchable APIs over the engine) -> ``clip_runtime`` (the engine). ``schemas`` holds the
wire types, ``errors`` the one mapping from a domain error to an HTTP answer, ``middleware`` and
``admission`` what runs before the handlers, ``observability`` metrics, traces and logs, and
``bentoml_adapter`` every reach into BentoML's private API.
"""
