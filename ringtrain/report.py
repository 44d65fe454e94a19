"""`ringtrain report RUN_DIR [RUN_DIR ...]`: what each run's steps cost, and how runs compare.

Reads only the logs (ringtrain.analysis); needs no MPI and can run while training goes on.
"""
from __future__ import annotations

import json
import math
import os
import sys

from ringtrain.analysis import RunError, load_run, phase_table, predicted_ps_over_ring, rank_table, run_metrics, scaling_table


def _fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def run(args) -> int:
    runs = []
    for d in args.run_dirs:
        try:
            runs.append(load_run(d, skip=args.skip))
        except RunError as e:
            print(f"ringtrain report: {e}", file=sys.stderr)
            return 2
    models = {(r.manifest.get("model"), r.manifest.get("dataset")) for r in runs}
    if len(models) > 1:
        listing = ", ".join(f"{os.path.basename(r.path)} ({r.manifest.get('model')} on {r.manifest.get('dataset')})" for r in runs)
        print(
            f"ringtrain report: these runs train different models or datasets and cannot be compared step for step: {listing}. "
            f"Report them separately.",
            file=sys.stderr,
        )
        return 2
    metrics = [run_metrics(r) for r in runs]
    out = {"runs": []}
    for r, m in zip(runs, metrics):
        phases = phase_table(r)
        ranks = rank_table(r)
        print(f"\n=== {r.path}")
        print(f"{m['backend']} | {m['workers']} worker(s) | model {m['model']} on {m['dataset']} | batch {m['batch_size']}/rank | {m['steps']} steps (first {args.skip} skipped)")
        for w in r.warnings:
            print(f"  warning: {w}")
        print(f"  {'phase':<16}{'median ms':>11}{'p95 ms':>10}")
        for ph, row in phases.iterrows():
            print(f"  {ph:<16}{row.median_ms:>11.3f}{row.p95_ms:>10.3f}")
        print(f"  throughput {_fmt(m['throughput_samples_per_s'], '.1f')} samples/s | exposed comm {100 * m['comm_fraction']:.1f}% of the step"
              if not math.isnan(m["comm_fraction"]) else f"  throughput {_fmt(m['throughput_samples_per_s'], '.1f')} samples/s")
        print(f"  bytes/step sent {_fmt(m['bytes_sent_per_step'], '.0f')} recv {_fmt(m['bytes_recv_per_step'], '.0f')} | cost model {_fmt(m['bytes_expected_per_step'], '.0f')}"
              f" (gradients {m['grad_bytes']:.0f} B)")
        print(f"  achieved during training: algbw {_fmt(m['algbw_GBps'])} GB/s, busbw {_fmt(m['busbw_GBps'])} GB/s")
        print(f"  slowest rank {m['slowest_rank']} (median step {ranks['median_step_ms'].max():.3f} ms); last to arrive at the exchange: rank {m['straggler_rank']}")
        out["runs"].append({**m, "phases_ms": phases.reset_index().to_dict("records"), "ranks": ranks.reset_index().to_dict("records")})
    if len(runs) > 1:
        print("\n=== comparison")
        print(f"  {'run':<28}{'N':>3}{'step ms':>10}{'samples/s':>12}{'exposed %':>10}{'busbw GB/s':>11}{'vs first':>9}")
        base = metrics[0]["median_step_s"]
        for m in metrics:
            print(f"  {m['label'][:27]:<28}{m['workers']:>3}{1e3 * m['median_step_s']:>10.3f}{m['throughput_samples_per_s']:>12.1f}"
                  f"{_fmt(100 * m['comm_fraction'], '.1f'):>10}{_fmt(m['busbw_GBps']):>11}{m['median_step_s'] / base:>8.2f}x")
        sc = scaling_table(metrics)
        if len(sc) and sc["efficiency"].notna().any():
            print("\n=== scaling efficiency = throughput(N) / (N * throughput(1))")
            for _, r in sc.iterrows():
                print(f"  {r.backend:<12}{r.model:<10} N={r.workers:<3} {r.throughput:>10.1f} samples/s  efficiency {_fmt(r.efficiency, '.2f')}")
        ps = [m for m in metrics if str(m["backend"]).startswith("ps")]
        rings = {m["workers"]: m for m in metrics if m["backend"] == "ring"}
        if ps and rings:
            print("\n=== parameter server vs ring (cost model for one dedicated server: N^2 / (2(N-1)))")
            for m in ps:
                r = rings.get(m["workers"])
                if r:
                    print(f"  {m['label']:<20} step {1e3 * m['median_step_s']:.3f} ms vs ring {1e3 * r['median_step_s']:.3f} ms: "
                          f"{m['median_step_s'] / r['median_step_s']:.2f}x (model predicts {predicted_ps_over_ring(m['workers']):.2f}x when bandwidth-bound)")
        out["scaling"] = sc.to_dict("records")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=float)
    if args.plot:
        from ringtrain import plots

        os.makedirs(args.plot, exist_ok=True)
        written = [plots.save(plots.step_breakdown(runs), os.path.join(args.plot, "step_breakdown.png"))]
        if len(runs) > 1:
            written.append(plots.save(plots.scaling_curve(metrics), os.path.join(args.plot, "scaling.png")))
        for i, r in enumerate(runs):
            written.append(plots.save(plots.rank_skew(r), os.path.join(args.plot, f"skew-{i}-{os.path.basename(r.path)}.png")))
        print("\nfigures: " + ", ".join(written))
    return 0
