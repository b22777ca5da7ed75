"""``--device``, checked before a command starts: a name torch does not know, or a GPU this machine lacks, is the
command's one error line rather than a torch traceback after the model has loaded."""

from __future__ import annotations


def check_device(text: str | None) -> None:
    """ValueError unless ``text`` (a ``--device`` value; None: the command's default) names a usable device."""
    if not text:
        return
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device name; give cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError(f"--device {text}: no CUDA GPU is visible on this machine; give --device cpu")
        if device.index is not None and device.index >= n:
            raise ValueError(f"--device {text}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: MPS is not available on this machine; give --device cpu")
