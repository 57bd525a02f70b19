"""What one saved model costs on this machine's CPU: load time, resident memory, and time per
batch of 16 image-text pairs through both towers (fp32, one process, no HTTP).

    python -m scripts.measure_model_cost clip-test-tiny siglip-test-tiny ViT-B-16-SigLIP

Each name is a served name already saved in the model store ($BENTOML_HOME). Models are loaded
one after another in this process, so RSS is the increase each one brings. Prints figures; the
machine and its load (uptime) are printed first, since both move the numbers.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BATCH = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", metavar="NAME", help="served names, saved")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches after a warm-up")
    return parser.parse_args(argv)


def photo(seed: int) -> bytes:
    """A 640x480 JPEG of smooth random colour (decoded and cropped like any request's image)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@dataclass(frozen=True)
class Cost:
    name: str
    family: str
    context: int
    weights_mib: float
    load_s: float
    rss_mib: float
    batch_ms: float

    def row(self) -> str:
        return (
            f"{self.name} | {self.family} | {self.context} | {self.weights_mib:.0f} | "
            f"{self.load_s:.2f} | {self.rss_mib:+.0f} | {self.batch_ms:.0f}"
        )


def measure(name: str, folder: Path, repeats: int) -> Cost:
    """Load the entry in ``folder`` on the CPU and time batches of 16 pairs through it."""
    import psutil
    import torch

    from clip_runtime.image_inputs import ImageLimits
    from clip_runtime.model import ClipModel
    from clip_runtime.runtimes import torch_plan

    process = psutil.Process()
    limits = ImageLimits(max_image_bytes=50_000_000, max_image_pixels=100_000_000, min_image_side=4)
    images = [photo(seed) for seed in range(BATCH)]
    weights_mib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    rss_before = process.memory_info().rss
    started = time.perf_counter()
    model = ClipModel(name, folder, torch_plan(torch.device("cpu")), limits, 0)
    load_s = time.perf_counter() - started
    rss_mib = (process.memory_info().rss - rss_before) / 2**20
    crops = [model.preprocessor.from_bytes(image) for image in images]
    timings = []
    for repeat in range(repeats + 1):  # the first batch warms up, untimed
        captions = [f"a photo number {repeat} {i}" for i in range(BATCH)]
        started = time.perf_counter()
        model.score_batch(crops, captions, [False] * BATCH)
        timings.append(time.perf_counter() - started)
    return Cost(
        name=name,
        family=model.family,
        context=model.info.context_length,
        weights_mib=weights_mib,
        load_s=load_s,
        rss_mib=rss_mib,
        batch_ms=1000 * statistics.median(timings[1:]),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import bentoml
    import torch

    from clip_runtime.registry import store_name

    print(
        f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} "
        f"load_average={' '.join(f'{load:.1f}' for load in os.getloadavg())}"
    )
    print("model | family | context | weights MiB | load s | RSS +MiB | ms per batch of 16")
    for name in args.models:
        folder = Path(bentoml.models.get(f"{store_name(name)}:latest").path)
        print(measure(name, folder, args.repeats).row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
