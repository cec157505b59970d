"""Inference through CUDA graphs: the network's forward pass for one window batch is captured once per input
shape and replayed, so the hundreds of kernel launches of a pass (and, with ``--compile``, Dynamo's guard
checks and the switches between compiled graphs and the eager Mamba blocks) cost no CPU time per window and
the GPU never waits for the CPU.

Used by :class:`light_training.prediction.SlidingWindowPredictor` when its config says ``cuda_graphs=True``
(``4_predict.py --cuda_graphs``). Safe by construction:

* a shape seen for the first time is run eagerly twice (warm-up: lazy initialisation, cuDNN algorithm choice,
  ``--compile``'s compilation), then captured; the capture's own output is the result of that call;
* if anything about the capture fails (an operation that cannot be captured, too little memory), that shape
  is run eagerly from then on and the reason is reported once; results never depend on it;
* the captured pass reads the network's parameters in place, so weights loaded or updated later are used;
  a graph keeps its activation memory (about one eager pass's worth) until the runner is dropped.

Not for training: backward passes and optimiser steps are not captured here.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

import torch

Key = Tuple[Tuple[int, ...], torch.dtype, torch.device]


class _Graph:
    def __init__(self, graph: "torch.cuda.CUDAGraph", static_in: torch.Tensor, static_out: torch.Tensor) -> None:
        self.graph, self.static_in, self.static_out = graph, static_in, static_out


class GraphedForward:
    """Callable ``x -> model(x)`` that replays a CUDA graph per input shape (see the module docstring).

    Call it inside the same ``torch.no_grad()`` / autocast context for every call (the context is part of what
    is captured); autocast must be entered with ``cache_enabled=False`` (a cached cast made during capture
    would be reused from the graph's memory pool after the capture ends).

    Args:
        model: the network (any callable returning one tensor).
        max_graphs: at most this many shapes are captured; further shapes run eagerly.
        say: receives one line when a capture fails (default: the ``light_training`` logger).
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], max_graphs: int = 4,
                 say: Optional[Callable[[str], None]] = None) -> None:
        self.model = model
        self.max_graphs = max_graphs
        self.say = say or logging.getLogger("light_training").warning
        self.graphs: Dict[Key, Optional[_Graph]] = {}  # None: this shape runs eagerly
        self.replays = 0
        # One memory pool shared by all captured shapes: safe because graphs replay one at a time on one
        # stream and each replay's output is cloned before the next replay can overwrite it.
        self.pool = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or torch.is_grad_enabled():
            return self.model(x)
        key: Key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.graphs:
            if len([g for g in self.graphs.values() if g is not None]) >= self.max_graphs:
                self.graphs[key] = None
                return self.model(x)
            return self._capture(key, x)
        entry = self.graphs[key]
        if entry is None:
            return self.model(x)
        entry.static_in.copy_(x)
        entry.graph.replay()
        self.replays += 1
        return entry.static_out.clone()

    def _capture(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """Warm up, capture and return the output for ``x``; on failure mark the shape eager."""
        try:
            static_in = x.clone()
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
                for _ in range(2):
                    out = self.model(static_in)
            torch.cuda.current_stream(x.device).wait_stream(side)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"the network returned {type(out).__name__}, not one tensor")
            del out
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self.model(static_in)
            graph.replay()
        except Exception as error:  # noqa: BLE001 - any failure means: run this shape eagerly
            self.graphs[key] = None
            torch.cuda.synchronize(x.device)
            self.say(f"CUDA graph capture for input {tuple(x.shape)} failed ({type(error).__name__}: {error}); "
                     "running that shape without CUDA graphs (same results, slower)")
            return self.model(x)
        self.graphs[key] = _Graph(graph, static_in, static_out)
        return static_out.clone()
