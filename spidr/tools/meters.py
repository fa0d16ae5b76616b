"""Running averages of training metrics, kept on the device (no host synchronisation until :meth:`pop`)."""

from __future__ import annotations

import torch

__all__ = ["AverageMeter", "AverageMeters"]


class AverageMeter:
    """The running sum and count of one metric; :meth:`pop` returns the average and starts afresh."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype = device, dtype
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.sum = torch.zeros((), device=self.device, dtype=self.dtype)
        self.count = torch.zeros((), device=self.device, dtype=torch.long)

    def update(self, val: torch.Tensor | float, n: int = 1) -> None:
        """Add ``val`` (weighted by ``n``)."""
        self.sum += val * n
        self.count += n

    def pop(self) -> float:
        """The average since the last reset (NaN when nothing was added), then reset."""
        average = (self.sum / self.count).item()
        self.reset()
        return average


class AverageMeters:
    """One :class:`AverageMeter` per name: ``update(loss=..., grad_norm=...)``, then ``pop()`` -> averages."""

    def __init__(self, names: list[str], device: torch.device, *, dtype: torch.dtype = torch.float32) -> None:
        self.names = list(names)
        self.meters = {name: AverageMeter(device, dtype) for name in self.names}

    def __getitem__(self, name: str) -> AverageMeter:
        return self.meters[name]

    def reset(self) -> None:
        """Reset every meter."""
        for meter in self.meters.values():
            meter.reset()

    def update(self, **values: torch.Tensor | float) -> None:
        """Add one value to each named meter.

        Raises:
            KeyError: a name that is not one of the meters (the message lists them).
        """
        for name, value in values.items():
            if name not in self.meters:
                raise KeyError(f"no meter named {name!r}; the meters are {', '.join(self.names)}")
            self.meters[name].update(value)

    def pop(self) -> dict[str, float]:
        """Every meter's average, then reset them all."""
        return {name: meter.pop() for name, meter in self.meters.items()}
