"""The Ray engine's decisions that need no Ray running: how many actors the cluster gets, how an
actor's start error and a node's missing image reach the user. The engine itself runs on a
two-node cluster in tests/integration/test_cli_ray.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from clip_eval import cli
from clip_eval.engines.local import LocalConfig, resolve_model_dirs
from clip_eval.engines.ray_data import (
    ActorStartError,
    RayConfig,
    RayEngine,
    _explain_unreachable,
    _start_error,
)
from clip_eval.image_cells import LoaderConfig, local_path
from clip_eval.records import PairOutcome


def engine(**options: object) -> RayEngine:
    local = LocalConfig(("ViT-B-32",), {}, LoaderConfig(Path("/data")))
    return RayEngine(RayConfig(local=local, **options))  # type: ignore[arg-type]


CPU_NODES = [{"CPU": 8.0, "memory": 1e9}, {"CPU": 3.0}]


def test_actors_default_to_one_per_cpus_per_actor_on_each_node() -> None:
    assert engine()._resources(CPU_NODES) == (0.0, 11)
    # An actor lives on one node: 8 // 2 + 3 // 2, not 11 // 2.
    assert engine(cpus_per_actor=2.0)._resources(CPU_NODES) == (0.0, 5)
    assert engine(cpus_per_actor=16.0)._resources(CPU_NODES) == (0.0, 1)  # at least one


def test_actors_default_to_one_per_gpu_when_the_cluster_has_gpus() -> None:
    nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0}, {"CPU": 8.0, "GPU": 2.0}]
    assert engine()._resources(nodes) == (1.0, 6)
    assert engine(gpus_per_actor=2.0)._resources(nodes) == (2.0, 3)
    assert engine(actors=2)._resources(nodes) == (1.0, 2)  # the flag wins
    assert engine(gpus_per_actor=0.0)._resources(nodes) == (0.0, 40)  # CPU actors asked for


def test_an_actor_start_error_is_found_in_the_text_ray_gives_for_a_dead_actor() -> None:
    ray_text = (
        "The actor died because of an error raised in its creation task, "
        "ray::MapWorker(MapBatches(_ScoreActor)).__init__() (pid=1, ip=127.0.0.1)\n"
        '  File "ray_data.py", line 1, in __init__\n'
        "clip_eval.engines.ray_data.ActorStartError: the Ray actor on node ab cannot open the "
        "model store: /m is missing; with --engine ray, ... the same path\n"
    )
    found = _start_error(RuntimeError(ray_text))
    assert isinstance(found, ActorStartError)
    assert str(found) == (
        "the Ray actor on node ab cannot open the model store: /m is missing; "
        "with --engine ray, ... the same path"
    )
    assert _start_error(RuntimeError("The actor died unexpectedly")) is None


def test_a_file_missing_on_the_actors_node_but_here_is_called_a_storage_problem(
    tmp_path: Path,
) -> None:
    here = tmp_path / "cat.jpg"
    here.write_bytes(b"jpeg")
    failed = PairOutcome("ViT-B-32", error="image_not_found", error_message=f"not found: {here}")
    explained = _explain_unreachable(failed, [str(here)])
    assert explained.error == "image_not_found"
    assert str(here) in (explained.error_message or "")
    assert "storage every node mounts" in (explained.error_message or "")
    # Missing here too (a wrong path, not a storage problem): the local engine's message stays.
    assert _explain_unreachable(failed, [str(tmp_path / "gone.jpg")]) == failed
    assert _explain_unreachable(failed, None) == failed


def test_local_path_names_files_only() -> None:
    config = LoaderConfig(Path("/data"))
    assert local_path("img/a.jpg", config) == Path("/data/img/a.jpg")
    assert local_path("/abs/a.jpg", config) == Path("/abs/a.jpg")
    assert local_path("https://example.com/a.jpg", config) is None
    assert local_path("data:image/png;base64,AAAA", config) is None
    assert local_path(b"\xff\xd8", config) is None
    assert local_path(None, config) is None


def test_model_dir_is_made_absolute_for_actors_that_run_elsewhere(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tiny_model_dir.parent)
    folders = resolve_model_dirs(["tiny"], Path(tiny_model_dir.name))
    assert folders == {"tiny": tiny_model_dir.resolve()}


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_cpus_per_actor_must_be_positive(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["in.csv", "--ray-cpus-per-actor", value])
    assert "--ray-cpus-per-actor" in capsys.readouterr().err
