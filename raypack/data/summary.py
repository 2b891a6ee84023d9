"""What `raypack compare` and `raypack prepare` print: every arm's counts side by side, and what went into
the packs when an arm was composed (grouped or single-turn only).

The columns name keys of an arm's stats record (raypack.data.arm), which compare.json and every
prepared manifest hold alike.
"""

from __future__ import annotations

from raypack.data.prepared import Manifest
from raypack.tables import format_table

# Each arm's over-length policy and what it made of the whole input (conversations truncated, split, dropped).
OVERLENGTH_COLUMNS = (("over-length", "overlength"), ("truncated", "num_truncated"), ("split conv.", "num_split"),
                      ("dropped long", "num_dropped_too_long"))
COMPARE_COLUMNS = (
    ("rows", "num_rows"), ("lower bound", "lower_bound_rows"), ("rows/LB", "rows_over_lower_bound"),
    ("tokens", "num_tokens"), ("supervised", "num_supervised_tokens"), ("efficiency", "efficiency"),
    ("pad frac", "padding_fraction"), ("split", "num_split_samples"), ("seconds", "seconds"),
) + OVERLENGTH_COLUMNS
PREPARE_COLUMNS = (
    ("samples", "num_samples"), ("rows", "num_rows"), ("LB rows", "lower_bound_rows"),
    ("tokens", "num_tokens"), ("supervised", "num_supervised_tokens"), ("efficiency", "efficiency"),
    ("pad frac", "padding_fraction"), ("split", "num_split_samples"), ("seconds", "seconds"),
) + OVERLENGTH_COLUMNS
COMPOSITION_COLUMNS = (
    ("grouping", "grouping"), ("clusters", "num_clusters"), ("within cos", "within_pack_cosine"),
    ("across cos", "across_pack_cosine"), ("mixed packs", "num_mixed_cluster_rows"),
    ("repeat packs", "num_repeated_cluster_rows"), ("shared packs", "num_shared_rows"),
    ("single-turn", "num_single_turn_samples"), ("multi-turn", "num_multi_turn_samples"),
    ("rows/LB", "rows_over_lower_bound"),
)


def arms_table(arms: dict[str, dict], columns: tuple, first: str = "arm") -> str:
    """One row per arm: its name, then the stats record's value for each column."""
    return format_table([first] + [c for c, _ in columns], [[name] + [m.get(key, "-") for _, key in columns]
                                                            for name, m in arms.items()])


def composition_lines(arms: dict[str, dict]) -> list[str]:
    """The grouping / single-turn-only columns, when some arm was composed (raypack.data.compose)."""
    composed = {name: m for name, m in arms.items() if "num_clusters" in m or m.get("only_single_turn")}
    return ["what goes into a pack:", arms_table(composed, COMPOSITION_COLUMNS)] if composed else []


def prepared_summary(manifests: dict[str, Manifest], folders: dict) -> str:
    """`raypack prepare`'s report: the input's fate, every split's counts, composition, and where each went."""
    first = next(iter(manifests.values()))
    rejected = {k: v for k, v in first.rejected_reasons.items() if v}
    lines = [f"input rows {first.num_input_rows}: {first.num_rejected_rows} rejected {rejected or ''}; "
             f"{first.overlength or 'the over-length policy'}: truncated {first.num_truncated}, split "
             f"{first.num_split}, dropped too long {first.num_dropped_too_long}, dropped with no target "
             f"{first.num_dropped_no_supervised}; {first.num_val_conversations} conversations held out for "
             "validation (each arm's policy and counts in its row)"]
    records = {name: m.to_dict() for name, m in manifests.items()}
    lines.append(arms_table(records, PREPARE_COLUMNS, first="split/arm"))
    lines += composition_lines(records)
    lines += [f"  {name}: {folder}" for name, folder in folders.items()]
    return "\n".join(lines)
