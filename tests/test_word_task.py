"""The CPU-scale word-rendering task (data_modules/synthetic/word_task.py): disjoint vocabularies, held-out
samples that never repeat a training combination, captions that quote the target, bucket sizes prepare keeps,
a cached folder whose JSONL files are at once prepare manifests and eval/GRPO prompt sets."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from data_modules.buckets import make_buckets
from data_modules.synthetic.engine import TextRenderingEngine
from data_modules.synthetic.word_task import SPLITS, WordTask, WordTaskConfig, build_word_task, candidate_words
from lit_ovis.errors import ConfigError

SMALL = dict(en_words=4, zh_words=2, unseen_en_words=2, unseen_zh_words=1, train_samples=60, heldout_samples=30, unseen_samples=9)


@pytest.fixture(scope="module")
def task():
    return WordTask(WordTaskConfig(**SMALL))


def test_vocabularies_are_disjoint_and_sized(task):
    train, unseen = task.vocab.train, task.vocab.unseen
    assert len(train) == 6 and len(unseen) == 3 and not set(train) & set(unseen)
    assert sum(w.isascii() for w in train) == 4 and sum(not w.isascii() for w in unseen) == 1
    en, zh = candidate_words()
    assert all(w in en or w in zh for w in train + unseen)
    assert WordTask(WordTaskConfig(**SMALL)).vocab.train == train  # fixed by vocab_seed
    assert WordTask(WordTaskConfig(**{**SMALL, "vocab_seed": 1})).vocab.train != train


def test_splits_differ_as_promised_and_captions_quote_the_target(task):
    train, heldout, unseen = (task.specs(s) for s in SPLITS)
    assert len(train) == 60 and len(heldout) == 30 and len(unseen) == 9
    assert {s.text for s in heldout} == set(task.vocab.train) and {s.text for s in unseen} == set(task.vocab.unseen)
    # Held-out: new seeds, and no (text, layout, background, colours, size) combination of the training set.
    assert not {s.seed for s in train} & {s.seed for s in heldout}
    assert not {WordTask.combination(s) for s in heldout} & {WordTask.combination(s) for s in train}
    assert len({(s.layout, s.fg, s.bg) for s in heldout}) > 10  # colours and layouts really vary
    # Every word equally often (a split is not dominated by a few words).
    assert max(Counter(s.text for s in train).values()) - min(Counter(s.text for s in train).values()) <= 1
    buckets = set(make_buckets(96))
    for spec in train[:12] + unseen:
        sample = task.engine.render_spec(spec)
        assert f'"{spec.text}"' in sample.caption and sample.text == spec.text
        assert sample.image.size == spec.size and spec.size in buckets  # prepare keeps every pixel
        assert sample.meta["font_px"] >= 0.8 * WordTaskConfig().min_font_px


def test_render_spec_is_deterministic_and_leaves_render_alone(task):
    spec = task.specs("heldout")[0]
    assert task.engine.render_spec(spec).image.tobytes() == task.engine.render_spec(spec).image.tobytes()
    # The original engine API still draws its own layouts (paragraphs included) deterministically.
    a, b = TextRenderingEngine(seed=3, base_size=96), TextRenderingEngine(seed=3, base_size=96)
    assert a.render(5).image.tobytes() == b.render(5).image.tobytes()


def test_build_writes_manifests_that_prepare_and_eval_read(tmp_path):
    from data_modules.records import records_from_manifest
    from lit_ovis.scoring.prompt_sets import read_prompt_set

    cfg = WordTaskConfig(**SMALL)
    report = build_word_task(cfg, tmp_path / "words", progress=False)
    assert report["counts"] == {"train": 60, "heldout": 30, "unseen": 9} and report["rendered_this_run"] == 99
    records = records_from_manifest(tmp_path / "words" / "train.jsonl")
    assert len(records) == 60 and all(r.target_text and f'"{r.target_text}"' in r.caption for r in records)
    assert all((tmp_path / "words" / "images" / "train").joinpath(f"{i:06d}.png").exists() for i in range(60))
    prompts = read_prompt_set(tmp_path / "words" / "heldout.jsonl")
    assert len(prompts) == 30 and all(p["target_text"] in task_vocab(report) for p in prompts)
    assert all((p["width"], p["height"]) in {tuple(s) for s in report["sizes"]} for p in prompts)
    again = build_word_task(cfg, tmp_path / "words", progress=False)
    assert again["rendered_this_run"] == 0 and again["fingerprint"] == report["fingerprint"]
    changed = build_word_task(WordTaskConfig(**{**SMALL, "train_samples": 61}), tmp_path / "words", progress=False)
    assert changed["rendered_this_run"] == 100 and len(records_from_manifest(tmp_path / "words" / "train.jsonl")) == 61
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def task_vocab(report: dict) -> set[str]:
    return set(report["vocabulary"]["train"])


def test_word_task_prompts_feed_the_prompt_data_module(tmp_path):
    from data_modules.prompts import PromptDataModule

    build_word_task(WordTaskConfig(**SMALL), tmp_path / "w", progress=False)
    dm = PromptDataModule(prompt_file=str(tmp_path / "w" / "heldout.jsonl"), batch_size=5)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert all(f'"{t}"' in p for p, t in zip(batch["prompts"], batch["target_texts"]))
    assert set(batch["languages"]) <= {"en", "zh"}


def test_bad_settings_name_the_option():
    with pytest.raises(ConfigError, match="--layouts"):
        WordTask(WordTaskConfig(**{**SMALL, "layouts": ("paragraph",)}))
    with pytest.raises(ConfigError, match="at most"):
        WordTask(WordTaskConfig(en_words=10_000))
    with pytest.raises(ConfigError, match="font"):
        WordTask(WordTaskConfig(**{**SMALL, "latin_font": "NoSuchFont.ttf"}))


def test_word_data_renders_trains_and_prepares_once(tmp_path):
    """The whole CPU-scale input chain (task -> autoencoder -> prepared latents with text embeddings) is cached:
    a rerun does no work, a changed task retrains the autoencoder in place and prepares its latents again."""
    from data_modules.streaming import LatentDataModule
    from data_modules.word_data import ensure_word_data
    from lit_ovis.models.autoencoder_training import AutoencoderConfig

    ae = AutoencoderConfig(block_out_channels=(8, 8, 8), norm_num_groups=4, steps=3, batch_size=4, stats_images=8)
    tiny = {**SMALL, "train_samples": 12, "heldout_samples": 6, "unseen_samples": 3}
    first = ensure_word_data(tmp_path / "w", WordTaskConfig(**tiny), ae, max_sequence_length=16, log=None)
    assert first.reports["autoencoder"]["trained_this_run"] and first.reports["latents"]["kept"] == 12
    assert (first.reports["latents"]["latent_channels"], first.reports["latents"]["latent_scale"]) == (16, 4)
    dm = LatentDataModule(root=str(first.latents), batch_size=1, num_workers=0, resolutions=[96])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape[1] == 16 and batch["prompt_embeds"].shape[1] <= 16
    again = ensure_word_data(tmp_path / "w", WordTaskConfig(**tiny), ae, max_sequence_length=16, log=None)
    assert not again.reports["autoencoder"]["trained_this_run"] and again.reports["latents"]["processed_this_run"] == 0
    changed = ensure_word_data(tmp_path / "w", WordTaskConfig(**{**tiny, "seed": 1}), ae, max_sequence_length=16, log=None)
    assert changed.reports["autoencoder"]["trained_this_run"] and changed.reports["latents"]["processed_this_run"] == 12


def test_cli_renders_the_task_and_names_bad_options(tmp_path, capsys):
    from lit_ovis.__main__ import main

    args = ["word-task", "--output-dir", str(tmp_path / "w"), "--en-words", "2", "--zh-words", "1", "--unseen-en-words", "1",
            "--unseen-zh-words", "1", "--train-samples", "6", "--heldout-samples", "3", "--unseen-samples", "2"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["counts"] == {"train": 6, "heldout": 3, "unseen": 2} and len(out["vocabulary"]["train"]) == 3
    assert main(args + ["--layouts", "poster,paragraph"]) == 2
    assert "--layouts" in capsys.readouterr().err


def test_word_first_captions_open_with_the_quoted_word_and_keep_the_render():
    engine_task = WordTask(WordTaskConfig(**SMALL))
    first_task = WordTask(WordTaskConfig(**SMALL, caption_style="word_first"))
    for (spec, a), (_, b) in zip(engine_task.samples("heldout"), first_task.samples("heldout")):
        assert b.caption.startswith(f'"{spec.text}"') and a.image.tobytes() == b.image.tobytes()
        assert f'"{spec.text}"' in a.caption and not a.caption.startswith('"')
        if spec.language == "en":
            assert f"{b.meta['fg']} letters" in b.caption
    with pytest.raises(ConfigError, match="--caption-style"):
        WordTask(WordTaskConfig(**SMALL, caption_style="last"))


def test_folders_built_before_caption_style_and_colours_existed_keep_their_fingerprint():
    # The fingerprint data/words/task.json carries since before the settings: [FORMAT, settings without them].
    import hashlib
    from dataclasses import asdict

    from data_modules.synthetic.word_task import FORMAT

    cfg = WordTaskConfig(**SMALL)
    before = {k: v for k, v in asdict(cfg).items() if k not in ("caption_style", "colours")}
    assert cfg.fingerprint() == hashlib.sha256(json.dumps([FORMAT, before], sort_keys=True).encode()).hexdigest()[:16]
    assert WordTaskConfig(**SMALL, caption_style="word_first").fingerprint() != cfg.fingerprint()
    assert WordTaskConfig(**SMALL, colours=("black", "white")).fingerprint() != cfg.fingerprint()
    assert WordTaskConfig(**SMALL, colours=["black", "white"]).fingerprint() == WordTaskConfig(**SMALL, colours=("black", "white")).fingerprint()


def test_colours_limit_the_palette_and_unknown_names_fail_in_one_line():
    task = WordTask(WordTaskConfig(**SMALL, colours=("black", "white")))
    specs = task.specs("train")
    assert {(s.fg, s.bg) for s in specs} == {("black", "white"), ("white", "black")}
    with pytest.raises(ConfigError, match="--colours"):
        WordTask(WordTaskConfig(**SMALL, colours=("black", "mauve")))
    with pytest.raises(ConfigError, match="--colours"):
        WordTask(WordTaskConfig(**SMALL, colours=("black",)))
