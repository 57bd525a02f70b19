"""``clip-eval INPUT --output OUTPUT [--engine local|remote|ray] [--model NAME ...]``

Scores every image-caption pair of a CSV, JSONL or Parquet table and writes the rows back with
``model``, ``score``, ``cosine``, ``error`` and ``error_message`` columns, as they are scored;
RefCLIPScore, image-image and text-text similarity, and the embeddings when asked.
Interrupted (Ctrl-C, crash), it continues with ``--resume`` without rescoring anything.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from clip_eval.cli_errors import ClipEvalError, UsageError
from clip_eval.datasets import (
    FORMATS,
    INPUT_FORMATS,
    DatasetSpec,
    TableFormat,
    detect_format,
    detect_input_format,
)
from clip_eval.embeddings import EmbeddingsFile, embeddings_format
from clip_eval.engines import Engine
from clip_eval.image_cells import LoaderConfig
from clip_eval.output import OutputFile, read_results
from clip_eval.summary import format_summary, plot_histogram, summarize, untrained_note
from clip_runtime.errors import RuntimeSetupError
from clip_runtime.registry import DEFAULT_MODELS

logger = logging.getLogger("clip_eval")

EXAMPLES = """examples:
  clip-eval pairs.csv -o scores.csv                              # in process, ViT-B-32
  clip-eval pairs.jsonl -o scores.parquet --model ViT-B-32 --model ViT-L-14 --plot hist.png
  clip-eval pairs.parquet -o scores.parquet --engine remote --url http://localhost:3000
  clip-eval pairs.csv -o scores.csv --engine ray --ray-address auto
  clip-eval pairs.csv -o scores.csv --resume                     # after an interruption
  clip-eval pairs.csv -o scores.csv --reference-column refs      # adds ref_clip_score
  clip-eval shards/ -o scores.parquet --embeddings-out vectors.parquet
  clip-eval pairs.csv --compare-modes --url http://localhost:3000
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-eval",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_general_arguments(parser)
    _add_input_output_arguments(parser)
    _add_local_engine_arguments(parser)
    _add_remote_engine_arguments(parser)
    _add_ray_engine_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    return parser


def _add_general_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="CSV, JSONL or Parquet table of pairs")
    parser.add_argument("-o", "--output", type=Path, help="where the scored rows go")
    parser.add_argument("--engine", choices=("local", "remote", "ray"), default="local")
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help=f"{' or '.join(DEFAULT_MODELS)} (default ViT-B-32); repeat for several, one output "
        "row per model. With --model-dir, the name the rows are labelled with",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="pairs per batch")


def _add_input_output_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("input and output")
    data.add_argument("--image-column", default="image", help="path, URL or base64 (image)")
    data.add_argument("--caption-column", default="caption", help="(caption)")
    data.add_argument(
        "--reference-column",
        help="reference captions (a text, or a list / JSON list of texts): adds ref_clip_score",
    )
    data.add_argument(
        "--image-column-2",
        help="a second image per row: adds image_image_cosine and image_image_score",
    )
    data.add_argument(
        "--text-column-2", help="a second text per row: adds text_text_cosine and text_text_score"
    )
    data.add_argument(
        "--embeddings-out",
        type=Path,
        metavar="FILE.parquet|npz|npy",
        help="also write each scored pair's image and caption embeddings, with row ids",
    )
    data.add_argument(
        "--input-format", choices=INPUT_FORMATS, help="default: from the suffix or folder layout"
    )
    data.add_argument("--output-format", choices=FORMATS, help="default: from the suffix")
    data.add_argument(
        "--image-root", type=Path, help="base of relative image paths (default: input's folder)"
    )
    data.add_argument(
        "--fetch-timeout", type=float, default=10.0, help="seconds per image URL (10)"
    )
    data.add_argument(
        "--url-allowed-host",
        dest="url_allowed_hosts",
        action="append",
        metavar="HOST[:PORT]",
        help="fetch image URLs from these hosts only (they may be private); repeatable. "
        "Default: CLIP_URL_ALLOWED_HOSTS, else any public host",
    )
    state = data.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="continue an interrupted run")
    state.add_argument("--overwrite", action="store_true", help="replace an existing output")
    data.add_argument("--plot", type=Path, metavar="FILE.png", help="histogram of the scores")
    data.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_local_engine_arguments(parser: argparse.ArgumentParser) -> None:
    local = parser.add_argument_group("--engine local (and ray)")
    local.add_argument(
        "--model-dir", type=Path, help="a saved model entry folder instead of the BentoML store"
    )
    local.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: CLIP_DEVICE or auto)")
    local.add_argument(
        "--precision", choices=("auto", "fp32", "fp16", "bf16"), help="default: CLIP_PRECISION"
    )
    local.add_argument(
        "--runtime",
        choices=("auto", "torch", "openvino"),
        help="what runs the towers (default: CLIP_RUNTIME; auto: openvino on CPU when installed)",
    )
    local.add_argument(
        "--io-workers", type=_positive_int, default=16, help="threads reading images (16)"
    )


def _add_remote_engine_arguments(parser: argparse.ArgumentParser) -> None:
    remote = parser.add_argument_group("--engine remote and --compare-modes")
    remote.add_argument("--url", help="the service, e.g. http://localhost:3000")
    remote.add_argument(
        "--api-key",
        default=os.environ.get("CLIP_API_KEY") or None,
        help="the service's API key, sent as 'Authorization: Bearer KEY' "
        "(default: the CLIP_API_KEY environment variable)",
    )
    remote.add_argument(
        "--concurrency", type=_positive_int, default=4, help="requests in flight (4)"
    )
    remote.add_argument(
        "--retries",
        type=int,
        default=5,
        help="retries of a request on 429/502/503/504, after its Retry-After (5)",
    )
    remote.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    remote.add_argument(
        "--ready-timeout", type=float, default=60.0, help="seconds to wait for /readyz"
    )
    remote.add_argument(
        "--compare-modes",
        action="store_true",
        help="time the single endpoint (one request per pair) against the batch endpoint",
    )
    remote.add_argument(
        "--compare-pairs", type=_positive_int, default=64, help="pairs to compare with (64)"
    )


def _add_ray_engine_arguments(parser: argparse.ArgumentParser) -> None:
    ray = parser.add_argument_group("--engine ray")
    ray.add_argument("--ray-address", help="an existing cluster (default: start a local Ray)")
    ray.add_argument(
        "--ray-actors",
        type=_positive_int,
        help="default: one per GPU of the cluster, else one per --ray-cpus-per-actor CPUs",
    )
    ray.add_argument(
        "--ray-cpus-per-actor",
        type=_positive_float,
        default=1.0,
        help="CPUs each actor holds; its torch and decode threads (1)",
    )
    ray.add_argument("--ray-gpus-per-actor", type=float, help="default: 1 if the cluster has GPUs")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output is None and not args.compare_modes:
        parser.error("--output is required (unless --compare-modes)")
    if (args.engine == "remote" or args.compare_modes) and not args.url:
        parser.error("--url is required with --engine remote and --compare-modes")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="clip-eval: %(levelname)s %(name)s: %(message)s",
    )
    try:
        return score_or_compare(args)
    except ClipEvalError as error:
        print(f"clip-eval: error: {error}", file=sys.stderr)
        return error.exit_code
    except RuntimeSetupError as error:  # --runtime/--precision this machine cannot run
        print(f"clip-eval: error: {error}", file=sys.stderr)
        return UsageError.exit_code
    except KeyboardInterrupt:  # before or after scoring: nothing to save
        print("clip-eval: interrupted", file=sys.stderr)
        return 130


def score_or_compare(args: argparse.Namespace) -> int:
    """Scores the input table into --output, or with --compare-modes times the two endpoints."""
    models: tuple[str, ...] = tuple(dict.fromkeys(args.models or ["ViT-B-32"]))
    dataset = _dataset_from_args(args)
    loader = _loader_from_args(args)
    if args.compare_modes:
        return _compare_modes(args, dataset, loader, models[0])
    return _score_table(args, dataset, loader, models)


def _dataset_from_args(args: argparse.Namespace) -> DatasetSpec:
    dataset = DatasetSpec(
        path=args.input,
        format=detect_input_format(args.input, args.input_format),
        image_column=args.image_column,
        caption_column=args.caption_column,
        reference_column=args.reference_column,
        image_column_2=args.image_column_2,
        text_column_2=args.text_column_2,
    )
    dataset.validate()
    return dataset


def _loader_from_args(args: argparse.Namespace) -> LoaderConfig:
    from clip_runtime.fetch import host_is_allow_listed
    from clip_runtime.settings import ClipSettings

    settings = ClipSettings()  # the service's CLIP_MAX_IMAGE_BYTES and URL policy apply here too
    loader = LoaderConfig(
        image_root=(args.image_root or args.input.parent).resolve(),
        fetch_timeout_s=args.fetch_timeout,
        max_image_bytes=settings.max_image_bytes,
        allow_urls=settings.allow_urls,
        url_allowed_hosts=tuple(args.url_allowed_hosts or settings.url_allowed_hosts),
        url_max_redirects=settings.url_max_redirects,
    )
    try:  # the service's own check of the entries, before any fetch
        host_is_allow_listed("", 0, loader.url_allowed_hosts)
    except ValueError as error:
        raise UsageError(f"--url-allowed-host: {error}") from error
    return loader


def _compare_modes(
    args: argparse.Namespace, dataset: DatasetSpec, loader: LoaderConfig, model: str
) -> int:
    from clip_eval.compare import compare_modes

    comparison = compare_modes(
        args.url,
        dataset,
        loader,
        model=model,
        pairs=args.compare_pairs,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        timeout_s=args.timeout,
        ready_timeout_s=args.ready_timeout,
        api_key=args.api_key,
    )
    print(comparison.format())
    return 0


def _score_table(
    args: argparse.Namespace,
    dataset: DatasetSpec,
    loader: LoaderConfig,
    models: tuple[str, ...],
) -> int:
    output_format = detect_format(args.output, args.output_format)
    if args.output.resolve() == args.input.resolve():
        raise UsageError("--output must not be the input file")
    if args.plot is not None and not args.plot.resolve().parent.is_dir():
        raise UsageError(f"--plot: folder does not exist: {args.plot.parent}")  # before scoring
    embeddings = _embeddings_file(args, len(models))
    engine = build_engine(args, models, loader)  # before the output: fail fast on a bad model
    output = OutputFile.open(
        args.output,
        output_format,
        _run_fingerprint(args, dataset, models, output_format, embeddings),
        resume=args.resume,
        overwrite=args.overwrite,
        embeddings=embeddings,
    )
    if output.rows_done:
        print(f"resuming {args.output}: {output.rows_done} rows already scored", file=sys.stderr)

    from clip_eval.pipeline import evaluate

    try:
        report = evaluate(
            dataset, engine, output, batch_size=args.batch_size, progress=not args.quiet
        )
    except KeyboardInterrupt:
        print(
            f"clip-eval: interrupted; {output.rows_done} rows are saved in {args.output}. "
            "Rerun the same command with --resume to continue.",
            file=sys.stderr,
        )
        return 130
    print(
        f"{args.output}: {report.rows_total} rows x {len(models)} model(s); "
        f"{report.rows_scored} scored now in {report.seconds:.1f} s"
        + (f", {report.rows_before} kept from before" if report.rows_before else "")
    )
    _print_summary(args, output_format, engine)
    return 0


def _embeddings_file(args: argparse.Namespace, model_count: int) -> EmbeddingsFile | None:
    if args.embeddings_out is None:
        return None
    if args.embeddings_out.resolve() in (args.output.resolve(), args.input.resolve()):
        raise UsageError("--embeddings-out must be another file than the input and output")
    return EmbeddingsFile(args.embeddings_out, embeddings_format(args.embeddings_out, model_count))


def _run_fingerprint(
    args: argparse.Namespace,
    dataset: DatasetSpec,
    models: tuple[str, ...],
    output_format: TableFormat,
    embeddings: EmbeddingsFile | None,
) -> dict[str, object]:
    """What an output was scored from: --resume refuses to continue one made from other input."""
    fingerprint: dict[str, object] = {
        "input": str(args.input.resolve()),
        "input_bytes": args.input.stat().st_size,
        "input_format": dataset.format,
        "image_column": dataset.image_column,
        "caption_column": dataset.caption_column,
        "models": list(models),
        "output_format": output_format,
    }
    optional = {
        "reference_column": dataset.reference_column,
        "image_column_2": dataset.image_column_2,
        "text_column_2": dataset.text_column_2,
        "embeddings_out": None if embeddings is None else str(embeddings.path.resolve()),
    }
    # Only what was asked for: a run started before these flags existed still resumes.
    fingerprint.update((key, value) for key, value in optional.items() if value is not None)
    return fingerprint


def _print_summary(args: argparse.Namespace, output_format: TableFormat, engine: Engine) -> None:
    results = read_results(args.output, output_format)
    print(format_summary(summarize(results)))
    untrained = engine.untrained_models()
    note = untrained_note(untrained)
    if note is not None:
        print(note)
    if args.plot is not None:
        title = f"CLIP scores: {args.input.name}"
        plot_histogram(results, args.plot, title=title, untrained=untrained)
        print(f"histogram: {args.plot}")


def build_engine(args: argparse.Namespace, models: tuple[str, ...], loader: LoaderConfig) -> Engine:
    if args.engine == "remote":
        from clip_eval.engines.remote import RemoteConfig, RemoteEngine, RetryPolicy

        if args.retries < 0:
            raise UsageError("--retries must be 0 or more")
        return RemoteEngine(
            RemoteConfig(
                url=args.url,
                models=models,
                loader=loader,
                batch_size=args.batch_size,
                concurrency=args.concurrency,
                timeout_s=args.timeout,
                ready_timeout_s=args.ready_timeout,
                io_workers=args.io_workers,
                retry=RetryPolicy(attempts=args.retries + 1),
                api_key=args.api_key,
                keep_vectors=args.embeddings_out is not None,
            )
        )
    from clip_eval.engines.local import LocalConfig, LocalEngine, resolve_model_dirs

    local = LocalConfig(
        models=models,
        model_dirs=resolve_model_dirs(models, args.model_dir),
        loader=loader,
        batch_size=args.batch_size,
        io_workers=args.io_workers,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        keep_vectors=args.embeddings_out is not None,
    )
    if args.engine == "local":
        return LocalEngine(local)
    from clip_eval.engines.ray_data import RayConfig, RayEngine

    return RayEngine(
        RayConfig(
            local=local,
            address=args.ray_address,
            actors=args.ray_actors,
            cpus_per_actor=args.ray_cpus_per_actor,
            gpus_per_actor=args.ray_gpus_per_actor,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
