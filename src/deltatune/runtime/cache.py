"""An adapter cache over one frozen base model: load adapters from a folder by name, keep them within a byte
budget, evict the least recently used, unload on request.

Loading adds the adapter's tensors to the wrappers already in the model (wrapping only modules no loaded
adapter targeted before); it never copies or re-wraps base weights. Adapters of different ranks and target sets
live side by side. An unloaded or evicted LoRA adapter's tensors are kept as a free slot (within the budget):
the next adapter with the same tensor shapes is copied into them (`core.hotswap`), which costs little more
than reading its file, instead of building new modules. Adapter names are folder names inside one
directory, checked so that no name can reach a path outside it (no '..', no absolute paths, no symlinks
that lead out).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..core.adapters import adapter_configs, all_wrappers, delete_adapter
from ..core.config import CONFIG_NAME
from ..core.errors import AdapterNotFoundError, DeltatuneError
from ..core.hotswap import AdapterSlot, LayoutMismatch, saved_layout
from ..core.io import PROVENANCE_NAME, WEIGHTS_NAME, load_adapter
from ..core.provenance import tokenizer_hash

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class AdapterNameInvalid(DeltatuneError, ValueError):
    """A requested adapter name is not a plain folder name inside the adapters directory."""


class CacheFullError(DeltatuneError, RuntimeError):
    """The adapters a batch needs do not fit the cache's byte budget at the same time."""


class AdapterDraining(DeltatuneError, RuntimeError):
    """The adapter is waiting to be unloaded once its rows end; new uses are refused until then."""


@dataclass
class CachedAdapter:
    name: str  # the folder name users ask for
    key: str  # the adapter's name inside the model (a Python identifier)
    path: Path
    bytes: int
    peft_type: str
    loaded_at: float
    last_used: float
    stamp: tuple[int, int] | None = None  # the weights file's (mtime_ns, size) when it was loaded


def _stamp(folder: Path) -> tuple[int, int] | None:
    try:
        info = (folder / WEIGHTS_NAME).stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def adapter_bytes(model: nn.Module, key: str) -> int:
    """Bytes of the tensors adapter `key` adds to the model."""
    return sum(
        p.numel() * p.element_size() for _, w in all_wrappers(model) for p in w.adapter_parameters(key)
    )


def _tensor_bytes(weights: Path) -> int:
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and the JSON header."""
    if not weights.is_file():
        return 0  # load_adapter names what is missing
    with weights.open("rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
    return max(weights.stat().st_size - 8 - header, 0)


class AdapterCache:
    """Adapters loaded on demand into `model`, least recently used evicted beyond `budget_bytes` (None: no limit).

    Thread-safe; `pinned(names)` keeps the adapters of a batch in flight from being evicted by its own loads.
    Up to `max_free_slots` unloaded adapters' tensors are kept for reuse; they count against the budget and
    are the first memory given up when room is needed (`release_free_slots` frees them now).
    """

    def __init__(
        self,
        model: nn.Module,
        directory: str | Path | None = None,
        *,
        budget_bytes: int | None = None,
        tokenizer: Any = None,
        allow_base_mismatch: bool = False,
        max_free_slots: int = 4,
        reload_changed: bool = False,
    ) -> None:
        self.model = model
        self.directory = Path(directory).resolve() if directory is not None else None
        self.budget_bytes = budget_bytes
        self.tokenizer = tokenizer
        self.allow_base_mismatch = allow_base_mismatch
        self._entries: OrderedDict[str, CachedAdapter] = OrderedDict()  # least recently used first
        self._pins: dict[str, int] = {}
        self._draining: dict[str, list[Future]] = {}  # unloads waiting for the adapter's pins to go
        self.max_free_slots = max_free_slots
        # an adapter whose weights file changed on disk (a run still training rewrites it at each checkpoint)
        # loads afresh at its next use that no running batch shares
        self.reload_changed = reload_changed
        self._free: OrderedDict[str, AdapterSlot] = OrderedDict()  # model key -> slot, oldest first
        self._fingerprints: dict[tuple[str, ...], dict] = {}  # shared by the slots (the base stays frozen)
        self._tokenizer_sha256: str | None = None  # hashed once, at the first load
        self._counter = 0
        self._lock = threading.RLock()
        # called with a model-side adapter name whose tensors are released or rewritten (what was computed
        # under it, such as a prefix cache's KV, is stale)
        self.on_release: list[Callable[[str], None]] = []

    # ---- names and paths -------------------------------------------------------------------------------------
    def resolve(self, name: str) -> Path:
        """The folder of adapter `name` inside the directory; refuses anything that would leave it."""
        if self.directory is None:
            raise AdapterNotFoundError("this cache has no adapters directory; pass a path to load()")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
            raise AdapterNameInvalid(
                f"adapter name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', starting "
                "with a letter or digit, naming a folder directly inside the adapters directory"
            )
        folder = self.directory / name
        if not folder.exists():
            raise AdapterNotFoundError(f"no adapter {name!r} in {self.directory}")
        return self.contained(name, folder)

    def contained(self, name: str, folder: Path) -> Path:
        """`folder` resolved, refused when it or its files are links that leave the directory."""
        resolved = folder.resolve()
        files = [resolved] + [resolved / f for f in (CONFIG_NAME, WEIGHTS_NAME, PROVENANCE_NAME)]
        for item in files:
            if item.exists() and not item.resolve().is_relative_to(self.directory):
                raise AdapterNameInvalid(
                    f"adapter {name!r} is a symlink (or holds one) that leads outside {self.directory}; "
                    "copy the adapter into the directory instead"
                )
        return resolved

    def available(self) -> list[str]:
        """Names of the adapter folders in the directory (loaded or not)."""
        if self.directory is None or not self.directory.is_dir():
            return []
        found = []
        for child in sorted(self.directory.iterdir()):
            if NAME_PATTERN.fullmatch(child.name) and (child / CONFIG_NAME).is_file():
                try:
                    self.resolve(child.name)
                except DeltatuneError:
                    continue
                found.append(child.name)
        return found

    # ---- loading and eviction --------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._entries

    @property
    def loaded(self) -> list[CachedAdapter]:
        return list(self._entries.values())

    @property
    def bytes_used(self) -> int:
        """Bytes of the loaded adapters and of the free slots."""
        return sum(e.bytes for e in self._entries.values()) + self.free_slot_bytes

    @property
    def free_slot_bytes(self) -> int:
        return sum(slot.nbytes for slot in self._free.values())

    def key_of(self, name: str) -> str:
        """The model-side adapter name of a loaded adapter (touching it as recently used)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
            entry.last_used = time.monotonic()
            self._entries.move_to_end(name)
            return entry.key

    def load(self, name: str, path: str | Path | None = None) -> CachedAdapter:
        """Make adapter `name` resident (a no-op if it is), evicting least recently used unpinned adapters
        to stay within the budget. `path` defaults to the folder `name` inside the directory."""
        with self._lock:
            if name in self._draining:
                raise AdapterDraining(
                    f"adapter {name!r} is being unloaded once its running requests end; retry shortly (it then "
                    "loads again on demand)"
                )
            if name in self._entries and self._stale(name):
                self.unload(name)
            if name in self._entries:
                self.key_of(name)
                return self._entries[name]
            folder = self.resolve(name) if path is None else Path(path)
            incoming = _tensor_bytes(folder / WEIGHTS_NAME)
            slot = self._free_slot_for(saved_layout(folder), incoming, name)
            if slot is not None:
                key = self._overwrite(slot, folder)
            else:
                self._make_room(incoming, name)
                key = self._next_key()
                load_adapter(
                    self.model,
                    folder,
                    adapter_name=key,
                    tokenizer=self.tokenizer,
                    tokenizer_sha256=self._tokenizer_digest(),
                    allow_base_mismatch=self.allow_base_mismatch,
                )
            now = time.monotonic()
            entry = CachedAdapter(
                name=name,
                key=key,
                path=folder,
                bytes=adapter_bytes(self.model, key) if slot is None else slot.nbytes,
                peft_type=adapter_configs(self.model)[key].peft_type,
                loaded_at=now,
                last_used=now,
                stamp=_stamp(folder),
            )
            self._entries[name] = entry
            try:
                self._make_room(0, name)  # the model may hold the tensors in another dtype than the file
            except CacheFullError:
                self._drop(name)
                raise
            return entry

    def _stale(self, name: str) -> bool:
        """Its file changed since it loaded, and no batch uses it."""
        entry = self._entries[name]
        return self.reload_changed and not self._pins.get(name) and _stamp(entry.path) != entry.stamp

    def _overwrite(self, slot: AdapterSlot, folder: Path) -> str:
        """Copy the adapter at `folder` into a free slot; a refused copy leaves the slot free and unchanged."""
        self._released(slot.adapter_name)
        try:
            slot.overwrite(
                folder,
                allow_base_mismatch=self.allow_base_mismatch,
                tokenizer_sha256=self._tokenizer_digest(),
            )
        except BaseException:
            self._free[slot.adapter_name] = slot
            raise
        return slot.adapter_name

    def _tokenizer_digest(self) -> str | None:
        if self.tokenizer is not None and self._tokenizer_sha256 is None:
            self._tokenizer_sha256 = tokenizer_hash(self.tokenizer)
        return self._tokenizer_sha256

    def unload(self, name: str) -> None:
        """Unload adapter `name`; its tensors are kept as a free slot for the next adapter of their shape."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
            if self._pins.get(name):
                raise CacheFullError(f"adapter {name!r} is in use by a running batch; unload it afterwards")
            del self._entries[name]
            self._released(entry.key)
            try:
                self._free[entry.key] = AdapterSlot(self.model, entry.key, self._fingerprints)
            except LayoutMismatch:  # not plain LoRA: nothing to reuse
                delete_adapter(self.model, entry.key)
            while len(self._free) > self.max_free_slots:
                self._delete_free_slot()

    def unload_when_idle(self, name: str) -> Future:
        """Unload adapter `name` now if nothing uses it, else as soon as its last pin goes; until then new
        uses are refused (AdapterDraining), so steady traffic cannot keep it loaded. The returned future is
        done once it is unloaded."""
        with self._lock:
            if name not in self._entries:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
            done: Future = Future()
            if self._pins.get(name):
                self._draining.setdefault(name, []).append(done)
            else:
                self.unload(name)
                done.set_result(None)
            return done

    def release_free_slots(self) -> int:
        """Delete every free slot's tensors now; returns the bytes released."""
        with self._lock:
            released = self.free_slot_bytes
            while self._free:
                self._delete_free_slot()
            return released

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name)
        self._released(entry.key)
        delete_adapter(self.model, entry.key)

    def _released(self, key: str) -> None:
        for listener in self.on_release:
            listener(key)

    def _delete_free_slot(self) -> None:
        key, _ = self._free.popitem(last=False)
        delete_adapter(self.model, key)

    @contextmanager
    def pinned(self, names: Iterable[str]) -> Iterator[dict[str, str]]:
        """Load `names` (None entries ignored) and keep them resident inside the block; yields name -> key."""
        names = list(dict.fromkeys(n for n in names if n is not None))
        with self._lock:
            for name in names:
                if name in self._entries and self._stale(name):
                    self.unload(name)  # its tensors become a free slot the new file loads into
                self._pins[name] = self._pins.get(name, 0) + 1
            try:
                keys = {name: self.load(name).key for name in names}
            except BaseException:
                self._unpin(names)
                raise
        try:
            yield keys
        finally:
            with self._lock:
                self._unpin(names)

    def _unpin(self, names: list[str]) -> None:
        for name in names:
            self._pins[name] -= 1
            if not self._pins[name]:
                del self._pins[name]
                if name in self._draining:
                    self._finish_draining(name)

    def _finish_draining(self, name: str) -> None:
        waiting = self._draining.pop(name)
        try:
            self.unload(name)
        except Exception as exc:
            for done in waiting:
                done.set_exception(exc)
        else:
            for done in waiting:
                done.set_result(None)

    def _over_budget(self, incoming: int, count_free_slots: bool = True) -> bool:
        used = self.bytes_used if count_free_slots else self.bytes_used - self.free_slot_bytes
        return self.budget_bytes is not None and used + incoming > self.budget_bytes

    def _lru_victim(self, keep: str) -> str | None:
        return next((n for n in self._entries if n != keep and not self._pins.get(n)), None)

    def _free_slot_for(self, layout: dict | None, incoming: int, keep: str) -> AdapterSlot | None:
        """A free slot whose tensors have `layout`, taken out of the free list, or None. While the budget is
        short, least recently used adapters are unloaded into free slots in the hope that one fits."""
        if layout is None:
            return None
        while True:
            key = next((k for k, slot in self._free.items() if slot.fits(layout)), None)
            if key is not None:
                return self._free.pop(key)
            # Free slots can be deleted to make room; evict only while the loaded adapters alone are too many.
            short = self._over_budget(incoming, count_free_slots=False)
            victim = self._lru_victim(keep) if short else None
            if victim is None:
                return None
            self.unload(victim)

    def _make_room(self, incoming: int, keep: str) -> None:
        """Free memory until `incoming` more bytes fit: free slots first (oldest first), then least recently
        used unpinned adapters (never `keep`)."""
        while self._over_budget(incoming):
            if self._free:
                self._delete_free_slot()
                continue
            victim = self._lru_victim(keep)
            if victim is None:
                size = incoming or self._entries[keep].bytes
                raise CacheFullError(
                    f"adapter {keep!r} ({size} bytes) does not fit the cache budget of {self.budget_bytes} "
                    f"bytes next to the adapters in use; raise the budget or send fewer distinct adapters "
                    "per batch"
                )
            self._drop(victim)

    def _next_key(self) -> str:
        existing = adapter_configs(self.model)
        while True:
            self._counter += 1
            key = f"served_{self._counter}"
            if key not in existing:
                return key
