#!/usr/bin/env python3
"""PyTorch baseline for scripts/bench-gpu.mjs (optional; needs torch and diffusers).

Builds diffusers' UNet2DConditionModel from assets/sd15/unet/config.json with random weights (the
same full SD v1.5 size as the addon's benchmark) and times the UNet work of the SingleInsert recipe
with plain PyTorch, per dtype:
  - stage I step, batch 16 at 512² (64² latents): one UNet forward with grad w.r.t. the conditioning
    (the `* class` prompt) and one without grad (the class prompt target), MSE, backward;
  - stage II step, batch 4: two forwards with grad (the `* class` prompt and the class prompt through
    the LoRA model) and one without, backward. No LoRA layers are inserted (peft may be absent): the
    LoRA's extra matmuls are < 1% of the UNet's work, and the backward pass through the UNet is the
    same either way;
  - generation: UNet forwards on a batch of 2 (classifier-free guidance) at 64² latents, per second.
What the addon's numbers include and these do not: the text encoder and image encoder passes of
each training step, the scheduler arithmetic, the VAE decode (cancelled out by the 25-minus-5-step
difference in bench-gpu.mjs). So this is a lower bound for an equivalent PyTorch implementation.

Prints one JSON object. When torch or diffusers cannot be imported it prints
{"available": false, "reason": "..."} and exits 0, so scripts/gpu-check.sh can always run it.

  python3 scripts/bench-pytorch.py [--device cuda] [--dtypes fp32,bf16,fp16] [--steps 3] [--quick]
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = {"stage1": {"steps": 50, "batch": 16}, "stage2": {"steps": 100, "batch": 4}}


def unavailable(reason, **extra):
    print(json.dumps({"benchmark": "pytorch baseline", "available": False, "reason": reason, **extra}, indent=2))
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per phase (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="tiny config (assets/tiny-sd), 64x64, batch 2")
    args = parser.parse_args()

    try:
        import torch
    except ImportError as e:
        return unavailable(f"torch not installed ({e})")
    try:
        import diffusers
        from diffusers import UNet2DConditionModel
    except Exception as e:  # ImportError, or a diffusers that does not import with this torch
        return unavailable(f"diffusers not installed ({type(e).__name__}: {e})", torch=torch.__version__)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        return unavailable("torch sees no CUDA device", torch=torch.__version__)
    config_dir = os.path.join(ROOT, "assets", "tiny-sd" if args.quick else "sd15", "unet", "config.json")
    with open(config_dir) as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    latent = config.get("sample_size", 64)
    hidden = config["cross_attention_dim"]
    b1, b2 = (2, 2) if args.quick else (RECIPE["stage1"]["batch"], RECIPE["stage2"]["batch"])
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def timed(fn):
        fn()  # warm-up
        sync()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2], times

    def peak():
        return torch.cuda.max_memory_allocated(device) if cuda else None

    def reset_peak():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    result = {
        "benchmark": "pytorch baseline",
        "available": True,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
        "card": torch.cuda.get_device_name(device) if cuda else None,
        "settings": {"device": str(device), "steps": args.steps, "quick": args.quick, "stage1Batch": b1, "stage2Batch": b2, "latent": latent,
                     "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}},
        "dtypes": {},
    }
    for name in args.dtypes.split(","):
        dtype = dtypes[name]
        out = {}
        try:
            torch.manual_seed(0)
            # random weights, built on the device (torch >= 2.0's device context) in float32, then cast
            with device:
                unet = UNet2DConditionModel(**config)
            unet = unet.to(dtype).eval().requires_grad_(False)
            gen = torch.Generator(device=device).manual_seed(0)

            def randn(*shape, grad=False):
                return torch.randn(*shape, generator=gen, device=device, dtype=dtype).requires_grad_(grad)

            def stage1_step():
                x, ctx = randn(b1, 4, latent, latent), randn(1, 77, hidden, grad=True)
                t = torch.randint(0, 1000, (b1,), device=device)
                eps = unet(x, t, ctx.expand(b1, -1, -1)).sample
                with torch.no_grad():
                    target = unet(x, t, randn(b1, 77, hidden)).sample
                ((eps.float() - target.float()) ** 2).mean().backward()

            def stage2_step():
                x, ctx_star, ctx_class = randn(b2, 4, latent, latent), randn(1, 77, hidden, grad=True), randn(1, 77, hidden, grad=True)
                t = torch.randint(0, 1000, (b2,), device=device)
                eps_star = unet(x, t, ctx_star.expand(b2, -1, -1)).sample
                eps_class = unet(x, t, ctx_class.expand(b2, -1, -1)).sample
                with torch.no_grad():
                    target = unet(x, t, ctx_class.detach().expand(b2, -1, -1)).sample
                loss = ((eps_star.float() - target.float()) ** 2).mean() + ((eps_class.float() - target.float()) ** 2).mean()
                loss.backward()

            x_gen, ctx_gen = randn(2, 4, latent, latent), randn(2, 77, hidden)

            def generate_call():
                with torch.inference_mode():
                    unet(x_gen, torch.tensor([500, 500], device=device), ctx_gen)

            for phase, fn in (("stage1", stage1_step), ("stage2", stage2_step)):
                reset_peak()
                try:
                    sec, times = timed(fn)
                    out[phase] = {"secPerStep": sec, "stepSec": times, "peakMemoryBytes": peak()}
                except torch.cuda.OutOfMemoryError as e:
                    out[phase] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                    torch.cuda.empty_cache()
            if "secPerStep" in out.get("stage1", {}) and "secPerStep" in out.get("stage2", {}):
                out["recipeSec"] = RECIPE["stage1"]["steps"] * out["stage1"]["secPerStep"] + RECIPE["stage2"]["steps"] * out["stage2"]["secPerStep"]
            reset_peak()
            sec, times = timed(generate_call)
            out["generate"] = {"itPerSec": 1.0 / sec, "secPerStep": sec, "peakMemoryBytes": peak()}
            del unet
            if cuda:
                torch.cuda.empty_cache()
        except Exception as e:  # keep the other dtypes
            out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        result["dtypes"][name] = out
        print(f"[bench-pytorch] {name}: {json.dumps(out)}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
