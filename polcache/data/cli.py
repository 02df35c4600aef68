"""`polcache data`: convert datasets between polcache's zarr store and LeRobotDataset v3.0."""

from __future__ import annotations

import argparse

from polcache.cli_types import add_progress_option, counted, h264_crf, image_height_width, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data", help="convert datasets to and from LeRobotDataset v3.0",
        description="Convert between polcache datasets (zarr) and LeRobotDataset v3.0 roots. Training can also "
                    "read a LeRobot root directly (dataset=ROOT); it is imported once, at full image size, into "
                    "ROOT/.polcache.")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    imp = sub.add_parser("import-lerobot", help="LeRobotDataset v3.0 root -> polcache dataset",
                         description="Read a LeRobotDataset v3.0 root (meta/info.json, parquet data, mp4 videos) and "
                                     "write it as a polcache dataset, one episode at a time (memory: about one "
                                     "episode, not the dataset). Images keep their size unless --image-size is "
                                     "given. With --instructions, each frame's task string also becomes its "
                                     "'instruction' observation.")
    imp.add_argument("root", help="LeRobot dataset root (the directory holding meta/info.json)")
    imp.add_argument("--out", required=True, help="polcache dataset (zarr directory) to write")
    imp.add_argument("--instructions", type=positive_int, nargs="?", const=64, default=0, metavar="BYTES",
                     help="also write each frame's task string as the 'instruction' observation of BYTES UTF-8 bytes "
                          "(default 64), as `polcache record --instructions` does, for language-conditioned policies; "
                          "a task that does not fit is refused")
    imp.add_argument("--image-size", type=image_height_width, metavar="HxW",
                     help="resize every camera to exactly HxW pixels as it is decoded (e.g. 96x96 or 96, or 240x320 for "
                          "480x640 cameras), with area averaging; a different aspect ratio stretches the image, "
                          "nothing is cropped or padded (as lerobot's and diffusion_policy's resize do); the "
                          "dataset's image_resize attr records the size and each camera's source size")
    add_progress_option(imp)
    imp.set_defaults(handler=_import)

    exp = sub.add_parser("export-lerobot", help="polcache dataset -> LeRobotDataset v3.0 root",
                         description="Write a polcache dataset as a LeRobotDataset v3.0 root; camera images become "
                                     "one H.264 mp4 per camera, and an 'instruction' observation (polcache record "
                                     "--instructions) each frame's task string. The output appears only once complete.")
    exp.add_argument("dataset", help="polcache dataset (zarr directory)")
    exp.add_argument("--out", required=True, help="LeRobot root to write (replaced only if it is a LeRobot root)")
    exp.add_argument("--fps", type=positive_int,
                     help="frame rate of a dataset without an fps attr (default 10); another than the attr is refused")
    exp.add_argument("--crf", type=h264_crf, default=10, metavar="0..51",
                     help="H.264 quality, lower is closer to the source (default 10)")
    add_progress_option(exp)
    exp.set_defaults(handler=_export)


def _import(args: argparse.Namespace) -> int:
    from polcache.data.lerobot import import_lerobot
    from polcache.data.store import check_dataset_output

    check_dataset_output(args.out, "--out", inputs=[args.root], demonstrations=True)
    r = import_lerobot(args.root, args.out, progress=not args.no_progress, instruction_bytes=args.instructions,
                       image_size=args.image_size)
    print(f"wrote {r.path}: {counted(r.episodes, 'episode')}, {counted(r.frames, 'frame')} at {r.fps} fps, obs "
          f"{', '.join(r.obs_keys)}")
    for skipped in r.skipped:
        print(f"  skipped {skipped}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from polcache.data.lerobot_export import check_lerobot_output, export_lerobot

    check_lerobot_output(args.out, "--out")
    r = export_lerobot(args.dataset, args.out, fps=args.fps, crf=args.crf, progress=not args.no_progress)
    videos = f", videos ({r.codec}) {', '.join(r.video_keys)}" if r.video_keys else ""
    print(f"wrote {r.path}: LeRobotDataset v3.0, {counted(r.episodes, 'episode')}, {counted(r.frames, 'frame')} at "
          f"{r.fps} fps{videos}")
    return 0

