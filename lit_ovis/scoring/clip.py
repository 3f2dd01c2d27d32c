"""CLIP-family scorers loaded from a local folder or hub id that the user has.

- `clip`: CLIPScore (Hessel et al. 2021): 100 * max(cos(image, text), 0), as torchmetrics computes it.
- `pickscore` / `hps`: the same image-text similarity with a preference-tuned CLIP checkpoint
  (e.g. PickScore_v1, HPSv2 weights converted to transformers), scaled by the model's logit scale.
- `aesthetic`: a linear head on CLIP image embeddings (LAION aesthetic predictor style), weights from a
  `.pt`/`.safetensors` file with `weight` [1, D] and `bias` [1].
"""

from __future__ import annotations

import os

import torch

from lit_ovis.errors import ConfigError
from lit_ovis.scoring.base import Scorer, register, to_pil


def _load_clip(path: str | None, option: str, device):
    if not path:
        raise ConfigError(f"{option} is not set: point it at a local CLIP folder (e.g. openai/clip-vit-large-patch14 downloaded with its processor)")
    from transformers import AutoProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(path).eval().to(device)
        processor = AutoProcessor.from_pretrained(path)
    except OSError as err:
        raise ConfigError(f"{path}: could not load CLIP weights ({str(err).splitlines()[0]}); set {option} to a local folder with the weights") from None
    return model, processor


class _CLIPSimilarity(Scorer):
    option = "--scorer.model_path"
    scale_by_logit = False

    def __init__(self, model_path: str | None = None, batch_size: int = 16, device: str = "cpu"):
        super().__init__(batch_size, device)
        self.model, self.processor = _load_clip(model_path, self.option, self.device)

    @torch.no_grad()
    def embed(self, images, prompts):
        inputs = self.processor(text=list(prompts), images=to_pil(images), return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        return torch.nn.functional.normalize(img.float(), dim=-1), torch.nn.functional.normalize(txt.float(), dim=-1)

    def _score_batch(self, images, prompts, metadata):
        img, txt = self.embed(images, prompts)
        cos = (img * txt).sum(-1)
        if self.scale_by_logit:
            return self.model.logit_scale.exp().float() * cos
        return 100.0 * cos.clamp(min=0)


@register("clip")
class CLIPScorer(_CLIPSimilarity):
    pass


@register("pickscore")
class PickScorer(_CLIPSimilarity):
    scale_by_logit = True


@register("hps")
class HPSScorer(_CLIPSimilarity):
    scale_by_logit = True


@register("aesthetic")
class AestheticScorer(_CLIPSimilarity):
    def __init__(self, model_path: str | None = None, head_path: str | None = None, batch_size: int = 16, device: str = "cpu"):
        super().__init__(model_path, batch_size, device)
        if not head_path or not os.path.exists(head_path):
            raise ConfigError(f"aesthetic head weights not found at '{head_path}'; set --scorer.head_path to a .pt/.safetensors linear head")
        if head_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(head_path)
        else:
            state = torch.load(head_path, map_location="cpu", weights_only=True)
        self.weight, self.bias = state["weight"].float().to(self.device), state["bias"].float().to(self.device)

    def _score_batch(self, images, prompts, metadata):
        img, _ = self.embed(images, prompts)
        return (img @ self.weight.T + self.bias).squeeze(-1)
