"""`moe-rt pack-experts`: write a model's experts as an expert pack for the disk tier.

Each expert becomes one contiguous, 4 KiB-aligned byte range (w13 then w2; with --bits its
quantized record, expert_cache/records.py), so the disk tier
fetches it with one O_DIRECT read (expert_cache/packs.py; docs/expert-cache.md "Packs"). Use the
folder with `cache: {offload: disk, pack_dir: DIR}`; without pack_dir the disk tier writes and
uses one automatically.
"""
from __future__ import annotations

import argparse

from moe_rt_app.cli.args import output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face model folder (default: the shipped demo model)")
    parser.add_argument("--out", required=True, type=output_dir, help="folder to write the pack to")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the packed experts (default: the checkpoint's); the compute "
                             "dtype saves a conversion per read")
    parser.add_argument("--bits", type=int, choices=[8, 4], default=None,
                        help="write quantized records (int8, or int4 with --group-size) for a cache "
                             "with the same engine.expert_bits; default: full precision")
    parser.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64,
                        help="int4: input columns per scale (default 64; the config's expert_group_size)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from expert_cache.packs import read_index, write_pack
    from expert_cache.records import expert_format
    from moe_rt.checkpoint import CheckpointReader, default_model_dir
    from moe_rt.loader import load_spec

    model = args.model or default_model_dir()
    spec, reader = load_spec(model), CheckpointReader(model)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    fmt = None if args.bits is None else expert_format(spec, args.bits, args.group_size, torch.float32, "cpu")
    write_pack(reader, spec, args.out, dtype, progress=not args.no_progress, fmt=fmt)
    idx = read_index(args.out)
    total = idx.layers * idx.experts * idx.stride
    kind = str(idx.dtype).removeprefix('torch.') if fmt is None else fmt.label()
    print(f"wrote {idx.layers} x {idx.experts} experts ({kind}, "
          f"{idx.expert_bytes / 2**20:.2f} MiB each, {total / 2**30:.2f} GiB) to {args.out}")
    return 0
