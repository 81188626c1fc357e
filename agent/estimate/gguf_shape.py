"""Turn GGUF metadata into a ModelShape the way llama.cpp's model loader reads its hyper-parameters.

Budgets must never be under-estimated, so every absent key is replaced by a conservative assumption (and named
in ``ModelShape.missing``), and every absurd value is rejected before it can drive an allocation estimate.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence

from agent.estimate.gguf_constants import gguf
from agent.estimate.gguf_header import ArrayInfo, GGUFError, GGUFModel, Scalar, read_model
from agent.estimate.shape import ModelShape, SSMShape

K = gguf.Keys
MAX_LAYERS = 4096
MAX_CONTEXT = 2**24
MAX_EMBD = 2**20
MAX_HEADS = 2**14
MAX_VOCAB = 2**24
MAX_HEAD_DIM = 2**16
MAX_FF = 2**24
MAX_EXPERTS = 2**16
MAX_SSM_DIM = 2**20

# When a GGUF has no context_length, assume a long one: a larger training context only ever raises estimates.
FALLBACK_CONTEXT = 131_072
FALLBACK_FF_PER_EMBD = 4

# The SWA period llama.cpp hard-codes in its loader for architectures whose GGUFs may omit
# `attention.sliding_window_pattern` (gemma2 alternates; gemma3 is 5 sliding : 1 full; cohere2, llama4 and
# exaone4 3 : 1). Other architectures with a window but no pattern are sized as all full attention, which
# can only over-estimate the KV cache.
_ARCH_SWA_PERIOD = {
    "gemma2": 2,
    "gemma3": 6,
    "gemma3n": 5,
    "cohere2": 4,
    "llama4": 4,
    "exaone4": 4,
    "gpt-oss": 2,
}
# Windows llama.cpp hard-codes where the GGUF has no `attention.sliding_window` (llama4's chunked attention
# uses chunks of 8192 tokens; a sliding_window of 0 in the file turns it off).
_ARCH_DEFAULT_WINDOW = {"llama4": 8192}
# Architectures whose every layer also has a shared expert as wide as a routed one.
_ARCH_SHARED_EXPERT = {"llama4"}
# Architectures that are recurrent in every layer and keep no KV cache at all.
_PURE_RECURRENT = {"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"}
# Hybrids whose every layer has both a recurrent state and a KV cache (llama.cpp special-cases falcon-h1).
_RECURRENT_AND_ATTENTION = {"falcon-h1"}
_LAYER_PREFIX = re.compile(r"^blk\.(\d+)\.")
# The input layer, which llama.cpp keeps in host memory whatever --n-gpu-layers says.
INPUT_TENSORS = frozenset({"token_embd", "token_types", "position_embd"})


class _Meta:
    """Typed, bounds-checked access to one model's metadata, remembering which keys were absent."""

    def __init__(self, model: GGUFModel, arch: str) -> None:
        self.model = model
        self.arch = arch
        self.missing: list[str] = []

    def key(self, template: str) -> str:
        return template.format(arch=self.arch)

    def _fail(self, message: str) -> GGUFError:
        return GGUFError(f"{self.model.path}: {message}")

    def _check(self, key: str, value: Scalar, low: int, high: int) -> int:
        if type(value) is not int:
            raise self._fail(f"{key} must be an integer, got {value!r}")
        if not low <= value <= high:
            raise self._fail(f"{key} = {value} is outside the sane range {low}..{high}")
        return value

    def raw(self, template: str) -> Scalar | ArrayInfo | None:
        return self.model.metadata.get(self.key(template))

    def integer(self, template: str, high: int, low: int = 1) -> int | None:
        key = self.key(template)
        value = self.model.metadata.get(key)
        if value is None:
            return None
        if isinstance(value, ArrayInfo):
            raise self._fail(f"{key} must be a single integer, got an array of {value.length}")
        return self._check(key, value, low, high)

    def per_layer(self, template: str, n_layer: int, high: int, low: int = 0) -> tuple[int, ...] | None:
        """A value llama.cpp accepts either once or once per layer (``get_key_or_arr``)."""
        key = self.key(template)
        value = self.model.metadata.get(key)
        if value is None:
            return None
        if not isinstance(value, ArrayInfo):
            return (self._check(key, value, low, high),) * n_layer
        if value.values is None or value.length != n_layer:
            raise self._fail(f"{key} is an array of {value.length} items; expected one per layer ({n_layer})")
        return tuple(self._check(key, item, low, high) for item in value.values)

    def note_missing(self, template: str) -> None:
        self.missing.append(self.key(template))


def _tensor_dim(model: GGUFModel, name: str, axis: int) -> int | None:
    for tensor in model.tensors:
        if tensor.name == name and len(tensor.dims) > axis:
            return tensor.dims[axis]
    return None


def _layers_from_tensors(model: GGUFModel) -> int | None:
    indices = [int(m[1]) for t in model.tensors if (m := _LAYER_PREFIX.match(t.name))]
    return max(indices) + 1 if indices else None


def _essential(meta: _Meta, template: str, high: int, fallback: int | None, what: str) -> int:
    value = meta.integer(template, high)
    if value is not None:
        return value
    if fallback is None or not 0 < fallback <= high:
        raise meta._fail(f"{meta.key(template)} is missing and the {what} cannot be derived from the tensors")
    meta.note_missing(template)
    return fallback


def _vocab_size(meta: _Meta) -> int:
    value = meta.integer(K.LLM.VOCAB_SIZE, MAX_VOCAB)
    if value is not None:
        return value
    tokens = meta.model.metadata.get(K.Tokenizer.LIST)
    if isinstance(tokens, ArrayInfo) and 0 < tokens.length <= MAX_VOCAB:
        return tokens.length
    for name in ("token_embd.weight", "output.weight"):
        rows = _tensor_dim(meta.model, name, 1)
        if rows is not None and 0 < rows <= MAX_VOCAB:
            meta.missing.append(K.Tokenizer.LIST)
            return rows
    raise meta._fail("the vocabulary size cannot be determined (no vocab_size, token list or token_embd)")


def _swa_layers(meta: _Meta, n_layer: int) -> tuple[int, tuple[bool, ...]]:
    """Which layers use the sliding window, following llama.cpp's ``set_swa_pattern``."""
    window = meta.integer(K.Attention.SLIDING_WINDOW, MAX_CONTEXT, low=0)
    if window is None:
        window = _ARCH_DEFAULT_WINDOW.get(meta.arch, 0)
    if window == 0:
        return 0, (False,) * n_layer
    pattern = meta.raw(K.Attention.SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, ArrayInfo):
        if pattern.values is None or pattern.length != n_layer:
            raise meta._fail(f"{meta.key(K.Attention.SLIDING_WINDOW_PATTERN)} must have one entry per layer")
        layers = tuple(bool(v) for v in pattern.values)
    else:
        period = (
            meta.integer(K.Attention.SLIDING_WINDOW_PATTERN, MAX_LAYERS, low=0)
            if pattern is not None
            else _ARCH_SWA_PERIOD.get(meta.arch)
        )
        if period is None:
            return 0, (False,) * n_layer
        layers = tuple(period == 0 or il % period < period - 1 for il in range(n_layer))
    return (window, layers) if any(layers) else (0, layers)


def _recurrent_layers(meta: _Meta, n_layer: int, n_head_kv: Sequence[int]) -> tuple[bool, ...]:
    if meta.arch in _PURE_RECURRENT or meta.arch in _RECURRENT_AND_ATTENTION:
        return (True,) * n_layer
    interval = meta.integer(K.LLM.FULL_ATTENTION_INTERVAL, MAX_LAYERS)
    if interval is not None:  # qwen3next-style: every interval-th layer is full attention
        return tuple((il + 1) % interval != 0 for il in range(n_layer))
    return tuple(kv == 0 for kv in n_head_kv)


def _recurrent_state_elements(meta: _Meta, n_embd: int) -> int:
    """n_embd_r + n_embd_s of llama.cpp's llama_hparams: f32 elements of state per layer and sequence."""
    wkv_head_size = meta.integer(K.WKV.HEAD_SIZE, MAX_SSM_DIM, low=0) or 0
    if wkv_head_size:  # RWKV: token-shift states plus the wkv matrix state
        token_shift = meta.integer(K.LLM.TOKEN_SHIFT_COUNT, 16, low=0)
        return (2 if token_shift is None else token_shift) * n_embd + n_embd * wkv_head_size
    l_cache = meta.integer(K.ShortConv.L_CACHE, MAX_SSM_DIM, low=0) or 0
    if l_cache:  # LFM2 short convolutions keep only a conv state
        return n_embd * (l_cache - 1)
    d_conv = meta.integer(K.SSM.CONV_KERNEL, MAX_SSM_DIM, low=0) or 0
    d_inner = meta.integer(K.SSM.INNER_SIZE, MAX_SSM_DIM, low=0) or 0
    d_state = meta.integer(K.SSM.STATE_SIZE, MAX_SSM_DIM, low=0) or 0
    n_group = meta.integer(K.SSM.GROUP_COUNT, MAX_SSM_DIM, low=0) or 0
    return max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state) + d_state * d_inner


def _ssm_shape(meta: _Meta) -> SSMShape | None:
    d_inner = meta.integer(K.SSM.INNER_SIZE, MAX_SSM_DIM, low=0) or 0
    d_state = meta.integer(K.SSM.STATE_SIZE, MAX_SSM_DIM, low=0) or 0
    if not d_inner or not d_state or meta.integer(K.WKV.HEAD_SIZE, MAX_SSM_DIM, low=0):
        return None
    return SSMShape(
        d_inner=d_inner,
        d_state=d_state,
        n_group=meta.integer(K.SSM.GROUP_COUNT, MAX_SSM_DIM, low=0) or 1,
        n_head=meta.integer(K.SSM.TIME_STEP_RANK, MAX_SSM_DIM, low=0) or 0,
        d_conv=meta.integer(K.SSM.CONV_KERNEL, MAX_SSM_DIM, low=0) or 0,
    )


def _experts(meta: _Meta, n_expert: int, n_ff: int) -> tuple[int, int, bool]:
    """(routed expert FFN width, shared experts' total width, whether any layer keeps a dense FFN)."""
    if not n_expert:
        return 0, 0, True
    n_ff_expert = meta.integer(K.LLM.EXPERT_FEED_FORWARD_LENGTH, MAX_FF, low=0) or n_ff
    shared = meta.integer(K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, MAX_FF, low=0)
    if shared is None:
        count = meta.integer(K.LLM.EXPERT_SHARED_COUNT, MAX_EXPERTS, low=0)
        shared = (count or (1 if meta.arch in _ARCH_SHARED_EXPERT else 0)) * n_ff_expert
    dense = bool(meta.integer(K.LLM.LEADING_DENSE_BLOCK_COUNT, MAX_LAYERS, low=0)) or any(
        (meta.integer(key, MAX_LAYERS, low=0) or 1) > 1
        for key in (K.LLM.INTERLEAVE_MOE_LAYER_STEP, K.LLM.MOE_EVERY_N_LAYERS)
    )
    return n_ff_expert, shared, dense


def shape_from_model(model: GGUFModel) -> ModelShape:
    """Read llama.cpp's hyper-parameters from metadata, falling back conservatively where keys are absent."""
    arch = model.metadata.get(K.General.ARCHITECTURE)
    if not isinstance(arch, str) or not arch:
        raise GGUFError(f"{model.path}: {K.General.ARCHITECTURE} is missing or not a string")
    meta = _Meta(model, arch)
    n_layer = _essential(meta, K.LLM.BLOCK_COUNT, MAX_LAYERS, _layers_from_tensors(model), "layer count")
    n_embd = _essential(
        meta, K.LLM.EMBEDDING_LENGTH, MAX_EMBD, _tensor_dim(model, "token_embd.weight", 0), "embedding length"
    )
    state_elements = _recurrent_state_elements(meta, n_embd)
    head_low = 0 if state_elements else 1  # recurrent models legitimately have no attention heads

    heads = meta.per_layer(K.Attention.HEAD_COUNT, n_layer, MAX_HEADS, low=head_low)
    if heads is None:
        # Unknown heads: assume 64-wide heads (many heads make the no-flash-attention score matrix biggest).
        meta.note_missing(K.Attention.HEAD_COUNT)
        heads = (n_embd // 64 if n_embd % 64 == 0 else 1,) * n_layer
    if not any(heads) and not state_elements:
        raise meta._fail(f"{meta.key(K.Attention.HEAD_COUNT)} is 0 in every layer of a non-recurrent model")
    n_head_kv = meta.per_layer(K.Attention.HEAD_COUNT_KV, n_layer, MAX_HEADS)
    if n_head_kv is None:
        n_head_kv = heads  # llama.cpp's own default (no GQA), so not a guess

    first_heads = heads[0] or max(heads)  # llama.cpp divides by the first layer's head count
    default_head_dim = n_embd // first_heads if first_heads else 0
    key_length = meta.integer(K.Attention.KEY_LENGTH, MAX_HEAD_DIM, low=0)
    value_length = meta.integer(K.Attention.VALUE_LENGTH, MAX_HEAD_DIM, low=0)
    # Absent key/value lengths default to n_embd / n_head in llama.cpp too: exact, not a fallback.
    key_length = default_head_dim if key_length is None else key_length
    value_length = default_head_dim if value_length is None else value_length

    value_length_mla = meta.integer(K.Attention.VALUE_LENGTH_MLA, MAX_HEAD_DIM, low=0) or 0
    query_width = mla_rank = 0
    if meta.integer(K.Attention.KEY_LENGTH_MLA, MAX_HEAD_DIM, low=0) and value_length_mla:
        # Multi-head latent attention: llama.cpp caches the compressed latent (kv_lora_rank + the rope part,
        # the file's key_length) as K and reads V as a view of it, so there is no V cache at all; with flash
        # attention the per-token working width is its output, n_head x the MLA value length.
        value_length = 0
        query_width = max(heads) * value_length_mla
        mla_rank = meta.integer(K.Attention.KV_LORA_RANK, MAX_HEAD_DIM, low=0) or key_length
    window, swa_layers = _swa_layers(meta, n_layer)
    key_length_swa = meta.integer(K.Attention.KEY_LENGTH_SWA, MAX_HEAD_DIM, low=0) or key_length
    value_length_swa = meta.integer(K.Attention.VALUE_LENGTH_SWA, MAX_HEAD_DIM, low=0) or value_length

    recurrent = _recurrent_layers(meta, n_layer, n_head_kv) if state_elements else (False,) * n_layer
    if arch in _PURE_RECURRENT:
        n_head_kv = (0,) * n_layer
    elif arch not in _RECURRENT_AND_ATTENTION:
        n_head_kv = tuple(0 if rec else kv for rec, kv in zip(recurrent, n_head_kv, strict=True))

    n_ff_layers = meta.per_layer(K.LLM.FEED_FORWARD_LENGTH, n_layer, MAX_FF)
    if n_ff_layers is None:
        meta.note_missing(K.LLM.FEED_FORWARD_LENGTH)
        n_ff = FALLBACK_FF_PER_EMBD * n_embd
    else:
        n_ff = max(n_ff_layers)

    n_expert = meta.integer(K.LLM.EXPERT_COUNT, MAX_EXPERTS, low=0) or 0
    n_ff_expert, n_ff_shared, dense_ffn = _experts(meta, n_expert, n_ff)
    context = meta.integer(K.LLM.CONTEXT_LENGTH, MAX_CONTEXT)
    if context is None:
        meta.note_missing(K.LLM.CONTEXT_LENGTH)
        context = FALLBACK_CONTEXT

    return ModelShape(
        path=model.path,
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=max(heads),
        n_head_kv=n_head_kv,
        key_length=tuple(key_length_swa if swa else key_length for swa in swa_layers),
        value_length=tuple(value_length_swa if swa else value_length for swa in swa_layers),
        n_vocab=_vocab_size(meta),
        n_ff=n_ff,
        context_length=context,
        weights_bytes=model.weights_bytes,
        file_bytes=model.file_bytes,
        tensor_count=len(model.tensors),
        n_expert=n_expert,
        n_expert_used=meta.integer(K.LLM.EXPERT_USED_COUNT, MAX_EXPERTS, low=0) or 0,
        sliding_window=window,
        swa_layers=swa_layers,
        recurrent_state_bytes=tuple(4 * state_elements if rec else 0 for rec in recurrent),
        n_ff_expert=n_ff_expert,
        n_ff_shared=n_ff_shared,
        dense_ffn=dense_ffn,
        mla_rank=mla_rank,
        flash_query_width=query_width,
        ssm=_ssm_shape(meta) if any(recurrent) else None,
        shard_count=len(model.headers),
        missing=tuple(meta.missing),
        input_weights_bytes=sum(t.nbytes for t in model.tensors if t.name.split(".")[0] in INPUT_TENSORS),
        output_tied=not any(t.name == "output.weight" for t in model.tensors),
    )


def load_shape(path: str | os.PathLike[str]) -> ModelShape:
    """Read a (possibly split) GGUF model's header and return its shape.

    Many units often share one model file, and a reconcile re-reads it: shapes are cached by the first
    file's path, size and modification time, so a changed file is read again.
    """
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        planned = _PLANNED.get(os.path.abspath(path))
        if planned is None:
            raise
        return planned
    return _cached_shape(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


_PLANNED: dict[str, ModelShape] = {}


def plan_shape(path: str | os.PathLike[str], shape: ModelShape) -> None:
    """The shape of a model not downloaded yet (read from its remote header), used until its file exists."""
    _PLANNED[os.path.abspath(path)] = shape


@functools.lru_cache(maxsize=256)
def _cached_shape(path: str, size: int, mtime_ns: int) -> ModelShape:
    return shape_from_model(read_model(path))
