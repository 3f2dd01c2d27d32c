"""Model FLOPs of the Ovis-Image MMDiT, counted from the architecture (not measured).

Per sample with N_i image tokens (packed 2x2 latents) and N_t text tokens, N = N_i + N_t, width d,
heads h x head dim a (= d), MLP hidden 4d, and a matmul of [n, k] x [k, m] costing 2 n k m:

- embedders: x_embedder 2 N_i c_in d; context_embedder 2 N_t c_txt d; timestep MLP 2 (256 d + d^2)
- double-stream block (x6 in 7B): modulation 2 * 2 d (6d); per stream q,k,v,out 4 * 2 n d^2 and the
  SwiGLU MLP 2 n d (8d) + 2 n (4d) d, with n = N_i for the image stream and N_t for the text stream;
  joint attention over N tokens: QK^T and PV, 2 * 2 N^2 d
- single-stream block (x27): modulation 2 d (3d); q,k,v 3 * 2 N d^2; proj_mlp 2 N d (8d);
  proj_out 2 N (5d) d; attention 2 * 2 N^2 d
- output: norm_out modulation 2 d (2d); proj_out 2 N_i d c_out

Training costs 3x the forward (backward = 2x forward); recomputation from activation checkpointing is
not counted (model FLOPs, as MFU is defined). Elementwise ops, norms and RoPE are ignored (<1%).
"""

from __future__ import annotations


def forward_flops(config: dict, image_tokens: int, text_tokens: int) -> int:
    d = config["num_attention_heads"] * config["attention_head_dim"]
    c_in, c_out = config["in_channels"], config.get("out_channels") or config["in_channels"]
    c_txt = config["joint_attention_dim"]
    ni, nt = image_tokens, text_tokens
    n = ni + nt
    flops = 2 * ni * c_in * d + 2 * nt * c_txt * d + 2 * (256 * d + d * d)
    attention = 2 * 2 * n * n * d

    def stream(tokens: int) -> int:
        return 4 * 2 * tokens * d * d + 2 * tokens * d * 8 * d + 2 * tokens * 4 * d * d

    double = 2 * 2 * d * 6 * d + stream(ni) + stream(nt) + attention
    single = 2 * d * 3 * d + 3 * 2 * n * d * d + 2 * n * d * 8 * d + 2 * n * 5 * d * d + attention
    flops += config["num_layers"] * double + config["num_single_layers"] * single
    flops += 2 * d * 2 * d + 2 * ni * d * c_out
    return flops


def train_flops(config: dict, image_tokens: int, text_tokens: int) -> int:
    return 3 * forward_flops(config, image_tokens, text_tokens)


def sampling_flops(config: dict, image_tokens: int, text_tokens: int, steps: int, cfg: bool = True) -> int:
    return steps * (2 if cfg else 1) * forward_flops(config, image_tokens, text_tokens)


def image_tokens_for(height: int, width: int) -> int:
    return (height // 16) * (width // 16)


def dpo_train_flops(config: dict, image_tokens: int, text_tokens: int, reference: bool = True) -> int:
    """One Diffusion-DPO pair: the policy trains on the winner and the loser (2 x forward + backward) and
    the frozen reference runs forward on both (2 x forward, no backward)."""
    return 2 * train_flops(config, image_tokens, text_tokens) + (2 * forward_flops(config, image_tokens, text_tokens) if reference else 0)


# Dense BF16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100-SXM": 989.0, "H100-PCIe": 756.0, "H100-NVL": 835.0, "H200": 989.0, "GH200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "B200": 2250.0, "MI300X": 1307.0}
# Device-name fragments (as torch.cuda.get_device_name reports them) -> table key; the first match wins.
_NAME_TO_PEAK = (("GH200", "GH200"), ("H200", "H200"), ("H100 PCIE", "H100-PCIe"), ("H100 NVL", "H100-NVL"), ("H100", "H100-SXM"),
                 ("A100", "A100"), ("L40S", "L40S"), ("B200", "B200"), ("MI300X", "MI300X"))


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense BF16 peak of a known GPU from its name ("NVIDIA H100 80GB HBM3" -> 989), else None."""
    name = device_name.upper()
    for fragment, key in _NAME_TO_PEAK:
        if fragment in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def detect_peak_tflops(device) -> float | None:
    """The BF16 peak of `device` when it is a known GPU (None on CPU or an unknown card)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_bf16_tflops(torch.cuda.get_device_name(device))
