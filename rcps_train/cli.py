"""``rcps-train``: train, eval, compare, make-synthetic and demo.

    rcps-train train --config FILE.toml [--set key=value ...] [--resume]
    rcps-train eval --checkpoint FILE [--protocol rcps|ssl-la|ssl-pancreas] [--data ROOT] [--out DIR]
    rcps-train compare --config FILE --methods rcps supervised --seeds 0 1 2 [--set key=value ...] [--out DIR]
    rcps-train make-synthetic --out DIR [--layout nifti|nnunet|h5] [--train N] [--val N] [--unlabeled N]
                              [--channels N] [--shape D H W] [--seed S]
    rcps-train demo [--out DIR]
    rcps-train config-reference   (the Markdown reference of every config key: docs/config.md)
    rcps-train prepare --input RAW_ROOT --out PREPARED_ROOT [--format nifti|nnunet] [--modality ct|mri|auto]
                       [--spacing auto|X Y Z] [--recipe la2018|pancreas-nih] [--unlabeled DIR] [--workers N]
    rcps-train predict --checkpoint CKPT [CKPT ...] --input FILE_OR_DIR [...] --out DIR [--protocol NAME] [--tta]
                       [--probabilities] [--skip-existing] [--device auto|cpu|cuda]

``--config`` also takes a shipped config by name: demo, la, pancreas, synthetic.
Distributed: ``torchrun --nproc_per_node N -m rcps_train train --config ...``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import ConfigError, config_reference, load_config, shipped_configs
from .knobs import EVAL_PROTOCOLS, LARGEST_COMPONENT_CHOICES
from .layouts import DataError
from .synthetic import LAYOUTS, UNLABELED_FOLDERS


def _train(args) -> None:
    from .engine import train

    train(load_config(args.config, args.set), resume=args.resume, overwrite=args.overwrite)


def _eval(args) -> None:
    from .rescore import rescore

    out = rescore(args.checkpoint, args.protocol, args.largest_component, args.data, args.split, args.out)
    print(f"metrics written to {out / 'metrics.json'}")


def _compare(args) -> None:
    from .compare import run_comparison

    out = run_comparison(args.config, args.methods, args.seeds, args.set, args.out)
    print(f"comparison written to {out}")


def _make_synthetic(args) -> None:
    from .synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(
        args.out,
        args.train,
        args.val,
        tuple(args.shape),
        args.seed,
        args.layout,
        args.channels,
        args.unlabeled,
        args.overwrite,
    )
    print(
        f"synthetic dataset written to {root} ({args.layout} layout, {args.channels} channel(s), {args.train} train, "
        f"{args.val} test cases"
        + (f", {args.unlabeled} unlabeled images in {UNLABELED_FOLDERS[args.layout]}/)" if args.unlabeled else ")")
    )


def _demo(args) -> None:
    from .engine import train
    from .synthetic import make_synthetic_dataset

    start = time.perf_counter()
    out = Path(args.out)
    data_root = out / "synthetic_data"
    if not data_root.is_dir():
        print(f"[1/3] writing a small synthetic dataset to {data_root}")
        # Written beside, then renamed: a killed demo leaves a partial folder, which the next one replaces.
        partial = out / "synthetic_data.partial"
        make_synthetic_dataset(partial, num_train=12, num_val=4, shape=(48, 48, 40), seed=0, overwrite=True)
        partial.rename(data_root)
    config = load_config("demo", args.set)
    # Paths are set directly rather than through --set strings, so no quoting rules apply to them.
    config["data"]["root"], config["run"]["out_dir"] = str(data_root), str(out)
    config["run"]["name"] = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(
        f"[2/3] training RCPS ({config['train']['epochs']} epochs, backend={config['loss']['backend']}) "
        f"-> {Path(config['run']['out_dir']) / config['run']['name']}"
    )
    print("[3/3] then evaluating on the test cases (sliding window, Dice/HD95/ASD):")
    train(config)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


def _prepare(args) -> None:
    from .prepare import PREPROCESSING_FILE, run_prepare

    spacing = "auto" if args.spacing == ["auto"] else args.spacing
    if spacing != "auto":
        try:
            spacing = [float(v) for v in spacing]
        except ValueError:
            raise DataError(f"--spacing must be 'auto' or 3 numbers (mm), got {' '.join(args.spacing)}") from None
    payload = run_prepare(
        args.input,
        args.out,
        args.format,
        args.modality,
        spacing,
        args.recipe,
        args.unlabeled,
        args.split_csv,
        args.workers,
    )
    plan = payload["plan"]
    print(
        f"prepared {len(payload['cases'])} cases into {args.out} (target spacing {plan['target_spacing']}: "
        f"{plan['spacing_rule']}; channels {[c.get('modality', c['scheme']) for c in plan['channels']]}); "
        f"the plan is in {Path(args.out) / PREPROCESSING_FILE}"
    )


def _predict(args) -> None:
    from .predict import run_predict

    summary = run_predict(
        args.checkpoint,
        args.input,
        args.out,
        args.protocol,
        args.tta,
        args.probabilities,
        args.skip_existing,
        args.device,
    )
    print(f"predict: {len(summary['written'])} written, {len(summary['skipped'])} skipped (already in {args.out})")
    if summary["failed"]:
        lines = "\n".join(f"  {name}: {message}" for name, message in summary["failed"].items())
        raise DataError(f"{len(summary['failed'])} cases failed:\n{lines}")


def _add_prepare_parser(commands) -> None:
    p = commands.add_parser("prepare", help="fingerprint, resample, normalise and crop a raw dataset")
    p.add_argument("--input", required=True, help="the raw dataset root (or a recipe's source folder)")
    p.add_argument("--out", required=True, help="the prepared root (a re-run keeps its finished cases)")
    p.add_argument("--format", default="nifti", choices=["nifti", "nnunet"], help="layout of input and output")
    p.add_argument("--modality", default="auto", choices=["ct", "mri", "auto"], help="normalisation per channel")
    p.add_argument(
        "--spacing", nargs="+", default=["auto"], metavar="auto|X Y Z", help="target spacing in mm (default: auto)"
    )
    p.add_argument("--recipe", choices=["la2018", "pancreas-nih"], help="the official RCPS preparation")
    p.add_argument("--unlabeled", help="a folder of images without labels to prepare too")
    p.add_argument("--split-csv", help="recipes: CSV with columns filename,split (the official data/*.csv)")
    p.add_argument("--workers", type=int, default=1, help="processes (default: 1)")
    p.set_defaults(func=_prepare)


def _add_predict_parser(commands) -> None:
    p = commands.add_parser("predict", help="segment raw scans with one or more checkpoints (an ensemble)")
    p.add_argument("--checkpoint", required=True, nargs="+", help="checkpoint.pt / best.pt files")
    p.add_argument("--input", required=True, nargs="+", help="scan files or folders (NIfTI, NRRD, MHA, ...)")
    p.add_argument("--out", required=True, help="folder for <case>.nii.gz")
    p.add_argument("--protocol", choices=EVAL_PROTOCOLS, help="sliding-window preset (default: the run's)")
    p.add_argument("--tta", action="store_true", help="also average over the 8 axis flips")
    p.add_argument("--probabilities", action="store_true", help="also write <case>_probabilities.nii.gz (float32, 4D)")
    p.add_argument("--skip-existing", action="store_true", help="keep cases whose output exists")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rcps-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train a model from a TOML config")
    p.add_argument("--config", required=True, help=f"a TOML file or a shipped config ({', '.join(shipped_configs())})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", action="store_true", help="continue the run folder's checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results and weights of an earlier run in the run folder (refused without it)",
    )
    p.set_defaults(func=_train)
    p = commands.add_parser("eval", help="re-score a checkpoint under an evaluation protocol (Dice/Jaccard/HD95/ASD)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument(
        "--protocol", choices=EVAL_PROTOCOLS, help="evaluation preset (default: the checkpoint's eval.protocol)"
    )
    p.add_argument(
        "--largest-component",
        choices=LARGEST_COMPONENT_CHOICES,
        help="keep only the largest connected component per class (default: the checkpoint's setting)",
    )
    p.add_argument("--data", help="dataset root (default: the one in the checkpoint's config)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument(
        "--out",
        help="folder for metrics.csv/json (default: eval-<checkpoint>-<protocol>-<split>-lcc-<on|off>-<data> next to "
        "the checkpoint; one folder per scoring, never the run's own metrics)",
    )
    p.set_defaults(func=_eval)
    p = commands.add_parser("compare", help="train several methods x seeds, then a table (mean +- std) and a plot")
    p.add_argument("--config", required=True, help="a TOML file or a shipped config, as for train")
    p.add_argument("--methods", nargs="+", default=["rcps", "supervised"], help="values of train.method")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (all runs)")
    p.add_argument("--out", default="runs/compare", help="folder for the runs, the table and the plot")
    p.set_defaults(func=_compare)
    p = commands.add_parser("make-synthetic", help="write a synthetic dataset (official NIfTI, nnU-Net raw or h5)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--layout", default="nifti", choices=LAYOUTS, help="data.format the dataset is written for (default: nifti)"
    )
    p.add_argument("--train", type=int, default=40)
    p.add_argument("--val", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 48], metavar=("D", "H", "W"))
    p.add_argument(
        "--unlabeled", type=int, default=0, help="images without labels, for data.unlabeled_dir (default: 0)"
    )
    p.add_argument("--channels", type=int, default=1, help="image channels (default: 1)")
    p.add_argument("--overwrite", action="store_true", help="clear a non-empty --out first (refused without it)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_synthetic)
    p = commands.add_parser("demo", help="synthetic data + a short RCPS run + evaluation (a few minutes on CPU)")
    p.add_argument("--out", default="runs", help="folder for the data and the run (default: runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a demo config key")
    p.set_defaults(func=_demo)
    _add_prepare_parser(commands)
    _add_predict_parser(commands)
    p = commands.add_parser("config-reference", help="print the Markdown reference of every config key")
    p.set_defaults(func=lambda args: print(config_reference(), end=""))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError) as err:
        print(f"rcps-train: error: {err}", file=sys.stderr)
        return 2
    return 0
