"""`python -m vkv_jax.testbed.train`: train the shipped tiny LLaVA on the shapes testbed.

The staged recipe of `vkv_jax/testbed/README.md`, on the real model code (`vkv_jax.models.llava` /
`llama` / `clip` as pure functions under `jax.grad`):

  stage 1  vision tower + projector + linear per-patch auxiliary heads (colour, shape incl. empty,
           row, column of the patch's cell) on the projector output, i.e. the tokens the LM sees;
  stage 2  question answering through the LM with vision + projector frozen, on multi-turn rows in the
           shipped chat template (`USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: ...`),
           loss on the answer tokens and their `</s>`, plus a grounding loss (weight 0.2): head 0 of
           LM layer 2, from the slot that predicts each answer, is trained to attend to the visual
           tokens of that answer's cells (the generator knows them). Without it the LM never learned
           to look a cell up by its row and column (see the README).

Parameters start from `vkv_jax.models.loading.random_params` (rescaled to fan-in init, see `fan_in_init`);
the aux heads are extra parameters that are never exported. With `--teacher MODEL` (the testbed-v2 recipe,
teacher = the shipped 64-px model) stage 1 also distils the teacher's visual token of each patch's cell (the
teacher's tower on the image box-averaged to its size) and stage 2 starts from the teacher's LM. With
`--testbed v3` the LM is 8 layers deep (`V3_SIZES`), the stage-1 heads read each patch's item or label
letter with occupied and empty patches weighted equally, and `--init-lm MODEL` grows a trained 4-layer LM to
that depth (`grow_lm`). AdamW + warm-up/cosine per stage, orbax `CheckpointManager` checkpoints (stage, step
and parameters/optimizer state; the batch order is a pure function of (seed, stage, step), so a resumed run
continues on the same data), a tqdm bar, periodic validation exact match per question type beside the
question-only baseline, and an HF export of the best validation checkpoint in `OUT/best`.

    python -m vkv_jax.testbed.train --out /tmp/vkv_train      # the shipped run: OUT/best is the shipped model
    python -m vkv_jax.testbed.train --testbed v2 --teacher tiny-llava --out /tmp/v2  # the testbed-v2 model
    python -m vkv_jax.testbed.train --testbed v3 --init-lm tiny-llava-576 --out /tmp/v3  # 8-layer LM, testbed v3
    python -m vkv_jax.testbed.train --evaluate tiny-llava --split test --limit 1000  # a shipped name or a folder
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
import shutil
import time
from typing import Any

import numpy as np

from vkv_jax.testbed import finegrained as F
from vkv_jax.testbed import synthetic as S
from vkv_jax.testbed import tiny
from vkv_jax.testbed import vocab as V
from vkv_jax.testbed.baselines import exact_match_summary, question_only_baseline

PATCH = 8
TESTBEDS = {"v1": "64-px images (64 visual tokens), the five one-word question types: the shipped default model",
            "v2": "192-px images (576 visual tokens), every question type incl. two-word object_at answers",
            "v3": "192-px images, a 24 x 24 grid of one-patch cells (576 visual tokens): one or two patches hold most "
                  "answers, read_all answers of 27-31 tokens (finegrained.py)"}
# the shipped LM's departures from tiny_config's defaults: 32-dim heads and a slow RoPE (theta 1e6), so
# that most of each head's dimensions stay position-independent over a prompt (content matching)
SHIPPED_SIZES = {"head_dim": 32, "rope_theta": 1_000_000}
N_COLOUR, N_SHAPE = len(S.COLOUR_NAMES) + 1, len(S.SHAPES) + 1  # class 0 = empty cell
AUX_HEADS = ("colour", "shape", "row", "col")
# testbed v3's per-patch classes: colour 0 empty, 1-6 an item's colour, 7 a label tag; "shape" is the kind:
# 0 empty, then the item kinds (shapes, digits), then the label letters
V3_COLOURS, V3_KINDS = len(S.COLOUR_NAMES) + 2, 1 + len(F.KINDS) + len(F.LETTERS)
# the testbed-v3 model's LM: the shipped sizes, 8 layers
V3_SIZES = {**SHIPPED_SIZES, "num_layers": 8}


# ----------------------------------------------------------------------------- data

def pixel_values(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float32, as the shipped CLIP processor (mean = std = 0.5) at
    the model's own size (no resize, no crop)."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def patch_cells(config: S.ShapesConfig) -> tuple[np.ndarray, np.ndarray]:
    """[P] row and [P] column of each patch's grid cell, patches in raster order."""
    per_row, k = config.image_size // PATCH, config.cell // PATCH
    pr, pc = np.divmod(np.arange(per_row * per_row), per_row)
    return pr // k, pc // k


def patch_labels(ex: S.Example, config: S.ShapesConfig) -> np.ndarray:
    """[P, 4] int32 colour (0 = empty), shape (0 = empty), row, column of each patch's cell (testbed v3:
    colour or label tag, item kind or label letter; see `V3_COLOURS`)."""
    rows, cols = patch_cells(config)
    lab = np.zeros((len(rows), 4), np.int32)
    lab[:, 2], lab[:, 3] = rows, cols
    if isinstance(config, F.FineConfig):
        at = rows * config.grid + cols
        for o in ex.objects:
            cell = at == o.row * config.grid + o.col
            lab[cell, 0] = 1 + S.COLOUR_NAMES.index(o.colour)
            lab[cell, 1] = 1 + F.KINDS.index(o.shape)
        for label in ex.labels:
            for (r, c), letter in zip(label.cells(), label.text):
                cell = at == r * config.grid + c
                lab[cell, 0] = V3_COLOURS - 1
                lab[cell, 1] = 1 + len(F.KINDS) + F.LETTERS.index(letter)
        return lab
    for o in ex.objects:
        cell = (lab[:, 2] == o.row) & (lab[:, 3] == o.col)
        lab[cell, 0] = 1 + S.COLOUR_NAMES.index(o.colour)
        lab[cell, 1] = 1 + S.SHAPES.index(o.shape)
    return lab


def conversation(tokenizer, turns: list[tuple[str, str]], n_image_tokens: int) -> tuple[list[int], list[bool]]:
    """Ids of a multi-turn chat in the checkpoint's template, image placeholder expanded, and the loss
    mask: True on the tokens the model must produce (each answer and its `</s>`)."""
    messages = []
    for j, (q, a) in enumerate(turns):
        content = ([{"type": "image"}] if j == 0 else []) + [{"type": "text", "text": q}]
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    # the Tokenizer renders single-turn prompts only; a training row needs the whole dialogue
    text = tokenizer._template.render(messages=messages, add_generation_prompt=False, **tokenizer._special)
    ids = tokenizer.encode(text)
    image_id = tokenizer.token_to_id(tokenizer.image_token)
    assistant, colon, eos = (tokenizer.token_to_id(w) for w in ("assistant", ":", V.EOS))
    out, target, answering = [], [], False
    for i, t in enumerate(ids):
        if t == image_id:
            out += [t] * n_image_tokens
            target += [False] * n_image_tokens
            continue
        out.append(t)
        target.append(answering)
        if t == eos:
            answering = False
        elif t == colon and i > 0 and ids[i - 1] == assistant:
            answering = True
    return out, target


def answer_slots(target: list[bool]) -> list[int]:
    """Slots whose next-token prediction is an answer's first token (the `:` after `ASSISTANT`)."""
    return [i - 1 for i in range(1, len(target)) if target[i] and not target[i - 1]]


def answer_patch_mask(questions: list[S.Example], config: S.ShapesConfig, n_image_tokens: int) -> np.ndarray:
    """[turns, P] bool: the visual tokens covering each question's answer cells (all False when the
    answer has no cells, e.g. a count of 0)."""
    mask = np.zeros((len(questions), n_image_tokens), bool)
    for j, q in enumerate(questions):
        mask[j, S.cells_to_patches(q.answer_cells, config, PATCH)] = True
    return mask


def build_pool(split: str, n: int, config: S.ShapesConfig, seed: int, turns: int, tokenizer,
               n_image_tokens: int, cache_dir: str | None = None) -> dict[str, Any]:
    """Training/validation rows for examples 0..n-1 of `split`.

    images [N, H, W, 3] uint8; ids, target [N, T] (right padded; target True where the next token is
    a loss target); valid [N, T]; labels [N, P, 4] (patch labels); answer_slot [N, turns] (the slot
    whose next-token prediction is each turn's first answer token), ground [N, turns, P] (the visual
    tokens covering each turn's answer cells) and turn_qtype [N, turns], for the grounding loss;
    qtype [N]; questions, answers (turn-1 strings).
    """
    key = hashlib.sha1(repr((split, n, config, seed, turns, n_image_tokens, tokenizer.vocab_size,
                             "v4")).encode()).hexdigest()[:12]
    path = pathlib.Path(cache_dir) / f"pool_{split}_{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        z = np.load(path, allow_pickle=True)
        return {k: (list(z[k]) if k in ("questions", "answers") else z[k]) for k in z.files}
    rows, targets, out = [], [], collections.defaultdict(list)
    for i in range(n):
        ex = S.make_example(i, split, config, seed)
        qs = [ex] + (S.more_questions(ex, turns - 1, config) if turns > 1 else [])
        ids, tgt = conversation(tokenizer, [(q.question, q.answer) for q in qs], n_image_tokens)
        rows.append(ids)
        targets.append(tgt)
        out["answer_slot"].append(answer_slots(tgt))
        out["ground"].append(answer_patch_mask(qs, config, n_image_tokens))
        out["turn_qtype"].append([S.ALL_QTYPES.index(q.qtype) for q in qs])
        out["images"].append(ex.image)
        out["labels"].append(patch_labels(ex, config))
        out["qtype"].append(S.ALL_QTYPES.index(ex.qtype))
        out["questions"].append(ex.question)
        out["answers"].append(ex.answer)
    T = max(map(len, rows))
    pool = {k: np.asarray(v) for k, v in out.items() if k not in ("questions", "answers")}
    pool["ids"] = np.full((n, T), tokenizer.pad_id, np.int32)
    pool["valid"] = np.zeros((n, T), bool)
    pool["target"] = np.zeros((n, T), bool)
    for i, (r, t) in enumerate(zip(rows, targets)):
        pool["ids"][i, :len(r)], pool["valid"][i, :len(r)], pool["target"][i, :len(r)] = r, True, t
    pool["questions"], pool["answers"] = out["questions"], out["answers"]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.npz")
        np.savez(tmp, **{k: (np.array(v, dtype=object) if isinstance(v, list) else v) for k, v in pool.items()})
        os.replace(tmp, path)
    return pool


def shapes_config(testbed: str, image_size: int | None = None):
    """The data config of testbed "v1" (the shipped model's), "v2" (`S.TESTBED_V2`) or "v3"
    (`F.TESTBED_V3`), at `image_size` when given."""
    if testbed not in TESTBEDS:
        raise ValueError(f"unknown testbed {testbed!r}; allowed: {tuple(TESTBEDS)}")
    base = {"v2": S.TESTBED_V2, "v3": F.TESTBED_V3}.get(testbed, S.ShapesConfig(image_size=64))
    return base if image_size is None else dataclasses.replace(base, image_size=image_size)


# ----------------------------------------------------------------------------- model

def model_config(tokenizer, image_size: int, **sizes):
    return tiny.tiny_config(tokenizer.vocab_size, tokenizer.token_to_id(V.IMAGE), image_size=image_size,
                                     patch_size=PATCH, **sizes)


MATMULS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head", "patch_embed", "fc1", "fc2", "w1", "w2")


def fan_in_init(params: dict[str, Any], scale: float = 0.02) -> dict[str, Any]:
    """`random_params` draws every weight with std 0.02; rescale the matmul weights to std
    1/sqrt(fan_in) (the recipe study's init; 0.02 is far too small for 64-wide layers). Embeddings,
    position embeddings, biases and norms are left as drawn."""
    import jax

    def fix(path, x):
        return x * ((x.shape[-2] ** -0.5) / scale) if path[-1].key in MATMULS else x

    return jax.tree_util.tree_map_with_path(fix, params)


def aux_sizes(config) -> dict[str, int]:
    """Classes of each stage-1 head on a testbed: colour, shape (v3: kind or letter), row, column."""
    if isinstance(config, F.FineConfig):
        return {"colour": V3_COLOURS, "shape": V3_KINDS, "row": config.grid, "col": config.grid}
    return {"colour": N_COLOUR, "shape": N_SHAPE, "row": config.grid, "col": config.grid}


def init_aux(key, d: int, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    import jax

    sizes = sizes or aux_sizes(S.ShapesConfig())
    keys = jax.random.split(key, len(sizes))
    return {n: jax.random.normal(k, (d, s)) * d ** -0.5 for k, (n, s) in zip(keys, sizes.items())}


def _xent(logits, labels):
    import jax
    import jax.numpy as jnp

    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]


def image_start(pool: dict, image_token_id: int) -> int:
    """The slot of the first visual token, checked to be the same in every row of `pool`."""
    first = (pool["ids"] == image_token_id).argmax(1)
    if not (first == first[0]).all():
        raise ValueError("rows of the pool place the image at different slots")
    return int(first[0])


def stage1_loss(train_params, cfg, batch, balanced: bool = False):
    """Per-patch aux classification on the projector output; with `batch["teacher"]` [B, P, D] (a
    teacher's visual token of each patch's cell), plus the squared distance to it relative to the
    teacher's mean squared norm, averaged over the patches of occupied cells and over those of empty cells
    with equal weight (~92% of the patches are empty: a plain mean left the objects' patches at 0.28
    relative error against 0.02 for empty ones). balanced=True (testbed v3, where ~87% of the patches are
    empty) averages the head losses over occupied and empty patches with equal weight too. Returns loss,
    metrics."""
    import jax.numpy as jnp

    from vkv_jax.models import llava

    feats = llava.image_features(train_params["model"], cfg, batch["pixels"])  # [B, P, D]
    labels = batch["labels"]
    logits = {n: feats @ train_params["aux"][n] for n in AUX_HEADS}
    if balanced:
        occ = (labels[..., 0] > 0).astype(jnp.float32)
        w = occ / jnp.maximum(occ.sum(), 1) + (1 - occ) / jnp.maximum((1 - occ).sum(), 1)
        loss = sum((_xent(logits[n], labels[..., i]) * w).sum() / 2 for i, n in enumerate(AUX_HEADS))
    else:
        loss = sum(_xent(logits[n], labels[..., i]).mean() for i, n in enumerate(AUX_HEADS))
    ok = (logits["colour"].argmax(-1) == labels[..., 0]) & (logits["shape"].argmax(-1) == labels[..., 1])
    occupied = labels[..., 0] > 0
    # most patches are empty: the accuracy on the occupied ones is the figure that says the tower reads
    metrics = {"acc": ok.mean(), "acc_occupied": (ok * occupied).sum() / jnp.maximum(occupied.sum(), 1)}
    if "teacher" in batch:
        t, occupied = batch["teacher"], labels[..., 0] > 0
        err = ((feats - t) ** 2).sum(-1) / (t ** 2).sum(-1).mean()  # [B, P]
        metrics["distill_object"] = (err * occupied).sum() / jnp.maximum(occupied.sum(), 1)
        metrics["distill_empty"] = (err * ~occupied).sum() / jnp.maximum((~occupied).sum(), 1)
        loss = loss + 0.5 * (metrics["distill_object"] + metrics["distill_empty"])
    return loss, {"loss": loss, **metrics}


def grounding_logmass(q, k, valid, answer_slot, ground_slots, head: int = 0):
    """[B, J] log of one head's attention mass on each turn's answer tokens, from the slot that
    predicts that turn's answer (causal softmax over the valid keys, as the model attends).

    q [B, Hq, S, Dh], k [B, Hkv, S, Dh] post-RoPE; valid [B, S]; answer_slot [B, J] int;
    ground_slots [B, J, S] bool (the answer's visual tokens, in sequence slots).
    """
    import jax
    import jax.numpy as jnp

    Dh = q.shape[-1]
    group = q.shape[1] // k.shape[1]
    qj = jnp.take_along_axis(q[:, head], answer_slot[..., None], axis=1)  # [B, J, Dh]
    logits = jnp.einsum("bjd,bsd->bjs", qj, k[:, head // group], preferred_element_type=jnp.float32) * Dh ** -0.5
    keys = jnp.arange(q.shape[2])
    seen = valid[:, None, :] & (keys[None, None, :] <= answer_slot[..., None])
    logp = jax.nn.log_softmax(jnp.where(seen, logits, -1e30), axis=-1)
    return jax.nn.logsumexp(jnp.where(ground_slots, logp, -1e30), axis=-1)


def stage2_loss(train_params, cfg, batch, ground_weight: float = 0.0, ground_layer: int = -1,
                image_start: int = 0):
    """Next-token loss on the answer tokens of multi-turn rows; vision + projector frozen
    (stop_gradient also prunes their backward pass). With `ground_weight` > 0, plus that times the
    grounding loss: -log of head 0's attention mass in layer `ground_layer`, from each answer's
    predicting slot, on the visual tokens of that answer's cells (turns whose answer has cells);
    `image_start` is the slot of the first visual token (the same in every row). Returns loss, metrics."""
    import jax
    import jax.numpy as jnp

    from vkv_jax.models import llama, llava

    p = dict(train_params["model"])
    p["vision"], p["projector"] = jax.lax.stop_gradient((p["vision"], p["projector"]))
    ids, valid = batch["ids"], batch["valid"]
    x, _ = llava.merge_embeddings(p, cfg, ids, batch["pixels"])
    observe = None
    if ground_weight:  # the answer patches [B, J, P] placed at their sequence slots [B, J, S]
        S, P = ids.shape[1], batch["ground"].shape[-1]
        ground_slots = jnp.pad(batch["ground"], ((0, 0), (0, 0), (image_start, S - image_start - P)))
        observe = functools.partial(grounding_logmass, valid=valid, answer_slot=batch["answer_slot"],
                                    ground_slots=ground_slots)
    # dense attention: XLA:CPU differentiates the blocked (online-softmax) loop ~1.4x slower (measured at
    # batch 8 x 768 slots, 8 layers: 6.9 s vs 4.95 s a gradient); training sequences fit in memory
    hidden, _, _, logmass = llama.prefill_layers(p["lm"], cfg.text, x, llava.positions_from_mask(valid), valid,
                                                 observe=observe, attn_impl="dense")
    logits = llama.unembed(p["lm"], hidden[:, :-1])
    w = batch["target"][:, 1:].astype(jnp.float32)
    nxt = ids[:, 1:]
    answer_loss = (_xent(logits, nxt) * w).sum() / w.sum()
    acc = ((logits.argmax(-1) == nxt) * w).sum() / w.sum()
    metrics = {"loss": answer_loss, "acc": acc}
    loss = answer_loss
    if ground_weight:
        has = batch["ground"].any(-1).astype(jnp.float32)  # [B, J]
        mass = logmass[ground_layer]
        metrics["ground"] = -(mass * has).sum() / jnp.maximum(has.sum(), 1.0)
        loss = loss + ground_weight * metrics["ground"]
    return loss, metrics


def make_optimizer(lr: float, steps: int, warmup: int, trainable: tuple[str, ...]):
    """AdamW (wd 0.01, clip 1.0) with linear warm-up and cosine decay to 5 % on the `trainable` parameter
    groups ("vision", "projector", "lm", "aux"); the others get zero updates."""
    import jax
    import optax

    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
    adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))

    def labels(params):
        groups = {**{k: v for k, v in params["model"].items()}, "aux": params["aux"]}
        lab = {k: jax.tree.map(lambda _, k=k: "train" if k in trainable else "frozen", v) for k, v in groups.items()}
        return {"model": {k: lab[k] for k in params["model"]}, "aux": lab["aux"]}

    return optax.multi_transform({"train": adam, "frozen": optax.set_to_zero()}, labels)


# ----------------------------------------------------------------------------- teacher (warm start)

def load_teacher(model: str, cfg, shapes: S.ShapesConfig):
    """(params, config) of a trained model (a shipped name or a folder) to warm-start from: its LM must
    have `cfg`'s shapes, and its vision tower must see one token per grid cell of an image
    `shapes.image_size` / its own size times smaller (the v1 model for testbed v2: 64 px, 8 x 8 cells)."""
    import vkv_jax

    teacher = vkv_jax.load(model, "float32")
    tv = teacher.config.vision
    if teacher.config.text != cfg.text:
        raise ValueError(f"--teacher {model}: its LM config differs from the one trained here "
                         f"({teacher.config.text} vs {cfg.text})")
    if tv.image_size // tv.patch_size != shapes.grid or shapes.image_size % tv.image_size:
        raise ValueError(f"--teacher {model}: its {tv.image_size}-px tower with {tv.patch_size}-px patches does not "
                         f"see one token per cell of the {shapes.grid} x {shapes.grid} grid of {shapes.image_size}-px "
                         "images")
    return teacher.params, teacher.config


def init_model(model: str, cfg, params: dict[str, Any]) -> dict[str, Any]:
    """`params` with every entry replaced by a trained model's (`--init`: a shipped name or a folder),
    which must have exactly the config trained here (sizes, vocabulary, image size)."""
    import vkv_jax

    src = vkv_jax.load(model, "float32")
    if src.config != cfg:
        raise ValueError(f"--init {model}: its config differs from the one trained here ({src.config} vs {cfg})")
    return {k: src.params[k] for k in params}


def _layer_list(layers) -> list[dict[str, Any]]:
    """Per-layer dicts from a list of them or from one dict of [L, ...] stacked arrays."""
    if isinstance(layers, dict):
        n = len(next(iter(layers.values())))
        return [{k: v[i] for k, v in layers.items()} for i in range(n)]
    return list(layers)


def grow_lm(src_lm: dict[str, Any], src_words: list[str], dst_lm: dict[str, Any],
            dst_words: list[str]) -> dict[str, Any]:
    """A deeper LM warm-started from a trained one (`--init-lm`): destination layer i copies source layer
    i * L_src // L_dst, and every copy after the first has its `o` and `down` projections zeroed, so each
    added layer starts as the identity on the residual stream and the grown LM computes what the source
    LM did. Embedding rows and lm_head columns are copied for the words both vocabularies hold (matched
    by word); the others keep `dst_lm`'s fresh initialisation. Widths must agree.

    src_lm, dst_lm: `params["lm"]` trees (layers a list of dicts, as loaded, or one dict of [L, ...] arrays, as
    `random_params` draws them); src_words, dst_words: each vocabulary in id order. Returns layers as a list.
    """
    import jax.numpy as jnp

    if src_lm["embed"].shape[1] != dst_lm["embed"].shape[1]:
        raise ValueError(f"--init-lm: hidden size {src_lm['embed'].shape[1]} differs from "
                         f"{dst_lm['embed'].shape[1]}")
    src_layers = _layer_list(src_lm["layers"])
    n_src, n_dst = len(src_layers), len(_layer_list(dst_lm["layers"]))
    layers, seen = [], set()
    for i in range(n_dst):
        j = i * n_src // n_dst
        layer = dict(src_layers[j])
        if j in seen:
            layer["o"], layer["down"] = jnp.zeros_like(layer["o"]), jnp.zeros_like(layer["down"])
        seen.add(j)
        layers.append(layer)
    out = {**dst_lm, "layers": layers, "final_norm": src_lm["final_norm"]}
    src_id = {w: i for i, w in enumerate(src_words)}
    pairs = [(i, src_id[w]) for i, w in enumerate(dst_words) if w in src_id]
    dst_ids, src_ids = (np.array(x) for x in zip(*pairs))
    out["embed"] = jnp.asarray(dst_lm["embed"]).at[dst_ids].set(jnp.asarray(src_lm["embed"])[src_ids])
    out["lm_head"] = jnp.asarray(dst_lm["lm_head"]).at[:, dst_ids].set(jnp.asarray(src_lm["lm_head"])[:, src_ids])
    return out


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, H/factor, W/factor, 3] uint8 by box averaging."""
    n, h, w, c = images.shape
    return images.reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4)).round().astype(np.uint8)


def cell_of_patch(config: S.ShapesConfig) -> np.ndarray:
    """[P] the raster index (row * grid + column) of each patch's grid cell."""
    rows, cols = patch_cells(config)
    return rows * config.grid + cols


def teacher_targets(teacher_params, teacher_cfg, shapes: S.ShapesConfig):
    """images [N, H, W, 3] uint8 -> [N, P, D]: the teacher's visual token of each patch's cell, from the
    teacher's tower on the image box-averaged to its size (the stage-1 distillation target)."""
    import jax

    from vkv_jax.models import llava

    features = jax.jit(lambda pix: llava.image_features(teacher_params, teacher_cfg, pix))
    factor, cells = shapes.image_size // teacher_cfg.vision.image_size, cell_of_patch(shapes)
    return lambda images: np.asarray(features(pixel_values(downsample(images, factor))))[:, cells]


# ----------------------------------------------------------------------------- training loop

def batch_indices(n: int, batch: int, seed: int, stage: int, step: int) -> np.ndarray:
    """Rows of batch `step` of `stage`: epochs are seeded permutations, so the data position is a pure
    function of (seed, stage, step) and a resumed run sees exactly the batches it would have seen."""
    per_epoch = n // batch
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng((seed, stage, epoch)).permutation(n)
    return perm[i * batch:(i + 1) * batch]


def make_batch(pool: dict, idx: np.ndarray, stage: int,
               ground_types: tuple[str, ...] = S.ALL_QTYPES) -> dict[str, np.ndarray]:
    """Stage-1 or stage-2 arrays of rows `idx`; the grounding mask only on turns of `ground_types`."""
    b = {"pixels": pixel_values(pool["images"][idx])}
    if stage == 1:
        b["labels"] = pool["labels"][idx]
    else:
        # trim the common right padding to a multiple of 32 (a few compiled shapes, not one per batch)
        T = min(pool["ids"].shape[1], -(-int(pool["valid"][idx].sum(1).max()) // 32) * 32)
        b.update(ids=pool["ids"][idx, :T], valid=pool["valid"][idx, :T], target=pool["target"][idx, :T],
                 answer_slot=pool["answer_slot"][idx])
        grounded = np.isin(pool["turn_qtype"][idx], [S.ALL_QTYPES.index(t) for t in ground_types])  # [B, turns]
        b["ground"] = pool["ground"][idx] & grounded[..., None]
    return b


def evaluate_pool(predict, params, pool: dict, batch: int = 50, shuffle_images: bool = False) -> dict[str, float]:
    """Exact match of the whole answer of each single-turn row (a validation pool), teacher-forced: a
    row is right when every answer token and the `</s>` after it is the argmax given the gold tokens
    before it, which is exactly when greedy decoding from the prompt produces the answer.
    `predict(params, ids, valid, pixels)` -> [B, T] argmax ids; `batch` rows at a time (the testbed-v2
    rows' attention at batch 250 took several GB)."""
    hit = []
    images = np.roll(pool["images"], 1, 0) if shuffle_images else pool["images"]
    for i in range(0, len(pool["ids"]), batch):
        sl = slice(i, i + batch)
        pred = np.asarray(predict(params, pool["ids"][sl], pool["valid"][sl], pixel_values(images[sl])))
        target = pool["target"][sl, 1:]
        hit.append(((pred[:, :-1] == pool["ids"][sl, 1:]) | ~target).all(1))
    hit = np.concatenate(hit)
    hits = collections.defaultdict(list)
    for h, t in zip(hit, pool["qtype"]):
        hits[S.ALL_QTYPES[int(t)]].append(bool(h))
    return exact_match_summary(hits)


def export(directory, params, cfg, tokenizer_dir, shapes: S.ShapesConfig) -> None:
    """HF LLaVA layout: config.json + model.safetensors + tokenizer / template / processor files, and
    the testbed config the model was trained on (`testbed.json`)."""
    from vkv_jax.models.saving import save_checkpoint

    directory = pathlib.Path(directory)
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, params, cfg)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json"):
        shutil.copy(pathlib.Path(tokenizer_dir) / name, tmp / name)
    S.save_config(shapes, tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def parse_qtype_weights(spec: str | None, qtypes: tuple[str, ...] = S.ONE_WORD_QTYPES) -> tuple[float, ...] | None:
    """"shape_at=3,relative=2" -> one weight per entry of `qtypes` (unnamed types weigh 1)."""
    if not spec:
        return None
    w = dict.fromkeys(qtypes, 1.0)
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in w:
            raise ValueError(f"unknown question type {name.strip()!r} in --qtype-weights; allowed: {qtypes}")
        w[name.strip()] = float(value)
    return tuple(w.values())


def train(args) -> dict:
    import jax
    import optax
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from vkv_jax.models import llava
    from vkv_jax.models.loading import random_params
    from vkv_jax.models.tokenizer import Tokenizer

    t0 = time.time()
    deadline = t0 + 60 * args.minutes if args.minutes else float("inf")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scfg = shapes_config(args.testbed, args.image_size)
    tok_dir = out / "tokenizer"
    tiny.write_tokenizer_files(tok_dir, V.build_tokenizer(scfg), scfg.image_size)
    tokenizer = Tokenizer.from_dir(tok_dir)
    # --sizes default: the shipped LM's sizes, 8 layers deep on testbed v3 (layer-wise budgets need depth)
    sizes = json.loads(args.sizes) if args.sizes is not None else (V3_SIZES if args.testbed == "v3" else SHIPPED_SIZES)
    cfg = model_config(tokenizer, scfg.image_size, **sizes)
    n_img = cfg.num_image_tokens
    log_f = open(out / "log.jsonl", "a")

    def emit(rec):
        rec = {"t": round(time.time() - t0, 1), **rec}
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
        if not args.quiet:
            tqdm.write(json.dumps(rec))

    cache = str(out / "data")
    train_cfg = dataclasses.replace(scfg, qtype_weights=parse_qtype_weights(args.qtype_weights, scfg.qtypes))
    pool = build_pool("train", args.train_pool, train_cfg, args.seed, args.turns, tokenizer, n_img, cache)
    val = build_pool("validation", args.val, scfg, args.seed, 1, tokenizer, n_img, cache)
    ground_types = tuple(t.strip() for t in args.ground_types.split(",") if t.strip())
    if bad := [t for t in ground_types if t not in S.ALL_QTYPES]:
        raise ValueError(f"unknown --ground-types {bad}; allowed: {S.ALL_QTYPES}")
    focus = None
    if args.focus_steps:
        focus_cfg = dataclasses.replace(scfg, qtypes=tuple(q.strip() for q in args.focus.split(",")))
        focus = build_pool("train", args.focus_pool, focus_cfg, args.seed, args.turns, tokenizer, n_img, cache)
    base = question_only_baseline(pool, val)
    emit({"event": "data", "testbed": args.testbed, "image_size": scfg.image_size,
          "train_rows": args.train_pool, "turns": args.turns, "seq_len": pool["ids"].shape[1],
          "qtype_weights": train_cfg.qtype_weights, "focus": args.focus if focus else None,
          "focus_steps": args.focus_steps, "ground_weight": args.ground_weight, "ground_layer": args.ground_layer,
          "ground_types": ground_types,
          "question_only_baseline": base})

    key = jax.random.PRNGKey(args.seed)
    params = {"model": fan_in_init(random_params(cfg, args.seed)),
              "aux": init_aux(key, cfg.text.hidden_size, aux_sizes(scfg))}
    targets = None
    if args.teacher:  # stage 1 distils the teacher's tokens; stage 2 starts from the teacher's LM
        teacher_params, teacher_cfg = load_teacher(args.teacher, cfg, scfg)
        targets = teacher_targets(teacher_params, teacher_cfg, scfg)
        params["model"]["lm"] = teacher_params["lm"]
        emit({"event": "teacher", "model": args.teacher, "image_size": teacher_cfg.vision.image_size})
    if args.init:  # every weight from a trained model of the same config (e.g. to run stage 2 again)
        params["model"] = init_model(args.init, cfg, params["model"])
        emit({"event": "init", "model": args.init})
    if args.init_lm:  # testbed v3: a deeper LM grown from a trained model's (`grow_lm`)
        import vkv_jax

        src = vkv_jax.load(args.init_lm, "float32")
        src_words = [src.tokenizer.id_to_token(i) for i in range(src.tokenizer.vocab_size)]
        params["model"]["lm"] = grow_lm(src.params["lm"], src_words, params["model"]["lm"], list(V.vocab_words(scfg)))
        emit({"event": "init_lm", "model": args.init_lm, "layers": f"{src.config.text.num_layers} -> "
                                                                   f"{cfg.text.num_layers}"})
    n_params = sum(int(x.size) for x in jax.tree.leaves(params["model"]))
    emit({"event": "model", "params": n_params, "config": json.loads(json.dumps(dataclasses.asdict(cfg)))})

    stages = {1: dict(steps=args.s1_steps, lr=args.s1_lr, warmup=min(50, args.s1_steps // 4), batch=args.s1_batch,
                      trainable=("vision", "projector", "aux"),
              loss=functools.partial(stage1_loss, balanced=isinstance(scfg, F.FineConfig))),
              2: dict(steps=args.s2_steps, lr=args.lr, warmup=min(100, args.s2_steps // 4), batch=args.batch,
                      trainable=("lm",), loss=functools.partial(
                          stage2_loss, ground_weight=args.ground_weight, ground_layer=args.ground_layer,
                          image_start=image_start(pool, cfg.image_token_id)))}

    def step_fn(stage):
        st = stages[stage]
        opt = make_optimizer(st["lr"], st["steps"], st["warmup"], st["trainable"])

        @jax.jit
        def step(params, opt_state, batch):
            (_, m), g = jax.value_and_grad(lambda p: st["loss"](p, cfg, batch), has_aux=True)(params)
            upd, opt_state = opt.update(g, opt_state, params)
            return optax.apply_updates(params, upd), opt_state, m

        return opt, step

    @jax.jit
    def tower_metrics(params, batch):  # stage-1 metrics on held-out images
        return stages[1]["loss"](params, cfg, batch)[1]

    @jax.jit
    def predict(params, ids, valid, pixels):
        return llava.logits(params["model"], cfg, ids, pixels, valid).argmax(-1)

    mgr = ocp.CheckpointManager((out / "ckpt").resolve(),
                                options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    stage, step, best = 1, 0, {"all": -1.0}
    history = []
    if mgr.latest_step() is not None:
        meta = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        stage, step, best, history = meta["stage"], meta["step"], meta["best"], meta["history"]
        opt, _ = step_fn(stage)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt": opt.init(params)})
        state = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        params, opt_state = state["state"]["params"], state["state"]["opt"]
        emit({"event": "resume", "stage": stage, "step": step, "best_val": best["all"]})
    else:
        opt_state = None

    def save(stage, step, params, opt_state):
        meta = {"stage": stage, "step": step, "best": best, "history": history}
        glob = step + (stages[1]["steps"] + 1 if stage == 2 else 0)  # distinct from stage 1's last step
        mgr.save(glob, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "opt": opt_state}),
                                                meta=ocp.args.JsonSave(meta)), force=True)
        mgr.wait_until_finished()

    stopped = False
    while stage <= 2 and not stopped:
        st = stages[stage]
        opt, step_jit = step_fn(stage)
        if opt_state is None:
            opt_state = opt.init(params)
        metrics = collections.defaultdict(list)
        bar = tqdm(total=st["steps"], initial=step, desc=f"stage {stage}", disable=args.quiet, mininterval=5)
        last_ckpt = time.time()
        while step < st["steps"]:
            # stage-2 curriculum: the first --focus-steps batches come from the focus pool
            src = focus if stage == 2 and step < args.focus_steps else pool
            idx = batch_indices(len(src["images"]), st["batch"], args.seed, stage + 10 * (src is focus), step)
            batch = make_batch(src, idx, stage, ground_types)
            if stage == 1 and targets is not None:
                batch["teacher"] = targets(src["images"][idx])
            params, opt_state, m = step_jit(params, opt_state, batch)
            step += 1
            bar.update(1)
            for k, v in m.items():
                metrics[k].append(float(v))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(metrics['loss'][-50:]):.3f}",
                                acc=f"{np.mean(metrics['acc'][-50:]):.3f}")
            out_of_time = time.time() > deadline or (stage, step) == tuple(args.stop_at or ())
            done = step == st["steps"]
            if step % args.eval_every == 0 or done or out_of_time:
                rec = {"event": f"stage{stage}", "step": step,
                       **{k: round(float(np.mean(v)), 4) for k, v in metrics.items()}}
                metrics.clear()
                if stage == 1:
                    held_out = tower_metrics(params, make_batch(val, np.arange(min(32, len(val["images"]))), 1))
                    rec["val_acc"], rec["val_acc_occupied"] = (round(float(held_out[k]), 4)
                                                               for k in ("acc", "acc_occupied"))
                if stage == 2:
                    rec["val"] = evaluate_pool(predict, params, val)
                    rec["baseline"] = base
                    history.append({"step": step, "t": round(time.time() - t0, 1), **rec["val"]})
                    if rec["val"]["all"] > best["all"]:
                        best = {**rec["val"], "step": step}
                        export(out / "best", params["model"], cfg, tok_dir, scfg)
                        rec["best"] = True
                emit(rec)
            if done or out_of_time or time.time() - last_ckpt > args.ckpt_seconds or step % args.ckpt_every == 0:
                save(stage, step, params, opt_state)
                last_ckpt = time.time()
            if out_of_time and not done:
                stopped = True
                emit({"event": "time_box", "stage": stage, "step": step})
                break
        bar.close()
        if not stopped:
            stage, step, opt_state = stage + 1, 0, None
            if stage == 2:
                save(2, 0, params, make_optimizer(1e-3, 1, 0, ("lm",)).init(params))
                opt_state = None
                if targets is not None:  # the teacher's LM on the distilled tokens, before any stage-2 step
                    emit({"event": "stage2", "step": 0, "val": evaluate_pool(predict, params, val)})
    result = {"best_val": best, "question_only_baseline": base, "minutes": round((time.time() - t0) / 60, 2),
              "finished": not stopped, "params": n_params}
    if not stopped:
        result["final_val"] = evaluate_pool(predict, params, val)
        result["final_val_shuffled_images"] = evaluate_pool(predict, params, val, shuffle_images=True)
        export(out / "final", params["model"], cfg, tok_dir, scfg)
    emit({"event": "end", **result})
    mgr.close()
    log_f.close()
    return result


# ----------------------------------------------------------------------------- evaluation of an export

def evaluate_checkpoint(model_dir: str, split: str = "test", limit: int = 1000, start: int = 0, seed: int = 0,
                        batch: int = 100, images: str = "real") -> dict:
    """Greedy `vkv_jax.generate` exact match (whole answer string) per question type on examples
    start..start+limit-1 of `split`. images: "real", "shuffled" (each question sees the next example's
    image) or "blank" (a background-grey image)."""
    import vkv_jax

    model = vkv_jax.load(model_dir)
    size = model.config.vision.image_size
    scfg = S.config_for_model(model_dir, size)
    exs = S.make_examples(split, limit, start=start, config=scfg, seed=seed)
    pictures = [e.image for e in exs]
    if images != "real":
        pictures = S.ablated_images(pictures, images, size)
    hits, preds = collections.defaultdict(list), []
    max_new_tokens = F.max_answer_words(scfg) + 1 if isinstance(scfg, F.FineConfig) else 4
    for i in range(0, len(exs), batch):
        chunk = exs[i:i + batch]
        out = vkv_jax.generate(model, model.prepare(images=pictures[i:i + batch], prompts=[e.question for e in chunk]),
                               max_new_tokens=max_new_tokens)
        for e, text in zip(chunk, out.text):
            preds.append(text.strip())
            hits[e.qtype].append(text.strip() == e.answer)
    return {"exact_match": exact_match_summary(hits), "n": len(exs), "split": split, "start": start, "images": images,
            "predictions": preds}


def build_parser() -> argparse.ArgumentParser:
    from vkv_jax.cli.common import ArgumentParser, HelpFormatter, at_least, real_at_least

    count, positive, steps = at_least(1), real_at_least(0.0, strict=True), at_least(0)
    ap = ArgumentParser(prog="python -m vkv_jax.testbed.train", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--out", default="vkv_train", help="run folder (checkpoints, log, exports)")
    ap.add_argument("--minutes", type=real_at_least(0.0), default=60.0,
                    help="wall-clock box, >= 0 (0 = none); resumable")
    ap.add_argument("--seed", type=steps, default=0,
                    help="seed of the initial weights, the data pools and the batch order (and, with --evaluate, "
                         "of the examples)")
    ap.add_argument("--testbed", default="v1", choices=tuple(TESTBEDS),
                    help="which testbed: " + "; ".join(f"{k}: {v}" for k, v in TESTBEDS.items()))
    ap.add_argument("--image-size", type=at_least(PATCH), default=None,
                    help=f"image side in pixels, a multiple of the {PATCH}-pixel patch (default: the testbed's, 64 "
                         "for v1, 192 for v2 and v3)")
    ap.add_argument("--sizes", default=None,
                    help="JSON object of vkv_jax.testbed.tiny.tiny_config sizes (default: the shipped model's, "
                         f"{json.dumps(SHIPPED_SIZES)}; on testbed v3 {json.dumps(V3_SIZES)})")
    ap.add_argument("--teacher", default=None, metavar="MODEL",
                    help="warm start from a trained model (a shipped name or a folder) whose tower sees one token "
                         "per grid cell (e.g. tiny-llava for --testbed v2): stage 1 adds the distance of each patch's "
                         "token to the teacher's token of its cell (the image box-averaged to the teacher's size); "
                         "stage 2 starts from the teacher's LM (default: train from scratch)")
    ap.add_argument("--init-lm", default=None, metavar="MODEL",
                    help="start the LM from a trained model's (a shipped name or a folder), grown to --sizes' depth by "
                         "repeating its layers with the repeats' output projections zeroed, embeddings matched by word "
                         "(default: from scratch)")
    ap.add_argument("--init", default=None, metavar="MODEL",
                    help="start every weight (tower, projector, LM) from a trained model of exactly this config "
                         "(a shipped name or a folder, e.g. a run's OUT/best), typically with --s1-steps 0 "
                         "(default: fresh weights)")
    ap.add_argument("--s1-steps", type=steps, default=500, help="stage-1 steps (vision tower + projector + aux heads)")
    ap.add_argument("--s1-batch", type=count, default=64, help="stage-1 images per batch")
    ap.add_argument("--s1-lr", type=positive, default=3e-3, help="stage-1 peak learning rate (warm-up, then cosine)")
    ap.add_argument("--s2-steps", type=steps, default=4000, help="stage-2 steps (the LM on question answering)")
    ap.add_argument("--batch", type=count, default=32, help="stage-2 rows per batch")
    ap.add_argument("--lr", type=positive, default=3e-3, help="stage-2 peak learning rate (warm-up, then cosine)")
    ap.add_argument("--turns", type=count, default=6, help="questions per image in a stage-2 row")
    ap.add_argument("--qtype-weights", default=None,
                    help='stage-2 training mix, e.g. "shape_at=3,relative=2" (others 1); validation stays uniform '
                         "(default: uniform)")
    ap.add_argument("--train-pool", type=count, default=20000,
                    help="rows (one image each) in the stage-2 training pool")
    ap.add_argument("--ground-weight", type=real_at_least(0.0), default=0.2,
                    help="weight of the stage-2 grounding loss (head 0 of --ground-layer attends to the "
                         "answer's cells)")
    ap.add_argument("--ground-types", default=",".join(S.ALL_QTYPES), help="question types the grounding loss covers")
    ap.add_argument("--ground-layer", type=steps, default=2, help="LM layer whose head 0 the grounding loss trains")
    ap.add_argument("--focus", default="shape_at", help="question types of the stage-2 curriculum's first phase")
    ap.add_argument("--focus-steps", type=steps, default=0,
                    help="stage-2 steps (of the one schedule) on --focus question types only, then the full mix")
    ap.add_argument("--focus-pool", type=count, default=5000, help="rows in the focus phase's training pool")
    ap.add_argument("--val", type=count, default=500, help="validation questions (uniform over question types)")
    ap.add_argument("--eval-every", type=count, default=250, help="validate every this many steps")
    ap.add_argument("--ckpt-every", type=count, default=500, help="checkpoint every this many steps")
    ap.add_argument("--ckpt-seconds", type=real_at_least(0.0), default=300,
                    help="... and at least every this many seconds")
    ap.add_argument("--quiet", action="store_true",
                    help="no progress bar or log lines on the terminal (log.jsonl is still written)")
    ap.add_argument("--stop-at", type=steps, nargs=2, metavar=("STAGE", "STEP"),
                    help="stop (checkpointed, resumable) after this step of this stage (1 or 2), as an interruption "
                         "would (default: run to the end)")
    ap.add_argument("--evaluate", metavar="MODEL_DIR",
                    help="only evaluate an exported model (a folder or a shipped name) with vkv_jax.generate "
                         "(default: train)")
    ap.add_argument("--split", default="test", choices=["train", "validation", "test"],
                    help="with --evaluate: the testbed split asked")
    ap.add_argument("--limit", type=count, default=1000, help="with --evaluate: questions asked")
    ap.add_argument("--images", default="real", choices=["real", "shuffled", "blank"],
                    help="with --evaluate: the real images, each question with another example's image, or blank")
    return ap


def check_args(args) -> None:
    """The checks argparse's types cannot make, before any data or model is built: ValueError /
    FileNotFoundError naming the flag (`run_cli` prints them as one `error:` line, exit code 2)."""
    import inspect

    from vkv_jax.cli.common import check_model_dir, check_out_dir

    if args.evaluate is not None:
        from vkv_jax import default_model

        check_model_dir(args.evaluate, "--evaluate")
        args.evaluate = default_model.resolve(args.evaluate)  # a shipped name: its folder (and testbed.json)
        return
    check_out_dir(args.out)
    for flag, model in (("--teacher", args.teacher), ("--init", args.init), ("--init-lm", args.init_lm)):
        if model is not None:
            check_model_dir(model, flag)
    if args.image_size is not None and args.image_size % PATCH:
        raise ValueError(f"--image-size {args.image_size} must be a multiple of the {PATCH}-pixel patch")
    if args.stop_at is not None and args.stop_at[0] not in (1, 2):
        raise ValueError(f"--stop-at STAGE must be 1 or 2, got {args.stop_at[0]}")
    try:
        sizes = (json.loads(args.sizes) if args.sizes is not None
                 else V3_SIZES if args.testbed == "v3" else SHIPPED_SIZES)
    except json.JSONDecodeError as e:
        raise ValueError(f"--sizes {args.sizes!r} is not valid JSON ({e})") from None
    allowed = [p.name for p in inspect.signature(tiny.tiny_config).parameters.values() if p.kind == p.KEYWORD_ONLY]
    if not isinstance(sizes, dict):
        raise ValueError(f"--sizes {args.sizes!r} must be a JSON object of sizes, e.g. {json.dumps(SHIPPED_SIZES)}")
    if bad := [k for k in sizes if k not in allowed]:
        raise ValueError(f"--sizes: unknown size {bad[0]!r}; allowed: {', '.join(allowed)}")
    for key, value in sizes.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not ok or (key != "rope_theta" and not isinstance(value, int)):
            kind = "a positive number" if key == "rope_theta" else "a positive integer"
            raise ValueError(f"--sizes: {key} must be {kind}, got {value!r}")
    layers = sizes.get("num_layers", inspect.signature(tiny.tiny_config).parameters["num_layers"].default)
    if args.ground_layer >= layers:
        raise ValueError(f"--ground-layer {args.ground_layer} is out of range for a {layers}-layer LM "
                         f"(0..{layers - 1})")
    qtypes = shapes_config(args.testbed, args.image_size).qtypes
    parse_qtype_weights_flag(args.qtype_weights, qtypes)
    for flag, text in (("--ground-types", args.ground_types), ("--focus", args.focus)):
        if bad := [t.strip() for t in text.split(",") if t.strip() and t.strip() not in S.ALL_QTYPES]:
            raise ValueError(f"{flag}: unknown question type {bad[0]!r}; allowed: {', '.join(S.ALL_QTYPES)}")


def parse_qtype_weights_flag(spec: str | None, qtypes: tuple[str, ...]) -> None:
    """--qtype-weights read as `parse_qtype_weights` reads it, each weight a finite number >= 0."""
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not weight >= 0 or weight == float("inf"):
            raise ValueError(f"--qtype-weights item {item.strip()!r}: expected TYPE=WEIGHT with a number >= 0")
    parse_qtype_weights(spec, qtypes)


def main(argv=None) -> int:
    from vkv_jax.cli.common import run_cli

    return run_cli(_main, build_parser().parse_args(argv))


def _main(args) -> int:
    check_args(args)
    if args.evaluate:
        r = evaluate_checkpoint(args.evaluate, args.split, args.limit, seed=args.seed, images=args.images)
        r.pop("predictions")
        print(json.dumps(r))
        return 0
    print(json.dumps(train(args)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
