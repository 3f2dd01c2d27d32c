"""Scorers: metrics by hand (EN and ZH), the real OCR model on rendered text, CLIPScore on a tiny CLIP
against torchmetrics' implementation, and the ensemble's normalisation and weights."""

from __future__ import annotations

import pytest
import torch

from lit_ovis.errors import ConfigError
from lit_ovis.scoring import ScorerEnsemble, build_scorer, normalise
from lit_ovis.scoring.metrics import levenshtein, ned, normalize, ocr_reward, word_accuracy


def test_metrics_by_hand_english():
    assert levenshtein("kitten", "sitting") == 3
    assert normalize("  Hello,   WORLD! ") == "hello world"
    assert normalize("ＯＰＥＮ") == "open"  # full-width
    assert ned("hello world", "hello world") == 1.0
    assert ned("helo world", "hello world") == pytest.approx(1 - 1 / 11)
    # target words: open, daily (2); OCR has open once -> 1/2
    assert word_accuracy("OPEN cafe", "Open Daily") == 0.5
    # each OCR word is used once: "sale sale" needs two hits
    assert word_accuracy("sale", "sale sale") == 0.5
    assert ocr_reward("OPEM", "open") == pytest.approx(0.75)
    assert ocr_reward("", "open") == 0.0 and ocr_reward("completely different text", "open") == 0.0


def test_metrics_by_hand_chinese():
    # characters are the units: 你 好 世 界 -> OCR got 你 好 界
    assert word_accuracy("你好界", "你好世界") == 0.75
    assert ned("你好界", "你好世界") == pytest.approx(1 - 1 / 4)
    assert ocr_reward("你好 世界", "你好世界") == 1.0  # spaces do not count in Chinese
    assert normalize("“你好”，世界！") == "你好世界"


@pytest.fixture(scope="module")
def ocr():
    return build_scorer("ocr")


def test_ocr_reads_rendered_english_and_chinese(ocr):
    from data_modules.synthetic.engine import TextRenderingEngine

    engine = TextRenderingEngine(seed=5, base_size=256)
    en = [engine.render(i, aspect_ratio=1.5, language="en") for i in range(8)]
    zh = [engine.render(100 + i, aspect_ratio=1.5, language="zh") for i in range(4)]
    texts = ocr.read([s.image for s in en + zh])
    en_acc = sum(word_accuracy(t, s.text) for t, s in zip(texts[:8], en)) / 8
    zh_acc = sum(word_accuracy(t, s.text) for t, s in zip(texts[8:], zh)) / 4
    assert en_acc >= 0.9, list(zip(texts, [s.text for s in en]))
    assert zh_acc >= 0.75, list(zip(texts[8:], [s.text for s in zh]))
    right = ocr.score([en[0].image], [en[0].caption], [{"target_text": en[0].text}])
    wrong = ocr.score([en[0].image], [en[0].caption], [{"target_text": "zebra quantum"}])
    assert right.item() > 0.8 and wrong.item() < 0.4


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
    with pytest.raises(ConfigError, match="unknown scorer"):
        build_scorer("nope")


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


def test_clip_score_matches_the_definition(tmp_path):
    # torchmetrics' CLIPScore (1.9) cannot read transformers-5 CLIP outputs, so the reference is the
    # definition itself, computed from the vision/text towers and projections directly.
    model, proc = _tiny_clip(tmp_path / "clip")
    scorer = build_scorer("clip", model_path=str(tmp_path / "clip"))
    images = torch.rand(3, 3, 40, 40)
    prompts = ["a red sign", "a cat", "text"]
    ours = scorer.score(images, prompts)
    from lit_ovis.scoring.base import to_pil

    inputs = scorer.processor(text=prompts, images=to_pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output)
    ref = 100 * torch.nn.functional.cosine_similarity(img, txt).clamp(min=0)
    assert torch.allclose(ours, ref, atol=1e-4)


def test_missing_clip_weights_name_the_option():
    with pytest.raises(ConfigError, match="model_path is not set"):
        build_scorer("clip")
    with pytest.raises(ConfigError, match="could not load CLIP weights"):
        build_scorer("clip", model_path="/nonexistent/clip")


def test_word_accuracy_tolerates_dropped_spaces_but_not_wrong_words():
    assert word_accuracy("BANKCONCERT", "bank concert") == 1.0
    assert word_accuracy("BANKCONCRT", "bank concert") == 0.5
    assert word_accuracy("bank", "bank bank") == 0.5
