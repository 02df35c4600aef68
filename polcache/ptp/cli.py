"""`polcache ptp embed` and `polcache ptp finetune`."""

from __future__ import annotations

import argparse

from polcache.cli_types import DEVICE_HELP, FRESH_HELP, add_progress_option, config_file, positive_int
from polcache.errors import PolcacheError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ptp", help="past-token prediction: embed a dataset once, fine-tune a long-context "
                                          "head on the stored embeddings",
                              description="Multistage long-context training (Torne et al. 2025): a short-context "
                                          "policy's frozen encoder embeds every frame once; the long-context head "
                                          "trains on the stored embeddings without running the encoder.")
    sub = p.add_subparsers(dest="ptp_command", required=True, metavar="STEP")
    e = sub.add_parser("embed", help="store the per-frame embeddings of a checkpoint's encoder over a dataset")
    e.add_argument("--checkpoint", required=True, help="the trained short-context policy whose encoder to use")
    e.add_argument("--dataset", help="dataset to embed (default: the one the checkpoint was trained on)")
    e.add_argument("--out", required=True, help="embedding store to write (a polcache dataset, key `embedding`)")
    e.add_argument("--batch-size", type=positive_int, default=256, help="frames per encoder batch (default 256)")
    e.add_argument("--device", default="cpu", help=DEVICE_HELP)
    add_progress_option(e)
    e.set_defaults(handler=_embed)
    f = sub.add_parser("finetune", help="train a long-context head on stored embeddings (resumes like train)")
    f.add_argument("--embeddings", required=True, help="store written by `polcache ptp embed`")
    f.add_argument("--config", required=True, type=config_file, help="YAML experiment config of the long-context policy")
    f.add_argument("overrides", nargs="*", help="config overrides as dotted key=value")
    f.add_argument("--fresh", action="store_true", help=FRESH_HELP)
    f.add_argument("--device", default="cpu", help=DEVICE_HELP)
    add_progress_option(f)
    f.set_defaults(handler=_finetune)


def _embed(args: argparse.Namespace) -> int:
    from polcache.policy.checkpoint import load_policy
    from polcache.policy.device import resolve_device
    from polcache.export.manifest import refuse_exported
    from polcache.ptp.embeddings import check_embedding_output, embed_dataset

    refuse_exported(args.checkpoint, "embed with the checkpoint it was exported from")
    if args.dataset is not None:
        check_embedding_output(args.out, args.dataset, "--out")
    policy, cfg, _ = load_policy(args.checkpoint, resolve_device(args.device))
    dataset = args.dataset or _training_dataset(policy, cfg, args.checkpoint)
    check_embedding_output(args.out, dataset, "--out")
    # embed_dataset checks first that the encoder takes the dataset's frames
    out = embed_dataset(policy, dataset, args.out, checkpoint=args.checkpoint, batch_size=args.batch_size,
                        progress=not args.no_progress)
    print(f"wrote {out}: {policy.encoder.feature_dim}-d float32 embeddings of {dataset}")
    return 0


def _training_dataset(policy, cfg, checkpoint: str) -> str:
    """The checkpoint's training data, found as calibrate finds it (a relative path from the current
    directory or any above the checkpoint) and checked to be that data (its statistics): the
    embeddings of another recording at that path would not be the frames the policy learnt from."""
    from polcache.data.training_set import dataset_candidates, training_data
    from polcache.data import open_dataset

    path, _, passed = training_data(policy, cfg, dataset_candidates(cfg.dataset, checkpoint), open_dataset)
    if path is None:
        found = (f"; found from that path, not that data: {'; '.join(passed)}" if passed
                 else ", which is not here (nor above the checkpoint)")
        raise PolcacheError(f"the checkpoint was trained on {cfg.dataset or '(no dataset recorded)'}{found}: pass "
                            f"--dataset PATH")
    return str(path)


def _finetune(args: argparse.Namespace) -> int:
    from polcache.config import load_config
    from polcache.ptp.finetune import finetune
    from polcache.train.cli import announce_checkpoint

    cfg = load_config(args.config, args.overrides)
    path = finetune(cfg, args.embeddings, fresh=args.fresh, progress=not args.no_progress, device=args.device,
                    overrides=args.overrides)
    announce_checkpoint(path)
    return 0
