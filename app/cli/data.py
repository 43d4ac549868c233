"""The `data` verb: `python -m app data stats CONFIG [key.sub=value ...] [--json]`.

Reads a train config's text dataset (files, or the standard library's docstrings) as training would (same split, same checks, the model
folder's own tokenizer) and prints rows, token-length percentiles and how many examples
exceed `data.max_length`, label counts, exact duplicates and the train/val overlap; for instruction
rows (`data.format: instructions`) the lengths of the rendered examples and the share of tokens
that are trained on (completion / assistant tokens). No Ray.
"""

from __future__ import annotations

import json

from app.cli.jobs import load_job
from app.config.base import ConfigError
from app.config.data import TEXT_DATA


def cmd_data(args) -> int:
    from app.data.stats import data_stats, format_stats, instruction_stats
    from app.data.text import read_splits
    from app.models.hf import load_tokenizer

    job = load_job("train", args)
    if not isinstance(job.data, TEXT_DATA):
        raise ConfigError(f"data: `data stats` reads text datasets (data.kind), not the built-in {job.data.name!r}")
    splits = read_splits(job.data)
    instructions = getattr(job.data, "format", "text") == "instructions"
    stats = (instruction_stats if instructions else data_stats)(splits.train, splits.val, load_tokenizer(job.model.path),
                                                                 job.data.max_length)
    stats["bad_rows_skipped"] = splits.bad_rows
    if args.json:
        print(json.dumps(stats), file=args.out)
        return 0
    print(f"{job.data.kind} data of {job.name!r}, tokenized with {job.model.path}", file=args.out)
    print(format_stats(stats), file=args.out)
    if splits.bad_rows:
        print(f"{splits.bad_rows} bad rows skipped (data.skip_bad_rows), first reasons:", file=args.out)
        for reason in splits.reasons:
            print(f"  {reason}", file=args.out)
    return 0
