"""``rcps-nnunet``: RCPS semi-supervised training inside nnU-Net v2 (docs/nnunet.md).

    rcps-nnunet preprocess-unlabeled DATASET [-c CONFIG ...] [-p PLANS] [-np N]
    rcps-nnunet train DATASET CONFIG FOLD [--rcps KEY=VALUE ...] [nnUNetv2_train flags]
    rcps-nnunet predict [nnUNetv2_predict flags]
    rcps-nnunet trainer-path

``train`` and ``predict`` put the trainer folder into ``nnUNet_extTrainer`` and call nnU-Net's own entry points
(with ``-tr nnUNetTrainerRCPS`` unless another ``-tr`` is given); ``trainer-path`` prints that folder for users who
call ``nnUNetv2_*`` themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .environment import (
    TRAINER_FOLDER,
    NnUNetSetupError,
    check_nnunet_version,
    export_trainer_folder,
    require_folders,
)
from .settings import SETTINGS_VARIABLE, cli_overrides, overrides_from_environment

TRAINER_NAME = "nnUNetTrainerRCPS"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcps-nnunet", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    unlabeled = commands.add_parser(
        "preprocess-unlabeled", help="preprocess $nnUNet_raw/<dataset>/imagesUnlabeled with the dataset's plans"
    )
    unlabeled.add_argument("dataset", help="dataset name (DatasetXXX_Name) or ID")
    unlabeled.add_argument(
        "-c",
        nargs="+",
        default=None,
        metavar="CONFIG",
        help="configurations (default: every non-cascade one whose labeled cases are preprocessed)",
    )
    unlabeled.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="plans identifier (default nnUNetPlans)")
    unlabeled.add_argument("-np", type=int, default=1, metavar="N", help="worker processes (default 1)")

    train = commands.add_parser("train", help="nnUNetv2_train with -tr nnUNetTrainerRCPS")
    train.add_argument("dataset", help="dataset name or ID")
    train.add_argument("configuration", help="e.g. 3d_fullres or 2d")
    train.add_argument("fold", help="0-4 or all")
    train.add_argument(
        "--rcps",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"an RCPS setting (repeatable; stored in {SETTINGS_VARIABLE}), e.g. --rcps alpha=0.2",
    )

    commands.add_parser("predict", help="nnUNetv2_predict that finds nnUNetTrainerRCPS (same flags)")
    commands.add_parser("trainer-path", help="print the folder to put into nnUNet_extTrainer")
    return parser


def _with_trainer(flags: list[str]) -> list[str]:
    """nnU-Net's flags with ``-tr nnUNetTrainerRCPS`` unless they name a trainer."""
    return flags if "-tr" in flags else [*flags, "-tr", TRAINER_NAME]


def _preprocess_unlabeled(args) -> None:
    from .unlabeled import preprocess_unlabeled, preprocessed_configurations

    configurations = args.c or preprocessed_configurations(args.dataset, args.p)
    preprocess_unlabeled(args.dataset, configurations, args.p, args.np)


def _train(args, nnunet_flags: list[str]) -> None:
    check_nnunet_version()
    if args.rcps:
        os.environ[SETTINGS_VARIABLE] = json.dumps({**overrides_from_environment(), **cli_overrides(args.rcps)})
    else:
        overrides_from_environment()  # a malformed variable fails here, not in every DDP worker
    require_folders("nnUNet_preprocessed", "nnUNet_results")
    export_trainer_folder()
    from nnunetv2.run.run_training import run_training_entry

    sys.argv = ["nnUNetv2_train", args.dataset, args.configuration, args.fold, *_with_trainer(nnunet_flags)]
    run_training_entry()


def _predict(nnunet_flags: list[str]) -> None:
    check_nnunet_version()
    require_folders("nnUNet_results")
    export_trainer_folder()
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    sys.argv = ["nnUNetv2_predict", *_with_trainer(nnunet_flags)]
    predict_entry_point()


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; setup problems print one line and return 2.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = _parser().parse_known_args(argv)
    if rest and args.command not in ("train", "predict"):
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    saved_argv = sys.argv
    try:
        if args.command == "preprocess-unlabeled":
            _preprocess_unlabeled(args)
        elif args.command == "train":
            _train(args, rest)
        elif args.command == "predict":
            _predict(rest)
        else:
            print(Path(TRAINER_FOLDER))
    except (NnUNetSetupError, ValueError) as err:
        print(f"rcps-nnunet: error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    return 0
