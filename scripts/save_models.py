"""Save open_clip models to the BentoML model store, each under a name derived from its spec.

    python -m scripts.save_models                          # ViT-B-32 and ViT-L-14, default tags
    python -m scripts.save_models --models ViT-B-32 --pretrained openai
    python -m scripts.save_models --models ViT-SO400M-14-SigLIP-384:webli
    python -m scripts.save_models --models hf-hub:timm/ViT-B-16-SigLIP
    python -m scripts.save_models --models ViT-B-32 --checkpoint ./my_clip.safetensors
    python -m scripts.save_models --models my-clip --config my-clip.json --checkpoint my.safetensors
    python -m scripts.save_models --random-init --seed 0   # offline, untrained (tests, demos)

A spec is ``ARCH:TAG`` (any architecture and pretrained tag open_clip lists), ``hf-hub:ORG/NAME``,
or an architecture alone (``ViT-B-32`` and ``ViT-L-14`` take their default tags). The spec is the
served name (``CLIP_MODELS``); the store name is derived from it (``clip_runtime.registry``).

Each entry holds safetensors weights, open_clip's config with the tag's preprocessing, and
``clip_model.json`` (source, tag, sha256); the same facts are the model's labels.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from clip_runtime.registry import DEFAULT_MODELS, ModelSpec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        metavar="SPEC",
        help="ARCH:TAG, hf-hub:ORG/NAME or ARCH (default: %(default)s)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--pretrained", metavar="TAG", help="open_clip tag (default: each model's default)"
    )
    source.add_argument(
        "--checkpoint", type=Path, metavar="PATH", help="local open_clip checkpoint"
    )
    source.add_argument("--random-init", action="store_true", help="untrained weights, offline")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="JSON",
        help="an open_clip model config registering a custom architecture (named by the file's "
        "stem) for --checkpoint or --random-init",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        metavar="DIR",
        help="a Hugging Face tokenizer folder (save_pretrained) instead of the hub's, for models "
        "whose config names one (SigLIP); copied into the entry",
    )
    parser.add_argument(
        "--preprocess-tag",
        metavar="TAG",
        help="tag whose preprocessing a checkpoint uses (default: the model's default tag)",
    )
    parser.add_argument("--offline", action="store_true", help="never touch the network")
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="skip a model whose latest store entry already has the requested source",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if (args.pretrained or args.checkpoint or args.tokenizer) and len(args.models) > 1:
        sys.exit("--pretrained, --checkpoint and --tokenizer apply to one model: --models SPEC")

    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if not args.random_init and not args.checkpoint:
        from clip_runtime.sources import ensure_offline_mode_if_unreachable

        # Before anything imports huggingface_hub, which reads HF_HUB_OFFLINE once.
        ensure_offline_mode_if_unreachable()

    import bentoml

    from clip_runtime.errors import ClipError
    from clip_runtime.registry import store_name
    from clip_runtime.sources import save_spec

    try:
        if args.config:
            import open_clip

            open_clip.add_model_config(args.config)
        specs = [_spec(text, args) for text in args.models]
    except ClipError as error:
        logging.error("%s", error.message)
        return 2
    for spec in specs:
        name = store_name(spec.name)
        if args.if_missing and _already_saved(name, spec, args):
            print(f"kept {name}:latest (already saved from the requested source)")
            continue
        try:
            _refuse_name_clash(name, spec)
            with bentoml.models.create(name, module="clip_runtime") as stored:
                entry = save_spec(
                    Path(stored.path),
                    spec,
                    random_init=args.random_init,
                    seed=args.seed,
                    checkpoint=args.checkpoint,
                    tokenizer_dir=args.tokenizer,
                )
                stored.info.labels.update(entry.labels())
                stored.info.metadata.update(entry.labels())
        except ClipError as error:
            logging.error("%s", error.message)
            return 2
        flag = "  (RANDOM-INIT: untrained, for tests and demos)" if entry.untrained else ""
        print(
            f"saved {stored.tag}: {spec.name} ({entry.family}) architecture={entry.architecture} "
            f"weights={entry.weights} pretrained={entry.pretrained} "
            f"sha256={entry.weights_sha256[:12]}{flag}"
        )
    return 0


def _spec(text: str, args: argparse.Namespace) -> ModelSpec:
    """The spec a name asks for; --preprocess-tag sets the preprocessing of local weights."""
    from dataclasses import replace

    from clip_runtime.registry import parse_spec

    spec = parse_spec(text, args.pretrained)
    if args.preprocess_tag and (args.checkpoint or args.random_init):
        spec = replace(spec, tag=args.preprocess_tag)
    return spec


def _refuse_name_clash(name: str, spec: ModelSpec) -> None:
    """Two served names can share a store name (``A:b`` and ``A-b``); never let one replace the
    other's entry silently."""
    import bentoml

    from clip_runtime.errors import ClipError, ModelStoreError
    from clip_runtime.model_entry import read_entry

    try:
        saved = read_entry(Path(bentoml.models.get(f"{name}:latest").path))
    except (bentoml.exceptions.NotFound, ClipError):
        return
    if saved.name is not None and saved.name != spec.name:
        raise ModelStoreError(
            f"store name {name} already holds {saved.name!r}; {spec.name!r} would replace it "
            f"(delete it first: bentoml models delete {name})"
        )


def _already_saved(name: str, spec: ModelSpec, args: argparse.Namespace) -> bool:
    import bentoml

    from clip_runtime.errors import ClipError
    from clip_runtime.model_entry import read_entry

    try:
        entry = read_entry(Path(bentoml.models.get(f"{name}:latest").path))
    except (bentoml.exceptions.NotFound, ClipError):
        return False
    if args.random_init:
        return entry.untrained and entry.seed == args.seed
    if args.checkpoint:
        return False  # a file path says nothing about whether its content changed
    return not entry.untrained and entry.pretrained == (spec.tag or spec.architecture)


if __name__ == "__main__":
    sys.exit(main())
