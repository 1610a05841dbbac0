"""STUDY SCRIPT — the staged training recipe for the shapes testbed, on a minimal model of its own.

Not library code and not the shipped model: a compact LLaVA-shaped stand-in (ViT patch 8 → 2-layer
MLP projector → Llama-style LM with RoPE, RMSNorm, SwiGLU, GQA) used to find a recipe that makes the
model read the image. To be ported onto `vkv_jax.models` by `vkv_jax/testbed/train.py`; findings and
commands are in `vkv_jax/testbed/README.md`.

Recipe knobs (all CLI flags):
  stage 1  --s1-steps N     vision tower + projector + auxiliary per-patch heads only (colour, shape
                            incl. "empty", row, column of the patch's cell), no LM;
  stage 2  --s2-steps N     question answering through the LM, optionally keeping the auxiliary loss
                            (--aux-weight) and a reduced / frozen vision learning rate (--vision-lr-mult);
           --curriculum N   the first N stage-2 steps draw images with 1-2 objects.
  --s1-steps 0 --aux-weight 0 is the plain end-to-end run of issue 7's "known difficulty".

    nice -n 10 python -m vkv_jax.testbed.recipe_study --s1-steps 600 --s2-steps 3000 --minutes 10

Every eval line reports exact match per question type next to the question-only baseline (the
majority answer for each question string, counted on the training pool) and the accuracy when every
image is replaced by another validation image (the model must then fall to about the baseline).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import pickle
import time

import numpy as np

from . import synthetic as S
from . import vocab as V

PATCH = 8
N_COLOUR, N_SHAPE = len(S.COLOUR_NAMES) + 1, len(S.SHAPES) + 1  # class 0 = empty cell


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class Pool:
    images: np.ndarray  # [N, H, W, 3] uint8
    tokens: np.ndarray  # [N, T] int32: <s> user : <image>×P question (pad-filled on the left) assistant :
    mask: np.ndarray  # [N, T] bool, False on pads
    answer: np.ndarray  # [N] int32 token id
    qtype: np.ndarray  # [N] int32 index into S.QTYPES
    patch_labels: np.ndarray  # [N, P, 4] int32: colour, shape (0 = empty), row, col of the patch's cell
    questions: list


Q_MAX = 13  # longest question in words + "?" ("is the red circle left or right of the blue cross ?")


def build_pool(split: str, n: int, config: S.ShapesConfig, seed: int, cache_dir: str) -> Pool:
    key = hashlib.sha1(repr((split, n, config, seed, PATCH, Q_MAX)).encode()).hexdigest()[:12]
    path = pathlib.Path(cache_dir) / f"pool_{split}_{key}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=True)
        return Pool(**{k: z[k] for k in z.files if k != "questions"}, questions=list(z["questions"]))
    tok = V.build_tokenizer(config)
    ids = {w: i for i, w in enumerate(V.vocab_words(config))}
    per_row = config.image_size // PATCH
    k = config.cell // PATCH
    n_patch = per_row * per_row
    T = 3 + n_patch + Q_MAX + 2
    pool = Pool(np.zeros((n, config.image_size, config.image_size, 3), np.uint8),
                np.full((n, T), ids[V.PAD], np.int32), np.zeros((n, T), bool),
                np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros((n, n_patch, 4), np.int32), [])
    pr, pc = np.divmod(np.arange(n_patch), per_row)
    for i in range(n):
        ex = S.make_example(i, split, config, seed)
        q = tok.encode(ex.question, add_special_tokens=False).ids
        row = [ids[V.BOS], ids["user"], ids[":"]] + [ids[V.IMAGE]] * n_patch
        pool.tokens[i, :len(row)] = row
        pool.tokens[i, T - 2 - len(q):T - 2] = q
        pool.tokens[i, T - 2:] = [ids["assistant"], ids[":"]]
        pool.mask[i] = True
        pool.mask[i, len(row):T - 2 - len(q)] = False
        pool.images[i] = ex.image
        pool.answer[i] = ids[ex.answer]
        pool.qtype[i] = S.QTYPES.index(ex.qtype)
        lab = pool.patch_labels[i]
        lab[:, 2], lab[:, 3] = pr // k, pc // k
        for o in ex.objects:
            cell = (lab[:, 2] == o.row) & (lab[:, 3] == o.col)
            lab[cell, 0] = 1 + S.COLOUR_NAMES.index(o.colour)
            lab[cell, 1] = 1 + S.SHAPES.index(o.shape)
        pool.questions.append(ex.question)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.npz")  # concurrent runs may build the same pool
    np.savez(tmp, **{f.name: getattr(pool, f.name) for f in dataclasses.fields(pool)
                     if f.name != "questions"}, questions=np.array(pool.questions, dtype=object))
    os.replace(tmp, path)
    return pool


def build_dialogue_pool(split: str, n: int, config: S.ShapesConfig, seed: int, turns: int) -> dict:
    """Multi-turn rows "<s> user : <image>×P q1 assistant : a1 </s> user : q2 assistant : a2 </s> …"
    (LLaVA-1.5 conversation format; its first turn is exactly the single-question prompt), with
    `target[t]` = the answer id where position t must predict an answer, -1 elsewhere."""
    ids = {w: i for i, w in enumerate(V.vocab_words(config))}
    tok = V.build_tokenizer(config)
    per_row, k = config.image_size // PATCH, config.cell // PATCH
    n_patch = per_row * per_row
    T = 3 + n_patch + turns * (Q_MAX + 6)
    out = {"images": np.zeros((n, config.image_size, config.image_size, 3), np.uint8),
           "tokens": np.full((n, T), ids[V.PAD], np.int32), "mask": np.zeros((n, T), bool),
           "target": np.full((n, T), -1, np.int32), "patch_labels": np.zeros((n, n_patch, 4), np.int32)}
    pr, pc = np.divmod(np.arange(n_patch), per_row)
    for i in range(n):
        ex = S.make_example(i, split, config, seed)
        row = [ids[V.BOS], ids["user"], ids[":"]] + [ids[V.IMAGE]] * n_patch
        for j, q in enumerate([ex] + S.more_questions(ex, turns - 1, config)):
            row += ([ids["user"], ids[":"]] if j else []) + tok.encode(q.question, add_special_tokens=False).ids
            row += [ids["assistant"], ids[":"]]
            out["target"][i, len(row) - 1] = ids[q.answer]
            row += [ids[q.answer], ids[V.EOS]]
        out["tokens"][i, :len(row)] = row
        out["mask"][i, :len(row)] = True
        out["images"][i] = ex.image
        lab = out["patch_labels"][i]
        lab[:, 2], lab[:, 3] = pr // k, pc // k
        for o in ex.objects:
            cell = (lab[:, 2] == o.row) & (lab[:, 3] == o.col)
            lab[cell, 0] = 1 + S.COLOUR_NAMES.index(o.colour)
            lab[cell, 1] = 1 + S.SHAPES.index(o.shape)
    return out


def _skeleton(question: str) -> str:
    """The question with its colour/shape words blanked (keeps row/column digits and the axis)."""
    return " ".join("_" if w in S.COLOURS or w in S.SHAPES else w for w in question.split())


def question_only_baseline(train: Pool, val: Pool) -> dict:
    """Accuracy on `val` of the best text-only guess: the majority training answer for the exact
    question string (if seen >= 5 times), else for its skeleton, else for its type."""
    by_q, by_s, by_t = (collections.defaultdict(collections.Counter) for _ in range(3))
    for q, t, a in zip(train.questions, train.qtype, train.answer):
        by_q[q][a] += 1
        by_s[_skeleton(q)][a] += 1
        by_t[t][a] += 1
    hits = collections.defaultdict(list)
    for q, t, a in zip(val.questions, val.qtype, val.answer):
        counts = by_q[q] if sum(by_q[q].values()) >= 5 else (by_s[_skeleton(q)] or by_t[t])
        hits[S.QTYPES[t]].append(counts.most_common(1)[0][0] == a)
    out = {k: round(float(np.mean(v)), 3) for k, v in hits.items()}
    out["all"] = round(float(np.mean([x for v in hits.values() for x in v])), 4)
    return out


# ----------------------------------------------------------------------------- model

@dataclasses.dataclass(frozen=True)
class ModelCfg:
    vocab: int
    n_patch: int
    d_vit: int = 64
    vit_layers: int = 2
    vit_heads: int = 4
    d: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 172


def init_params(key, c: ModelCfg):
    import jax
    import jax.numpy as jnp
    keys = iter(jax.random.split(key, 64))

    def dense(i, o, n=None):
        shape = (i, o) if n is None else (n, i, o)
        return jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(i)

    hd, L, Lv = c.d // c.heads, c.layers, c.vit_layers
    return {
        "vision": {
            "patch": dense(PATCH * PATCH * 3, c.d_vit), "pos": 0.02 * jax.random.normal(next(keys), (c.n_patch, c.d_vit)),
            "ln1": jnp.ones((Lv, c.d_vit)), "qkv": dense(c.d_vit, 3 * c.d_vit, Lv), "o": dense(c.d_vit, c.d_vit, Lv),
            "ln2": jnp.ones((Lv, c.d_vit)), "fc1": dense(c.d_vit, 4 * c.d_vit, Lv), "fc2": dense(4 * c.d_vit, c.d_vit, Lv),
            "ln_f": jnp.ones(c.d_vit),
        },
        "projector": {"w1": dense(c.d_vit, c.d), "b1": jnp.zeros(c.d), "w2": dense(c.d, c.d), "b2": jnp.zeros(c.d)},
        "aux": {"colour": dense(c.d, N_COLOUR), "shape": dense(c.d, N_SHAPE), "row": dense(c.d, 8), "col": dense(c.d, 8)},
        "lm": {
            "embed": 0.02 * jax.random.normal(next(keys), (c.vocab, c.d)),
            "ln1": jnp.ones((L, c.d)), "q": dense(c.d, c.heads * hd, L), "k": dense(c.d, c.kv_heads * hd, L),
            "v": dense(c.d, c.kv_heads * hd, L), "o": dense(c.heads * hd, c.d, L) / np.sqrt(2 * L),
            "ln2": jnp.ones((L, c.d)), "gate": dense(c.d, c.mlp, L), "up": dense(c.d, c.mlp, L),
            "down": dense(c.mlp, c.d, L) / np.sqrt(2 * L), "ln_f": jnp.ones(c.d), "head": dense(c.d, c.vocab),
        },
    }


def _layernorm(x, g):
    import jax.numpy as jnp
    mu = x.mean(-1, keepdims=True)
    return (x - mu) * jnp.reciprocal(jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)) * g


def _rmsnorm(x, g):
    import jax.numpy as jnp
    return x * jnp.reciprocal(jnp.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)) * g


def vision(p, images, c: ModelCfg):
    """[B, H, W, 3] uint8 → visual tokens in LM space [B, P, d] (CLIP-style ViT + MLP projector)."""
    import jax
    import jax.numpy as jnp
    B, H, W, _ = images.shape
    x = images.astype(jnp.float32) / 127.5 - 1.0
    x = x.reshape(B, H // PATCH, PATCH, W // PATCH, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(B, -1, PATCH * PATCH * 3) @ p["vision"]["patch"] + p["vision"]["pos"]
    hv, hd = c.vit_heads, c.d_vit // c.vit_heads

    def layer(x, w):
        h = _layernorm(x, w["ln1"])
        q, k, v = jnp.split(h @ w["qkv"], 3, -1)
        q, k, v = (t.reshape(B, -1, hv, hd) for t in (q, k, v))
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd), -1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, -1, c.d_vit) @ w["o"]
        h = _layernorm(x, w["ln2"])
        return x + jax.nn.gelu(h @ w["fc1"]) @ w["fc2"], None

    stack = {k: p["vision"][k] for k in ("ln1", "qkv", "o", "ln2", "fc1", "fc2")}
    x, _ = jax.lax.scan(layer, x, stack)
    x = _layernorm(x, p["vision"]["ln_f"])
    pj = p["projector"]
    return jax.nn.gelu(x @ pj["w1"] + pj["b1"]) @ pj["w2"] + pj["b2"]


def aux_logits(p, vis):
    return {k: vis @ w for k, w in p["aux"].items()}


def _rope(x, pos):
    import jax.numpy as jnp
    hd = x.shape[-1]
    inv = 1.0 / (10000 ** (np.arange(0, hd, 2) / hd))
    ang = pos[..., None].astype(jnp.float32) * inv  # [B, T, hd/2]
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def lm_last(p, tokens, mask, vis, c: ModelCfg, return_attn=False, all_positions=False):
    """Logits of the last position [B, V] (and the last layer's attention of it [B, H, T])."""
    import jax
    import jax.numpy as jnp
    w = p["lm"]
    emb = w["embed"][tokens]
    x = jnp.concatenate([emb[:, :3], vis, emb[:, 3 + vis.shape[1]:]], 1)
    B, T, _ = x.shape
    pos = jnp.cumsum(mask, 1) - 1
    allowed = jnp.tril(jnp.ones((T, T), bool))[None] & mask[:, None, :]  # [B, Tq, Tk]
    hd, G = c.d // c.heads, c.heads // c.kv_heads

    def layer(x, lw):
        h = _rmsnorm(x, lw["ln1"])
        q = _rope((h @ lw["q"]).reshape(B, T, c.heads, hd), pos)
        k = _rope((h @ lw["k"]).reshape(B, T, c.kv_heads, hd), pos)
        v = (h @ lw["v"]).reshape(B, T, c.kv_heads, hd)
        q = q.reshape(B, T, c.kv_heads, G, hd)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) / np.sqrt(hd)
        a = jax.nn.softmax(jnp.where(allowed[:, None, None], s, -1e9), -1)
        o = jnp.einsum("bhgqk,bkhd->bqhgd", a, v).reshape(B, T, c.heads * hd)
        x = x + o @ lw["o"]
        h = _rmsnorm(x, lw["ln2"])
        x = x + (jax.nn.silu(h @ lw["gate"]) * (h @ lw["up"])) @ lw["down"]
        return x, a[:, :, :, -1].reshape(B, c.heads, T)

    stack = {k: w[k] for k in ("ln1", "q", "k", "v", "o", "ln2", "gate", "up", "down")}
    x, attn = jax.lax.scan(layer, x, stack)
    if all_positions:
        return _rmsnorm(x, w["ln_f"]) @ w["head"]
    logits = _rmsnorm(x[:, -1], w["ln_f"]) @ w["head"]
    return (logits, attn[-1]) if return_attn else logits


# ----------------------------------------------------------------------------- training

def _xent(logits, labels):
    import jax
    import jax.numpy as jnp
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]


def make_fns(c: ModelCfg, aux_weight: float):
    import jax
    import jax.numpy as jnp

    def aux_loss(p, vis, labels):
        lg = aux_logits(p, vis)
        losses = [_xent(lg[k], labels[..., i]).mean() for i, k in enumerate(("colour", "shape", "row", "col"))]
        cell_ok = (lg["colour"].argmax(-1) == labels[..., 0]) & (lg["shape"].argmax(-1) == labels[..., 1])
        return sum(losses), cell_ok.mean()

    def s1_loss(p, b):
        vis = vision(p, b["images"], c)
        loss, acc = aux_loss(p, vis, b["patch_labels"])
        return loss, {"aux_loss": loss, "patch_acc": acc}

    def s2_loss(p, b):
        vis = vision(p, b["images"], c)
        logits = lm_last(p, b["tokens"], b["mask"], vis, c)
        qa = _xent(logits, b["answer"]).mean()
        al, acc = aux_loss(p, vis, b["patch_labels"])
        return qa + aux_weight * al, {"qa_loss": qa, "aux_loss": al, "patch_acc": acc,
                                      "acc": (logits.argmax(-1) == b["answer"]).mean()}

    def dialogue_loss(p, b):  # multi-turn: loss at every answer position (target >= 0)
        vis = vision(p, b["images"], c)
        logits = lm_last(p, b["tokens"], b["mask"], vis, c, all_positions=True)
        tgt = b["target"]
        w = (tgt >= 0).astype(jnp.float32)
        qa = (_xent(logits, jnp.maximum(tgt, 0)) * w).sum() / w.sum()
        hit = ((logits.argmax(-1) == tgt) * w).sum() / w.sum()
        al, acc = aux_loss(p, vis, b["patch_labels"])
        return qa + aux_weight * al, {"qa_loss": qa, "aux_loss": al, "patch_acc": acc, "acc": hit}

    @jax.jit
    def predict(p, b):
        return lm_last(p, b["tokens"], b["mask"], vision(p, b["images"], c), c).argmax(-1)

    return s1_loss, s2_loss, dialogue_loss, predict


def make_opt(lr, steps, warmup, vision_lr_mult):
    import optax
    sched = lambda m: optax.warmup_cosine_decay_schedule(0.0, lr * m, warmup, max(steps, warmup + 1), lr * m * 0.05)
    tx = lambda m: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched(m), weight_decay=0.01))
    labels = {"vision": "vision", "projector": "vision", "aux": "vision", "lm": "lm"}
    vis_tx = tx(vision_lr_mult) if vision_lr_mult > 0 else optax.set_to_zero()
    return optax.multi_transform({"vision": vis_tx, "lm": tx(1.0)}, labels)


def batches(pool, bs: int, rng: np.random.Generator):
    arrays = pool if isinstance(pool, dict) else {
        "images": pool.images, "tokens": pool.tokens, "mask": pool.mask, "answer": pool.answer,
        "patch_labels": pool.patch_labels}
    n = len(arrays["images"])
    while True:
        idx = rng.choice(n, bs, replace=False)
        yield {k: v[idx] for k, v in arrays.items()}


def evaluate(predict, params, pool: Pool, shuffle_images=False, bs=256):
    preds = []
    for i in range(0, len(pool.answer), bs):
        sl = slice(i, i + bs)
        images = pool.images[sl]
        if shuffle_images:  # each question sees another validation image
            images = np.roll(pool.images, 1, 0)[sl]
        preds.append(np.asarray(predict(params, {"images": images, "tokens": pool.tokens[sl], "mask": pool.mask[sl]})))
    hit = np.concatenate(preds) == pool.answer
    out = {q: round(float(hit[pool.qtype == i].mean()), 3) for i, q in enumerate(S.QTYPES) if (pool.qtype == i).any()}
    out["all"] = round(float(hit.mean()), 4)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--qtypes", default=",".join(S.QTYPES))
    ap.add_argument("--s1-steps", type=int, default=600)
    ap.add_argument("--s2-steps", type=int, default=3000)
    ap.add_argument("--curriculum", type=int, default=0, help="stage-2 steps on 1-2 object images first")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--s1-lr", type=float, default=3e-3)
    ap.add_argument("--vision-lr-mult", type=float, default=0.3)
    ap.add_argument("--aux-weight", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--turns", type=int, default=1, help=">1: stage 2 trains on multi-turn rows with this many questions per image")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--train-pool", type=int, default=20000)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock box for the whole run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=os.environ.get("VKV_STUDY_CACHE", "/tmp/vkv_study"))
    ap.add_argument("--log", default=None, help="JSONL log path")
    ap.add_argument("--save-s1", default=None, help="pickle the parameters after stage 1 here")
    ap.add_argument("--load-s1", default=None, help="start stage 2 from these stage-1 parameters")
    a = ap.parse_args(argv)

    import jax
    import optax

    t0, c0 = time.time(), time.process_time()
    qtypes = tuple(a.qtypes.split(","))
    cfg = S.ShapesConfig(image_size=a.image_size, qtypes=qtypes)
    train = build_pool("train", a.train_pool, cfg, a.seed, a.cache_dir)
    val = build_pool("validation", a.val, cfg, a.seed, a.cache_dir)
    easy = build_pool("train", max(a.curriculum * a.batch // 4, 1000), dataclasses.replace(cfg, min_objects=1, max_objects=2),
                      a.seed + 1000, a.cache_dir) if a.curriculum else None
    base = question_only_baseline(train, val)
    log = open(a.log, "a") if a.log else None

    def emit(rec):
        # wall time is shared with other jobs on a busy machine; process CPU time is the fair clock
        rec = {"t": round(time.time() - t0, 1), "cpu": round(time.process_time() - c0, 1), **rec}
        print(json.dumps(rec), flush=True)
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    emit({"event": "start", "args": vars(a), "question_only_baseline": base, "data_s": round(time.time() - t0, 1)})
    c = ModelCfg(vocab=len(V.vocab_words(cfg)), n_patch=(a.image_size // PATCH) ** 2, d=a.d, layers=a.layers,
                 mlp=int(a.d * 8 / 3 + 0.5))
    params = init_params(jax.random.PRNGKey(a.seed), c)
    emit({"event": "model", "params": int(sum(x.size for x in jax.tree.leaves(params)))})
    s1_loss, s2_loss, dialogue_loss, predict = make_fns(c, a.aux_weight)
    rng = np.random.default_rng(a.seed)
    deadline = t0 + 60 * a.minutes

    def run_stage(name, loss_fn, opt, steps, pool_for_step):
        nonlocal params
        state = opt.init(params)

        @jax.jit
        def step(params, state, b):
            (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, b)
            upd, state = opt.update(g, state, params)
            return optax.apply_updates(params, upd), state, m

        its = {}
        acc = collections.defaultdict(list)
        for i in range(steps):
            pool = pool_for_step(i)
            it = its.setdefault(id(pool), batches(pool, a.batch, rng))
            params, state, m = step(params, state, next(it))
            for k, v in m.items():
                acc[k].append(float(v))
            last = i == steps - 1 or time.time() > deadline
            if (i + 1) % a.eval_every == 0 or last:
                rec = {"event": name, "step": i + 1, **{k: round(float(np.mean(v)), 4) for k, v in acc.items()}}
                acc.clear()
                if name == "s2":
                    rec["val"] = evaluate(predict, params, val)
                emit(rec)
            if last:
                return i + 1

    if a.load_s1:
        with open(a.load_s1, "rb") as f:
            params = jax.tree.map(jax.numpy.asarray, pickle.load(f))
    elif a.s1_steps:
        run_stage("s1", s1_loss, make_opt(a.s1_lr, a.s1_steps, 50, 1.0), a.s1_steps, lambda i: train)
        if a.save_s1:
            with open(a.save_s1, "wb") as f:
                pickle.dump(jax.tree.map(np.asarray, params), f)
    if a.s2_steps and time.time() < deadline:
        if a.turns > 1:
            t1 = time.time()
            train = build_dialogue_pool("train", a.train_pool, cfg, a.seed, a.turns)
            if easy is not None:
                easy = build_dialogue_pool("train", len(easy.answer), dataclasses.replace(cfg, min_objects=1, max_objects=2),
                                           a.seed + 1000, a.turns)
            emit({"event": "dialogue_pool", "turns": a.turns, "seconds": round(time.time() - t1, 1)})
        pick = lambda i: easy if (easy is not None and i < a.curriculum) else train
        run_stage("s2", dialogue_loss if a.turns > 1 else s2_loss, make_opt(a.lr, a.s2_steps, 100, a.vision_lr_mult), a.s2_steps, pick)
        emit({"event": "final", "val": evaluate(predict, params, val),
              "val_shuffled_images": evaluate(predict, params, val, shuffle_images=True),
              "question_only_baseline": base})


if __name__ == "__main__":
    main()
