"""Prints a sweep's summary.json as a Markdown table (for docs/RESULTS.md).

    python scripts/results_table.py runs/rate-sweep/summary.json
"""

import json
import sys

from backdoor_train.results import SweepSummary
from backdoor_train.runs.stats import fmt_pct


def main(path: str) -> None:
    with open(path) as fh:
        summary = SweepSummary.from_stored(json.load(fh), path)  # whichever release wrote it
    keys = list(summary.groups[0].point)
    print("| " + " | ".join(keys) + " | poisoned images | seeds | clean accuracy (mean ± std [95% t interval]) | ASR (mean ± std [95% t interval]) | ASR per seed |")
    print("|" + " --- |" * (len(keys) + 5))
    trials = {t.name: t for t in summary.trials}
    for g in sorted(summary.groups, key=lambda g: [(isinstance(v, str), str(v) if isinstance(v, str) else v)
                                                   for v in g.point.values()]):
        for variant, f in g.variants.items():
            acc, asr = f.clean_accuracy, f.attack_success_rate
            per_seed = ", ".join(f"s{trials[t].seed}: {trials[t].variants[variant].attack_success_rate:.2%}"
                                 for t in sorted(g.trials, key=lambda t: trials[t].seed))
            point = " | ".join(str(g.point[k]) for k in keys)
            print(f"| {point} | {g.n_poisoned} | {acc.n} | {fmt_pct(acc)} | {fmt_pct(asr)} | {per_seed} |")


if __name__ == "__main__":
    main(sys.argv[1])
