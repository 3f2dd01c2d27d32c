"""CLIP-family scorers loaded from a local folder or hub id that the user has.

- `clip`: CLIPScore as CVTG-2K reports it (TextCrafter's `unified_metrics_eval.py`, following Hessel et al.
  2021's CLIP-S): 2.5 * max(cos(E_image, E_text), 0) with the text "A photo depicts <prompt>" and CLIP
  ViT-L/14 (`openai/clip-vit-large-patch14`). The 2.5 is CLIP-S's w; raw cosines sit around 0.3, which is why
  CVTG-2K's table reads 0.74-0.84. We do not use torchmetrics' CLIPScore: it reports 100 * cos (another
  scale) and, in torchmetrics 1.9 with transformers 5, it fails on the `BaseModelOutputWithPooling` that
  `CLIPModel.get_image_features` now returns (`'BaseModelOutputWithPooling' object has no attribute 'norm'`),
  and it only accepts a fixed list of hub ids, not a local folder.
- `pickscore` / `hps`: the same image-text similarity with a preference-tuned CLIP checkpoint
  (e.g. PickScore_v1, HPSv2 weights converted to transformers), scaled by the model's logit scale.
- `aesthetic`: a linear head on normalised CLIP image embeddings (LAION aesthetic predictor, the
  `sa_0_4_vit_l_14_linear.pth` head CVTG-2K uses), weights from a `.pt`/`.safetensors` file with `weight` [1, D]
  and `bias` [1].
"""

from __future__ import annotations

import os

import torch

from lit_ovis.scoring.base import MissingInput, Scorer, register, to_pil

CLIPSCORE_W = 2.5  # CLIP-S rescaling weight (Hessel et al. 2021), as CVTG-2K uses it
CLIPSCORE_PREFIX = "A photo depicts "


def _load_clip(path: str | None, device):
    if not path:
        raise MissingInput("model_path", "no CLIP weights given (e.g. a local copy of openai/clip-vit-large-patch14 with its processor)")
    from transformers import AutoProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(path).eval().to(device)
        processor = AutoProcessor.from_pretrained(path)
    except OSError as err:
        raise MissingInput("model_path", f"could not load CLIP weights from '{path}' ({str(err).splitlines()[0]})") from None
    return model, processor


class _CLIPSimilarity(Scorer):
    prefix = ""

    def __init__(self, model_path: str | None = None, batch_size: int = 16, device: str = "cpu"):
        super().__init__(batch_size, device)
        self.model, self.processor = _load_clip(model_path, self.device)

    @torch.no_grad()
    def embed(self, images, prompts):
        texts = [self.prefix + p for p in prompts]
        inputs = self.processor(text=texts, images=to_pil(images), return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        img = getattr(img, "pooler_output", img)  # transformers 5 returns a ModelOutput here
        txt = getattr(txt, "pooler_output", txt)
        return torch.nn.functional.normalize(img.float(), dim=-1), torch.nn.functional.normalize(txt.float(), dim=-1)

    def cosine(self, images, prompts) -> torch.Tensor:
        img, txt = self.embed(images, prompts)
        return (img * txt).sum(-1)


@register("clip")
class CLIPScorer(_CLIPSimilarity):
    """CVTG-2K CLIPScore: 2.5 * max(cos, 0) on "A photo depicts <prompt>"."""

    prefix = CLIPSCORE_PREFIX

    def _score_batch(self, images, prompts, metadata):
        return CLIPSCORE_W * self.cosine(images, prompts).clamp(min=0)


@register("pickscore")
class PickScorer(_CLIPSimilarity):
    def _score_batch(self, images, prompts, metadata):
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)


@register("hps")
class HPSScorer(PickScorer):
    pass


@register("aesthetic")
class AestheticScorer(_CLIPSimilarity):
    def __init__(self, model_path: str | None = None, head_path: str | None = None, batch_size: int = 16, device: str = "cpu"):
        super().__init__(model_path, batch_size, device)
        if not head_path or not os.path.exists(head_path):
            raise MissingInput("head_path", f"aesthetic head weights not found at '{head_path}' (a .pt/.safetensors linear head)")
        if head_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(head_path)
        else:
            state = torch.load(head_path, map_location="cpu", weights_only=True)
        self.weight, self.bias = state["weight"].float().to(self.device), state["bias"].float().to(self.device)

    def _score_batch(self, images, prompts, metadata):
        img, _ = self.embed(images, prompts)
        return (img @ self.weight.T + self.bias).squeeze(-1)
