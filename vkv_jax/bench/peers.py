"""Peer measurements for `vkv_jax.bench`: HF transformers (sdpa, full cache) and NVIDIA kvpress presses,
on a checkpoint saved from our random weights, in a virtual environment of their own.

kvpress 0.5.5 needs `transformers<5.3` while vkv_jax's test extras pin transformers 5.23, so the peers
run in a separate venv (torch 2.13.0 CPU + transformers 5.2.0 + kvpress 0.5.5) that `ensure_venv`
creates once and reuses. This file is both the host-side driver (`ensure_venv`, `run`) and the script
the peer interpreter executes (`python peers.py SPEC.json OUT.json`); the script part imports
only torch / transformers / kvpress / numpy, never vkv_jax or jax.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

PEER_PINS = ("torch==2.13.0", "transformers==5.2.0", "kvpress==0.5.5")
_MARKER = ".vkv_jax_peers"


def default_venv_dir() -> pathlib.Path:
    root = os.environ.get("VKV_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vkv_jax")
    return pathlib.Path(root) / "peer-venv"


def ensure_venv(directory: str | os.PathLike | None = None, log=print) -> tuple[pathlib.Path | None, str | None]:
    """Create (once) the peer venv. Returns (python path, None) or (python path or None, error text).

    torch is installed first and pinned exactly (a loose `torch` would pull a CUDA build); then the pinned
    transformers + kvpress. If kvpress cannot be installed, transformers 5.2.0 alone is tried so the HF
    peer still runs; the error is returned for the report.
    """
    directory = pathlib.Path(directory or default_venv_dir())
    py = directory / "bin" / "python"
    marker = directory / _MARKER
    if marker.exists():
        state = json.loads(marker.read_text())
        return py, state.get("kvpress_error")
    log(f"[peers] creating {directory} with {' '.join(PEER_PINS)} (once; a few minutes)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    _check([base, "-m", "venv", str(directory)])
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _check(pip + [PEER_PINS[0]])
    kvpress_error = None
    try:
        _check(pip + list(PEER_PINS))
    except RuntimeError as e:
        kvpress_error = f"pip install {' '.join(PEER_PINS)} failed: {e}"
        log(f"[peers] {kvpress_error}; trying the HF peer alone")
        try:
            _check(pip + list(PEER_PINS[:2]))
        except RuntimeError as e2:
            return None, f"{kvpress_error}; pip install {' '.join(PEER_PINS[:2])} also failed: {e2}"
    marker.write_text(json.dumps({"pins": PEER_PINS, "kvpress_error": kvpress_error}))
    return py, kvpress_error


def _check(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-3:])} -> rc {p.returncode}: {(p.stderr or p.stdout)[-2000:]}")


def run(python: pathlib.Path, spec: dict, workdir: pathlib.Path, timeout: float = 3600) -> dict:
    """Run the peer script under `python` on `spec`; returns its JSON (or {"error": ...})."""
    spec_path = workdir / "peer_spec.json"
    out_path = workdir / "peer_out.json"
    spec_path.write_text(json.dumps(spec))
    if out_path.exists():
        out_path.unlink()
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    p = subprocess.run([str(python), __file__, str(spec_path), str(out_path)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if p.returncode != 0 or not out_path.exists():
        return {"error": f"peer script rc {p.returncode}: {(p.stderr or p.stdout)[-3000:]}"}
    return json.loads(out_path.read_text())


# ---------------------------------------------------------------- the peer-side script (torch only)

def _peer_main(spec_path: str, out_path: str) -> None:
    import numpy as np
    import torch
    import transformers
    from transformers import LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList

    spec = json.loads(pathlib.Path(spec_path).read_text())
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    model = LlavaForConditionalGeneration.from_pretrained(spec["checkpoint"], dtype=dtype,
                                                          attn_implementation="sdpa").eval()
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "results": []}
    try:
        import kvpress
        info["kvpress"] = getattr(kvpress, "__version__", "0.5.5")
        presses = {"snapkv": kvpress.SnapKVPress, "streamingllm": kvpress.StreamingLLMPress}
    except Exception as e:  # noqa: BLE001 - reported, the HF peer still runs
        info["kvpress_error"] = repr(e)
        presses = {}

    class Clock(LogitsProcessor):
        """Stamps the time each new token's logits arrive: stamp i follows forward pass i."""

        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    def generate(ids, pix, new_tokens):
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True,
                                 pad_token_id=0)
        return start, clock.stamps, out

    # warm-up: a short text-only prompt warms the decode kernels without a long prefill
    warm = torch.randint(2, 1000, (1, 16))
    with torch.inference_mode():
        model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)

    for case in spec["cases"]:
        data = np.load(case["inputs"])
        ids = torch.from_numpy(data["input_ids"].astype(np.int64))
        pix = torch.from_numpy(data["pixel_values"]).to(dtype)
        for peer in case["peers"]:
            row = {"case": case["name"], "peer": peer["name"], "kept_fraction": peer.get("kept_fraction", 1.0)}
            try:
                press_name = peer.get("press")
                if press_name is not None:
                    if press_name not in presses:
                        raise RuntimeError(f"kvpress unavailable: {info.get('kvpress_error')}")
                    press = presses[press_name](compression_ratio=1.0 - peer["kept_fraction"])
                    with press(model):
                        start, stamps, out = generate(ids, pix, case["new_tokens"])
                else:
                    start, stamps, out = generate(ids, pix, case["new_tokens"])
                steps = np.diff(np.asarray(stamps))
                cache = out.past_key_values
                kv_bytes = 0
                for layer in getattr(cache, "layers", []):
                    for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                        if t is not None:
                            kv_bytes += t.element_size() * t.numel()
                B = ids.shape[0]
                row.update(
                    ttft_s=stamps[0] - start,
                    tpot_s=float(np.median(steps)), tpot_p90_s=float(np.percentile(steps, 90)),
                    decode_tokens_per_s=B * len(steps) / float(steps.sum()),
                    steps=int(len(steps)), kv_bytes_end=int(kv_bytes),
                    kv_tokens_end=int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else None)
            except Exception as e:  # noqa: BLE001 - one failing peer must not hide the others
                row["error"] = repr(e)[:2000]
            info["results"].append(row)
    try:
        import resource
        info["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # noqa: BLE001
        pass
    pathlib.Path(out_path).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    _peer_main(sys.argv[1], sys.argv[2])
