#!/usr/bin/env python3
"""Whether two runs' results.json hold the same figures: every number and string of the
results (accuracy, ASR, per-class and per-source figures, dataset hashes, every epoch's loss
and accuracy) except what names where and when a run happened (times, speeds, paths, ids, the
config's storage and data locations). Both files are read through results.py's reader, so a file of
an earlier release is compared in today's schema. Used by scripts/container-check.sh step 2.

    same_figures.py A/results.json B/results.json     exit 0 when equal, 1 with the differences
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Iterator

from backdoor_train.results import ResultsError, results_from_stored

# Keys whose values say where or when, not what: they differ between any two runs.
VOLATILE = re.compile(r"(seconds|_at|per_second|run_id|uri|checkpoint|poison_manifest|storage|root|"
                      r"cache_dir|setup)$")


def leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if not VOLATILE.search(str(key)):
                yield from leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, node


def read(path: str) -> dict[str, Any]:
    with open(path) as fh:
        return results_from_stored(json.load(fh), path).to_dict()


def main(a: str, b: str) -> int:
    try:
        left, right = dict(leaves(read(a))), dict(leaves(read(b)))
    except (OSError, ValueError, ResultsError) as exc:  # ValueError: not JSON
        print(f"    {exc}")
        return 2
    differ = sorted(k for k in left.keys() | right.keys() if left.get(k, "<absent>") != right.get(k, "<absent>"))
    for key in differ[:20]:
        print(f"    {key}: {left.get(key, '<absent>')!r} != {right.get(key, '<absent>')!r}")
    print(f"    {len(left)} figures compared, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
