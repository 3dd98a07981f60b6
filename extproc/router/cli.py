"""``switchyard router score|eval|fit``: score prompts with a bundle; evaluate it on the dev
split; fit a bundle that predicts each model's expected score from outcome records."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

DEFAULT_BUNDLE = "builtin:default"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchyard router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser(
        "score", help='JSON lines {"id","prompt"|"messages"} on stdin -> scores on stdout'
    )
    score.add_argument("--bundle", default=DEFAULT_BUNDLE)
    score.add_argument("--providers", default=None, help="comma list, e.g. cuda,cpu")
    score.add_argument("--batch", type=int, default=64)
    ev = sub.add_parser("eval", help="cost/quality curves and APGR on the dev split")
    ev.add_argument("--bundle", default=DEFAULT_BUNDLE)
    ev.add_argument("--providers", default=None)
    ev.add_argument("--plot", type=Path, default=None, help="write a PNG of the curves")
    ev.add_argument("--limit", type=int, default=0, help="at most N dev prompts per data set")
    ev.add_argument("--data", type=Path, default=None, help="data/routing folder")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    fit = sub.add_parser(
        "fit",
        help="fit a bundle predicting each model's expected score from outcome records",
        description="Outcome records (JSON lines): "
        '{"id", "prompt" | "messages", "model", "score" in [0, 1]} plus optional cost_usd, '
        "latency_ms, ts. See docs/router-model.md.",
    )
    fit.add_argument(
        "--outcomes",
        type=Path,
        nargs="+",
        required=True,
        metavar="FILE|DIR",
        help="outcome files (JSONL), or recording directories (the ext_proc's --outcomes-dir)",
    )
    fit.add_argument("--out", type=Path, required=True, metavar="DIR")
    fit.add_argument("--models", default=None, help="comma list (default: every model present)")
    fit.add_argument("--name", default="fitted", help="bundle name (router.yaml)")
    fit.add_argument("--base", default="builtin:default", help="static bundle giving features")
    fit.add_argument("--vocab", type=int, default=2048, help="token-bag size (0: none)")
    fit.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    fit.add_argument(
        "--force", action="store_true", help="write the bundle even if it loses to length"
    )
    fit.add_argument(
        "--min-outcomes",
        type=int,
        default=0,
        metavar="N",
        help="fewer outcomes than N: too few, nothing fitted (the refit Job's minOutcomes)",
    )
    fit.add_argument(
        "--summary",
        type=Path,
        default=None,
        metavar="FILE",
        help="write a JSON report of the run there, whatever its result (the refit Job's "
        "termination message)",
    )
    fit.add_argument(
        "--keep",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="once --out is written, delete the other bundle directories next to it but these "
        "(repeatable; the refit Job's rollback history)",
    )
    cal = sub.add_parser(
        "calibrate",
        help="the policy knob that meets a quality or strong-model-share target on outcomes",
        description="Sweeps the policy's knob (predictive: maxQualityLoss or costWeight; "
        "classifier: the tiers' maxDifficulty) on the prompts that have an outcome for every "
        "model of the policy, through the gateway's own compiler, scorer and engine, and prints "
        "the expected cost and quality at each value and a YAML snippet. Exit 2 on bad input.",
    )
    cal.add_argument("--outcomes", type=Path, nargs="+", required=True, metavar="FILE")
    cal.add_argument("-f", "--file", action="append", required=True, help="policy file or folder")
    cal.add_argument("--bundle", default=None, help="router bundle to use instead of the policy's")
    cal.add_argument("--policy", default=None, help="namespace/name when the files hold several")
    target = cal.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--target-quality",
        type=float,
        default=None,
        help="share of the best single model's mean score to keep (e.g. 0.95); picks the "
        "cheapest value that keeps it",
    )
    target.add_argument(
        "--strong-share",
        type=float,
        default=None,
        help="most share of requests on the most expensive model (e.g. 0.3); picks the best "
        "quality within it",
    )
    cal.add_argument(
        "--output-tokens",
        type=int,
        default=256,
        help="completion tokens assumed per request for cost (default 256; max_tokens caps it)",
    )
    cal.add_argument("--write", type=Path, default=None, help="write the calibrated policy here")
    return parser


def _providers(value: str | None) -> list[str] | None:
    return [p.strip() for p in value.split(",") if p.strip()] if value else None


def _read_prompts(stream: IO[str]) -> list[tuple[Any, str]]:
    """``{"id", "prompt" | "messages", ...}`` lines (outcome records are accepted as they are)."""
    from switchyard.training.outcomes import parse_record

    rows: list[tuple[Any, str]] = []
    for lineno, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"line {lineno}: not valid JSON ({exc})") from exc
        rec = parse_record(doc, f"line {lineno}", need_model=False)
        rows.append((rec.id, rec.text))
    return rows


def cmd_score(args: argparse.Namespace, stdin: IO[str], stdout: IO[str]) -> int:
    from switchyard.extproc.router.bundle import load_bundle
    from switchyard.extproc.router.runtime import OnnxRouter

    rows = _read_prompts(stdin)
    router = OnnxRouter(
        load_bundle(args.bundle), providers=_providers(args.providers), max_batch=args.batch
    )
    try:
        scores = router.score_batch([p for _, p in rows])
    finally:
        router.close()
    for (rid, _), s in zip(rows, scores, strict=True):
        if s.predicted is not None:  # a fitted bundle: expected score per model
            fitted = {
                "id": rid,
                "predicted": {k: round(v, 6) for k, v in s.predicted.items()},
                "difficulty": round(s.difficulty, 6),
            }
            stdout.write(orjson.dumps(fitted).decode() + "\n")
            continue
        out = {
            "id": rid,
            "difficulty": round(s.difficulty, 6),
            "category": s.category,
            "categories": {k: round(v, 6) for k, v in s.categories.items()},
        }
        stdout.write(orjson.dumps(out).decode() + "\n")
    return 0


def evaluate_bundle(
    bundle: str,
    providers: list[str] | None = None,
    limit: int = 0,
    data_root: Path | None = None,
) -> dict[str, Any]:
    """APGR, strong calls for 95% quality and cost saving per evaluation pair on the dev split."""
    from switchyard.extproc.router import metrics
    from switchyard.extproc.router.bundle import load_bundle
    from switchyard.extproc.router.runtime import OnnxRouter
    from switchyard.training import data

    examples = [e for e in data.load_all(data_root) if e.split == "dev"]
    if limit:
        per: dict[str, int] = {}
        kept = []
        for e in examples:
            if per.get(e.source, 0) < limit:
                per[e.source] = per.get(e.source, 0) + 1
                kept.append(e)
        examples = kept
    router = OnnxRouter(load_bundle(bundle), providers=providers)
    try:
        diff = np.array([s.difficulty for s in router.score_batch([e.text for e in examples])])
    finally:
        router.close()
    length = np.array([len(e.text) for e in examples], dtype=np.float64)
    report: dict[str, Any] = {"bundle": bundle, "n_prompts": len(examples), "pairs": {}}
    for source, pairs in data.EVAL_PAIRS.items():
        for weak, strong in pairs:
            idx = [
                i
                for i, e in enumerate(examples)
                if e.source == source and (weak, strong) in e.outcomes
            ]
            if len(idx) < 2:
                continue
            o = np.array([examples[i].outcomes[(weak, strong)] for i in idx])
            ratio = data.price(weak) / data.price(strong)
            entry: dict[str, Any] = {
                "n": len(idx),
                "quality_weak": float(o[:, 0].mean()),
                "quality_strong": float(o[:, 1].mean()),
                "price_ratio": round(ratio, 4),
            }
            for name, score in (
                ("router", diff[idx]),
                ("length", length[idx]),
                ("random", np.zeros(len(idx))),
            ):
                r = metrics.evaluate(score, o[:, 0], o[:, 1], cost_ratio=ratio)
                entry[name] = {
                    "apgr": round(r.apgr, 4),
                    "strong_calls_at_95": round(r.calls_at_95, 4),
                    "cost_saving_at_95": round(r.saving_at_95, 4),
                    "curve": {"calls": r.curve.calls.tolist(), "quality": r.curve.quality.tolist()},
                }
            report["pairs"][f"{source}: {weak} -> {strong}"] = entry
    return report


def _print_report(report: dict[str, Any], out: IO[str]) -> None:
    out.write(f"bundle {report['bundle']}: {report['n_prompts']} dev prompts\n")
    head = (
        f"{'pair':78} {'router':>7} {'length':>7} {'random':>7}  {'calls@95':>8} {'saving@95':>9}\n"
    )
    out.write(head)
    for key, e in report["pairs"].items():
        r, ln, rnd = e["router"], e["length"], e["random"]
        out.write(
            f"{key[:78]:78} {r['apgr']:7.3f} {ln['apgr']:7.3f} {rnd['apgr']:7.3f}  "
            f"{r['strong_calls_at_95']:8.2f} {r['cost_saving_at_95']:9.2f}\n"
        )


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib  # optional: pip install -r requirements-train.txt

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(report["pairs"].items())
    cols = min(3, len(pairs))
    rows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, (key, e) in zip(axes.ravel(), pairs, strict=False):
        for name in ("router", "length", "random"):
            c = e[name]["curve"]
            ax.plot(c["calls"], c["quality"], label=f"{name} (APGR {e[name]['apgr']:.3f})")
        ax.axhline(0.95 * e["quality_strong"], color="grey", ls=":", lw=1)
        ax.set_title(key if len(key) < 60 else key[:57] + "...", fontsize=8)
        ax.set_xlabel("share of strong-model calls")
        ax.set_ylabel("quality")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(pairs) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_eval(args: argparse.Namespace, stdout: IO[str]) -> int:
    report = evaluate_bundle(args.bundle, _providers(args.providers), args.limit, args.data)
    if args.json:
        slim = {k: v for k, v in report.items() if k != "pairs"}
        slim["pairs"] = {
            k: {
                n: ({m: x for m, x in v.items() if m != "curve"} if isinstance(v, dict) else v)
                for n, v in e.items()
            }
            for k, e in report["pairs"].items()
        }
        stdout.write(orjson.dumps(slim, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_report(report, stdout)
    if args.plot is not None:
        _plot(report, args.plot)
    return 0


def cmd_fit(args: argparse.Namespace, stdout: IO[str], report: dict[str, Any]) -> int:
    from switchyard.training import fit, outcomes

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    outs = outcomes.load(args.outcomes, models)
    stdout.write(
        f"{outs.n_records} records: {len(outs.texts)} prompts, {outs.n_outcomes} outcomes, "
        f"models {', '.join(outs.models)}\n"
    )
    report.update(outcomes=outs.n_outcomes, prompts=len(outs.texts), models=outs.models[:32])
    if outs.n_outcomes < args.min_outcomes:
        raise fit.TooFewOutcomes(
            f"{outs.n_outcomes} outcomes, fewer than the {args.min_outcomes} asked for "
            "(--min-outcomes); nothing fitted"
        )
    featurizer = fit.Featurizer(args.base)
    res = fit.fit(outs, featurizer, max_vocab=args.vocab, folds=args.folds)
    cvm, hm = res.cv_figures["mean"], res.figures["mean"]
    stdout.write(
        f"cross-validation ({res.cv.folds} folds): alpha {res.cv.alpha:g}, token-bag weight "
        f"{res.cv.beta:g}; {res.seconds['total']:.1f} s\n"
    )
    for j, m in enumerate(outs.models):
        c = res.stack[:, j]
        stdout.write(
            f"blend for {m}: ridge x {c[3]:.2f} + difficulty logit x {c[1]:.3f} + length x "
            f"{c[2]:.3f}\n"
        )
    for label, m in (("cross-validated", cvm), (f"held-out ({res.n_holdout} prompts)", hm)):
        if m:
            stdout.write(
                f"{label} mean APGR over {len(res.cv_figures['pairs'])} pair(s): fitted "
                f"{m['fitted']['apgr']:.3f}, length {m['length']['apgr']:.3f}, "
                f"default {m['default']['apgr']:.3f}; strong calls for 95 %: fitted "
                f"{m['fitted']['calls_at_95']:.2f}, length {m['length']['calls_at_95']:.2f}\n"
            )
    if not res.cv_figures["pairs"]:
        stdout.write(
            f"no two models differ by {fit.MIN_GAP} or more in mean score on these outcomes: "
            "there is no routing decision to learn\n"
        )
    if not res.beats_length:
        msg = fit.verdict(res) + "; collect more outcomes (see docs/router-model.md)"
        if not args.force:
            raise fit.TooFewOutcomes(msg + "; nothing written (--force writes it anyway)")
        stdout.write("warning: " + msg + "\n")
    else:
        stdout.write(fit.verdict(res) + "\n")
    command = "switchyard router fit " + " ".join(
        [*(f"--outcomes {p}" for p in args.outcomes), f"--out {args.out}"]
        + ([f"--models {args.models}"] if args.models else [])
    )
    for key, m in (("heldOutAPGR", hm), ("crossValidatedAPGR", cvm)):
        if m:
            report[key] = {k: round(m[k]["apgr"], 4) for k in ("fitted", "length", "default")}
    fit.write_bundle(args.out, res, outs, featurizer, args.name, command)
    stdout.write(f"bundle written to {args.out}\n")
    report.update(result="fitted", bundle=str(args.out))
    for old in prune_bundles(args.out, args.keep):
        stdout.write(f"deleted bundle {old}\n")
    return 0


def prune_bundles(out: Path, keep: list[Path]) -> list[Path]:
    """Delete the bundle directories (those holding router.yaml) next to ``out`` but ``keep``."""
    import shutil

    spared = {out.resolve(), *(k.resolve() for k in keep)}
    deleted = []
    for sibling in sorted(out.parent.iterdir()):
        if sibling.is_symlink() or not (sibling / "router.yaml").is_file():
            continue
        if sibling.resolve() not in spared:
            shutil.rmtree(sibling)
            deleted.append(sibling)
    return deleted


def write_summary(path: Path, report: dict[str, Any]) -> None:
    """The run's JSON report; at most 4 KiB (what Kubernetes keeps of a termination message)."""
    report["message"] = str(report.get("message", ""))[-1500:]
    try:
        path.write_text(json.dumps(report)[:4096])
    except OSError as exc:  # the report is extra: never the reason a fit fails
        print(f"switchyard router fit: cannot write --summary {path}: {exc}", file=sys.stderr)


def main(argv: list[str], stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> int:
    """``switchyard router ...``; returns the exit status."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    args = _parser().parse_args(argv)
    if args.command == "calibrate":
        from switchyard.training.loop_cli import cmd_calibrate

        return cmd_calibrate(args, stdout)
    from switchyard.extproc.router.bundle import BundleError

    try:
        if args.command == "score":
            return cmd_score(args, stdin, stdout)
        if args.command == "fit":
            return _fit_reported(args, stdout)
        return cmd_eval(args, stdout)
    except (ValueError, BundleError, FileNotFoundError, ImportError) as exc:
        print(f"switchyard router {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _fit_reported(args: argparse.Namespace, stdout: IO[str]) -> int:
    """``cmd_fit``, and its report in ``--summary`` whatever happens."""
    report: dict[str, Any] = {"result": "error"}
    try:
        return cmd_fit(args, stdout, report)
    except Exception as exc:
        if type(exc).__name__ == "TooFewOutcomes":  # fit.py may not even import
            report.update(result="too-few", message=str(exc))
        else:
            report.update(result="error", message=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if args.summary is not None:
            write_summary(args.summary, report)
