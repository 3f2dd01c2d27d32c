"""Frozen Qwen3 text encoder with the Ovis prompt template.

`OvisTextEncoder.encode` reproduces `OvisImagePipeline.encode_prompt` exactly: the system prompt is
prepended to the user prompt, the Qwen3 chat template is applied without thinking, the sequence is
padded/truncated to `max_sequence_length + prefix_tokens`, the final hidden states are zeroed on padding
and the template prefix tokens are stripped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

from lit_ovis.errors import CheckpointError, ConfigError
from lit_ovis.files import check_weights_source, hub_load_failure
from lit_ovis.models.presets import TEXT_ENCODER_PRESETS, TINY_SEED
from lit_ovis.models.tokenizer import build_byte_tokenizer

# Same wording as the released pipeline; the model was trained with it.
OVIS_SYSTEM_PROMPT = (
    "Describe the image by detailing the color, quantity, text, shape, size, texture, spatial relationships "
    "of the objects and background: "
)
# Tokens of "<|im_start|>user\n" + system prompt under the Qwen tokenizer; they are cut from the output.
OVIS_PREFIX_TOKENS = 28
MAX_SEQUENCE_LENGTH = 256
# How many template tokens are cut from the front of the encoder's output (`EncoderConfig.template_cut`).
TEMPLATE_CUTS = ("pipeline", "template")


def template_prefix_tokens(tokenizer, system_prompt: str = OVIS_SYSTEM_PROMPT) -> int:
    """Tokens this tokenizer spends on the template before the user's caption: the first position where two
    different captions' token ids differ (the byte-level tiny tokenizer: 140; the pipeline assumes Qwen's 28)."""
    a, b = (tokenizer(format_prompts(tokenizer, [c], system_prompt), add_special_tokens=False)["input_ids"][0]
            for c in ("A", "B"))
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def prefix_tokens_for(tokenizer, template_cut: str = "pipeline", system_prompt: str = OVIS_SYSTEM_PROMPT) -> int:
    """`template_cut` -> tokens cut: "pipeline" = OvisImagePipeline's fixed 28 (exports sample alike); "template" =
    this tokenizer's own template length, so only the caption and the chat suffix stay."""
    if template_cut == "pipeline":
        return OVIS_PREFIX_TOKENS
    if template_cut == "template":
        return template_prefix_tokens(tokenizer, system_prompt)
    raise ConfigError(f"template_cut '{template_cut}' is not one of {', '.join(TEMPLATE_CUTS)}; set "
                      "--model.encoders.template_cut to pipeline (OvisImagePipeline's 28 tokens) or template")


def text_ids(seq_len: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids [L, 3] = (0, i, i) of the text tokens, as the pipeline builds them (on `device` directly)."""
    pos = torch.arange(seq_len, device=device)
    return torch.stack([torch.zeros_like(pos), pos, pos], dim=-1).to(dtype)


class OvisTextEncoder(nn.Module):
    def __init__(
        self,
        model: Qwen3Model,
        tokenizer,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        prefix_tokens: int = OVIS_PREFIX_TOKENS,
        system_prompt: str = OVIS_SYSTEM_PROMPT,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.prefix_tokens = prefix_tokens
        self.system_prompt = system_prompt

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)

    def format(self, prompts: list[str]) -> list[str]:
        return format_prompts(self.tokenizer, prompts, self.system_prompt)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            self.format(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_sequence_length + self.prefix_tokens,
            return_tensors="pt",
            add_special_tokens=False,
        )

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompts -> embeddings [B, max_sequence_length, hidden] (zeros on padding)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.tokenize(prompts)
        return self._embed(tokens.input_ids, tokens.attention_mask)

    @torch.no_grad()
    def encode_tokens(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Stored prompt tokens (`prompt_token_ids`, right-padded to [B, T] with their `lengths`) -> the embeddings
        `encode` gives for the same prompts: padded exactly as `tokenize` pads (side, pad id, length)."""
        rows = [ids[: int(n)].tolist() for ids, n in zip(token_ids.cpu(), lengths.cpu())]
        tokens = self.tokenizer.pad({"input_ids": rows}, padding="max_length", max_length=self.max_sequence_length + self.prefix_tokens,
                                    return_tensors="pt")
        return self._embed(tokens["input_ids"], tokens["attention_mask"])

    def _embed(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        input_ids, mask = input_ids.to(device), mask.to(device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        hidden = hidden * mask[..., None]
        return hidden[:, self.prefix_tokens :, :]


def format_prompts(tokenizer, prompts: list[str], system_prompt: str = OVIS_SYSTEM_PROMPT) -> list[str]:
    """The Ovis prompt template (system prompt + user prompt, Qwen3 chat template without thinking)."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": system_prompt + p}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        for p in prompts
    ]


def prompt_token_ids(tokenizer, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                     prefix_tokens: int = OVIS_PREFIX_TOKENS) -> list[list[int]]:  # prefix: `prefix_tokens_for`
    """The token ids `OvisTextEncoder.tokenize` feeds the encoder, without the padding: what `prepare
    --text-storage tokens` stores, so training encodes online (`encode_tokens`) without the template or tokenizer."""
    return tokenizer(format_prompts(tokenizer, prompts), truncation=True, max_length=max_sequence_length + prefix_tokens,
                     add_special_tokens=False)["input_ids"]


def load_tokenizer(source: str = "tiny"):
    """The tokenizer of a text-encoder source alone (no weights): the byte tokenizer for `tiny`, else the source's
    `tokenizer/` subfolder (a pipeline folder or hub id)."""
    if source == "tiny":
        return build_byte_tokenizer()
    if source in TEXT_ENCODER_PRESETS:
        raise CheckpointError(f"text encoder preset '{source}' has no tokenizer offline; pass a folder with tokenizer/ "
                              "(e.g. a local copy of AIDC-AI/Ovis-Image-7B)")
    path = Path(source)
    sub = "tokenizer" if (path / "tokenizer").is_dir() or not path.exists() else ""
    try:
        return AutoTokenizer.from_pretrained(source, subfolder=sub)
    except OSError as err:
        raise CheckpointError(f"{source}: could not load its tokenizer ({str(err).splitlines()[0]}); pass 'tiny', a local "
                              "pipeline folder or a cached hub id") from None


def build_text_encoder(
    source: str = "tiny",
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    dtype: torch.dtype = torch.float32,
    template_cut: str = "pipeline",
) -> OvisTextEncoder:
    """`source`: a preset (`tiny`; `ovis2.5-2b` random init) or a diffusers pipeline folder / hub id that has
    `text_encoder/` and `tokenizer/` subfolders (e.g. AIDC-AI/Ovis-Image-7B). `template_cut`: see
    `prefix_tokens_for`."""
    if source in TEXT_ENCODER_PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = Qwen3Model(Qwen3Config(**TEXT_ENCODER_PRESETS[source]))
        if source != "tiny":
            raise CheckpointError(
                f"text encoder preset '{source}' has no tokenizer offline; set --model.encoders.text_encoder to a "
                "folder with text_encoder/ and tokenizer/ (e.g. a local copy of AIDC-AI/Ovis-Image-7B)"
            )
        tokenizer = build_byte_tokenizer()
        return OvisTextEncoder(model.to(dtype), tokenizer, max_sequence_length, prefix_tokens_for(tokenizer, template_cut))
    path = Path(source)
    local = check_weights_source(source, "text encoder")
    enc_sub = "text_encoder" if (path / "text_encoder").is_dir() or not local else None
    tok_sub = "tokenizer" if (path / "tokenizer").is_dir() or not local else None
    try:
        model = Qwen3Model.from_pretrained(source, subfolder=enc_sub or "", torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder=tok_sub or "")
    except OSError as err:
        raise CheckpointError(
            f"{source}: could not load the text encoder ({hub_load_failure(source, err)}); set "
            "--model.encoders.text_encoder to 'tiny', a local pipeline folder or a cached hub id"
        ) from None
    return OvisTextEncoder(model, tokenizer, max_sequence_length, prefix_tokens_for(tokenizer, template_cut))
