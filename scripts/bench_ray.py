#!/usr/bin/env python
"""``clip-eval``'s engines side by side on this machine, in one run: the local engine, then the
Ray engine with 1 and 2 actors on a two-node Ray cluster started here (one CPU per node, both on
127.0.0.1), on the same pairs of photo-like 640x480 JPEGs, random-init ViT-B-32.

    python -m scripts.bench_ray                      # what `make bench-ray` runs
    python -m scripts.bench_ray --pairs 64 --markdown ''   # a quick look, nothing appended

Each engine runs as the user runs it: a ``clip-eval`` process of its own, timed from start to
exit (imports, connecting to Ray, model loading included), and its own ``scored now in`` figure
(the scoring alone). Every run's output is checked against the local engine's, row for row.
It prints the table and appends it to --markdown (docs/benchmarks.md) with the machine's CPU
model and load average; figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import ast
import csv
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from clip_testkit.sample_images import jpeg_bytes

if TYPE_CHECKING:  # imported at run time only after LOOPBACK_ONLY_ENV is set
    from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[1]

CAPTIONS = [f"a photo of a {thing}" for thing in ("cat", "dog", "bridge", "car", "tree", "cake")]
CAPTIONS += ["two people on a beach at sunset", "a diagram of a neural network"]
MODEL = "ViT-B-32"
LOOPBACK = "127.0.0.1"
# Ray takes the host interface's address instead of loopback unless told it is not clustering
# across machines.
LOOPBACK_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# What Ray Data logs when one block feeds the whole actor pool (the issue this measures).
SINGLE_INPUT_WARNING = "won't fully utilize the available concurrency"
SCORE_TOLERANCE = 1e-3  # scores are 100 x cosine; thread counts differ between engines


@dataclass
class Run:
    name: str
    flags: list[str]
    wall_s: float = 0.0
    scoring_s: float | None = None
    per_actor: dict[str, int] | None = None
    single_input_warning: bool = False
    matches_local: str = ""


def make_pairs(folder: Path, count: int) -> Path:
    """``count`` rows: a JPEG file of its own (path relative to the table) and a caption."""
    images = folder / "img"
    images.mkdir(parents=True, exist_ok=True)
    table = folder / "pairs.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for row in range(count):
            (images / f"{row}.jpg").write_bytes(jpeg_bytes(row))
            writer.writerow([f"img/{row}.jpg", CAPTIONS[row % len(CAPTIONS)]])
    return table


def save_model(home: Path) -> Path:
    from clip_runtime.model_entry import store_name
    from clip_testkit.server import model_folder, save_random_init_models

    save_random_init_models(home, [MODEL])
    return model_folder(home, store_name(MODEL))


def start_cluster() -> Cluster:
    """Two nodes of one CPU each on loopback, owned by this process."""
    os.environ.update(LOOPBACK_ONLY_ENV)  # before Ray is imported: it reads this at import
    from ray.cluster_utils import Cluster

    head = {"node_ip_address": LOOPBACK, "num_cpus": 1, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(node_ip_address=LOOPBACK, num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


def run_cli(run: Run, table: Path, output: Path, model_dir: Path) -> str:
    command = [sys.executable, "-m", "clip_eval", str(table), "-o", str(output), "--overwrite"]
    command += ["--model", MODEL, "--model-dir", str(model_dir), "--quiet", "-v", *run.flags]
    env = {**os.environ, **LOOPBACK_ONLY_ENV, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    run.wall_s = time.perf_counter() - started
    text = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{run.name} failed ({result.returncode}):\n{text[-4000:]}")
    scored = re.search(r"scored now in ([0-9.]+) s", text)
    run.scoring_s = float(scored.group(1)) if scored else None
    actors = re.search(r"outcomes per actor: (\{.*\})", text)
    run.per_actor = ast.literal_eval(actors.group(1)) if actors else None
    run.single_input_warning = SINGLE_INPUT_WARNING in text
    return text


def compare(output: Path, local: Path) -> str:
    import pandas as pd

    mine, theirs = pd.read_parquet(output), pd.read_parquet(local)
    if len(mine) != len(theirs) or list(mine["image"]) != list(theirs["image"]):
        return "rows differ"
    if mine["error"].notna().any():
        return f"{int(mine['error'].notna().sum())} errors"
    worst = (mine["score"].astype(float) - theirs["score"].astype(float)).abs().max()
    return f"yes (max score diff {worst:.1e})" if worst <= SCORE_TOLERANCE else f"no ({worst})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(runs: list[Run]) -> str:
    local = runs[0]
    lines = [
        "| engine | wall s | vs local | scoring s | vs local | outcomes per actor "
        "| single-input warning | rows equal local |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for run in runs:
        scoring = "" if run.scoring_s is None else f"{run.scoring_s:.1f}"
        scoring_ratio = (
            f"{run.scoring_s / local.scoring_s:.2f}x" if run.scoring_s and local.scoring_s else ""
        )
        actors = ", ".join(str(n) for n in (run.per_actor or {}).values())
        lines.append(
            f"| {run.name} | {run.wall_s:.1f} | {run.wall_s / local.wall_s:.2f}x | {scoring} "
            f"| {scoring_ratio} | {actors} | {'yes' if run.single_input_warning else 'no'} "
            f"| {run.matches_local} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=288)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--notes", default="", help="a line added to the report")
    args = parser.parse_args()

    load_start = os.getloadavg()
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as scratch:
        folder = Path(scratch)
        print(f"making {args.pairs} pairs and saving random-init {MODEL}...", flush=True)
        pairs = make_pairs(folder / "data", args.pairs)
        model_dir = save_model(folder / "bentoml")
        cluster = start_cluster()
        address = cluster.address
        ray = ["--engine", "ray", "--ray-address", address, "--ray-cpus-per-actor", "1"]
        runs = [
            Run("local", []),
            Run("ray, 1 actor", [*ray, "--ray-actors", "1"]),
            Run("ray, 2 actors", [*ray, "--ray-actors", "2"]),
        ]
        try:
            for index, run in enumerate(runs):
                output = folder / f"run-{index}.parquet"
                print(f"{run.name}...", flush=True)
                run.flags += ["--batch-size", str(args.batch_size)]
                run_cli(run, pairs, output, model_dir)
                run.matches_local = "-" if index == 0 else compare(output, folder / "run-0.parquet")
                print(f"  {run.wall_s:.1f} s", flush=True)
        finally:
            cluster.shutdown()
    load_end = os.getloadavg()
    report = table(runs)
    header = [
        f"## {started:%Y-%m-%d %H:%M} UTC — Ray engine (`scripts/bench_ray.py`)",
        "",
        f"- Command: `python -m scripts.bench_ray --pairs {args.pairs} "
        f"--batch-size {args.batch_size}`",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores; load average "
        f"{', '.join(f'{x:.2f}' for x in load_start)} at start, "
        f"{', '.join(f'{x:.2f}' for x in load_end)} at end",
        f"- Pairs: {args.pairs} photo-like 640x480 JPEG files (clip_testkit.sample_images, one per "
        f"row), {len(CAPTIONS)} captions; {MODEL} random-init; Ray: a two-node cluster on this "
        "machine (`ray.cluster_utils.Cluster`, 1 CPU per node, 127.0.0.1), "
        "`--ray-cpus-per-actor 1`",
        "- wall: the `clip-eval` process from start to exit; scoring: its `scored now in`",
    ]
    if args.notes:
        header.append(f"- Notes: {args.notes}")
    text = "\n".join([*header, "", report, ""])
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "a") as handle:
            handle.write("\n" + text)
        print(f"appended to {args.markdown}")


if __name__ == "__main__":
    main()
