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


def _add_epsilon_command(sub) -> None:
    p = sub.add_parser(
        "epsilon",
        help="the ε a DP-SGD run spends",
        description="Upper bound on the ε of T Poisson-subsampled Gaussian steps at a given δ.",
    )
    p.add_argument("--noise-multiplier", type=float, required=True, metavar="Z")
    p.add_argument("--sample-rate", type=float, required=True, metavar="Q")
    p.add_argument("--steps", type=int, required=True, metavar="T")
    _add_common_accounting_options(p)
    p.set_defaults(run=_run_epsilon)


def _add_calibrate_command(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="the noise multiplier for a target ε",
        description="Smallest noise multiplier (within 0.2%) whose T steps stay within ε.",
    )
    p.add_argument("--epsilon", type=float, required=True, metavar="EPS", help="target ε")
    p.add_argument("--sample-rate", type=float, required=True, metavar="Q")
    p.add_argument("--steps", type=int, required=True, metavar="T")
    _add_common_accounting_options(p)
    p.set_defaults(run=_run_calibrate)


def _add_common_accounting_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delta", type=float, required=True)
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _run_epsilon(args: argparse.Namespace) -> int:
    from dp_attn.accounting import make_accountant

    try:
        acc = make_accountant(args.accountant)
        acc.step(
            noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate, count=args.steps
        )
        epsilon = acc.epsilon(args.delta)
    except ValueError as error:
        return _usage_error("epsilon", error)
    result = {
        "epsilon": epsilon,
        "delta": args.delta,
        "noise_multiplier": args.noise_multiplier,
        "sample_rate": args.sample_rate,
        "steps": args.steps,
        "accountant": args.accountant,
    }
    _report(
        result,
        args.json,
        f"ε = {epsilon:.4f} at δ = {args.delta:g}\n"
        f"({args.steps} steps, noise multiplier {args.noise_multiplier:g}, sample rate "
        f"{args.sample_rate:g}; {args.accountant} accountant, an upper bound)",
    )
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
        "and save a plot. Needs the demo extra: pip install \"dp-attn[demo]\".",
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
        run_demo(epsilon=args.epsilon, epochs=args.epochs, device=args.device, seed=args.seed,
                 plot=args.plot, quick=args.quick, baseline=not args.no_baseline)  # fmt: skip
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
