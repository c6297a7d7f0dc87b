"""Splink 5.0 (DuckDB backend) on the FEBRL dedupe data sets, with the settings Tessera's FEBRL
test uses (tests/it/matching.rs): the same five blocking rules, the same columns and levels
(Jaro-Winkler 0.92/0.8 with term frequencies on names, birth date exact / day and month swapped /
one edit / within a year, and so on), u from one million random pairs with seed 42.

Splink trains m with EM sessions, each blocked on some columns and estimating the others; two
sessions (birth date; given name and surname) cover every comparison. Its prior comes from
deterministic rules with an assumed recall, as its FEBRL notebooks do.

Usage: python benches/splink_febrl.py DATASET.parquet [...]  (Parquet as the Tessera test writes
it: text columns, blanks as nulls). Prints one JSON object per data set: records, candidate
pairs, pairwise precision, recall and F1 at match probability 0.5 (blocking misses count as
misses), and the seconds for training, for scoring (predict) and in all.
"""

import json
import sys
import time
from collections import Counter

import pyarrow.parquet as pq
import splink.comparison_level_library as cll
import splink.comparison_library as cl
from splink import DuckDBAPI, Linker, SettingsCreator, block_on

BLOCKING = [
    block_on("given_name"),
    block_on("surname"),
    block_on("date_of_birth"),
    block_on("soc_sec_id"),
    block_on("postcode", "street_number"),
]


def date_of_birth():
    swapped = (
        "substr(date_of_birth_l, 1, 4) = substr(date_of_birth_r, 1, 4) AND "
        "substr(date_of_birth_l, 5, 2) = substr(date_of_birth_r, 7, 2) AND "
        "substr(date_of_birth_l, 7, 2) = substr(date_of_birth_r, 5, 2)"
    )
    within_year = (
        "abs(date_diff('day', try_strptime(date_of_birth_l, '%Y%m%d'), "
        "try_strptime(date_of_birth_r, '%Y%m%d'))) <= 365"
    )
    return cl.CustomComparison(
        output_column_name="date_of_birth",
        comparison_levels=[
            cll.NullLevel("date_of_birth"),
            cll.ExactMatchLevel("date_of_birth"),
            cll.CustomLevel(swapped, "day and month swapped"),
            cll.LevenshteinLevel("date_of_birth", 1),
            cll.CustomLevel(within_year, "within 365 days"),
            cll.ElseLevel(),
        ],
    )


def settings():
    return SettingsCreator(
        link_type="dedupe_only",
        unique_id_column_name="rec_id",
        blocking_rules_to_generate_predictions=BLOCKING,
        comparisons=[
            cl.JaroWinklerAtThresholds("given_name", [0.92, 0.8]).configure(
                term_frequency_adjustments=True
            ),
            cl.JaroWinklerAtThresholds("surname", [0.92, 0.8]).configure(
                term_frequency_adjustments=True
            ),
            date_of_birth(),
            cl.LevenshteinAtThresholds("soc_sec_id", [1, 2]),
            cl.LevenshteinAtThresholds("street_number", [1]),
            cl.JaroWinklerAtThresholds("address_1", [0.9, 0.8]),
            cl.JaroWinklerAtThresholds("suburb", [0.9]),
            cl.LevenshteinAtThresholds("postcode", [1]),
            cl.ExactMatch("state"),
        ],
        retain_intermediate_calculation_columns=False,
    )


def entity(rec_id):
    return rec_id.split("-")[1]


def evaluate(path):
    table = pq.read_table(path)
    ids = table.column("rec_id").to_pylist()
    sizes = Counter(entity(i) for i in ids)
    truth = sum(n * (n - 1) // 2 for n in sizes.values())

    started = time.perf_counter()
    db = DuckDBAPI()
    df = db.register(table)
    linker = Linker(df, settings(), log_level=None)
    linker.training.estimate_probability_two_random_records_match(
        [block_on("soc_sec_id", "date_of_birth"), block_on("given_name", "surname", "postcode")],
        recall=0.7,
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=42)
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("date_of_birth"))
    linker.training.estimate_parameters_using_expectation_maximisation(
        block_on("given_name", "surname")
    )
    trained = time.perf_counter()
    scored = linker.inference.predict().as_pyarrow_table()
    done = time.perf_counter()

    prob = scored.column("match_probability").to_pylist()
    left = scored.column("rec_id_l").to_pylist()
    right = scored.column("rec_id_r").to_pylist()
    found = [(a, b) for a, b, p in zip(left, right, prob) if p >= 0.5]
    hits = sum(1 for a, b in found if entity(a) == entity(b))
    precision = hits / max(len(found), 1)
    recall = hits / truth
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {
        "data": path,
        "records": len(ids),
        "true_pairs": truth,
        "candidate_pairs": len(prob),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "train_s": round(trained - started, 2),
        "predict_s": round(done - trained, 2),
        "pairs_per_second": round(len(prob) / max(done - trained, 1e-9)),
        "total_s": round(done - started, 2),
    }


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(json.dumps(evaluate(path)), flush=True)
