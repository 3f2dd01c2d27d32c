"""`lit-ovis word-task`: render the CPU-scale text-rendering task (data_modules/synthetic/word_task.py) into a
folder: images/<split>/*.png and train.jsonl / heldout.jsonl / unseen.jsonl, each both a `lit-ovis prepare` /
`make-pairs` manifest and a prompt set for `lit-ovis eval` and `data_modules.prompts.PromptDataModule`.

    lit-ovis word-task --output-dir data/words
    lit-ovis prepare --manifest data/words/train.jsonl --output-dir data/words/latents --resolution 96 \\
        --dedup false --vae data/words/autoencoder --text-encoder tiny

A rerun with the same settings does nothing; other settings replace the folder atomically.
"""

from __future__ import annotations

import argparse
import json
import sys

from data_modules.synthetic.word_task import WordTaskConfig, build_word_task
from lit_ovis.errors import OneLineArgumentParser, UserError
from lit_ovis.options import add_options, from_options


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="lit-ovis word-task", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True, help="folder to write (replaced atomically when the settings change)")
    add_options(p, WordTaskConfig)
    args = p.parse_args(argv)
    try:
        report = build_word_task(from_options(WordTaskConfig, args), args.output_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("fingerprint", "counts", "vocabulary", "sizes", "font_px", "rendered_this_run")},
                     ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
