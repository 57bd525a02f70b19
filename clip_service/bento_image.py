"""The container image of the Bento, declared with BentoML's own ``Image`` (the SDK's way).

Declared here rather than in bentofile.yaml's ``docker:`` section: there, ``base_image`` next to
``python_version`` or ``system_packages`` makes ``bentoml build`` warn that they are ignored (the
legacy options' check), although the generator in use applies them. The service passes this to
``bentoml.service(image=...)``; bentofile.yaml adds the Python requirements and the envs.
"""

from __future__ import annotations

import bentoml

# A CUDA base, chosen to match the CUDA that the torch wheel brings: torch 2.14.1 from PyPI ships
# CUDA 13.0 user-space libraries (cuBLAS, cuDNN, NCCL...) as pip packages, so the small `base`
# flavour is enough. What the base adds: NVIDIA_REQUIRE_CUDA=cuda>=13.0, so the NVIDIA container
# runtime refuses to start on a host driver too old for CUDA 13 (instead of torch silently falling
# back to the CPU), and NVIDIA_DRIVER_CAPABILITIES=compute,utility. Not BentoML's `cuda_version`:
# it offers CUDA 12.x only and switches BentoML back to its legacy Dockerfile generator.
CUDA_BASE_IMAGE = "nvidia/cuda:13.0.2-base-ubuntu24.04"

BENTO_IMAGE = bentoml.images.Image(
    base_image=CUDA_BASE_IMAGE,
    # Ubuntu: the Debian family's apt-get commands (the default distro, stated).
    distro="debian",
    # BentoML makes a uv-managed Python 3.11 virtualenv in /app/.venv (the version tests run on);
    # unset, it would be the Python that happens to run `bentoml build`.
    python_version="3.11",
).system_packages(
    # BentoML bootstraps uv with `pip install`; the base image has no Python at all.
    "python3-pip",
    # libz.so.1: Pillow's _imaging and its bundled libpng/libtiff/freetype link the system zlib.
    "zlib1g",
)
