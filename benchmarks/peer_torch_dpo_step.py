"""Peer (copied from shared/bench/torch_dpo_step.py, kept here unchanged so the benchmark is self-contained).

Anchor: one Diffusion-DPO training step of an SD1.5-sized UNet in PyTorch/diffusers.

Mirrors what the public Diffusion-DPO trainer does per step (policy UNet in fp32 master
weights under bf16 autocast, frozen reference UNet in bf16, AdamW), on random weights and
random latents/text states, so only speed is measured. Prints JSON lines.
"""
import json, sys, time
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)


def main(pairs=8, steps=12, compile_=False, ckpt=False, beta=5000.0):
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    unet = UNet2DConditionModel(**SD15).to(dev)
    if ckpt:
        unet.enable_gradient_checkpointing()
    ref = UNet2DConditionModel(**SD15).to(dev, dtype=torch.bfloat16).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-8, fused=True)
    nparams = sum(p.numel() for p in unet.parameters())

    def step(latents, ctx, t, noise):
        noisy = latents + noise * 0.5  # scheduler math is negligible next to the UNet
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(noisy, t, ctx).sample
            with torch.no_grad():
                rpred = ref(noisy.to(torch.bfloat16), t, ctx.to(torch.bfloat16)).sample
        mse = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        rmse = (rpred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        mw, ml = mse.chunk(2)
        rw, rl = rmse.chunk(2)
        inside = -0.5 * beta * ((mw - ml) - (rw - rl))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    fn = torch.compile(step) if compile_ else step
    n = 2 * pairs
    latents = torch.randn(n, 4, 64, 64, device=dev)
    ctx = torch.randn(n, 77, 768, device=dev)
    t = torch.randint(0, 1000, (pairs,), device=dev).repeat(2)
    noise = torch.randn(n, 4, 64, 64, device=dev).chunk(2)[0].repeat(2, 1, 1, 1)

    # FLOPs of one step, counted by PyTorch's own counter.
    from torch.utils.flop_counter import FlopCounterMode
    fc = FlopCounterMode(display=False)
    with fc:
        step(latents, ctx, t, noise)
    flops = fc.get_total_flops()
    torch.cuda.synchronize()

    for _ in range(3):
        fn(latents, ctx, t, noise)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(latents, ctx, t, noise)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    print(json.dumps(dict(
        impl="torch-diffusers", compile=compile_, grad_ckpt=ckpt, pairs=pairs,
        params_M=round(nparams / 1e6, 1), step_s=round(dt, 4),
        pairs_per_s=round(pairs / dt, 2), step_TFLOP=round(flops / 1e12, 2),
        TFLOPs=round(flops / dt / 1e12, 1), mfu_vs_989=round(flops / dt / 989e12, 3),
        peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 1),
        gpu=torch.cuda.get_device_name())), flush=True)


if __name__ == "__main__":
    args = dict(a.split("=") for a in sys.argv[1:])
    main(pairs=int(args.get("pairs", 8)), compile_=args.get("compile", "0") == "1",
         ckpt=args.get("ckpt", "0") == "1", steps=int(args.get("steps", 12)))
