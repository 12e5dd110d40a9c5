"""Load reward checkpoints safely, and convert pickled ones to safetensors once.

Safetensors files load directly. Pickled files (``.pt``, ``.pth``, ``.bin``) load only through
``torch.load(weights_only=True)``, which accepts plain state dicts and refuses pickles that would
run code (whole pickled modules, as MPS's original release). Convert once, then point the config
at the ``.safetensors`` file::

    python -m synpref.transforms.checkpoints HPS_v2.1_compressed.pt HPS_v2.1.safetensors
"""
from __future__ import annotations

import argparse
import sys

from .model_io import local_copy


def load_state_dict(location: str, cache_dir: str = "", key: str = "") -> dict:
    """A flat {name: tensor} dict from a safetensors or (weights-only) pickled checkpoint.

    Args:
        location: local path or fsspec URL (copied to ``cache_dir`` first).
        key: for pickles that wrap the weights (``{"state_dict": {...}}``), the key to unwrap;
            ``""`` unwraps ``state_dict`` / ``model`` when that is the only tensor dict inside.
    """
    import torch

    path = local_copy(location, cache_dir)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary pickles: say what to do, in one line
        raise ValueError(f"{location}: not a plain state dict ({type(e).__name__}); convert it once with "
                         f"'python -m synpref.transforms.checkpoints IN OUT.safetensors' on a trusted machine") from None
    for k in ([key] if key else ["state_dict", "model"]):
        if isinstance(obj, dict) and isinstance(obj.get(k), dict):
            obj = obj[k]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{location}: expected a dict of tensors, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def convert_to_safetensors(src: str, dst: str, key: str = "") -> int:
    """Write ``src``'s state dict as safetensors (contiguous, shared tensors cloned). Returns tensor count."""
    from safetensors.torch import save_file

    state = {k: v.contiguous().clone() for k, v in load_state_dict(src, key=key).items()}
    save_file(state, dst)
    return len(state)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Convert a pickled state-dict checkpoint to safetensors.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--key", default="", help="wrapping key, e.g. state_dict (default: auto)")
    a = p.parse_args(argv)
    try:
        n = convert_to_safetensors(a.src, a.dst, a.key)
    except (ValueError, FileNotFoundError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} tensors to {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
