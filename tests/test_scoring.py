"""Scorers: the CVTG-2K / LongText-Bench metrics by hand (EN and ZH), the GRPO OCR reward, the real OCR model
on rendered text, CLIPScore as CVTG-2K defines it on a tiny CLIP, the ensemble, option names in errors, and
the prompt-set readers on small inline samples of each benchmark's format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lit_ovis.errors import ConfigError, DataError
from lit_ovis.scoring import ScorerEnsemble, build_scorer, json_option, normalise
from lit_ovis.scoring.metrics import (WordScores, levenshtein, ocr_reward, pool_words, quoted_spans, text_accuracy,
                                      text_match, word_accuracy, word_scores)

EPS = 1e-5  # CVTG-2K's NED denominator guard


def test_cvtg_word_metrics_by_hand_english():
    assert levenshtein("kitten", "sitting") == 3
    # target words open, daily: "open" is read (case-insensitive), "daily" is not; its closest OCR word
    # (difflib) is "cafe": lev(daily, cafe) = 4 -> similarity 1 - 4 / 5
    ws = word_scores("OPEN cafe", "Open Daily")
    assert (ws.total, ws.correct) == (2, 1)
    assert ws.ned == pytest.approx([1.0, 1 - 4 / (5 + EPS)])
    # punctuation is part of a CVTG-2K word: "open," is not "open"
    assert word_accuracy("open", "open,") == 0.0
    assert word_scores("open", "open,").ned == pytest.approx([1 - 1 / (5 + EPS)])
    # membership: one OCR word satisfies a repeated target word (the CVTG-2K script's `in` test)
    assert word_accuracy("sale", "sale sale") == 1.0
    # no substring credit: a word glued into garbage is not read (the old fallback scored this 1.0)
    assert word_accuracy("xaxcat", "a cat") == 0.0
    # nothing read: every target word is wrong and its similarity is ~0 (against the empty word)
    empty = word_scores("", "open")
    assert empty.correct == 0 and empty.ned[0] == pytest.approx(0.0, abs=1e-5)


def test_cvtg_pooling_is_per_word_not_per_image():
    a = word_scores("open cafe", "open daily")  # 1 of 2
    b = word_scores("fresh bread today", "fresh bread today")  # 3 of 3
    pooled = pool_words([a, b])
    assert pooled["word_accuracy"] == pytest.approx(4 / 5)  # per-image mean would be 0.75
    assert pooled["ned"] == pytest.approx((sum(a.ned) + sum(b.ned)) / 5)
    assert pooled["words"] == 5
    assert pool_words([WordScores()])["word_accuracy"] is None


def test_cvtg_metrics_chinese_use_characters():
    ws = word_scores("你好界", "你好世界")  # characters are the words: 你 好 界 read, 世 missing
    assert (ws.total, ws.correct) == (4, 3)
    assert ws.ned == pytest.approx([1.0, 1.0, 1 - 1 / (1 + EPS), 1.0])
    assert word_accuracy("你好 世界", "你好世界") == 1.0  # spaces do not count in Chinese
    assert word_accuracy("“你好”，世界！", "你好世界") == 1.0  # nor punctuation


def test_word_accuracy_interval_covers_the_estimate_and_narrows_with_more_images():
    from lit_ovis.scoring.metrics import word_accuracy_interval

    small = [WordScores(2, 1), WordScores(1, 1), WordScores(1, 0), WordScores(2, 2)] * 5
    low, high = word_accuracy_interval(small)
    assert low < pool_words(small)["word_accuracy"] < high
    wide = high - low
    low, high = word_accuracy_interval(small * 10)
    assert high - low < 0.5 * wide
    assert word_accuracy_interval([WordScores(1, 1)] * 8) == (1.0, 1.0)


def test_paired_gain_interval_by_hand_and_by_significance():
    from lit_ovis.scoring.metrics import word_accuracy_gain_interval

    before = [WordScores(1, 0), WordScores(2, 1), WordScores(1, 1), WordScores(1, 0)]
    after = [WordScores(1, 1), WordScores(2, 2), WordScores(1, 1), WordScores(1, 0)]
    gain, low, high = word_accuracy_gain_interval(before, after)
    assert gain == pytest.approx(4 / 5 - 2 / 5)  # pooled over the 5 words of the same 4 images
    assert low <= gain <= high
    # the same gain on many images is significant; no change never is
    gain, low, high = word_accuracy_gain_interval(before * 50, after * 50)
    assert 0 < low < gain < high
    assert word_accuracy_gain_interval(after * 20, after * 20) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        word_accuracy_gain_interval(before, after[:3])


def test_longtext_text_accuracy_by_hand():
    # EN: punctuation deleted (not split on), lower case, multiset of words
    target = " ".join(["Visit EVExpo2023.com for details", "CENTRAL PARK - 2 BLOCKS"])
    ocr = "visit evexpo2023com for for central park 2"
    # target words: visit evexpo2023com for details central park 2 blocks (8); matched: visit evexpo2023com for
    # central park 2 (6; the second "for" has no partner)
    assert text_match(ocr, target, "en") == (6, 8)
    # ZH: characters, digits kept, punctuation and spaces dropped; multiset, so repeats need repeats
    assert text_match("本地烘焙，始于 1998", "本地烘焙，始于1998", "zh") == (10, 10)
    assert text_match("哈", "哈哈哈", "zh") == (1, 3)
    assert text_accuracy("你好界", "你好世界") == pytest.approx(0.75)


def test_ocr_reward_is_bounded_and_not_gameable():
    assert ocr_reward("a cat", "A Cat") == 1.0
    assert ocr_reward("", "open") == 0.0 and ocr_reward("", "") == 1.0
    # recall = mean(1/6, 1/2) = 1/3 (similarities of "a" and "cat" to "xaxcat"), precision = 1/2 -> F1 = 0.4
    assert ocr_reward("xaxcat", "a cat") == pytest.approx(0.4, abs=1e-4)
    # rendering extra words cannot raise the reward (precision pays for them)
    assert ocr_reward("open open zebra quantum", "open") < ocr_reward("open", "open")
    assert 0.0 <= ocr_reward("opem", "open") < 1.0
    assert ocr_reward("你好界", "你好世界") == pytest.approx(2 * 0.75 * 1.0 / 1.75, abs=1e-4)
    for p, t in [("zzz", "open"), ("open daily daily", "open daily"), ("你", "你好")]:
        assert 0.0 <= ocr_reward(p, t) <= 1.0


@pytest.fixture(scope="module")
def ocr():
    return build_scorer("ocr")


def test_ocr_reads_rendered_english_and_chinese(ocr):
    from data_modules.synthetic.engine import TextRenderingEngine

    engine = TextRenderingEngine(seed=5, base_size=256)
    en = [engine.render(i, aspect_ratio=1.5, language="en") for i in range(8)]
    zh = [engine.render(100 + i, aspect_ratio=1.5, language="zh") for i in range(4)]
    texts = ocr.read([s.image for s in en + zh])
    en_acc = pool_words([word_scores(t, s.text) for t, s in zip(texts[:8], en)])["word_accuracy"]
    zh_acc = pool_words([word_scores(t, s.text) for t, s in zip(texts[8:], zh)])["word_accuracy"]
    assert en_acc >= 0.9, list(zip(texts, [s.text for s in en]))
    assert zh_acc >= 0.75, list(zip(texts[8:], [s.text for s in zh]))
    right = ocr.score([en[0].image], [en[0].caption], [{"target_text": en[0].text}])
    wrong = ocr.score([en[0].image], [en[0].caption], [{"target_text": "zebra quantum"}])
    assert right.item() > 0.8 and wrong.item() < 0.4
    # one read gives every metric
    _, details = ocr.score_with_details([en[0].image], [""], [{"target_text": en[0].text}])
    assert set(details[0]) >= {"ocr_text", "word_accuracy", "ned", "text_accuracy", "reward", "word_ned"}


def test_fast_recognition_path_reads_rendered_words_in_batches():
    """Detection-free batched recognition (the GRPO reward path) on the word task's small single-line renders."""
    from data_modules.synthetic.word_task import WordTask, WordTaskConfig

    fast = build_scorer("ocr", mode="recognize", batch_size=32)
    task = WordTask(WordTaskConfig(en_words=8, zh_words=4, heldout_samples=24))
    samples = [s for _, s in task.samples("heldout")]
    calls, session = [], fast.engine.text_rec.session

    class Counting:  # the recogniser's ONNX session, counting its calls
        def __call__(self, batch):
            calls.append(len(batch))
            return session(batch)

    fast.engine.text_rec.session = Counting()
    texts = fast.read([s.image for s in samples])
    assert len(calls) == 1  # 24 images, one ONNX call
    for language in ("en", "zh"):
        pick = [(t, s) for t, s in zip(texts, samples) if s.language == language]
        acc = pool_words([word_scores(t, s.text) for t, s in pick])["word_accuracy"]
        assert len(pick) >= 8 and acc >= 0.9, pick
    right, _ = fast.score_with_details([samples[0].image], [""], [{"target_text": samples[0].text}])
    wrong = fast.score([samples[0].image], [""], [{"target_text": "zebra"}])
    assert right.item() > 0.9 and wrong.item() < 0.3
    with pytest.raises(ValueError, match="mode"):
        build_scorer("ocr", mode="fast")


def test_likelihood_metric_is_a_dense_ocr_reward_from_the_same_read():
    """metric='likelihood': the recogniser's per-character CTC probability of the target, from the one ONNX
    call that also gives the reading; high for the rendered word, near zero for another word, falling as the
    text dissolves, while the discrete reward stays tied at first."""
    from PIL import ImageFilter

    from data_modules.synthetic.word_task import WordTask, WordTaskConfig

    dense = build_scorer("ocr", mode="recognize", batch_size=16, metric="likelihood")
    task = WordTask(WordTaskConfig(en_words=8, zh_words=4, heldout_samples=16))
    samples = [s for _, s in task.samples("heldout")]
    images, meta = [s.image for s in samples], [{"target_text": s.text} for s in samples]
    calls, session = [], dense.engine.text_rec.session
    dense.engine.text_rec.session = lambda batch: calls.append(len(batch)) or session(batch)
    right, details = dense.score_with_details(images, [""] * 16, meta)
    assert calls == [16]
    assert torch.allclose(right, torch.tensor([d["likelihood"] for d in details]))
    assert {"reward", "word_accuracy", "ocr_text"} <= set(details[0])
    assert right.median() > 0.9 and ((right > 0) & (right <= 1)).all()
    wrong = dense.score(images, [""] * 16, [{"target_text": "zebra"}] * 16)
    assert wrong.max() < 0.01
    gone = dense.score([im.filter(ImageFilter.GaussianBlur(8)) for im in images], [""] * 16, meta)
    assert gone.mean() < 0.5 * right.mean()
    with pytest.raises(ValueError, match="mode='recognize'"):
        build_scorer("ocr", metric="likelihood")


def test_text_band_crops_to_the_text_and_keeps_plain_images():
    from lit_ovis.scoring.ocr import text_band

    image = np.full((96, 96, 3), 240, dtype=np.uint8)
    image[40:56, 20:70] = 10  # a dark "word"
    crop = text_band(image)
    assert crop.shape[0] < 40 and crop.shape[1] < 80
    assert (crop < 128).any(axis=-1).sum() == 16 * 50  # the whole word is inside
    assert text_band(np.full((32, 32, 3), 7, dtype=np.uint8)).shape == (32, 32, 3)


def test_brightness_scorer_and_ensemble():
    dark, bright = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    images = torch.cat([dark, bright, 0.5 * bright])
    b = build_scorer("brightness").score(images, ["", "", ""])
    assert torch.allclose(b, torch.tensor([0.0, 1.0, 0.5]))
    ens = ScorerEnsemble({"brightness": build_scorer("brightness"), "contrast": build_scorer("contrast")}, {"brightness": 2.0, "contrast": 0.5}, "zscore")
    total, parts = ens(images, ["", "", ""])
    z = (b - b.mean()) / (b.std() + 1e-6)
    assert torch.allclose(total, 2.0 * z + 0.5 * normalise(parts["contrast"], "zscore"))
    assert torch.allclose(normalise(torch.tensor([1.0, 3.0]), "minmax", (0.0, 4.0)), torch.tensor([0.25, 0.75]))
    assert torch.allclose(normalise(torch.tensor([3.0, 1.0, 2.0]), "rank"), torch.tensor([1.0, 0.0, 0.5]))
    with pytest.raises(ConfigError, match="unknown scorer"):
        build_scorer("nope")


def test_ensemble_from_weights_is_the_one_call_api():
    fn_calls = []

    def bright(images, prompts, metadata):
        fn_calls.append(len(images))
        return images.mean(dim=(1, 2, 3))

    images = torch.stack([torch.full((3, 4, 4), 0.2), torch.full((3, 4, 4), 0.8)])
    ens = ScorerEnsemble.from_weights({"brightness": 3.0, "contrast": 1.0})  # built from the registry
    total, parts = ens(images, ["a", "b"])
    torch.testing.assert_close(total, 3.0 * parts["brightness"] + parts["contrast"])
    # callers' own functions (GRPO reward_fns) replace the registry; unlisted weights are 1
    ens = ScorerEnsemble.from_weights({"ocr": 2.0}, scorers={"bright": bright})
    total, parts = ens(images, ["a", "b"])
    torch.testing.assert_close(total, torch.tensor([0.2, 0.8]))
    assert fn_calls == [2]
    # settings of a known scorer that is not used (a config's clip kwargs after rewards were overridden) are
    # ignored; a name that is no scorer at all is a typo and fails
    assert list(ScorerEnsemble.from_weights({"brightness": 1.0}, {"clip": {"model_path": "x"}}).scorers) == ["brightness"]
    with pytest.raises(ConfigError, match="not scorers"):
        ScorerEnsemble.from_weights({"brightness": 1.0}, {"clipp": {"model_path": "x"}})


def _tiny_clip(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<|startoftext|>": 256, "<|endoftext|>": 257})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = CLIPTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64, bos_token_id=256, eos_token_id=257, pad_token_id=257),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = CLIPModel(cfg)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return model, proc


def test_clip_score_is_cvtg2k_clip_s(tmp_path):
    # CVTG-2K: 2.5 * max(cos(image, "A photo depicts " + prompt), 0), from the towers and projections directly
    # (torchmetrics' CLIPScore reports 100 * cos and fails on transformers-5 CLIP outputs; see scoring/clip.py).
    model, proc = _tiny_clip(tmp_path / "clip")
    scorer = build_scorer("clip", model_path=str(tmp_path / "clip"))
    images = torch.rand(3, 3, 40, 40)
    prompts = ["a red sign", "a cat", "text"]
    ours = scorer.score(images, prompts)
    from lit_ovis.scoring.base import to_pil

    inputs = scorer.processor(text=["A photo depicts " + p for p in prompts], images=to_pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output)
    ref = 2.5 * torch.nn.functional.cosine_similarity(img, txt).clamp(min=0)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert (ours >= 0).all() and (ours <= 2.5).all()


def test_missing_weights_name_the_option_of_the_command(tmp_path):
    from lit_ovis.cli.eval import build_ensemble as eval_ensemble
    from data_modules.make_pairs import PairsConfig, build_ensemble as pairs_ensemble

    with pytest.raises(ConfigError, match=r"no CLIP weights given .*; set build_scorer\(.clip., model_path=...\)"):
        build_scorer("clip")
    with pytest.raises(ConfigError, match="set --clip-model$"):
        eval_ensemble("ocr,clip", None, "{}")
    with pytest.raises(ConfigError, match="could not load CLIP weights from '/nonexistent/clip'.*set --clip-model"):
        eval_ensemble("clip", "/nonexistent/clip", "{}")
    _tiny_clip(tmp_path / "clip")
    with pytest.raises(ConfigError, match="""set --scorer-kwargs '\\{"aesthetic": \\{"head_path": "..."\\}\\}'"""):
        eval_ensemble("aesthetic", str(tmp_path / "clip"), "{}")
    with pytest.raises(ConfigError, match="""set --scorer-kwargs '\\{"clip": \\{"model_path": "..."\\}\\}'"""):
        pairs_ensemble(PairsConfig(output_dir="unused", scorers="clip=1"))
    grpo = json_option("--model.grpo.reward_kwargs")
    with pytest.raises(ConfigError, match="""set --model.grpo.reward_kwargs '\\{"hps": \\{"model_path": "..."\\}\\}'"""):
        ScorerEnsemble.from_weights({"hps": 1.0}, option=grpo)
    with pytest.raises(ConfigError, match="accepts"):
        build_scorer("brightness", model_path="x")


# ----------------------------------------------------------------------------------------- prompt sets
def _write(path, obj=None, lines=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) if lines is not None else json.dumps(obj, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    return path


CVTG_ROWS = [
    {"index": 0, "prompt": "A retro book cover with 'Crime Scene' in bold and a title that says 'The Mystery' in italic.",
     "carrier_list": ["glass", "title"], "sentence_list": ["a glass with 'Crime Scene' in bold.", "a title that says 'The Mystery' in italic."]},
    {"index": 7, "prompt": "A shop front whose sign reads 'OPEN' and whose door says 'PUSH'.",
     "carrier_list": ["sign", "door"], "sentence_list": ["a sign that reads 'OPEN'.", "a door that says 'PUSH'."]},
]


def test_reader_cvtg2k_data_list_combined_and_root(tmp_path):
    from lit_ovis.scoring.prompt_sets import read_prompt_set

    root = tmp_path / "CVTG-2K"
    f = _write(root / "CVTG" / "2.json", {"data_list": CVTG_ROWS})
    _write(root / "CVTG-Style" / "3.json", {"data_list": [{"index": 1, "prompt": "A poster with 'A' and 'B C' and 'D'.",
                                                           "carrier_list": [], "sentence_list": []}]})
    _write(root / "CVTG" / "2_combined.json", {"0": CVTG_ROWS[0]["prompt"]})
    items = read_prompt_set(f)
    assert [it["id"] for it in items] == ["CVTG_2_0", "CVTG_2_7"]
    assert items[0]["target_texts"] == ["Crime Scene", "The Mystery"] and items[0]["target_text"] == "Crime Scene The Mystery"
    assert items[0]["regions"] == 2 and items[0]["subset"] == "CVTG" and items[0]["benchmark"] == "cvtg"
    assert items[0]["language"] == "en"
    combined = read_prompt_set(root / "CVTG" / "2_combined.json")
    assert combined[0]["target_texts"] == ["Crime Scene", "The Mystery"] and combined[0]["regions"] == 2
    every = read_prompt_set(root)  # the root folder: all <N>.json, not the _combined duplicates
    assert len(every) == 3 and {it["regions"] for it in every} == {2, 3}
    assert quoted_spans("no quotes here") == []


def test_reader_sentence_list_and_generic_jsonl(tmp_path, capsys):
    from lit_ovis.scoring.prompt_sets import read_prompt_set

    f = _write(tmp_path / "p.jsonl", lines=[
        json.dumps({"prompt": "a sign", "sentence_list": ["a sign that reads 'OPEN'."]}),
        "{not json",
        json.dumps({"caption": "no prompt key but a caption", "target_text": "HI", "id": "x"}),
        json.dumps({"target_text": "orphan"}),
        json.dumps({"prompt": '海报写着"你好"', "text": "你好"}),
    ])
    items = read_prompt_set(f)
    assert [it["target_text"] for it in items] == ["OPEN", "HI", "你好"]
    assert items[1]["id"] == "x" and items[2]["language"] == "zh" and items[0]["benchmark"] == "jsonl"
    assert "skipped 2 unusable entries" in capsys.readouterr().err  # the bad line and the entry without a prompt
    with pytest.raises(DataError, match="no usable prompts"):
        read_prompt_set(_write(tmp_path / "bad.jsonl", lines=["{oops"]))


def test_reader_longtext_bench_and_geneval(tmp_path):
    from lit_ovis.scoring.prompt_sets import read_prompt_set

    longtext = _write(tmp_path / "text_prompts_zh.jsonl", lines=[json.dumps(x, ensure_ascii=False) for x in [
        {"category": "sign", "length": "short", "prompt": "广告牌印着“每日新鲜烘焙”，标语“本地烘焙，始于1998”",
         "text": ["每日新鲜烘焙", "本地烘焙，始于1998"], "text_length": 16, "prompt_id": 12},
        {"category": "sign", "length": "long", "prompt": "A sign reads \"FRESH BREWS\"", "text": ["FRESH BREWS"], "text_length": 2, "prompt_id": 3},
    ]])
    items = read_prompt_set(longtext)
    assert [it["id"] for it in items] == ["12", "3"]
    assert items[0]["target_texts"] == ["每日新鲜烘焙", "本地烘焙，始于1998"] and items[0]["language"] == "zh"
    assert items[1]["target_text"] == "FRESH BREWS" and items[1]["language"] == "en" and items[0]["benchmark"] == "longtext"
    geneval = _write(tmp_path / "evaluation_metadata.jsonl", lines=[
        json.dumps({"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}),
        json.dumps({"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
                    "prompt": "a photo of two clocks"}),
    ])
    items = read_prompt_set(geneval)
    assert [it["tag"] for it in items] == ["single_object", "counting"] and items[1]["exclude"][0]["count"] == 3
    assert all(it["target_text"] == "" and it["benchmark"] == "geneval" for it in items)
