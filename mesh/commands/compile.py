"""`shoal compile`: build (or find cached) the compiled library for a model's layer range on this device."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shoal.mesh.commands.cli import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compile", help="compile a model's layers with TVM Relax for this device (cached)",
        description=__doc__ + " Prints the library's path; the cache is $SHOAL_COMPILE_CACHE or "
        "<user data dir>/shoal/compile.",
    )
    parser.add_argument("--model", default="default", metavar="PATH|default",
                        help="a GGUF file, or `default` for the embedded SmolLM2-135M-Instruct (default)")
    parser.add_argument("--target", choices=("auto", "llvm", "cuda"), default="auto",
                        help="auto: CUDA when an NVIDIA GPU is present, else this CPU (default auto)")
    parser.add_argument("--layers", metavar="A:B", default=":",
                        help="the layer range [A, B) to build; either side may be empty (default: all)")
    parser.add_argument("--quantization", choices=("auto", "q4_1", "native", "f32"), default=None,
                        help="q4_1: 4-bit weights inside the kernels; native: every weight in its GGUF "
                        "block type inside the kernels; f32: dequantized at load; auto (default): q4_1 for a "
                        "file laid out as that build keeps it, else native")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even when a valid cached library exists")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    parser.set_defaults(handler=run)


def _progress_line(quiet: bool) -> Callable[[float, str], None]:
    start = time.perf_counter()

    def show(fraction: float, message: str) -> None:
        if quiet:
            return
        line = f"\r[{fraction * 100:5.1f}%] {time.perf_counter() - start:5.1f}s {message}"
        sys.stderr.write(line[:160].ljust(80))
        if fraction >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def run(args: argparse.Namespace) -> int:
    from shoal.models.block_types import NATIVE, TensorTypes
    from shoal.models.compile import compile_shard, model_fingerprint
    from shoal.models.embedded import embedded_model_path
    from shoal.models.errors import ModelError
    from shoal.models.gguf import GGUFModel
    from shoal.models.runtime import DEFAULT_QUANTIZATION
    from shoal.models.span import LayerSpan
    from shoal.models.targets import detect_target
    from shoal.models.weights import AUTO, choose_quantization

    try:
        path = embedded_model_path() if args.model == "default" else Path(args.model)
        model = GGUFModel.open(path)
        try:
            span = LayerSpan.parse(args.layers, model.config.num_layers)
            target = detect_target(args.target)
            quantization = args.quantization or DEFAULT_QUANTIZATION
            if quantization == AUTO:
                quantization = choose_quantization(TensorTypes.from_gguf(model).kinds)
            types = TensorTypes.from_gguf(model) if quantization == NATIVE else None
            shard = compile_shard(
                model.config, span, target, quantization=quantization, tensor_types=types,
                fingerprint=model_fingerprint(model), progress=_progress_line(args.quiet), force=args.force,
            )
        finally:
            model.close()
    except (ModelError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    how = "found in the cache" if shard.cached else f"built in {shard.compile_seconds:.1f} s"
    if not args.quiet:
        print(f"layers {span} of {path.name} for {target.kind} ({shard.quantization}): {how}",
              file=sys.stderr)
    print(shard.library)
    return 0
