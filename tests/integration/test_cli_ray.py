"""clip-eval's Ray engine on a two-node Ray cluster on this machine (``ray.cluster_utils``, one
CPU per node, both on 127.0.0.1): the batches are shared by an actor on each node, the output is
the local engine's row for row, an interrupted run continues, and an actor that cannot open the
model store stops the run with a message about shared storage."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster

from clip_eval import cli
from clip_eval.datasets import DatasetSpec
from clip_eval.engines.local import LocalConfig
from clip_eval.engines.ray_data import ActorStartError, RayConfig, RayEngine
from clip_eval.image_cells import LoaderConfig
from clip_eval.output import OutputFile, state_path
from tests.cli_helpers import OPTIONAL_SCORES, add_second_columns, check_output

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
# Ray takes the host interface's address instead of loopback unless told it is not clustering
# across machines (read by Ray in this process and in the nodes it starts).
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[str]:
    """The cluster's address; each test's run connects and disconnects as the CLI does."""
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LOOPBACK_ONLY_ENV, "0")
        patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        node = {"node_ip_address": LOOPBACK, "num_cpus": 1}
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        try:
            cluster.add_node(**node)
            cluster.wait_for_nodes()
            print(f"two-node cluster up in {time.perf_counter() - started:.1f}s")
            yield cluster.address
        finally:
            cluster.shutdown()


def test_two_actors_share_the_run_and_match_the_local_engine(
    two_nodes: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset, good = add_second_columns(tmp_path / "data", "parquet")
    output = tmp_path / "scores.parquet"
    extras = [*OPTIONAL_SCORES, "--embeddings-out", str(tmp_path / "vectors.npz")]
    common = [str(dataset.path), "-o", str(output), "--batch-size", "2", "--quiet", *extras]
    tiny = ["--model", "tiny", "--model-dir", str(tiny_model_dir)]

    # The first 5 rows locally, then an interruption (as Ctrl-C between two batches).
    real_append = OutputFile.append

    def append_then_interrupt(
        self: OutputFile, rows: pd.DataFrame, input_rows: int, embeddings: Any = None
    ) -> None:
        real_append(self, rows, input_rows, embeddings)
        if self.rows_done >= 5:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(OutputFile, "append", append_then_interrupt)
        assert cli.main([*common, *tiny, "--batch-size", "5"]) == 130
    assert json.loads(state_path(output).read_text())["rows_done"] == 5

    # The rest on the cluster, one actor per node by default: rows 5.. hold every other kind of
    # reference and every bad row. Were a row skipped or scored twice, outcomes would land on the
    # wrong rows and the checks below fail.
    engines: list[Any] = []
    real_build = cli.build_engine

    def keep_engine(*args: Any) -> Any:
        engines.append(real_build(*args))
        return engines[-1]

    monkeypatch.setattr(cli, "build_engine", keep_engine)
    started = time.perf_counter()
    ray_run = [*common, *tiny, "--engine", "ray", "--ray-address", two_nodes, "--resume"]
    assert cli.main(ray_run) == 0
    print(f"ray run {time.perf_counter() - started:.1f}s")
    assert not ray.is_initialized()  # the CLI leaves the cluster it connected to

    per_actor = engines[0].rows_per_actor
    print("outcomes per actor:", dict(per_actor))
    assert sum(per_actor.values()) == len(dataset.frame) - 5
    assert len(per_actor) == 2 and min(per_actor.values()) > 0
    assert len({actor.split(" pid ")[0] for actor in per_actor}) == 2  # one on each node
    check_output(output, dataset, tiny_model_dir)

    # Every column, the optional scores and the embeddings, across the local half and the Ray
    # half, are the local engine's over the whole input.
    local = tmp_path / "local.parquet"
    local_extras = [*OPTIONAL_SCORES, "--embeddings-out", str(tmp_path / "local.npz")]
    assert cli.main([str(dataset.path), "-o", str(local), "--quiet", *local_extras, *tiny]) == 0
    ray_rows, local_rows = pd.read_parquet(output), pd.read_parquet(local)
    # Scores are 100 x cosines: 1e-4 there is the 1e-6 the cosines are held to.
    pd.testing.assert_frame_equal(ray_rows, local_rows, check_exact=False, atol=1e-4, rtol=0)
    for column in ("cosine", "ref_clip_score", "image_image_cosine", "text_text_cosine"):
        np.testing.assert_allclose(
            ray_rows[column].astype(float), local_rows[column].astype(float), atol=1e-6
        )
    ray_vectors, local_vectors = np.load(tmp_path / "vectors.npz"), np.load(local_extras[-1])
    assert list(ray_vectors["tiny/row"]) == good
    np.testing.assert_allclose(ray_vectors["tiny/image"], local_vectors["tiny/image"], atol=1e-6)
    np.testing.assert_allclose(ray_vectors["tiny/text"], local_vectors["tiny/text"], atol=1e-6)


def test_an_actor_without_the_model_store_stops_the_run(two_nodes: str, tmp_path: Path) -> None:
    # The driver's check of the store passed; the folder is not where the actor looks (as on a
    # node that does not mount it).
    dataset, _ = add_second_columns(tmp_path / "data", "parquet")
    unmounted = tmp_path / "not-mounted" / "entry"
    local = LocalConfig(("tiny",), {"tiny": unmounted}, LoaderConfig(dataset.path.parent))
    engine = RayEngine(RayConfig(local=local, address=two_nodes, actors=1))
    with pytest.raises(ActorStartError) as raised:
        list(engine.score_dataset(DatasetSpec(dataset.path, "parquet"), 0))
    message = str(raised.value)
    assert str(unmounted) in message
    assert "model store" in message and "storage every node mounts" in message
    assert not ray.is_initialized()
