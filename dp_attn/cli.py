"""The `dp-attn` command. Subcommands import what they need lazily, so that the
accounting commands run without loading torch or triton."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dp-attn",
        description="Differentially private training of attention models: kernels and accounting.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each subcommand registers itself here: sub.add_parser(...).set_defaults(run=function).
    _add_epsilon_command(sub)
    _add_calibrate_command(sub)
    _add_demo_command(sub)
    _add_selfcheck_command(sub)
    return parser


# ---------------------------------------------------------------- accounting: epsilon, calibrate


def _steps(text: str) -> int:
    """--steps: an integer, also written as an integral float (1e4)."""
    from dp_attn.accounting.schedule import parse_count

    try:
        return parse_count(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_epsilon_command(sub) -> None:
    p = sub.add_parser(
        "epsilon",
        help="the ε a DP-SGD run spends",
        description="Upper bound on the ε of T Poisson-subsampled Gaussian steps at a given δ, "
        "or of a schedule of such runs read from a file.",
    )
    p.add_argument(
        "--noise-multiplier",
        type=float,
        metavar="Z",
        help="noise std / clipping norm, >= 0 (required without --schedule)",
    )
    p.add_argument(
        "--sample-rate",
        type=float,
        metavar="Q",
        help="Poisson sampling rate in (0, 1] (required without --schedule)",
    )
    p.add_argument(
        "--steps",
        type=_steps,
        metavar="T",
        help="number of steps, e.g. 10000 or 1e4 (required without --schedule)",
    )
    p.add_argument(
        "--schedule",
        metavar="FILE",
        help="CSV or JSON (.json) rows of noise_multiplier, sample_rate, steps, "
        "composed in order, instead of --noise-multiplier/--sample-rate/--steps "
        "(default: none)",
    )
    _add_common_accounting_options(p)
    p.set_defaults(run=_run_epsilon)


def _add_calibrate_command(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="the noise multiplier for a target ε",
        description="Smallest noise multiplier (within 0.2%) whose T steps stay within ε.",
    )
    p.add_argument(
        "--epsilon", type=float, required=True, metavar="EPS", help="target ε, > 0 (required)"
    )
    p.add_argument(
        "--sample-rate",
        type=float,
        required=True,
        metavar="Q",
        help="Poisson sampling rate in (0, 1] (required)",
    )
    p.add_argument(
        "--steps",
        type=_steps,
        required=True,
        metavar="T",
        help="number of steps, e.g. 10000 or 1e4 (required)",
    )
    _add_common_accounting_options(p)
    p.set_defaults(run=_run_calibrate)


def _add_common_accounting_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delta", type=float, required=True, help="target δ in (0, 1) (required)")
    p.add_argument(
        "--accountant",
        choices=("prv", "rdp"),
        default="prv",
        help="prv (tight) or rdp (a few %% looser) (default: %(default)s)",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (default: plain text)"
    )


# What a valid query can still run into: a bound that cannot be computed in float64.
_NUMERICAL_ERRORS = (ArithmeticError, FloatingPointError)


def _run_epsilon(args: argparse.Namespace) -> int:
    from dp_attn.accounting import Step, make_accountant, read_schedule

    single = (args.noise_multiplier, args.sample_rate, args.steps)
    try:
        if args.schedule is not None:
            if any(v is not None for v in single):
                raise ValueError("give --schedule or --noise-multiplier/--sample-rate/--steps")
            schedule = read_schedule(args.schedule)
        elif any(v is None for v in single):
            raise ValueError(
                "--noise-multiplier, --sample-rate and --steps are required (or --schedule FILE)"
            )
        else:
            schedule = (Step(*single),) if args.steps else ()
        acc = make_accountant(args.accountant)
        acc.compose(schedule)
        epsilon = acc.epsilon(args.delta)
    except (ValueError, OSError) as error:
        return _usage_error("epsilon", error)
    except _NUMERICAL_ERRORS as error:
        return _usage_error("epsilon", f"ε could not be computed for these values ({error})")
    steps = sum(s.count for s in schedule)
    result = {"epsilon": epsilon, "delta": args.delta}
    if args.schedule is None:
        result.update(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate)
        what = (
            f"{steps} steps, noise multiplier {args.noise_multiplier:g}, sample rate "
            f"{args.sample_rate:g}"
        )
    else:
        result.update(schedule=args.schedule, runs=len(schedule))
        what = f"{steps} steps in {len(schedule)} runs from {args.schedule}"
    result.update(steps=steps, accountant=args.accountant)
    text = (
        f"ε = {epsilon:.4f} at δ = {args.delta:g}\n"
        f"({what}; {args.accountant} accountant, an upper bound)"
    )
    if epsilon == float("inf") and any(s.noise_multiplier == 0 for s in schedule):
        text += (
            "\nε is infinite: a step with noise multiplier 0 adds no noise, so it "
            "releases its batch's gradient sum exactly"
        )
    _report(result, args.json, text)
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from dp_attn.accounting import calibrate_noise_multiplier, make_accountant

    try:
        z = calibrate_noise_multiplier(
            args.epsilon, args.delta, args.sample_rate, args.steps, accountant=args.accountant
        )
        acc = make_accountant(args.accountant)
        acc.step(noise_multiplier=z, sample_rate=args.sample_rate, count=args.steps)
        epsilon = acc.epsilon(args.delta)
    except ValueError as error:
        return _usage_error("calibrate", error)
    except _NUMERICAL_ERRORS as error:
        return _usage_error("calibrate", f"could not calibrate for these values ({error})")
    result = {
        "noise_multiplier": z,
        "epsilon": epsilon,
        "target_epsilon": args.epsilon,
        "delta": args.delta,
        "sample_rate": args.sample_rate,
        "steps": args.steps,
        "accountant": args.accountant,
    }
    _report(
        result,
        args.json,
        f"noise multiplier = {z:.4f}\n"
        f"(gives ε = {epsilon:.4f} <= {args.epsilon:g} at δ = {args.delta:g} over "
        f"{args.steps} steps at sample rate {args.sample_rate:g}; {args.accountant} accountant)",
    )
    return 0


def _report(result: dict, as_json: bool, text: str) -> None:
    if as_json:
        import json

        print(json.dumps(result))
    else:
        print(text)


def _usage_error(command: str, error: Exception) -> int:
    print(f"dp-attn {command}: error: {error}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------- demo


def _add_demo_command(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small vision transformer with DP on handwritten digits",
        description="Train a small vision transformer on scikit-learn's 8×8 handwritten digits "
        "with DP-SGD at (ε, 1e-5) and without privacy; print test accuracy and ε each epoch "
        "and save a plot. Needs scikit-learn, matplotlib and tqdm: "
        'pip install -e ".[demo]" in the dp_attn clone.',
    )
    p.add_argument("--epsilon", type=float, default=3.0, help="target ε (default 3)")
    p.add_argument("--epochs", type=int, default=None, help="default 40 (1 with --quick)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="data split, initialisation (default 0)")
    p.add_argument("--plot", default="dp_attn_demo.png", help="PNG path (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="a tiny run, for smoke tests")
    p.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    if not 0.0 < args.epsilon < float("inf"):
        return _usage_error("demo", f"--epsilon must be a finite number > 0, got {args.epsilon}")
    if args.epochs is not None and args.epochs < 1:
        return _usage_error("demo", f"--epochs must be >= 1, got {args.epochs}")
    from dp_attn.demo import resolve_device, run_demo

    try:
        resolve_device(args.device)
    except ValueError as error:
        return _usage_error("demo", f"--device: {error}")
    try:
        run_demo(
            epsilon=args.epsilon,
            epochs=args.epochs,
            device=args.device,
            seed=args.seed,
            plot=args.plot,
            quick=args.quick,
            baseline=not args.no_baseline,
        )
    except ImportError as error:  # an optional dependency (scikit-learn, tqdm, matplotlib)
        return _usage_error("demo", error)
    return 0


# ---------------------------------------------------------------- selfcheck


def _add_selfcheck_command(sub) -> None:
    p = sub.add_parser(
        "selfcheck",
        help="run the kernels on this machine against the float64 reference",
        description="Run flash attention and the DP linear-layer kernels on this machine against "
        "the plain-PyTorch reference in float64; print device, backend and max errors. Exit "
        "status 1 if any error is out of tolerance.",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object after the table")
    p.set_defaults(run=_run_selfcheck)


def _run_selfcheck(args: argparse.Namespace) -> int:
    import json

    from dp_attn.selfcheck import run_selfcheck

    try:
        report = run_selfcheck(args.device)
    except RuntimeError as error:  # e.g. --device cuda on a machine without CUDA
        return _usage_error("selfcheck", f"--device: {error}")
    if args.json:
        print(json.dumps(report))
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
