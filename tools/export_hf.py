"""Export a GRPOModule checkpoint's policy and tokenizer as a Hugging Face folder.

    python tools/export_hf.py --ckpt runs/cropi_tiny/checkpoints/last.ckpt --out my_model

Reads the module's hyperparameters from the checkpoint (file, or FSDP2 distributed checkpoint
folder), loads its weights into a fresh policy and writes config, generation config, safetensors
and tokenizer files atomically; transformers and vLLM load the result directly. ``fit`` already
writes the final policy to ``<default_root_dir>/hf_model``; this tool exports any other checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from cropi_pl.policy.export import export_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint file or folder")
    parser.add_argument("--out", required=True, help="HF folder to write (replaced if present)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"export_hf: {error}")
    print(f"exported {args.ckpt} to {out}")


if __name__ == "__main__":
    main()
