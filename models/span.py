"""`LayerSpan`: the contiguous range of decoder layers [start, stop) that one stage runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class LayerSpan:
    """Layers `[start, stop)` of a model with `num_layers` layers.

    The first span (start == 0) also owns the token embedding; the last (stop == num_layers) owns the final
    norm and the output head.
    """

    start: int
    stop: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.stop <= self.start:
            raise ValueError(f"invalid layer range {self.start}:{self.stop}: need 0 <= start < stop")

    @classmethod
    def parse(cls, text: str, num_layers: int) -> LayerSpan:
        """Parse `A:B` (either side may be empty: `:15`, `15:`, `:`) for a model of `num_layers` layers."""
        start_text, sep, stop_text = text.partition(":")
        if not sep:
            raise ValueError(f"layer range {text!r} must look like A:B (e.g. 0:15)")
        try:
            start = int(start_text) if start_text.strip() else 0
            stop = int(stop_text) if stop_text.strip() else num_layers
        except ValueError:
            raise ValueError(f"layer range {text!r} must hold integers, e.g. 0:15") from None
        span = cls(start, stop)
        span.check(num_layers)
        return span

    @classmethod
    def whole(cls, num_layers: int) -> LayerSpan:
        return cls(0, num_layers)

    def check(self, num_layers: int) -> None:
        if self.stop > num_layers:
            raise ValueError(f"layer range {self} exceeds the model's {num_layers} layers")

    def is_first(self) -> bool:
        return self.start == 0

    def is_last(self, num_layers: int) -> bool:
        return self.stop == num_layers

    def __len__(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.stop}"
