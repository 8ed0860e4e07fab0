"""Training steps replayed from CUDA graphs: a step's few hundred kernels launched as one, so that launching them
one by one from Python does not bound a GPU step of a millisecond or two."""

import warnings
from collections.abc import Callable

import torch

Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (x, layer, dead_capacity) -> metrics on the device


class StepGraphs:
    """A step captured once per AuxK dead capacity (its one varying shape), the second time that capacity comes up.

    The first time runs eagerly on a side stream, so that lazy set-up (Adam's state, cuBLAS workspaces, Triton's
    compilations) happens outside any capture. The step must keep its state in place (parameters, optimizer state,
    counters) and read nothing back. The graphs share one memory pool: a replay's gradients and intermediates live
    only during that replay, and the caller copies a graph's metrics out before the next replay.
    """

    def __init__(self, step: Step, parameters: list[torch.nn.Parameter]):
        self.step, self.parameters = step, parameters
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # dead capacity -> (graph, metrics)
        self.warmed_up: set[int] = set()
        self.x = self.layer = None  # the graphs' inputs, allocated once: each batch is copied in before a replay
        self.pool = None

    def __call__(self, x: torch.Tensor, layer: torch.Tensor, dead_capacity: int) -> torch.Tensor:
        """The step on x: [batch, d_model], layer: [batch]; every call must give the same batch shape."""
        with torch.cuda.device(x.device):  # streams and captures are made on the current device, maybe not x's
            return self.warm_up_capture_or_replay(x, layer, dead_capacity)

    def warm_up_capture_or_replay(self, x: torch.Tensor, layer: torch.Tensor, dead_capacity: int) -> torch.Tensor:
        """The step, with x's device the current one."""
        if dead_capacity not in self.warmed_up:
            self.warmed_up.add(dead_capacity)
            return self.on_side_stream(x, layer, dead_capacity)
        if self.x is None:
            self.x, self.layer = torch.empty_like(x), torch.empty_like(layer)
        self.x.copy_(x)
        self.layer.copy_(layer)
        if dead_capacity not in self.graphs:
            self.graphs[dead_capacity] = self.capture(dead_capacity)
        graph, metrics = self.graphs[dead_capacity]
        graph.replay()
        return metrics

    def on_side_stream(self, x: torch.Tensor, layer: torch.Tensor, dead_capacity: int) -> torch.Tensor:
        """An eager step on a side stream, as warm-up before a capture must run (PyTorch's CUDA graph notes)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), warnings.catch_warnings():
            # a capturable optimizer warns when it first steps uncaptured, which warm-up does on purpose
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            metrics = self.step(x, layer, dead_capacity)
        torch.cuda.current_stream().wait_stream(side)
        return metrics

    def capture(self, dead_capacity: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record the step on the static inputs; nothing runs until a replay."""
        for parameter in self.parameters:
            parameter.grad = None  # backward then allocates the gradients in the graph's pool, which replays reuse
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's threads may call CUDA (pinned allocations) while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            metrics = self.step(self.x, self.layer, dead_capacity)
        self.pool = graph.pool()
        return graph, metrics
