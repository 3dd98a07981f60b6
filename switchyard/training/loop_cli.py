"""``switchyard router calibrate`` and ``switchyard simulate``: argument handling, and clear
errors (exit 2, no traceback) for input they cannot use."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import yaml

EXIT_BAD_INPUT = 2


def _guarded(command: str, run: Callable[[], int]) -> int:
    from switchyard.extproc.router.bundle import BundleError

    try:
        return run()
    except (ValueError, BundleError, OSError, ImportError) as exc:
        # ValueError covers ReplayError, OutcomeError, PolicyError and CompileError
        print(f"switchyard {command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def cmd_calibrate(args: argparse.Namespace, stdout: IO[str]) -> int:
    """``switchyard router calibrate``."""

    def run() -> int:
        from switchyard.training import calibrate, outcomes, replay

        if args.target_quality is not None and not 0.0 < args.target_quality <= 1.0:
            raise replay.ReplayError(f"--target-quality {args.target_quality}: expected (0, 1]")
        if args.strong_share is not None and not 0.0 <= args.strong_share <= 1.0:
            raise replay.ReplayError(f"--strong-share {args.strong_share}: expected [0, 1]")
        if args.output_tokens < 0:
            raise replay.ReplayError(f"--output-tokens {args.output_tokens}: expected >= 0")
        outs = outcomes.load(args.outcomes)
        routing = replay.load_routing(args.file, bundle=args.bundle)
        cal = asyncio.run(
            calibrate.calibrate(
                routing,
                outs,
                policy_key=args.policy,
                target_quality=args.target_quality,
                strong_share=args.strong_share,
                output_tokens=args.output_tokens,
                source=", ".join(str(p) for p in args.outcomes),
            )
        )
        stdout.write(calibrate.report(cal))
        if args.write is not None and cal.chosen is not None:
            doc = replay.with_changes(routing.document(cal.policy), {"strategy": cal.chosen.knob})
            args.write.write_text(
                yaml.safe_dump(replay.policy_document(doc), sort_keys=False), encoding="utf-8"
            )
            stdout.write(f"calibrated policy written to {args.write}\n")
        return 0 if cal.chosen is not None else 1

    return _guarded("router calibrate", run)


def add_simulate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``switchyard simulate``'s arguments."""
    sim = sub.add_parser(
        "simulate",
        help="replay logged traffic through a candidate policy and compare with the one in force",
        description="Replays each logged request through the gateway's own parse, score and "
        "engine path for the candidate policy files and for the policy in force (--current, "
        "or else the decision the log recorded), and prints cost, expected quality, model "
        "shares and the requests that change model. Exit 2 on bad input.",
    )
    sim.add_argument("-f", "--file", action="append", required=True, help="candidate policy")
    sim.add_argument(
        "--log",
        type=Path,
        action="append",
        required=True,
        help="the gateway's request recording (a requests-*.jsonl directory or file), or an "
        "outcome file (its prompts)",
    )
    sim.add_argument(
        "--current", action="append", default=None, help="the policy in force (default: the log)"
    )
    sim.add_argument(
        "--outcomes", type=Path, nargs="+", default=None, metavar="FILE", help="realized scores"
    )
    sim.add_argument(
        "--alias",
        default=None,
        help="model field for outcome-file prompts (default: the policies' only alias)",
    )
    sim.add_argument("--output-tokens", type=int, default=256, help="completion tokens assumed")
    sim.add_argument("--show", type=int, default=50, help="changes listed (0: all)")


def cmd_simulate(args: argparse.Namespace, stdout: IO[str]) -> int:
    """``switchyard simulate``."""

    def run() -> int:
        from switchyard.training import outcomes, replay, simulate, traffic

        if args.output_tokens < 0:
            raise replay.ReplayError(f"--output-tokens {args.output_tokens}: expected >= 0")
        candidate = replay.load_routing(args.file)
        current = replay.load_routing(args.current) if args.current else None
        aliases = list(candidate.config.policies_by_alias)
        alias = args.alias or (aliases[0] if len(aliases) == 1 else None)
        lines = traffic.read_traffic(args.log, alias)
        if not lines.lines:
            raise replay.ReplayError(
                f"{', '.join(map(str, args.log))}: no request to replay"
                + (f" ({lines.without_body} recorded without a body)" if lines.without_body else "")
            )
        if current is None and not lines.recorded:
            raise replay.ReplayError(
                "the traffic has no recorded decisions (outcome records): give the policy in "
                "force with --current FILE"
            )
        outs = outcomes.load(args.outcomes) if args.outcomes else None
        sim = asyncio.run(simulate.simulate(candidate, lines, current, outs, args.output_tokens))
        stdout.write(simulate.report(sim, args.show))
        return 0

    return _guarded("simulate", run)
