"""Layer weights on their home tiers, and the GPU staging slots that stream them in.

A layer whose weights are all on the GPU is used in place. The others are fetched in layer
order into a ring of `plan.weight_slots` slots, `weight_slots - 1` layers ahead of the
one computing (across step boundaries too), so the copy of the next layers overlaps compute.

With --compress-weight, 2-D weights are stored packed (kernels/quant/pack.py) in every tier, so the
packed bytes are what crosses PCIe; layers receive them as `PackedWeight` and the linear op
dequantizes on the fly.
"""
from __future__ import annotations

import torch

from offload_engine.kernels.quant.spec import QuantSpec

from offload_engine.policies.memory import MemoryPlan

from .models.base import Layer
from .models.ops import PackedWeight
from .io.tiers import ALIGN, Storage, Tier, round_up
from .io.transfer import Mover, Pending


class WeightStore:
    def __init__(self, layers: list[Layer], plan: MemoryPlan, storages: dict[Tier, Storage], dtype: torch.dtype,
                 mover: Mover, quant_spec=None, device: torch.device | None = None):
        self.dtype, self.mover, self.quant_spec, self.device = dtype, mover, quant_spec, device
        self.homes: dict[str, tuple[Tier, torch.Tensor]] = {}
        self.packed: dict[str, tuple[int, ...]] = {}  # key -> original shape, for weights stored packed
        self.specs: dict[str, object] = {}  # key -> its QuantSpec (groups no longer than its rows)
        self.layer_specs = [layer.weight_specs() for layer in layers]
        for specs in self.layer_specs:
            for spec in specs:
                if spec.key not in self.homes:
                    tier = plan.weight_tiers[spec.key]
                    name = spec.key.replace(".", "_")
                    if spec.key in plan.compressed_weights:
                        self.packed[spec.key] = spec.shape
                        stored = plan.weight_formats.get(spec.key)  # the checkpoint's own blocks, kept
                        self.specs[spec.key] = QuantSpec(*stored) if stored else quant_spec.for_length(spec.shape[-1])
                        home = storages[tier].allocate(self.specs[spec.key].packed_shape(spec.shape), torch.uint8,
                                                       name)
                    else:
                        home = storages[tier].allocate(spec.shape, dtype, name)
                    self.homes[spec.key] = (tier, home)
        self.fetch_order = [i for i, specs in enumerate(self.layer_specs)
                            if any(self.homes[s.key][0] != Tier.GPU for s in specs)]
        self._position = {layer: p for p, layer in enumerate(self.fetch_order)}
        gpu = storages[Tier.GPU]
        self.slots = [gpu.allocate((plan.weight_slot_bytes,), torch.uint8, f"weight_slot{n}")
                      for n in range(plan.weight_slots if self.fetch_order else 0)]
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._issued: dict[int, tuple[dict[str, torch.Tensor], list[Pending]]] = {}
        self._expected = 0  # fetch sequence number of the next streamed layer to be used
        self._next_issue = 0

    def store(self, key: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Write a checkpoint tensor, or its rows from `row_start` on, into its home (quantized on
        the compute device if stored packed: a packed home keeps the leading dimensions)."""
        home = self.homes[key][1]
        if row_start or tensor.shape[0] != home.shape[0]:
            home = home[row_start:row_start + tensor.shape[0]]
        if key in self.packed:
            from offload_engine.kernels.quant.pack import quantize
            home.copy_(quantize(tensor.to(self.device, torch.float32), self.specs[key]))
        else:
            # From the GPU to host memory, cast on the GPU first: a cross-device copy that also casts
            # goes through a pageable temporary of the source dtype (fp32 into pinned fp16: ~1 GB/s).
            # On one device, copy_ casts in place, without a temporary.
            home.copy_(tensor.to(home.dtype) if tensor.device != home.device else tensor)

    def accepts_packed(self, key: str, bits: int, group_size: int) -> bool:
        s = self.specs.get(key)
        return s is not None and (s.bits, s.group_size) == (bits, group_size)

    def store_packed(self, key: str, packed: torch.Tensor) -> None:
        """Write bytes already in the packed format (e.g. GGUF Q4_1 blocks): no float round trip."""
        self.homes[key][1].copy_(packed)

    def _wrap(self, key: str, tensor: torch.Tensor):
        if key in self.packed:
            return PackedWeight(tensor, self.specs[key], self.packed[key], self.dtype)
        return tensor

    def _in_place(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's weights where they live (all on the GPU tier: nothing to stream)."""
        return {s.name: self._wrap(s.key, self.homes[s.key][1]) for s in self.layer_specs[i]}

    def get(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's weights on the compute device, waiting for their copy if streamed."""
        if i not in self._position:
            return self._in_place(i)
        n = self._expected
        if self.fetch_order[n % len(self.fetch_order)] != i:  # a step was abandoned midway: realign
            n = self._restart(i)
        self._issue_up_to(n + len(self.slots) - 1)
        views, pends = self._issued.pop(n)
        for p in pends:
            p.wait()
        self._expected = n + 1
        return views

    def _restart(self, i: int) -> int:
        for _, pends in self._issued.values():
            for p in pends:
                p.synchronize()
        self._issued.clear()
        n = self._expected - self._expected % len(self.fetch_order) + self._position[i]
        if n < self._expected:
            n += len(self.fetch_order)
        self._next_issue = n
        return n

    def _issue_up_to(self, last: int) -> None:
        while self._next_issue <= last:
            n = self._next_issue
            layer = self.fetch_order[n % len(self.fetch_order)]
            slot = n % len(self.slots)
            views = self._slot_views(slot, layer)
            pends = []
            for spec in self.layer_specs[layer]:
                tier, home = self.homes[spec.key]
                if tier != Tier.GPU:
                    view = views[spec.name]
                    dst = view.packed if isinstance(view, PackedWeight) else view
                    pends.append(self.mover.load(dst, home, "weight_io", from_disk=tier == Tier.DISK))
            self._issued[n] = (views, pends)
            self._next_issue += 1

    def _slot_views(self, slot: int, layer: int) -> dict[str, torch.Tensor]:
        key = (slot, layer)
        if key not in self._views:
            views, offset = {}, 0
            buf = self.slots[slot]
            for spec in self.layer_specs[layer]:
                tier, home = self.homes[spec.key]
                if tier == Tier.GPU:
                    views[spec.name] = self._wrap(spec.key, home)
                    continue
                nbytes = home.numel() * home.element_size()
                view = buf[offset:offset + nbytes].view(home.dtype).view(home.shape)
                views[spec.name] = self._wrap(spec.key, view)
                offset = round_up(offset + nbytes, ALIGN)
            self._views[key] = views
        return self._views[key]
