"""Diffusion-DPO vs the Diffusion-SDPO safeguard variants on rendered-text preference pairs (tiny model, CPU).

Pairs come from `data_modules.preference.build_synthetic_pairs` (winner = the caption's text rendered
correctly, loser = the same layout with the text misspelled), encoded by the tiny VAE, with tiny text-encoder
prompt embeddings. The first `--pairs` are trained on, the next `--heldout` are never seen. As in the report,
the reference is an SFT model: the tiny MMDiT is first trained for `--sft-steps` flow-matching steps on the
training winners, and every variant starts from those weights (policy == reference), sees the same batches and
noise, and is evaluated on the same fixed noise/timestep draws. Reported per variant: implicit accuracy on train and held-out pairs, the policy
minus reference flow-matching error of winners (dL_w) and losers (dL_l) -- dL_w > 0 means the winner got worse,
which is what the safeguard exists to prevent -- and lambda_safe statistics over training.

    .venv/bin/python benchmarks/bench_dpo_curve.py                      # 5 variants, ~40 s each on an idle 2-core CPU
    .venv/bin/python benchmarks/bench_dpo_curve.py --variants plain,paper_mu0.6 --steps 100

The loop is a plain optimizer loop around `SDPOModule.pair_loss` (the exact loss `training_step` uses) and the
module's own AdamW and gradient clipping, so that one script runs every variant in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS: dict[str, dict] = {
    "plain": dict(enabled=False),
    "report_mu1": dict(rule="report", mu=1.0),
    "report_mu0.5": dict(rule="report", mu=0.5),
    "report_mu0.75": dict(rule="report", mu=0.75),
    "paper_mu0.6": dict(rule="paper", mu=0.6),
    "report_mu1_margin0.1": dict(rule="report", mu=1.0, safety_margin=0.1),
    "report_mu1_margin0.2": dict(rule="report", mu=1.0, safety_margin=0.2),
    "report_mu1_margin0.3": dict(rule="report", mu=1.0, safety_margin=0.3),
    "report_mu1_margin0.5": dict(rule="report", mu=1.0, safety_margin=0.5),
    "report_mu1_margin0.6": dict(rule="report", mu=1.0, safety_margin=0.6),
    "report_mu0.5_margin0.1": dict(rule="report", mu=0.5, safety_margin=0.1),
}

DEFAULT_VARIANTS = "plain,report_mu1,report_mu0.5,paper_mu0.6,report_mu1_margin0.3"


def load_pairs(root: str) -> dict[str, dict]:
    """{id: item} from the LitData bucket datasets under <root>/<resolution>/<WxH>/."""
    from litdata import StreamingDataset

    out = {}
    for bucket in sorted(p for p in Path(root).glob("*/*") if p.is_dir()):
        ds = StreamingDataset(str(bucket))
        for i in range(len(ds)):
            it = ds[i]
            out[it["id"]] = {**it, "bucket": bucket.name}
    return out


def make_pairs(n: int, resolution: int, seq_len: int, cache: str | None) -> dict[str, dict]:
    from data_modules.preference import build_synthetic_pairs

    root = Path(cache or tempfile.mkdtemp(prefix="dpo-curve-")) / f"n{n}-r{resolution}-l{seq_len}"
    if not (root / "report.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        build_synthetic_pairs(str(root), n, resolution, "tiny", "tiny", seq_len, progress=False)
    return load_pairs(str(root))


def collate(items: list[dict], seq_len: int) -> dict:
    embeds = torch.zeros(len(items), seq_len, items[0]["prompt_embeds"].shape[-1])
    for k, it in enumerate(items):
        e = it["prompt_embeds"].float()[:seq_len]
        embeds[k, : e.shape[0]] = e
    return {"latents_w": torch.stack([it["latents_w"].float() for it in items]),
            "latents_l": torch.stack([it["latents_l"].float() for it in items]),
            "prompt_embeds": embeds, "captions": [it["caption"] for it in items]}


def by_bucket(items: list[dict], seq_len: int) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for it in items:
        groups.setdefault(it["bucket"], []).append(it)
    return [collate(g, seq_len) for _, g in sorted(groups.items())]


def build_module(variant: dict, args, state: dict | None = None):
    from lit_ovis.modules.config import EncoderConfig, OptimizerConfig
    from lit_ovis.losses.dpo import SafeguardConfig
    from lit_ovis.modules.sdpo import SDPOConfig, SDPOModule

    sdpo = dict(beta=args.beta, timestep_sampling="uniform", timestep_shift="none", safeguard=SafeguardConfig(**variant))
    torch.manual_seed(0)
    m = SDPOModule(encoders=EncoderConfig(max_sequence_length=args.seq_len),
                   optimizer=OptimizerConfig(lr=args.lr, warmup_steps=0, grad_clip=1.0), sdpo=SDPOConfig(**sdpo))
    m.configure_model()
    if state is not None:  # the SFT weights: policy and reference start equal
        m.backbone.load_state_dict(state)
        m.reference.load_state_dict(state)
    return m


def sft_state(train: list[dict], args) -> dict | None:
    """Flow-matching SFT of the tiny MMDiT on the training winners (the reference model of the DPO stage)."""
    if args.sft_steps <= 0:
        return None
    from lit_ovis import flow
    from lit_ovis.models.vae import pack_latents

    m = build_module({"safeguard": False}, args)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=args.lr)
    groups: dict[str, list[dict]] = {}
    for it in train:
        groups.setdefault(it["bucket"], []).append(it)
    keys = sorted(groups)
    rng = random.Random(1)
    for step in range(args.sft_steps):
        bucket = rng.choices(keys, [len(groups[k]) for k in keys])[0]
        batch = collate(rng.sample(groups[bucket], min(args.batch_size, len(groups[bucket]))), args.seq_len)
        x0 = pack_latents(batch["latents_w"])
        cond = m.conditioning(batch["latents_w"].shape[2], batch["latents_w"].shape[3], m.embed_prompts(batch))
        g = torch.Generator().manual_seed(10_000 + step)
        t = torch.rand(x0.shape[0], generator=g)
        noise = torch.randn(x0.shape, generator=g)
        pred = m.predict_velocity(m.backbone, flow.interpolate(x0, noise, t), t, cond)
        loss = (pred - flow.velocity_target(x0, noise)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.trainable_parameters(), 1.0)
        opt.step()
    print(f"SFT: {args.sft_steps} flow-matching steps on the training winners, last loss {loss.item():.4f}", flush=True)
    return {k: v.detach().clone() for k, v in m.backbone.state_dict().items()}


@torch.no_grad()
def evaluate(module, batches: list[dict], draws: int = 2) -> dict[str, float]:
    """Pair-weighted means over buckets and `draws` fixed noise/timestep draws."""
    module.eval()
    acc = dw = dl = margin = 0.0
    n = 0
    for b, batch in enumerate(batches):
        k = batch["latents_w"].shape[0]
        for d in range(draws):
            _, st = module.pair_loss(batch, generator=torch.Generator().manual_seed(1000 * b + d))
            acc += float(st["implicit_acc"]) * k
            margin += float(st["reward_margin"]) * k
            dw += float(st["policy_loss_w"] - st["ref_loss_w"]) * k
            dl += float(st["policy_loss_l"] - st["ref_loss_l"]) * k
            n += k
    module.train()
    return {"acc": acc / n, "margin": margin / n, "dL_w": dw / n, "dL_l": dl / n}


def run_variant(name: str, variant: dict, train: list[dict], heldout: list[dict], args, state: dict | None = None) -> dict:
    module = build_module(variant, args, state)
    opt = module.configure_optimizers()["optimizer"]
    groups: dict[str, list[dict]] = {}
    for it in train:
        groups.setdefault(it["bucket"], []).append(it)
    keys = sorted(groups)
    weights = [len(groups[k]) for k in keys]
    rng = random.Random(0)  # identical batch sequence for every variant
    train_eval, held_eval = by_bucket(train, args.seq_len), by_bucket(heldout, args.seq_len)
    with torch.no_grad():
        ref_w = evaluate(module, held_eval)  # policy == reference here; also gives the reference error scale
    curve, lambdas = [], []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        bucket = rng.choices(keys, weights)[0]
        items = rng.sample(groups[bucket], min(args.batch_size, len(groups[bucket])))
        loss, st = module.pair_loss(collate(items, args.seq_len), generator=torch.Generator().manual_seed(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), 1.0)
        opt.step()
        if "lambda_mean" in st:
            lambdas.append((float(st["lambda_mean"]), float(st["lambda_min"]), float(st["lambda_max"])))
        if step % args.eval_every == 0 or step == args.steps:
            tr, ho = evaluate(module, train_eval), evaluate(module, held_eval)
            curve.append({"step": step, "train": tr, "heldout": ho})
            print(f"  {name:22s} step {step:4d}  acc train {tr['acc']:.3f} held-out {ho['acc']:.3f}  "
                  f"dL_w {tr['dL_w']:+.4f}/{ho['dL_w']:+.4f}  dL_l {tr['dL_l']:+.4f}/{ho['dL_l']:+.4f}", flush=True)
    seconds = time.perf_counter() - start
    lam = torch.tensor(lambdas) if lambdas else None
    return {
        "variant": variant, "seconds": seconds, "curve": curve, "start": ref_w,
        "ref_error_w": float(module_ref_error(module, held_eval)),
        "lambda": None if lam is None else {"mean": float(lam[:, 0].mean()), "min": float(lam[:, 1].min()),
                                            "max": float(lam[:, 2].max()),
                                            "frac_steps_mean_below_0.9": float((lam[:, 0] < 0.9).float().mean())},
    }


@torch.no_grad()
def module_ref_error(module, batches: list[dict]) -> float:
    """The reference's winner error on held-out pairs (the scale dL_w is measured against)."""
    total, n = 0.0, 0
    for b, batch in enumerate(batches):
        _, st = module.pair_loss(batch, generator=torch.Generator().manual_seed(1000 * b))
        total += float(st["ref_loss_w"]) * batch["latents_w"].shape[0]
        n += batch["latents_w"].shape[0]
    return total / n


def table(results: dict[str, dict]) -> str:
    lines = ["| variant | acc train | acc held-out | dL_w train | dL_w held-out | dL_l held-out | λ mean | λ min | λ max | s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        last = r["curve"][-1]
        lam = r["lambda"] or {}
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {last['train']['acc']:.3f} | {last['heldout']['acc']:.3f} | {last['train']['dL_w']:+.4f} | "
                     f"{last['heldout']['dL_w']:+.4f} | {last['heldout']['dL_l']:+.4f} | {fmt(lam.get('mean'))} | "
                     f"{fmt(lam.get('min'))} | {fmt(lam.get('max'))} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=32, help="training pairs")
    p.add_argument("--heldout", type=int, default=32, help="held-out pairs (never trained on)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64, help="prompt tokens (byte-level tiny tokenizer: EN captions quote their text within 64)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sft-steps", type=int, default=300, help="flow-matching steps on the winners before DPO (0: random init)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=200.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for the tiny model on a shared CPU)")
    p.add_argument("--cache-dir", default=None, help="keep the rendered pairs here between runs")
    p.add_argument("--json", default=None, help="write all curves to this JSON file")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    pairs = make_pairs(args.pairs + args.heldout, args.resolution, args.seq_len, args.cache_dir)
    ids = sorted(pairs)
    train, heldout = [pairs[i] for i in ids[: args.pairs]], [pairs[i] for i in ids[args.pairs:]]
    print(f"{len(train)} training pairs, {len(heldout)} held-out pairs, buckets "
          f"{sorted({it['bucket'] for it in train + heldout})}", flush=True)
    state = sft_state(train, args)
    results = {}
    for name in args.variants.split(","):
        results[name] = run_variant(name, VARIANTS[name], train, heldout, args, state)
    print()
    print(f"reference winner error on held-out pairs: {next(iter(results.values()))['ref_error_w']:.4f}")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
