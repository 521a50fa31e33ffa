"""Recommendation: embed a catalog and user histories with MiniLM, rank items per user, score held-out interactions.

    python -m recipes.recommend [--quick] [--out DIR] [--overwrite]

1. `Model.embed` embeds every item ("title. description"); texts are packed or bucketed by
   length inside embed, so the whole catalog is a handful of compiled programs.
2. A user is represented two ways: the mean of their history items' embeddings, and the
   embedding of their history written out as one text (the item titles in order).
3. Users are scored in batches (`score_batch` users x every item, one matmul each); items the
   user already has are excluded and the top `k` are kept.
4. recall@k and NDCG@k against each user's held-out interactions (never part of the history,
   never counted in the popularity baseline, which ranks items by how many histories hold them).
5. Content and popularity together: cosine + weight x log(1 + count). The weight is chosen on
   a validation split carved from the histories (each user's last history item predicted from
   the rest), never on the held-out interactions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import common


@dataclass(frozen=True)
class Config:
    data: Path = common.DATA / "recommend"
    model: str = "minilm"
    k: int = 10
    embed_batch: int = 64
    score_batch: int = 32
    users: int | None = None  # None: every user
    prior_weights: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)  # tried on the validation split


QUICK = replace(Config(), model="tiny", users=12, score_batch=5)


def top_k(scores: np.ndarray, seen: list[set[int]], k: int) -> np.ndarray:
    """[U, I] scores -> [U, k] item indices, best first, leaving out each user's seen items."""
    scores = scores.copy()
    for u, items in enumerate(seen):
        scores[u, list(items)] = -np.inf
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.take_along_axis(scores, part, axis=1).argsort(axis=1, kind="stable")[:, ::-1]
    return np.take_along_axis(part, order, axis=1)


def rank_in_batches(users: np.ndarray, items: np.ndarray, seen: list[set[int]], k: int, batch: int) -> np.ndarray:
    """Cosine scores (unit vectors: a dot product) of `batch` users at a time -> [U, k] item indices."""
    return np.concatenate([top_k(users[s:s + batch] @ items.T, seen[s:s + batch], k)
                           for s in range(0, len(users), batch)])


def metrics(ranked: np.ndarray, heldout: list[set[int]], k: int) -> dict:
    """Mean recall@k and NDCG@k (binary relevance) over users."""
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    recall, ndcg = [], []
    for row, truth in zip(ranked, heldout):
        hits = np.array([int(i) in truth for i in row[:k]], float)
        recall.append(hits.sum() / len(truth))
        ndcg.append((hits * discount).sum() / discount[:min(len(truth), k)].sum())
    return {f"recall@{k}": round(float(np.mean(recall)), 4), f"ndcg@{k}": round(float(np.mean(ndcg)), 4)}


def mean_profiles(item_vecs: np.ndarray, seen: list[set[int]]) -> np.ndarray:
    """A user as the unit-norm mean of their history items' embeddings."""
    mean = np.stack([item_vecs[sorted(s)].mean(0) for s in seen])
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def log_popularity(seen: list[set[int]], n_items: int) -> np.ndarray:
    """log(1 + how many of these histories hold each item)."""
    counts = Counter(i for s in seen for i in s)
    return np.log1p(np.array([counts.get(i, 0) for i in range(n_items)], float))


def hybrid(item_vecs, seen, prior: float, k: int, batch: int) -> np.ndarray:
    """Rank by cosine with the mean profile + prior x log popularity (both from `seen` only)."""
    shifted = np.concatenate([item_vecs, prior * log_popularity(seen, len(item_vecs))[:, None]], axis=1)
    users = np.concatenate([mean_profiles(item_vecs, seen), np.ones((len(seen), 1))], axis=1)
    return rank_in_batches(users, shifted, seen, k, batch)


def choose_prior(item_vecs, users: list[dict], index: dict, cfg: Config) -> tuple[float, list]:
    """The prior weight with the best validation NDCG: each user's last history item is the target,
    the history before it the input (users with one history item are left out)."""
    val_seen = [{index[i] for i in u["history"][:-1]} for u in users if len(u["history"]) > 1]
    val_target = [{index[u["history"][-1]]} for u in users if len(u["history"]) > 1]
    tried = [(w, metrics(hybrid(item_vecs, val_seen, w, cfg.k, cfg.score_batch), val_target, cfg.k))
             for w in cfg.prior_weights]
    best = max(tried, key=lambda t: (t[1][f"ndcg@{cfg.k}"], -t[0]))[0]
    return best, [{"prior_weight": w, **m} for w, m in tried]


def main(args) -> dict:
    import jaxaccel

    cfg = QUICK if args.quick else Config()
    out = common.prepare_out(args.out, args.overwrite)
    items = common.read_jsonl(cfg.data / "catalog.jsonl")
    users = common.read_jsonl(cfg.data / "users.jsonl")[:cfg.users]
    common.write_jsonl(out / "data" / "users.jsonl", users)
    index = {it["id"]: i for i, it in enumerate(items)}
    seen = [{index[i] for i in u["history"]} for u in users]
    heldout = [{index[i] for i in u["heldout"]} for u in users]

    model = common.tiny_encoder() if cfg.model == "tiny" else jaxaccel.load(cfg.model)
    item_vecs = model.embed([f"{it['title']}. {it['description']}" for it in items], batch_size=cfg.embed_batch)
    mean = mean_profiles(item_vecs, seen)
    history_text = model.embed(["; ".join(items[index[i]]["title"] for i in u["history"]) for u in users],
                               batch_size=cfg.embed_batch)
    # popularity: how many users' histories hold each item (held-out interactions never count)
    popular = np.repeat(log_popularity(seen, len(items))[None], len(users), axis=0)
    prior, validation = choose_prior(item_vecs, users, index, cfg)

    rankings = {
        "embedding: mean of history items": rank_in_batches(mean, item_vecs, seen, cfg.k, cfg.score_batch),
        "embedding: history as one text": rank_in_batches(history_text, item_vecs, seen, cfg.k, cfg.score_batch),
        "popularity": top_k(popular, seen, cfg.k),
        f"embedding + popularity prior (weight {prior}, chosen on validation)":
            hybrid(item_vecs, seen, prior, cfg.k, cfg.score_batch),
    }
    table = [{"method": name, **metrics(r, heldout, cfg.k)} for name, r in rankings.items()]
    common.write_jsonl(out / "rankings.jsonl", [
        {"user": u["id"], **{name: [items[int(i)]["id"] for i in r[n]] for name, r in rankings.items()}}
        for n, u in enumerate(users)])
    results = {"recipe": "recommend", "quick": args.quick, "items": len(items), "users": len(users),
               "heldout_interactions": sum(map(len, heldout)), "k": cfg.k, "table": table,
               "validation": validation}
    common.save_results(out, results)
    return results


if __name__ == "__main__":
    raise SystemExit(common.run(main, "recommend", __doc__))
