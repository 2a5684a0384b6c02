"""The `warp-ray` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

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
  soup     A rewarded soup: policies fine-tuned from one init, each against its own reward,
           served at a trade-off lambda on the simplex (lambdas >= 0, summing to 1), linearly
           or, with --init, by SLERP of their task vectors.
           warp-ray merge soup --models helpful/ concise/ --lambdas 0.7 0.3 --out soup/
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


def _print_measures(measures: dict) -> None:
    for key, value in measures.items():
        print(f"{key:24} {value:.4f}" if isinstance(value, float) else f"{key:24} {value}")


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every process's output (Ray, vLLM, DeepSpeed, the learners' progress bars); by default "
        "they go to log files (<output_dir>/logs/ray) and the console shows the stages and the learners' steps",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warp-ray", description="WARP and WARM on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser(
        "merge",
        help="merge model folders (slerp, average, liti, soup)",
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

    soup = methods.add_parser("soup", parents=[common], help="a rewarded soup: sum_k lambda_k theta_k")
    soup.add_argument("--models", type=Path, nargs="+", required=True, help="the policies, one per reward")
    soup.add_argument("--lambdas", type=float, nargs="+", required=True, help="one per policy, each >= 0, summing to 1")
    soup.add_argument("--init", type=Path, help="the policies' shared init: SLERP of their task vectors instead")

    config = commands.add_parser("config", help="validate a config and print it with every default filled in")
    _add_config_args(config)

    train_rm = commands.add_parser("train-rm", help="train M reward models on Ray Tune and merge them (WARM)")
    _add_config_args(train_rm)
    _add_verbose(train_rm)

    warp = commands.add_parser(
        "warp", help="run WARP: M learners per iteration, SLERP, LITI, I iterations (Algorithm 1)"
    )
    _add_config_args(warp)
    _add_verbose(warp)
    warp.add_argument(
        "--resume", action="store_true", help="continue after the last complete iteration in paths.output_dir"
    )

    soup = commands.add_parser(
        "soup",
        help="rewarded soups: a policy per reward, interpolated at any lambda, against multi-objective RL",
        description="Train one policy per reward of the config's `rewards` from the SFT, evaluate their weight "
        "interpolation at every lambda of soup.grid under every reward, against multi-objective RL runs on the "
        "weighted sum at soup.baseline_grid's lambdas, for each seed of soup.seeds; writes each seed's "
        "front to paths.output_dir/seed_<s>, and the verdict over the seeds to paths.output_dir (docs/soups.md).",
    )
    _add_config_args(soup)
    _add_verbose(soup)

    evaluate = commands.add_parser(
        "eval",
        help="policies on the held-out prompts: proxy reward, control reward, KL to the SFT, share cut",
        description="Sample the held-out prompts from each policy folder given (any iteration's model/, a front "
        "point made with `warp-ray merge`, your own checkpoint) as a run's evaluations do, and score the samples. "
        "The config gives the SFT, the prompts and the reward, as for `warp-ray warp`.",
    )
    _add_config_args(evaluate)
    _add_verbose(evaluate)
    evaluate.add_argument(
        "--model",
        type=Path,
        nargs="+",
        required=True,
        help="the policy, a Hugging Face model folder, or several: they share the reward servers, the SFT "
        "reference and, if they are one model but for its weights, one vLLM engine",
    )
    evaluate.add_argument("--out", type=Path, help="also write the measures to this JSON file, by model folder")
    compare = commands.add_parser(
        "compare",
        help="the win rate of policy A against policy B under a reward, with its 95%% interval",
        description="Sample each held-out prompt from A and from B with the same seed and count how often A's "
        "completion scores higher (ties: a half). The interval takes prompts as the unit.",
    )
    _add_config_args(compare)
    _add_verbose(compare)
    compare.add_argument("a", type=Path, help="policy A: a Hugging Face model folder")
    compare.add_argument("b", type=Path, help="policy B: a Hugging Face model folder")
    compare.add_argument(
        "--reward",
        choices=["proxy", "control"],
        default="proxy",
        help="the reward to compare under: the run's proxy reward, or the control reward (built-in task: gold)",
    )
    compare.add_argument("--out", type=Path, help="also write the result to this JSON file")

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
        elif args.method == "soup":
            folders.soup_folders(args.models, args.out, args.lambdas, init=args.init, overwrite=args.overwrite)
        else:
            folders.liti_folders(args.init, args.merged, args.out, eta=args.eta, overwrite=args.overwrite)
        print(f"wrote {args.out}")
        return

    from warp_ray.config_io import check_paths, load_config

    config = load_config(args.config, args.overrides)
    console = None if getattr(args, "verbose", True) else Console(highlight=False, soft_wrap=True)
    if console is not None:
        from warp_ray.progress import quiet_libraries

        quiet_libraries()
    if args.command == "config":
        check_paths(config.paths)
        print(config.to_yaml(), end="")
    elif args.command == "train-rm":
        from warp_ray.driver import run_warm
        from warp_ray.reward.warm import markdown

        print(markdown(run_warm(config, console)), end="")
        print(f"reward models, WARM and accuracy.json in {config.paths.output_dir / 'rm'}")
    elif args.command == "warp":
        from warp_ray.driver import run_warp

        last = run_warp(config, resume=args.resume, console=console)
        print((last / "report.md").read_text())
        logs = config.paths.output_dir / "logs"
        print(f"final policy: {last / 'model'}; LITI front: {last / 'front.png'}; logs: {logs}")
    elif args.command == "soup":
        from warp_ray.driver import run_soup

        run_soup(config, console)
        out = config.paths.output_dir
        print((out / "report.md").read_text())
        print(f"every seed's front, report and policies: {out}/seed_*; all seeds' fronts: {out / 'front.png'}")
    elif args.command in ("eval", "compare"):
        from warp_ray import driver

        if args.command == "eval":
            result = driver.run_eval(config, args.model, console)
            for model, measures in result.items():
                print(model)
                _print_measures(measures)
        else:
            reward = {"proxy": "reward", "control": "control_reward"}[args.reward]
            result = driver.run_compare(config, args.a, args.b, reward, console)
            _print_measures(result)
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=2))
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
