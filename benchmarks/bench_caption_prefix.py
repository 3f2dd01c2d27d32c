"""Does SFT on the word task learn to read its caption faster when the text tokens hold only the caption?

The pipeline cuts a fixed 28-token template prefix (right for Qwen's tokenizer). The tiny byte-level tokenizer
needs 140 tokens for that prefix, so 112 bytes of the system prompt stay in front of every caption: of the 216
text tokens the transformer attends to, 112 are the same in every prompt. This benchmark trains the same
config (`configs/words_sft.yaml` via `main.py fit`, as `bench_words_sft.py` does) with `CaptionOnlyFlowMatching`,
which drops those 112 positions (from the prepared embeddings and from the text encoder's output alike, so
training, the CFG branch and sampling agree), and reports per checkpoint how much the caption lowers the flow
loss (`bench_words_sft.caption_use`) and, for `--score-steps`, held-out OCR word accuracy.

    python benchmarks/bench_caption_prefix.py --task-root data/words9f --run runs/caption_only --max-steps 500

The experiment behind `--model.encoders.template_cut template` (the same cut as a training setting, used alike by
prepare, the modules and `load_module`); `as_template_cut_checkpoint` turns a checkpoint of this experiment into
the plain FlowMatchingModule checkpoint it equals. Exports of either do not sample like `OvisImagePipeline`, which
always cuts 28 tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_words_sft import caption_use, score, train  # noqa: E402
from lit_ovis.models.text_encoder import OVIS_PREFIX_TOKENS, OvisTextEncoder, build_text_encoder  # noqa: E402
from lit_ovis.modules.flow_matching import FlowMatchingModule  # noqa: E402

SYSTEM_PROMPT_REMNANT = 112  # positions before the caption with the tiny byte-level tokenizer (measured: where "A" and "B" differ)


def caption_only_encoder(encoders, skip: int) -> OvisTextEncoder:
    """The run's text encoder, cutting `skip` more template positions: the same hidden states as the full
    encoder's from position `skip` on (Qwen3 is causal), `skip` fewer of them."""
    full = build_text_encoder(encoders.text_encoder, encoders.max_sequence_length)
    return OvisTextEncoder(full.model, full.tokenizer, encoders.max_sequence_length - skip, OVIS_PREFIX_TOKENS + skip)


class CaptionOnlyFlowMatching(FlowMatchingModule):
    """FlowMatchingModule whose text tokens start at the caption (see the module docstring)."""

    def __init__(self, *args, skip: int = SYSTEM_PROMPT_REMNANT, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = skip

    def build_frozen(self) -> None:
        super().build_frozen()
        self._frozen["text_encoder"] = caption_only_encoder(self.encoders_cfg, self.skip)

    def embed_prompts(self, batch: dict[str, Any]):
        embeds = batch.get("prompt_embeds")
        if embeds is None:
            return self.text_encoder.encode(batch["captions"]).to(self.device, self.compute_dtype)
        length = self.encoders_cfg.max_sequence_length - self.skip
        embeds = embeds[:, self.skip:self.skip + length]
        return super().embed_prompts({**batch, "prompt_embeds": embeds})[:, :length]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task-root", default="data/words9f", help="task folder with latents/ prepared with the tiny text encoder")
    p.add_argument("--run", default="runs/caption_only")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--score-steps", type=lambda v: {int(x) for x in v.split(",")}, default=set())
    p.add_argument("--heldout-limit", type=int, default=256)
    p.add_argument("--skip-train", action="store_true", help="only measure the checkpoints listed in <run>/curve.json")
    p.add_argument("overrides", nargs="*", help="extra `main.py fit` overrides")
    args = p.parse_args()
    # Checkpoints name the class by its importable path; run as a script, this file is __main__.
    from benchmarks.bench_caption_prefix import CaptionOnlyFlowMatching as module_class

    run, task = ROOT / args.run, ROOT / args.task_root
    if args.skip_train:
        checkpoints = json.loads((run / "curve.json").read_text())["checkpoints"]
    else:
        overrides = [f"--data.root={task / 'latents'}", f"--trainer.max_steps={args.max_steps}",
                     "--model.class_path=benchmarks.bench_caption_prefix.CaptionOnlyFlowMatching", *args.overrides]
        checkpoints = train(run, overrides, every=args.every)
    for c in checkpoints:
        c["caption_use"] = caption_use(c["path"], task / "latents", module_class=module_class)
        if c["step"] in args.score_steps:
            from lit_ovis.loading import load_module

            gen = load_module(c["path"])  # the run's backbone (EMA weights) and encoders, then its text encoder cut
            gen._frozen["text_encoder"] = caption_only_encoder(gen.encoders_cfg, module_class.load_from_checkpoint(
                c["path"], map_location="cpu").skip)
            gen._empty_embed = None
            c["heldout"] = score(c["path"], task / "heldout.jsonl", run / "eval" / f"step-{c['step']}" / "heldout",
                                 args.heldout_limit, None, generator=gen)
        print(json.dumps(c), flush=True)
        (run / "curve.json").write_text(json.dumps({"checkpoints": checkpoints, "args": {**vars(args), "score_steps": sorted(args.score_steps)}}, indent=1))


if __name__ == "__main__":
    main()


def as_template_cut_checkpoint(source: str, target: str, vae: str | None = None) -> str:
    """A checkpoint of this experiment as the plain FlowMatchingModule checkpoint it equals: `template_cut:
    template` cuts the same 140 template tokens (28 + the 112 skipped here) and `max_sequence_length` keeps the
    same 104 caption positions, so every stage command, `lit_ovis.load_module` and `lit-ovis eval` read it."""
    import torch

    from lit_ovis.files import atomic_path

    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    skip = hp.pop("skip", SYSTEM_PROMPT_REMNANT)
    hp["_class_path"] = "lit_ovis.modules.flow_matching.FlowMatchingModule"
    enc = dict(hp["encoders"])
    enc.update(max_sequence_length=enc["max_sequence_length"] - skip, template_cut="template", **({"vae": vae} if vae else {}))
    hp["encoders"] = enc
    with atomic_path(target) as tmp:
        torch.save(ckpt, tmp)
    return target
