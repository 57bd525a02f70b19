"""Save ViT-B-32 and ViT-L-14 to the BentoML model store as ``clip-vit-b-32`` and ``clip-vit-l-14``.

    python scripts/save_models.py                          # pretrained, default tags
    python scripts/save_models.py --models ViT-B-32 --pretrained openai
    python scripts/save_models.py --models ViT-B-32 --checkpoint ./my_clip.safetensors
    python scripts/save_models.py --random-init --seed 0   # offline, untrained (tests, demos)

Each entry holds safetensors weights, open_clip's config with the tag's preprocessing, and
``clip_model.json`` (source, tag, sha256); the same facts are the model's labels.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clip_runtime.settings import KNOWN_MODELS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(KNOWN_MODELS), choices=KNOWN_MODELS)
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
    if (args.pretrained or args.checkpoint) and len(args.models) > 1:
        sys.exit("--pretrained TAG and --checkpoint apply to one model: add --models NAME")

    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if not args.random_init and not args.checkpoint:
        from clip_runtime.sources import ensure_offline_mode_if_unreachable

        # Before anything imports huggingface_hub, which reads HF_HUB_OFFLINE once.
        ensure_offline_mode_if_unreachable()

    import bentoml

    from clip_runtime.errors import ClipError
    from clip_runtime.model_entry import store_name
    from clip_runtime.sources import (
        DEFAULT_TAGS,
        save_checkpoint,
        save_pretrained,
        save_random_init,
    )

    for architecture in args.models:
        name = store_name(architecture)
        if args.if_missing and _already_saved(name, architecture, args):
            print(f"kept {name}:latest (already saved from the requested source)")
            continue
        try:
            with bentoml.models.create(name, module="clip_runtime") as stored:
                folder = Path(stored.path)
                if args.random_init:
                    entry = save_random_init(folder, architecture, args.seed)
                elif args.checkpoint:
                    tag = args.preprocess_tag or DEFAULT_TAGS[architecture]
                    entry = save_checkpoint(folder, architecture, args.checkpoint, tag)
                else:
                    entry = save_pretrained(
                        folder, architecture, args.pretrained or DEFAULT_TAGS[architecture]
                    )
                stored.info.labels.update(entry.labels())
                stored.info.metadata.update(entry.labels())
        except ClipError as error:
            logging.error("%s", error.message)
            return 2
        flag = "  (RANDOM-INIT: untrained, for tests and demos)" if entry.is_untrained else ""
        print(
            f"saved {stored.tag}: {architecture} weights={entry.weights_source} "
            f"pretrained={entry.pretrained} sha256={entry.weights_sha256[:12]}{flag}"
        )
    return 0


def _already_saved(name: str, architecture: str, args: argparse.Namespace) -> bool:
    import bentoml

    from clip_runtime.errors import ClipError
    from clip_runtime.model_entry import read_entry
    from clip_runtime.sources import DEFAULT_TAGS

    try:
        entry = read_entry(Path(bentoml.models.get(f"{name}:latest").path))
    except (bentoml.exceptions.NotFound, ClipError):
        return False
    if args.random_init:
        return entry.is_untrained and entry.seed == args.seed
    if args.checkpoint:
        return False  # a file path says nothing about whether its content changed
    return entry.pretrained == (args.pretrained or DEFAULT_TAGS[architecture])


if __name__ == "__main__":
    sys.exit(main())
