"""python -m ssamba.prepare <dataset> --src <official download> --dst <folder> [options]

Writes AST-style manifests, class_labels_indices.csv and stats.json (fbank norm_mean / norm_std; one per
fold for ESC-50 and IEMOCAP, from that fold's training clips) under --dst and prints a JSON report: items and hours per manifest, clips skipped by reason
(missing, unreadable, empty), files written. Running it again rewrites nothing that is unchanged.
A download that is incomplete or in another layout stops with one line naming what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys

from ssamba.prepare import audioset, esc50, iemocap, librispeech, speechcommands, voxceleb1
from ssamba.prepare.common import LayoutError, Preparation

DATASETS = {
    "audioset": audioset,
    "librispeech": librispeech,
    "esc50": esc50,
    "speechcommands": speechcommands,
    "voxceleb1": voxceleb1,
    "iemocap": iemocap,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ssamba.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="dataset", required=True, metavar="dataset")
    for name, module in DATASETS.items():
        command = commands.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("--src", required=True, help="the official download, unpacked")
        command.add_argument("--dst", required=True, help="folder for manifests, label csv and stats.json")
        command.add_argument("--no-stats", dest="stats", action="store_false",
                             help="skip the normalisation stats (the slow part)")
        command.add_argument("--stats-items", type=int, default=2000,
                             help="training clips sampled for the stats (default 2000)")
        command.add_argument("--target-length", type=int, default=module.TARGET_LENGTH,
                             help=f"frames each clip is padded/cut to for the stats (default {module.TARGET_LENGTH})")
        command.add_argument("--threads", type=int, default=16, help="threads reading audio headers")
        if hasattr(module, "add_arguments"):
            module.add_arguments(command)
    return parser


def run(args: argparse.Namespace) -> dict:
    """Prepare one dataset as ``args`` say; returns the report."""
    prep = Preparation(args.dataset, args.src, args.dst, args.threads)
    training = DATASETS[args.dataset].prepare(prep, args)
    if args.stats:
        for manifest, label_csv in training:
            if not prep.manifests[manifest]["items"]:
                raise LayoutError(f"{manifest} has no usable clips to take stats from")
        for manifest, label_csv in training:
            prep.write_stats(manifest, label_csv, args.target_length, args.stats_items)
    return prep.report()


def prepare(argv: list[str]) -> dict:
    return run(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except LayoutError as error:
        sys.exit(f"ssamba.prepare {args.dataset}: {error}")
    except OSError as error:  # e.g. --dst not writable, or under a file, or the disk full
        sys.exit(f"ssamba.prepare {args.dataset}: {error.strerror or error}: {error.filename or args.dst}")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
