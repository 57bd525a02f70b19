"""``clip-eval``: CLIP scores for datasets of image-caption pairs.

One pipeline (read rows -> score pairs -> append results) with three interchangeable engines:
in-process ``clip_runtime`` (``local``), the running service (``remote``) and Ray Data actors
(``ray``). Output is written as it is scored, so an interrupted run resumes without rescoring.
"""
