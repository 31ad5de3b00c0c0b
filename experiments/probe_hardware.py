"""Measure the hardware facts the engine's design depends on (device machine).

Prints one JSON object: CPU flags, host memory bandwidth, PCIe copies (alone and concurrent
in both directions), and CPU / GPU decode-attention variants at OPT-30B / OPT-6.7B shapes.
"""
import json
import time

import torch
import torch.nn.functional as F


def bench(fn, reps=5, sync=True):
    fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main():
    out = {}
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0]
    out["cpu_model"] = [l for l in open("/proc/cpuinfo") if "model name" in l][0].split(":")[1].strip()
    out["cpu_flags"] = [f for f in ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile", "avx2", "f16c") if f in flags.split()]
    out["torch_threads"] = torch.get_num_threads()
    out["torch"] = torch.__version__

    x = torch.empty(1 << 30, dtype=torch.uint8).random_()
    y = torch.empty_like(x)
    out["host_copy_GBps"] = 2 * x.numel() / bench(lambda: y.copy_(x)) / 1e9
    del x, y

    gib = 1 << 30
    h = torch.empty(gib, dtype=torch.uint8, pin_memory=True).random_()
    h2 = torch.empty(gib, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(gib, dtype=torch.uint8, device="cuda")
    d2 = torch.empty(gib, dtype=torch.uint8, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    out["h2d_GBps"] = gib / bench(lambda: d.copy_(h, non_blocking=True)) / 1e9
    out["d2h_GBps"] = gib / bench(lambda: h2.copy_(d2, non_blocking=True)) / 1e9

    def both():
        with torch.cuda.stream(s1):
            d.copy_(h, non_blocking=True)
        with torch.cuda.stream(s2):
            h2.copy_(d2, non_blocking=True)
    out["bidir_concurrent_total_GBps"] = 2 * gib / bench(both) / 1e9
    small = torch.empty(8 << 20, dtype=torch.uint8, pin_memory=True)

    def big_h2d_small_d2h():
        with torch.cuda.stream(s1):
            d.copy_(h, non_blocking=True)
        with torch.cuda.stream(s2):
            for i in range(16):
                small.copy_(d2[i * (8 << 20):(i + 1) * (8 << 20)], non_blocking=True)
    out["h2d_1g_with_16x8m_d2h_s"] = bench(big_h2d_small_d2h)
    t0 = time.perf_counter()
    big = torch.empty(8 * gib, dtype=torch.uint8, pin_memory=True)
    out["pin_alloc_8g_s"] = time.perf_counter() - t0
    del big, h, h2, d, d2

    # CPU decode attention, OPT-30B shapes
    B, H, D, T = 24, 56, 128, 544
    res = {}
    kc = torch.randn(T, B, H, D, dtype=torch.float16).pin_memory()
    vc = torch.randn(T, B, H, D, dtype=torch.float16).pin_memory()
    q = torch.randn(B, H, 1, D, dtype=torch.float16)
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[:3, ..., :40] = False
    kp, vp = kc.permute(1, 2, 0, 3), vc.permute(1, 2, 0, 3)
    res["sdpa_fp16_tbhd"] = bench(lambda: F.scaled_dot_product_attention(q, kp, vp, attn_mask=mask), sync=False)
    kb, vb = kp.contiguous(), vp.contiguous()
    res["sdpa_fp16_bhtd"] = bench(lambda: F.scaled_dot_product_attention(q, kb, vb, attn_mask=mask), sync=False)
    res["sdpa_fp16_bhtd_nomask"] = bench(lambda: F.scaled_dot_product_attention(q, kb, vb), sync=False)

    def bmm_fp16():
        s = torch.matmul(q, kb.transpose(-1, -2)).float().masked_fill(~mask, -1e4).softmax(-1).half()
        return torch.matmul(s, vb)
    res["bmm_fp16_bhtd"] = bench(bmm_fp16, sync=False)

    def bmm_fp32():
        s = torch.matmul(q.float(), kb.float().transpose(-1, -2)).masked_fill(~mask, -1e4).softmax(-1)
        return torch.matmul(s, vb.float())
    res["bmm_fp32_upcast_bhtd"] = bench(bmm_fp32, sync=False)
    kf, vf = kb.float(), vb.float()
    res["sdpa_fp32_bhtd"] = bench(lambda: F.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=mask), sync=False)
    res["bytes_fp16_cache"] = 2 * kc.numel() * 2
    out["cpu_attention_opt30b_b24_s"] = res
    del kc, vc, kb, vb, kf, vf

    # GPU decode attention, OPT-6.7B shapes
    B, H, D, T = 32, 32, 128, 544
    g = {}
    kc = torch.randn(T, B, H, D, dtype=torch.float16, device="cuda")
    vc = torch.randn(T, B, H, D, dtype=torch.float16, device="cuda")
    q = torch.randn(B, H, 1, D, dtype=torch.float16, device="cuda")
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool, device="cuda")
    mask[:3, ..., :40] = False
    kp, vp = kc.permute(1, 2, 0, 3), vc.permute(1, 2, 0, 3)
    kb, vb = kp.contiguous(), vp.contiguous()
    g["sdpa_tbhd_mask"] = bench(lambda: F.scaled_dot_product_attention(q, kp, vp, attn_mask=mask), reps=50)
    g["sdpa_bhtd_mask"] = bench(lambda: F.scaled_dot_product_attention(q, kb, vb, attn_mask=mask), reps=50)
    g["sdpa_bhtd_nomask"] = bench(lambda: F.scaled_dot_product_attention(q, kb, vb), reps=50)
    g["bytes"] = 2 * kc.numel() * 2
    out["gpu_attention_opt6.7b_b32_s"] = g
    # prefill attention at 6.7B shapes, with a padding mask vs causal only
    qp = torch.randn(32, 32, 512, 128, dtype=torch.float16, device="cuda")
    pm = torch.ones(32, 1, 512, 512, dtype=torch.bool, device="cuda").tril()
    g2 = {}
    g2["causal"] = bench(lambda: F.scaled_dot_product_attention(qp, qp, qp, is_causal=True), reps=20)
    g2["bool_mask"] = bench(lambda: F.scaled_dot_product_attention(qp, qp, qp, attn_mask=pm), reps=20)
    out["gpu_prefill_attention_b32_s512_s"] = g2
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
