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

Training (:class:`GraphedTrainingStep`, ``3_train.py --cuda_graphs``): the forward pass, the loss and the
(scaled) backward pass of one batch are captured together per batch shape and replayed; the optimiser step,
gradient clipping and the loss-scale update stay eager (they are a few fused kernels and need the host to
look at the loss and the gradient norm anyway). On an H200 (SegMamba 4→4, batch 2 × 128³, fp16, compiled,
channels-last) this took a step from 157.6 to 141.1 ms: the GPU no longer waits for Python between kernels.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Tuple

import torch

Key = Tuple[Tuple[int, ...], torch.dtype, torch.device]


def _warm_up(run: Callable[[], Any], times: int, device: torch.device) -> Any:
    """Call ``run`` ``times`` times on a side stream (warm-up must happen off the capture stream, as CUDA graphs
    require) and return its last result. Then hand the memory those runs left cached for the side stream,
    where nothing else can reuse it, back to the GPU: the capture allocates about as much again in the graph's
    own pool (else the first capture needs the pass's memory twice, e.g. 2 x 13.7 GiB for a SegMamba training
    step at 2 x 128^3)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    result = None
    with torch.cuda.stream(side):
        for _ in range(times):
            result = run()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return result


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
            out = _warm_up(lambda: self.model(static_in), 2, x.device)
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


TrainKey = Tuple[Tuple[Any, ...], ...]


def _tensor_key(t: torch.Tensor) -> Tuple[Any, ...]:
    return tuple(t.shape), t.stride(), t.dtype, t.device


class _TrainGraph:
    def __init__(self, graph: "torch.cuda.CUDAGraph", static_inputs: Tuple[torch.Tensor, ...],
                 static_loss: torch.Tensor, grads: List[Optional[torch.Tensor]]) -> None:
        self.graph, self.static_inputs, self.static_loss, self.grads = graph, static_inputs, static_loss, grads


class GraphedTrainingStep:
    """``step(*inputs) -> loss`` that runs ``loss_of(*inputs)`` under ``autocast()`` and then
    ``scale(loss).backward()``, replayed from a CUDA graph captured once per input shapes.

    After a call, every parameter's ``.grad`` holds the (scaled) gradient of this batch, exactly as after an
    eager ``optimizer.zero_grad(); scale(loss).backward()``; unscaling, clipping and the optimiser step are the
    caller's (eager) business. The gradients are written into buffers owned by the graph: the step re-attaches
    them to the parameters before each replay, so ``optimizer.zero_grad(set_to_none=True)`` between calls is
    harmless, and gradients are never accumulated across calls (each call overwrites them). A captured graph
    keeps a step's activation memory until :meth:`release`.

    First call for a new set of input shapes: ``warmup`` eager forward/backward passes on a side stream (lazy
    initialisation, cuDNN autotuning, ``torch.compile``'s compilation; their gradients are discarded), the
    capture, then one replay whose result is returned. If the capture fails (an operation that synchronises
    with the host or cannot be captured, too little memory) those shapes run eagerly from then on and the
    reason is reported once; results never depend on it. Inputs not on CUDA always run eagerly.

    Args:
        loss_of: ``(*inputs) -> scalar loss``; must not synchronise with the host (no ``.item()``) and must
            not depend on Python-side state that changes between calls (that would be frozen in the graph).
        parameters: the parameters whose gradients the optimiser reads.
        scale: e.g. ``GradScaler.scale`` (its scale lives on the GPU and is read in place); identity if None.
        autocast: returns a fresh autocast context; it must be created with ``cache_enabled=False`` (a cast
            cached during the capture would be reused from the graph's memory after it).
        max_graphs: at most this many input-shape sets are captured; further shapes run eagerly.
        say: receives one line when a capture fails (default: the ``light_training`` logger).
    """

    def __init__(self, loss_of: Callable[..., torch.Tensor], parameters: Iterable[torch.nn.Parameter],
                 scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 autocast: Optional[Callable[[], ContextManager]] = None, max_graphs: int = 2, warmup: int = 3,
                 say: Optional[Callable[[str], None]] = None) -> None:
        self.loss_of = loss_of
        self.parameters = [p for p in parameters if p.requires_grad]
        self.scale = scale or (lambda loss: loss)
        self.autocast = autocast or nullcontext
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.say = say or logging.getLogger("light_training").warning
        self.graphs: Dict[TrainKey, Optional[_TrainGraph]] = {}  # None: these shapes run eagerly
        self.replays = 0
        self.pool = None  # one memory pool for all captured shapes (replayed one at a time on one stream)

    def _eager(self, *inputs: torch.Tensor) -> torch.Tensor:
        self._clear_grads()  # overwrite, never accumulate, as a replay does
        with self.autocast():
            loss = self.loss_of(*inputs)
        self.scale(loss).backward()
        return loss.detach()

    def _clear_grads(self) -> None:
        for p in self.parameters:
            p.grad = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not inputs or any(t.device.type != "cuda" for t in inputs):
            return self._eager(*inputs)
        key: TrainKey = tuple(_tensor_key(t) for t in inputs)
        if key not in self.graphs:
            if len([g for g in self.graphs.values() if g is not None]) >= self.max_graphs:
                self.graphs[key] = None
                shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                self.say(f"training inputs {shapes}: already {self.max_graphs} batch shapes captured as CUDA "
                         "graphs; this one trains without (same results, slower)")
            else:
                return self._capture(key, inputs)
        entry = self.graphs[key]
        if entry is None:
            return self._eager(*inputs)
        for static, t in zip(entry.static_inputs, inputs):
            static.copy_(t)
        for p, g in zip(self.parameters, entry.grads):
            p.grad = g
        entry.graph.replay()
        self.replays += 1
        return entry.static_loss.clone()

    def release(self) -> None:
        """Drop every captured graph and the gradients held in their memory (the parameters' ``.grad`` become
        None) and return that memory to the GPU, e.g. so that validation can use it; the next call captures
        again (warm-up included). Shapes whose capture failed stay eager."""
        captured = [key for key, entry in self.graphs.items() if entry is not None]
        if not captured:
            return
        for key in captured:
            del self.graphs[key]
        self._clear_grads()
        self.pool = None
        torch.cuda.synchronize()  # (graphs exist only where CUDA does)
        torch.cuda.empty_cache()

    def _capture(self, key: TrainKey, inputs: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        device = inputs[0].device
        try:
            static_inputs = tuple(t.clone() for t in inputs)  # clone keeps the memory layout
            _warm_up(lambda: self._eager(*static_inputs), self.warmup, device)
            self._clear_grads()  # the captured backward then assigns fresh gradient buffers (no accumulation)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                with self.autocast():
                    static_loss = self.loss_of(*static_inputs)
                self.scale(static_loss).backward()
            static_loss = static_loss.detach()
            grads = [p.grad for p in self.parameters]
            graph.replay()
        except Exception as error:  # noqa: BLE001 - any failure means: run these shapes eagerly
            self.graphs[key] = None
            torch.cuda.synchronize(device)
            shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
            self.say(f"CUDA graph capture of the training step for inputs {shapes} failed "
                     f"({type(error).__name__}: {error}); training those shapes without CUDA graphs "
                     "(same results, slower)")
            return self._eager(*inputs)
        self.graphs[key] = _TrainGraph(graph, static_inputs, static_loss, grads)
        return static_loss.clone()
