"""Where MELO's index of N edits sends their prompts, held-out phrasings and unrelated
prompts, without training a block: what routing allows, apart from what training achieves.
Takes minutes where `edits` takes an hour."""
from __future__ import annotations

import collections
import dataclasses
import statistics
import time

from .base import Benchmark, add_router, key_source_choices, melo_settings
from .data import PROTOCOLS, load_stream
from .machine import machine


def routing_study(dataset: str, n: int, backbone=None, protocol: str | None = None,
                  settings: dict | None = None) -> dict:
    """Builds the index from the edits' keys alone by the engine's rules (blocks are
    numbered, not trained), then routes: each edit prompt (own block?), each held-out
    phrasing (a block of an edit of the *same fact*, another fact's, or none?) and each
    locality prompt (did anything fire?). Counts what the placement rule did (new, joined,
    beside, superseded) and how many edits ended superseded."""
    from melo_engine.backbone import Backbone
    from melo_engine.calibrate import calibrated_radius
    from melo_engine.config import DEFAULT_MODEL, MeloConfig
    from melo_engine.index import ClusterState
    from melo_engine.placement import add
    from melo_engine.router import router_for
    from melo_engine.keys import Keyer

    bb = backbone or Backbone.load(DEFAULT_MODEL)
    cfg = MeloConfig(**(settings or {})).for_backbone(bb)
    keyer = Keyer(bb, cfg)
    radius = calibrated_radius(bb, cfg, keyer)
    cfg = dataclasses.replace(cfg, init_radius=radius)
    stream = load_stream(dataset, n, protocol)
    edit_keys = keyer.keys([r.prompt for r in stream.edits])
    gen_keys = keyer.keys([g.prompt for g in stream.generality])
    loc_keys = keyer.keys(stream.locality)
    sib_keys = keyer.keys([s.prompt for s in stream.siblings]) if stream.siblings else []
    router = router_for(bb, cfg.router)
    prompt_of = lambda eid: stream.edits[int(eid[1:])].prompt  # noqa: E731
    actions = collections.Counter()
    state = ClusterState()
    for i, (r, k) in enumerate(zip(stream.edits, edit_keys)):
        same = lambda e, q=r.prompt: router.same_question(q, prompt_of(e))  # noqa: E731
        actions[add(state, f"e{i}", k, i, r.target, radius, cfg.on_conflict, same).action] += 1
    route_ms = []

    def route(k, text):
        t0 = time.perf_counter()
        b = router.route(state, k, text, prompt_of).block
        route_ms.append(1000 * (time.perf_counter() - t0))
        return b

    fact_of = [r.fact for r in stream.edits]
    own = [route(k, r.prompt) for k, r in zip(edit_keys, stream.edits)]
    gen = [route(k, g.prompt) for k, g in zip(gen_keys, stream.generality)]
    loc = [route(k, q) for k, q in zip(loc_keys, stream.locality)]
    sib = [route(k, s.prompt) for k, s in zip(sib_keys, stream.siblings)]
    same_fact = [b is not None and fact_of[b] == g.fact for b, g in zip(gen, stream.generality)]
    out = {
        "dataset": dataset, "protocol": stream.protocol, "n": len(stream.edits), "model": DEFAULT_MODEL,
        "key": cfg.key_name(), "on_conflict": cfg.on_conflict, "machine": machine(),
        "date": time.strftime("%Y-%m-%d"), "init_radius": radius, "clusters": len(state.clusters),
        "actions": dict(actions), "superseded": len(state.dormant),
        "prompts": {"own_block": sum(b == i for i, b in enumerate(own)) / len(own),
                    "no_block": sum(b is None for b in own) / len(own)},
        "generality": {"same_fact_block": sum(same_fact) / len(gen),
                       "other_fact_block": sum(b is not None and not s for b, s in zip(gen, same_fact)) / len(gen),
                       "no_block": sum(b is None for b in gen) / len(gen), "count": len(gen)},
        "locality": {"fired": sum(b is not None for b in loc) / len(loc), "count": len(loc)},
        # A sibling (same template, another subject) that fires an edit of the fact it is a
        # sibling of: the failure zsRE's unrelated locality questions cannot see.
        "siblings": {"fired_their_edit": sum(b is not None and fact_of[b] == s.fact for b, s in
                                             zip(sib, stream.siblings)) / max(1, len(sib)),
                     "fired_any": sum(b is not None for b in sib) / max(1, len(sib)), "count": len(sib)},
        "router": cfg.router,
        "route_ms_median": statistics.median(route_ms),
    }
    return out


def print_routing(res: dict) -> None:
    print(f"{res['dataset']} ({res['protocol']}), {res['n']} edits, key {res['key']}, radius {res['init_radius']:.3f}, "
          f"{res['clusters']} clusters, placements {res['actions']}, {res['superseded']} superseded; "
          f"routing {res['route_ms_median']:.2f} ms per query (median)")
    p, g, lo = res["prompts"], res["generality"], res["locality"]
    print(f"edit prompts      own block {p['own_block']:.3f}  no block {p['no_block']:.3f}")
    print(f"held-out phrasings same-fact block {g['same_fact_block']:.3f}  other fact {g['other_fact_block']:.3f}  "
          f"none {g['no_block']:.3f}  ({g['count']})")
    print(f"locality prompts  fired {lo['fired']:.3f}  ({lo['count']})")
    si = res["siblings"]
    print(f"siblings          fired their edit {si['fired_their_edit']:.3f}  any block {si['fired_any']:.3f}  "
          f"({si['count']}; router {res['router']})")


def _add_arguments(p) -> None:
    p.add_argument("--dataset", choices=list(PROTOCOLS), default="zsre")
    p.add_argument("--protocol", default=None)
    p.add_argument("--n", type=int, default=1000)
    add_router(p)
    p.add_argument("--key-source", choices=key_source_choices(), default=None)
    p.add_argument("--json", default=None)


def _run(args) -> dict:
    res = routing_study(args.dataset, args.n, protocol=args.protocol, settings=melo_settings(args))
    print_routing(res)
    return res


BENCH = Benchmark("routing", "where the index of N edits routes their prompts and held-out phrasings",
                  _add_arguments, _run)
