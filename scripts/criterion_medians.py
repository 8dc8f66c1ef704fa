#!/usr/bin/env python3
"""Criterion's median estimate (ns) of each benchmark named, from the reports of its last
run: `criterion_medians.py CRITERION_DIR GROUP ID...` prints them on one line, in order
("nan" for one not run). bench_ratios.sh and ab_bench.sh read their figures through it, so
both report the same statistic."""
import json
import os
import sys

home, group, ids = sys.argv[1], sys.argv[2], sys.argv[3:]


def median(benchmark):
    path = os.path.join(home, group, benchmark, "new", "estimates.json")
    if not os.path.exists(path):
        return float("nan")
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"]


print(*(f"{median(i):.1f}" for i in ids))
