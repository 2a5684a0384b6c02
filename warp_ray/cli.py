"""The `warp-ray` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from warp_ray.errors import ConfigError, WarpRayError

MERGE_HELP = """\
Merge Hugging Face model folders (safetensors), streaming one tensor at a time, so that
memory stays near one tensor per model whatever the model size. The output folder gets the
first folder's config, tokenizer and shard layout, and loads with from_pretrained.
Every merge is computed in float32 and written in the first folder's dtype.

  slerp    WARP's merge: SLERP of the task vectors (model - init), per tensor.
           warp-ray merge slerp --init sft/ --models run1/ run2/ --out merged/
  average  WARM's merge (a model soup): the weighted average of whole weights.
           warp-ray merge average --models rm1/ rm2/ rm3/ rm4/ --out warm/
  liti     WARP's LITI: (1 - eta) * init + eta * merged, back towards the init.
           warp-ray merge liti --init sft/ --merged merged/ --eta 0.3 --out next_init/
"""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (see configs/); default: the paper's defaults")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set warp.beta=0.05 (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warp-ray", description="WARP and WARM on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser(
        "merge",
        help="merge model folders (slerp, average, liti)",
        description=MERGE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    methods = merge.add_subparsers(dest="method", required=True, metavar="METHOD")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--out", type=Path, required=True, help="output folder (written under a temporary name, then renamed)"
    )
    common.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    slerp = methods.add_parser("slerp", parents=[common], help="SLERP of task vectors relative to --init (WARP)")
    slerp.add_argument("--init", type=Path, required=True, help="the common initialization of the models")
    slerp.add_argument("--models", type=Path, nargs="+", required=True, help="the fine-tuned models (M >= 1)")
    slerp.add_argument(
        "--weights",
        type=float,
        nargs="+",
        help="one weight per model (default: uniform 1/M); for two models, 1-lam lam",
    )
    average = methods.add_parser("average", parents=[common], help="weighted average of whole weights (WARM)")
    average.add_argument("--models", type=Path, nargs="+", required=True, help="models fine-tuned from one start")
    average.add_argument("--weights", type=float, nargs="+", help="one weight per model (default: uniform)")
    liti = methods.add_parser("liti", parents=[common], help="(1 - eta) * init + eta * merged (WARP's LITI)")
    liti.add_argument("--init", type=Path, required=True, help="the initialization to interpolate towards")
    liti.add_argument("--merged", type=Path, required=True, help="the merged model, e.g. the output of merge slerp")
    liti.add_argument("--eta", type=float, required=True, help="in [0, 1]: 0 gives init, 1 gives merged")

    config = commands.add_parser("config", help="validate a config and print it with every default filled in")
    _add_config_args(config)

    train_rm = commands.add_parser("train-rm", help="train M reward models on Ray Tune and merge them (WARM)")
    _add_config_args(train_rm)

    warp = commands.add_parser(
        "warp", help="run WARP: M learners per iteration, SLERP, LITI, I iterations (Algorithm 1)"
    )
    _add_config_args(warp)
    warp.add_argument(
        "--resume", action="store_true", help="continue after the last complete iteration in paths.output_dir"
    )

    reproduce = commands.add_parser(
        "reproduce", help="measure the WARP and WARM papers' claims on the built-in task (docs/results.md)"
    )
    _add_config_args(reproduce)
    reproduce.add_argument(
        "--report", type=Path, help="folder for results.md and its figures (default: <paths.output_dir>/reproduce)"
    )
    reproduce.add_argument(
        "--report-only", action="store_true", help="redraw the report from the results.json of an earlier run"
    )
    reproduce.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="measure the first N seeds of reproduce.seeds only "
        "(--seeds 1: a quick look, whose noise lacks the seeds' spread)",
    )
    reproduce.add_argument(
        "--regime-only",
        action="store_true",
        help="measure only whether the built-in task is in the papers' regime (minutes), "
        "logged with the configurations tried",
    )

    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "merge":
        from warp_ray.merge import folders

        if args.method == "slerp":
            folders.slerp_folders(args.init, args.models, args.out, weights=args.weights, overwrite=args.overwrite)
        elif args.method == "average":
            folders.average_folders(args.models, args.out, weights=args.weights, overwrite=args.overwrite)
        else:
            folders.liti_folders(args.init, args.merged, args.out, eta=args.eta, overwrite=args.overwrite)
        print(f"wrote {args.out}")
        return

    from warp_ray.config_io import check_paths, load_config

    config = load_config(args.config, args.overrides)
    if args.command == "config":
        check_paths(config.paths)
        print(config.to_yaml(), end="")
    elif args.command == "train-rm":
        from warp_ray.driver import run_warm
        from warp_ray.reward.warm import markdown

        print(markdown(run_warm(config)), end="")
        print(f"reward models, WARM and accuracy.json in {config.paths.output_dir / 'rm'}")
    elif args.command == "warp":
        from warp_ray.driver import run_warp

        last = run_warp(config, resume=args.resume)
        print(f"final policy: {last / 'model'}; LITI front: {last / 'front.png'}")
    elif args.command == "reproduce" and args.seeds is not None and (args.regime_only or args.report_only):
        raise ConfigError(
            "--seeds chooses the seeds to measure: --regime-only measures the first one, --report-only "
            "measures none (it redraws the report of the last results)"
        )
    elif args.command == "reproduce" and args.regime_only:
        from warp_ray.reproduce import measure_regime

        table, log = measure_regime(config, args.report)
        print(table)
        print(f"logged with the configurations tried in {log}")
    else:
        from warp_ray.reproduce import reproduce

        report = reproduce(config, args.report, measure=not args.report_only, seeds=args.seeds)
        print(f"claims, figures and verdicts: {report}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except WarpRayError as e:
        # Raised in an actor, it comes back as Ray's RayTaskError too, whose text is the remote traceback.
        print(f"warp-ray: error: {getattr(e, 'cause', e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
