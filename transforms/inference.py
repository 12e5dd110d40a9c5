"""One RunInference adapter for every plug-in: generators and reward ensembles alike.

Beam's ``RunInference`` gives batching, one model per worker (or ``model_copies`` shared
by a machine's processes), metrics and a dead-letter output. What differs between a
generator and a reward ensemble is only how the model is loaded and what one call
does with a batch; that is a small ``Work`` object, so there is one handler, not two.
"""
from __future__ import annotations

import abc
import time
from typing import Any, Iterable, Optional, Sequence

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from ..core.progress import progress
from .model_io import set_torch_threads


class Work(abc.ABC):
    """What a plug-in step does: load its model(s) on a worker, then turn a batch into one result per element."""

    #: progress and metric names: "<stage>_ms" busy time, progress lines "[<stage>]"
    stage: str = "work"
    unit: str = "items"

    @abc.abstractmethod
    def load(self) -> Any:
        ...

    @abc.abstractmethod
    def run(self, model: Any, batch: Sequence[Any]) -> list[Any]:
        """One result per batch element, in order."""

    def size(self, element: Any) -> int:
        """How many items (images) an element counts for in progress lines."""
        return 1


class PluginModelHandler(ModelHandler[Any, Any, Any]):
    """RunInference adapter for any ``Work``.

    Args:
        work: the step's loader and batch function (picklable; models load in ``load_model`` on workers).
        name: model id in results and the metrics namespace.
        batch_size: elements per call; min = max, so calls have a fixed composition within a bundle.
        model_copies: 0 = one model per worker process; N = N copies per machine shared by its processes.
        torch_threads: intra-op threads per worker process (1 on CPU workers: see README).
        total: expected items, for progress lines with time left.
    """

    def __init__(self, work: Work, name: str, *, batch_size: int = 1, model_copies: int = 0,
                 torch_threads: int = 1, total: Optional[int] = None):
        super().__init__(model_copies=model_copies or None)
        self._work, self._name, self._batch_size = work, name, batch_size
        self._threads, self._total = torch_threads, total

    def load_model(self) -> Any:
        set_torch_threads(self._threads)
        return self._work.load()

    def run_inference(self, batch: Sequence[Any], model: Any, inference_args=None) -> Iterable[PredictionResult]:
        start = time.perf_counter()
        results = self._work.run(model, batch)
        if len(results) != len(batch):
            raise ValueError(f"{self._name}: {len(results)} results for {len(batch)} inputs")
        Metrics.counter("synpref", f"{self._work.stage}_ms").inc(int(1000 * (time.perf_counter() - start)))
        progress(self._work.stage, self._total, self._work.unit).update(sum(self._work.size(x) for x in batch))
        return [PredictionResult(x, r, self._name) for x, r in zip(batch, results)]

    def batch_elements_kwargs(self):
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}

    def get_metrics_namespace(self) -> str:
        return f"synpref_{self._name}"
