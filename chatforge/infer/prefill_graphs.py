"""Bucketed prefill forwards recorded as CUDA graphs: one launch per prefill instead of hundreds.

Why: an eager prefill forward is some 35 torch calls per layer, ~6 ms of host time at depth 20,
and while the host launches them the GPU finishes the decode step in flight and idles: at 32-128
streams a prompt arrives every few steps, so that idle time caps the server's tokens/s. With
bucketed shapes (infer/session.py) a prefill group takes one of a few dozen (rows G, tokens T)
shapes, so each is recorded once, at the session's warm-up, and replayed after.

Every graph reads and writes static buffers: the ids (G, T), each row's last position (G,), and
a cache whose per-layer keys/values are contiguous views of one flat buffer per layer, sized for
the largest recorded bucket (`MAX_TOKENS` tokens); buckets past it run eagerly. All graphs share
one memory pool, recorded from the largest down: a replay's outputs (the logits, the cache) are
read on the same stream before the next replay, so no two graphs are ever live at once.

Without `record` (the CPU, and the CPU tests) the same buffers and forward run eagerly, which is
how the tests check the static-buffer logic gives the replies an ordinary prefill gives.
"""

from __future__ import annotations

import torch

MAX_TOKENS = 4096  # the largest bucket (G x T) recorded; a real group holds at most 512 prompt tokens


class PrefillGraphs:
    def __init__(self, engine, max_rows: int, max_tokens: int = MAX_TOKENS, record: bool | None = None):
        from chatforge.model.gpt import KVCache

        e, config = engine, engine.config
        self.engine, self.max_tokens = engine, max_tokens
        self.record = e.cuda_graph if record is None else record
        per_token = config.n_kv_head * config.head_dim
        flat = lambda: torch.zeros(max_tokens * per_token, dtype=e.dtype, device=e.device)  # noqa: E731
        self.k = [flat() for _ in range(config.n_layer)]
        self.v = [flat() for _ in range(config.n_layer)]
        self.ids = torch.zeros(max_tokens, dtype=torch.long, device=e.device)
        self.last = torch.zeros(max_rows, dtype=torch.long, device=e.device)
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=e.device)
        self.max_rows = max_rows
        self.graphs: dict[tuple[int, int], tuple] = {}  # (G, T) -> (cache, ids, last, run)
        self.pool = torch.cuda.graph_pool_handle() if self.record else None
        self._KVCache = KVCache

    def fits(self, G: int, T: int) -> bool:
        return G <= self.max_rows and G * T <= self.max_tokens

    def cache(self, G: int, T: int):
        """A KVCache of G rows and T positions over the flat buffers (contiguous views)."""
        config = self.engine.config
        view = self._KVCache.__new__(self._KVCache)
        view.config, view.batch_size, view.max_len = config, G, T
        shape, n = (G, config.n_kv_head, T, config.head_dim), G * T * config.n_kv_head * config.head_dim
        view.k = [f[:n].view(shape) for f in self.k]
        view.v = [f[:n].view(shape) for f in self.v]
        view.lengths = self.lengths[:G]
        return view

    def build(self, G: int, T: int) -> None:
        """Make (and, when recording, record) the forward of bucket (G, T)."""
        if (G, T) in self.graphs:
            return
        e = self.engine
        cache, ids, last = self.cache(G, T), self.ids[:G * T].view(G, T), self.last[:G]

        def forward():
            cache.lengths.zero_()
            with e._autocast():
                return e.model(ids, kv_cache=cache, logits_at=last)[:, 0]  # (G, V)

        self.graphs[(G, T)] = (cache, ids, last, self._recorded(forward) if self.record else forward)

    def run(self, ids: torch.Tensor, last: torch.Tensor):
        """Prefill (G, T) ids whose rows end at positions `last` (device tensors, ids padded to a
        bucket built before): (the cache, its rows' lengths set to last + 1; (G, V) logits)."""
        G, T = ids.shape
        self.build(G, T)
        cache, static_ids, static_last, run = self.graphs[(G, T)]
        static_ids.copy_(ids)
        static_last.copy_(last)
        logits = run()
        cache.lengths.copy_(last + 1)  # the padding's keys/values lie past each row's length
        return cache, logits

    def _recorded(self, forward):
        device = self.engine.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # kernel selection, allocation and plans outside the recording
                forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = forward()

        def replay():
            graph.replay()
            return out

        return replay
