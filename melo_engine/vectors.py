"""VectorTable: exact nearest and within-radius search over a growing set of named vectors.

Routing must never miss (a miss silently drops an edit), and at 100,000 edits a plain
float32 scan reads every key for every query (docs/BENCHMARKS.md, "Scale", has the cost).
So a query runs in two passes:

1. a float16 scan of the unit directions (half the bytes) gives every row an approximate
   squared distance;
2. every row whose approximate distance could, within the scan's error bound, meet the
   question (within a radius, or tie with the nearest) is recomputed exactly in float32.

The bound: with q = |q| u and c = |c| v, |q - c|^2 = |q|^2 + |c|^2 - 2 |q| |c| (u . v), and
u . v from float16 operands (float32 accumulation) is off by at most ~3 * 2^-11 for unit
vectors. SLACK is three times that, so the recheck set always holds the exact answer; the
tests and `bench scale` compare with brute force.

Rows are appended, overwritten and freed in place (freed rows are reused); a caller that
shares the table across threads guards changes and queries with one lock.
"""
from __future__ import annotations

import torch

SLACK = 5e-3          # on u . v; float16 rounding of both operands and of the result is ~1.5e-3


class VectorTable:
    def __init__(self, dim: int | None = None, capacity: int = 64):
        self.dim = dim
        self.ids: list[str | None] = []          # row -> id (None: free)
        self.row: dict[str, int] = {}             # id -> row
        self.free: list[int] = []
        self._cap = capacity
        self.exact = self.unit = self.norm = None  # [cap, dim] float32, [cap, dim] float16, [cap]
        self.radius = torch.zeros(0)               # [cap]: a row's own radius (clusters have one)
        self.alive = torch.zeros(0, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.row)

    def __contains__(self, name: str) -> bool:
        return name in self.row

    def _grow(self, dim: int, need: int) -> None:
        if self.exact is None:
            self.dim = dim
            cap = max(self._cap, need)
            self.exact = torch.zeros(cap, dim)
            self.unit = torch.zeros(cap, dim, dtype=torch.float16)
            self.norm = torch.zeros(cap)
            self.radius = torch.zeros(cap)
            self.alive = torch.zeros(cap, dtype=torch.bool)
            return
        cap = self.exact.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        self.exact = torch.cat([self.exact, torch.zeros(new - cap, self.dim)])
        self.unit = torch.cat([self.unit, torch.zeros(new - cap, self.dim, dtype=torch.float16)])
        self.norm = torch.cat([self.norm, torch.zeros(new - cap)])
        self.radius = torch.cat([self.radius, torch.zeros(new - cap)])
        self.alive = torch.cat([self.alive, torch.zeros(new - cap, dtype=torch.bool)])

    def set(self, name: str, vec: torch.Tensor, radius: float = 0.0) -> None:
        self.set_many([name], vec[None], [radius])

    def set_many(self, names: list[str], vecs: torch.Tensor, radii: list[float] | None = None) -> None:
        """Add or overwrite rows (one vector, and optionally one radius, per name)."""
        if not names:
            return
        vecs = vecs.detach().to(torch.float32)
        if self.dim is not None and vecs.shape[1] != self.dim:
            raise ValueError(f"vectors of size {vecs.shape[1]} in a table of size {self.dim}")
        rows = []
        fresh = [n for n in names if n not in self.row]
        self._grow(vecs.shape[1], len(self.ids) + max(0, len(fresh) - len(self.free)))
        for n in names:
            r = self.row.get(n)
            if r is None:
                r = self.free.pop() if self.free else len(self.ids)
                if r == len(self.ids):
                    self.ids.append(n)
                else:
                    self.ids[r] = n
                self.row[n] = r
            rows.append(r)
        idx = torch.tensor(rows)
        norms = vecs.norm(dim=-1)
        self.exact[idx] = vecs
        self.norm[idx] = norms
        self.unit[idx] = (vecs / norms.clamp(min=1e-12)[:, None]).to(torch.float16)
        self.radius[idx] = torch.tensor(radii if radii is not None else [0.0] * len(rows), dtype=torch.float32)
        self.alive[idx] = True

    def remove(self, name: str) -> None:
        r = self.row.pop(name, None)
        if r is None:
            return
        self.ids[r] = None
        self.alive[r] = False
        self.free.append(r)

    # ---- queries -------------------------------------------------------------------------
    def _approx(self, q: torch.Tensor):
        """Approximate squared distances to every used row, and the error bound of each."""
        n = len(self.ids)
        qn = float(q.norm())
        u = (q / max(qn, 1e-12)).to(torch.float16)
        cos = torch.mv(self.unit[:n], u).to(torch.float32)
        norms = self.norm[:n]
        d2 = qn * qn + norms * norms - 2 * qn * norms * cos
        slack = 2 * qn * norms * SLACK
        d2 = torch.where(self.alive[:n], d2, torch.full_like(d2, float("inf")))
        return d2, slack

    def _exact(self, rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (self.exact[rows] - q).norm(dim=-1)

    def query(self, q: torch.Tensor, radius: float | None = None):
        """One scan answers both questions routing asks: the rows within `radius` of q (None:
        within each row's own radius) with their exact distances, and the exactly nearest
        row. Returns (ids, distances, nearest id, nearest distance)."""
        if not self.row:
            return [], torch.zeros(0), None, float("inf")
        d2, slack = self._approx(q)
        r = self.radius[: d2.shape[0]] if radius is None else torch.full_like(d2, float(radius))
        cand = (d2 - slack <= r * r).nonzero().squeeze(1)
        # Any row whose lower bound is below the smallest upper bound could be the nearest.
        near = (d2 - slack <= float((d2 + slack).min())).nonzero().squeeze(1)
        rows = torch.cat([cand, near]).unique()
        d = self._exact(rows, q)
        i = int(d.argmin())
        keep = d <= r[rows]
        return [self.ids[j] for j in rows[keep].tolist()], d[keep], self.ids[int(rows[i])], float(d[i])

    def within(self, q: torch.Tensor, radius: float | None = None) -> tuple[list[str], torch.Tensor]:
        ids, d, _, _ = self.query(q, radius)
        return ids, d

    def nearest(self, q: torch.Tensor) -> tuple[str | None, float]:
        _, _, name, d = self.query(q)
        return name, d

    def k_nearest(self, q: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """The k rows nearest q with their exact distances, nearest first (exact, like `query`:
        every row whose lower bound is below the k-th smallest upper bound is rechecked)."""
        if not self.row or k <= 0:
            return []
        d2, slack = self._approx(q)
        k = min(k, len(self.row))
        kth_upper = float(torch.topk(d2 + slack, k, largest=False).values[-1])
        rows = (d2 - slack <= kth_upper).nonzero().squeeze(1)
        d = self._exact(rows, q)
        order = torch.argsort(d)[:k]
        return [(self.ids[int(rows[i])], float(d[i])) for i in order]

    def rows_of(self, names: list[str]) -> torch.Tensor:
        return torch.tensor([self.row[n] for n in names], dtype=torch.long)
