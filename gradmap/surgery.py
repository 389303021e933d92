"""Layer surgery: find, remove, temporarily hide and restore decoder layers of a causal LM.

Everything that changes which decoder layers a model runs goes through this module, so the three things that
must stay consistent always do: the layer list itself, the per-layer entries of the config (`num_hidden_layers`,
`layer_types`, ...), and the attention modules' `layer_idx` (used to address the KV cache during generation).

`remove_layers` returns a `RemovedLayers`: the layers it took out, keyed by position, with their per-layer config
entries, so it can put them back for a while (`dense_view`: how compensation sees the dense model without a copy)
or for good (`restore`). No state is kept anywhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from gradmap.module_paths import LAYER_PATHS, first_path

# Config attributes that hold the layer count under another name (GPT-2 style configs).
_LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers")
# Config attributes that are per-layer lists and must shrink with the model.
_PER_LAYER_LIST_ATTRS = ("layer_types", "sliding_window_pattern_list", "no_rope_layers", "mlp_only_layers")


class UnsupportedArchitectureError(ValueError):
    pass


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layer list (raises UnsupportedArchitectureError naming the class if unknown)."""
    found = first_path(model, LAYER_PATHS.values(), nn.ModuleList)
    if found is None:
        raise UnsupportedArchitectureError(
            f"cannot find the decoder layer list of {type(model).__name__}; supported layouts: "
            + ", ".join(f"{fam} (`{p}`)" for fam, p in LAYER_PATHS.items()))
    return found[1]


def num_layers(model: nn.Module) -> int:
    return len(get_decoder_layers(model))


def _set_decoder_layers(model: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Refill the existing ModuleList in place: a new list would reset its train/eval flag and drop its hooks."""
    container = get_decoder_layers(model)
    layers = list(layers)
    del container[:]
    container.extend(layers)


def _sync_config(config: object, keep: Sequence[int], old_len: int) -> None:
    """Shrink or regrow the config's per-layer fields to match the layer positions in `keep`."""
    for attr in _LAYER_COUNT_ATTRS:
        if isinstance(getattr(config, attr, None), int):
            setattr(config, attr, len(keep))
    for attr in _PER_LAYER_LIST_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == old_len:
            setattr(config, attr, type(value)(value[i] for i in keep))
    text_config = getattr(config, "text_config", None)  # multimodal wrappers (e.g. Gemma3ForConditionalGeneration)
    if text_config is not None and text_config is not config:
        _sync_config(text_config, keep, old_len)


def _layer_entries(config: object, i: int, old_len: int) -> dict[str, object]:
    """The per-layer config entries of layer position `i` (a config for `old_len` layers)."""
    entries: dict[str, object] = {}
    for attr in _PER_LAYER_LIST_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == old_len:
            entries[attr] = value[i]
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        entries["text_config"] = _layer_entries(text_config, i, old_len)
    return entries


def _regrow_config(config: object, entries: Mapping[int, Mapping[str, object]], total: int) -> None:
    """Inverse of `_sync_config`: reinsert the removed positions' per-layer entries (keyed by position)."""
    for attr in _PER_LAYER_LIST_ATTRS:
        value = getattr(config, attr, None)
        if (isinstance(value, (list, tuple)) and len(value) == total - len(entries)
                and all(attr in e for e in entries.values())):
            it = iter(value)
            setattr(config, attr, type(value)(entries[i][attr] if i in entries else next(it) for i in range(total)))
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        _regrow_config(text_config, {i: e.get("text_config", {}) for i, e in entries.items()}, total)


def _renumber(layers: Sequence[nn.Module]) -> None:
    """Give every module with a `layer_idx` (attention, and the layer itself in some models) its new position."""
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position


def _config_snapshot(config: object) -> dict[str, object]:
    snap = {a: getattr(config, a) for a in _LAYER_COUNT_ATTRS + _PER_LAYER_LIST_ATTRS if hasattr(config, a)}
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        snap["text_config"] = _config_snapshot(text_config)
    return snap


def _config_restore(config: object, snap: Mapping[str, object]) -> None:
    for attr, value in snap.items():
        if attr == "text_config":
            _config_restore(config.text_config, value)  # type: ignore[arg-type]
        else:
            setattr(config, attr, value)


def _check_indices(indices: Sequence[int], n: int) -> list[int]:
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} are out of range; allowed: 0..{n - 1}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"layer indices {list(indices)} contain duplicates; allowed: distinct indices in 0..{n - 1}")
    if len(indices) >= n:
        raise ValueError(f"cannot remove {len(indices)} of {n} layers: at least one must remain; "
                         f"allowed: 1..{n - 1} indices in 0..{n - 1}")
    return sorted(indices)


class RemovedLayers(Mapping[int, nn.Module]):
    """The layers `remove_layers` took out of `model`, keyed by their position in the model they were removed from
    (original indices for a first removal), with the per-layer config entries they had (e.g. their `layer_types`).

    A read-only mapping {position: layer}, in position order. `dense_view()` puts the layers back for the duration
    of a block (the dense model, without a copy), `restore()` for good; `then(later)` combines it with a removal
    made afterwards on the pruned model, keyed by original position.
    """

    def __init__(self, model: nn.Module, layers: Mapping[int, nn.Module], entries: Mapping[int, dict[str, object]]):
        self.model = model
        self._layers = dict(sorted(layers.items()))
        self.entries = dict(entries)

    def __getitem__(self, position: int) -> nn.Module:
        return self._layers[position]

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"RemovedLayers(positions={list(self._layers)})"

    def dense_view(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The model with these layers back in place for the block (see `dense_view`)."""
        return dense_view(self.model, self)

    def restore(self) -> None:
        """Put the layers back for good (the inverse of the `remove_layers` call that returned this)."""
        restore_layers(self.model, self)

    def then(self, later: RemovedLayers) -> RemovedLayers:
        """These layers and `later` (removed afterwards from the model this removal left), keyed by position in
        the model before this removal."""
        kept = kept_indices(len(self) + num_layers(self.model) + len(later), list(self))
        layers = {**self._layers, **{kept[p]: layer for p, layer in later.items()}}
        entries = {**self.entries, **{kept[p]: e for p, e in later.entries.items()}}
        return RemovedLayers(self.model, layers, entries)


def remove_layers(model: nn.Module, indices: Sequence[int]) -> RemovedLayers:
    """Remove the layers at the given current positions, in place; return them keyed by position.

    Keeps the config's per-layer fields in sync and renumbers `layer_idx`, so cached generation works.
    """
    layers = get_decoder_layers(model)
    n = len(layers)
    drop = set(_check_indices(list(indices), n))
    keep = [i for i in range(n) if i not in drop]
    removed = RemovedLayers(model, {i: layers[i] for i in sorted(drop)},
                            {i: _layer_entries(model.config, i, n) for i in sorted(drop)})
    _set_decoder_layers(model, [layers[i] for i in keep])
    _sync_config(model.config, keep, n)
    _renumber(get_decoder_layers(model))
    return removed


def restore_layers(model: nn.Module, removed: Mapping[int, nn.Module], config_snapshot: Mapping | None = None) -> None:
    """Inverse of `remove_layers`: put `removed` back at their positions (positions in the restored model). The
    config comes back from `config_snapshot` if given, else from the removed layers' own entries (a
    `RemovedLayers`; a plain mapping restores the layer count only)."""
    current = list(get_decoder_layers(model))
    total = len(current) + len(removed)
    it = iter(current)
    merged = [removed[i] if i in removed else next(it) for i in range(total)]
    _set_decoder_layers(model, merged)
    if config_snapshot is not None:
        _config_restore(model.config, config_snapshot)
    else:
        for attr in _LAYER_COUNT_ATTRS:
            if isinstance(getattr(model.config, attr, None), int):
                setattr(model.config, attr, total)
        entries = getattr(removed, "entries", None)
        if entries is not None and set(entries) == set(removed):
            _regrow_config(model.config, entries, total)
    _renumber(merged)


@contextlib.contextmanager
def layers_removed(model: nn.Module, indices: Sequence[int]) -> Iterator[nn.Module]:
    """Run the model as if `indices` were removed; everything is put back exactly on exit.

    Used by iterative metrics, which must never change the model they score.
    """
    if not indices:
        yield model
        return
    snap = _config_snapshot(model.config)
    removed = remove_layers(model, indices)
    try:
        yield model
    finally:
        restore_layers(model, removed, snap)


@contextlib.contextmanager
def dense_view(model: nn.Module, removed: Mapping[int, nn.Module]) -> Iterator[nn.Module]:
    """Temporarily reinsert removed layers (keyed by original position; a `RemovedLayers`, whose config entries
    come back too) into a pruned model.

    This is how compensation gets the dense reference without a second copy of the model: the removed layers
    are kept in memory until compensation ends.
    """
    if not removed:
        yield model
        return
    snap = _config_snapshot(model.config)
    kept_positions = [i for i in range(num_layers(model) + len(removed)) if i not in removed]
    restore_layers(model, removed)
    _sync_config(model.config, list(range(num_layers(model))), num_layers(model))
    try:
        yield model
    finally:
        _set_decoder_layers(model, [get_decoder_layers(model)[i] for i in kept_positions])
        _config_restore(model.config, snap)
        _renumber(get_decoder_layers(model))


def kept_indices(original_count: int, removed: Sequence[int]) -> list[int]:
    drop = set(removed)
    return [i for i in range(original_count) if i not in drop]


def aligned_dense_layers(original_count: int, removed: Sequence[int]) -> tuple[list[int], list[int]]:
    """(kept, aligned): kept[j] is the original index of kept layer j, and aligned[j] the original layer whose dense
    output sits at the same point of the computation as kept layer j's output: the input of the next kept layer,
    i.e. original k_{j+1} - 1 (the last layer for the last kept one). aligned[j] != kept[j] marks a layer before a gap.
    """
    kept = kept_indices(original_count, removed)
    aligned = [(kept[j + 1] - 1) if j + 1 < len(kept) else original_count - 1 for j in range(len(kept))]
    return kept, aligned


def contiguous_gaps(removed: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of consecutive removed original indices as (first, last), in depth order: [2, 3, 7] -> [(2, 3), (7, 7)]."""
    gaps: list[tuple[int, int]] = []
    for i in sorted(removed):
        if gaps and i == gaps[-1][1] + 1:
            gaps[-1] = (gaps[-1][0], i)
        else:
            gaps.append((i, i))
    return gaps


@torch.no_grad()
def assert_same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Raise if two state dicts differ (used by tests and metric contracts)."""
    if a.keys() != b.keys():
        raise AssertionError(f"state dict keys differ: {sorted(set(a) ^ set(b))[:5]}")
    for k in a:
        if not torch.equal(a[k], b[k]):
            raise AssertionError(f"weight {k} changed")
