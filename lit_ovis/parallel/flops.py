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


PEAK_BF16_TFLOPS = {"H100-SXM": 989.0, "H100-PCIe": 756.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}
