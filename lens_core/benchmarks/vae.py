"""Benchmark of the FLUX.2 VAE (``python -m lens_core.bench --component vae ...``).

* ``--what speed``: decode time at ``--size``² with the real FLUX.2 VAE config and random weights, ours vs
  diffusers ``AutoencoderKLFlux2`` holding the same weights, for each ``--dtypes`` entry.
* ``--what memory``: peak RSS of a fresh process decoding at ``--mem-size`` (H×W) untiled vs tiled (and the
  RSS after building the model, so the activation share can be read off), with ``--mem-config``.
"""
from __future__ import annotations

import time

from lens_core.bench import median_time, run_isolated


def add_arguments(parser):
    parser.add_argument("--what", default="speed,memory", help="comma list of speed, memory")
    parser.add_argument("--size", type=int, default=1024, help="square image size for the speed figure")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-diffusers", action="store_true", help="time ours only")
    parser.add_argument("--mem-size", default="1440x1440", help="HxW for the memory figure")
    parser.add_argument("--mem-dtype", default="float32")
    parser.add_argument("--mem-config", default="real", choices=("real", "tiny"))
    parser.add_argument("--tile", type=int, default=512, help="tile size in pixels for the tiled figure")


def random_state_dict(config, seed=0):
    """Fan-in scaled random weights for a LensVAE of ``config`` (plausible activation ranges), fp32."""
    import torch

    from lens_core.vae import LensVAE

    g = torch.Generator().manual_seed(seed)
    model = LensVAE(config, device="meta")
    sd = {}
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(1000)
        elif name == "bn.running_var":
            sd[name] = torch.exp(0.5 * torch.randn(t.shape, generator=g))
        elif t.ndim >= 2:
            fan_in = t[0].numel()
            sd[name] = torch.randn(t.shape, generator=g) / fan_in ** 0.5
        elif "norm" in name and name.endswith("weight"):
            sd[name] = 1 + 0.1 * torch.randn(t.shape, generator=g)
        else:
            sd[name] = 0.1 * torch.randn(t.shape, generator=g)
    return sd


def _build(config, dtype_name, seed=0):
    import torch

    from lens_core.vae import LensVAE

    dtype = getattr(torch, dtype_name)
    model = LensVAE(config, device="meta")
    model.load_state_dict(random_state_dict(config, seed), assign=True)
    return model.to(dtype).eval()


def _diffusers(config, sd, dtype):
    from diffusers import AutoencoderKLFlux2

    ref = AutoencoderKLFlux2(**{k: v for k, v in config.to_dict().items()})
    ref.load_state_dict(sd)
    return ref.to(dtype).eval()


def _timed(fn, sync=None):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if sync:
        sync()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _speed_rows(args):
    """Ours and diffusers alternate run by run (the machine is shared: load drifts), wall and CPU time."""
    import statistics

    import torch

    from lens_core.vae import REAL_VAE_CONFIG, LensVAE, unpatchify

    rows = []
    cfg = REAL_VAE_CONFIG
    sd = random_state_dict(cfg)
    s = args.size
    lat = torch.randn(1, cfg.packed_channels, s // 16, s // 16, generator=torch.Generator().manual_seed(1))
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours = LensVAE(cfg, device="meta")
        ours.load_state_dict(sd, assign=True)
        ours = ours.to(device=args.device, dtype=dtype).eval()
        ref = None if args.no_diffusers else _diffusers(cfg, sd, dtype).to(args.device)
        lat_d = lat.to(args.device)
        sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else None
        t_ours, t_ref = [], []
        with torch.no_grad():
            if ref is not None:
                z = unpatchify(lat_d.to(dtype) * torch.sqrt(ref.bn.running_var + ref.bn.eps)[:, None, None]
                               + ref.bn.running_mean[:, None, None])
            for _ in range(args.runs):
                out, wall, cpu = _timed(lambda: ours.decode(lat_d, tiled=False), sync)
                t_ours.append((wall, cpu))
                if ref is not None:
                    ref_out, wall, cpu = _timed(lambda: ref.decode(z).sample, sync)
                    t_ref.append((wall, cpu))
        med = lambda ts, i: statistics.median(t[i] for t in ts)  # noqa: E731
        row = {"what": f"decode {s}x{s}", "dtype": dtype_name, "ours_s": med(t_ours, 0),
               "ours_cpu_s": med(t_ours, 1)}
        if ref is not None:
            err = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
            row.update(diffusers_s=med(t_ref, 0), diffusers_cpu_s=med(t_ref, 1),
                       ratio=med(t_ours, 0) / med(t_ref, 0), cpu_ratio=med(t_ours, 1) / med(t_ref, 1),
                       rel_err_vs_diffusers=err)
        rows.append(row)
        del ours, ref
    return rows


def _decode_peak(config_name, dtype_name, h, w, tiled, tile):
    """Child-process body: build, note RSS, decode once; returns (RSS after build, decode seconds)."""
    import resource

    import torch

    from lens_core.vae import REAL_VAE_CONFIG, VAEConfig

    cfg = REAL_VAE_CONFIG if config_name == "real" else VAEConfig(block_out_channels=(16, 32, 32, 64),
                                                                  norm_num_groups=8)
    model = _build(cfg, dtype_name)
    model.tile_size = tile
    lat = torch.randn(1, cfg.packed_channels, h // 16, w // 16, generator=torch.Generator().manual_seed(1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.no_grad():
        model.decode(lat, tiled=tiled)
    return base, time.perf_counter() - t0


def _memory_rows(args):
    h, w = (int(v) for v in args.mem_size.lower().split("x"))
    rows = []
    for tiled in (False, True):
        (base, secs), peak = run_isolated(_decode_peak, args.mem_config, args.mem_dtype, h, w, tiled, args.tile)
        rows.append({"what": f"decode {h}x{w} {'tiled ' + str(args.tile) if tiled else 'untiled'}",
                     "config": args.mem_config, "dtype": args.mem_dtype, "peak_rss_MiB": peak / 2**20,
                     "after_build_MiB": base / 2**20, "activation_MiB": (peak - base) / 2**20, "seconds": secs})
    rows.append({"what": "ratio tiled/untiled", "peak_rss_MiB": rows[1]["peak_rss_MiB"] / rows[0]["peak_rss_MiB"],
                 "activation_MiB": rows[1]["activation_MiB"] / max(rows[0]["activation_MiB"], 1e-9)})
    return rows


def run(args):
    rows = []
    what = args.what.split(",")
    if "memory" in what:
        if str(args.device) != "cpu":  # peak RSS of a fresh CPU process: no device counterpart here
            print(f"# --what memory measures host RSS of a CPU decode; skipped on --device {args.device}")
        else:
            rows += _memory_rows(args)
    if "speed" in what:
        rows += _speed_rows(args)
    return rows
