"""HiP's decode step with static shapes, for CUDA-graph capture (decode_graph.py).

A decode step of a long context is a few kernels a layer, and without a graph the host spends
more time launching them than the GPU running them. Nothing here depends on a host value: the
position, the left-padding ends and the query index come from BatchState's device copies; the
selection and the hot cache's slots live in fixed buffers per item; the cache is written at a
device index (through the home's mapping when it is in pinned host memory). Steps come in two
phases, each captured once: a refresh step (the tree search, then the hot cache is brought up
to date) every `refresh` steps after the prompt, and reuse steps in between, which attend the
selection as it stands. Both compute what the eager step computes (tests/test_hip_static.py).
"""
from __future__ import annotations

import torch

from offload_engine.kernels.decode_attention import decode_attention
from offload_engine.kernels.hip.attention import block_sparse_attention


class StaticDecode:
    """The static step of HiPAccess (mixed in: uses its policy, store, item, state, where)."""

    def _attend_static(self, q, k, v):
        p, st = self.policy, self.state
        cfg = p.kernel_cfg
        k_new, v_new = k[:, 0], v[:, 0]  # (B, Hkv, D)
        position = st.length_t.view(1)
        q_idx, key_start = position.to(torch.int32), st.key_start_t.to(torch.int32)
        qh = q.transpose(1, 2)
        if self.where.kind == "gpu":
            self.where.k.index_copy_(0, position, k_new[None])
            self.where.v.index_copy_(0, position, v_new[None])
            if self.item[0] in p.dense:  # the first layers attend everything written so far
                return decode_attention(q[:, 0], self.where.k, self.where.v, st.end_t, st.key_start_t)[:, None]
            keys, values = self.where.k.permute(1, 2, 0, 3), self.where.v.permute(1, 2, 0, 3)
            if p.static_refresh:
                self._keep_selection(qh, keys, q_idx, key_start)
            out = block_sparse_attention(qh, keys, values, p.static_blocks[self.item], q_idx, key_start,
                                         cfg.block_size_q, cfg.block_size_k)
            return out.transpose(1, 2)
        hot, home = p.hot[self.item], p.mapped_home(self.item, self.where, q.device)
        codec = p.codec
        home[0].index_copy_(0, position, codec.encoded(k_new)[None])  # the home, written in place
        home[1].index_copy_(0, position, codec.encoded(v_new)[None])
        hot.write_rep_at(position, k_new)
        if p.static_refresh:
            blocks = self._keep_selection(qh, hot.rep_keys(p.max_len), q_idx, key_start)
            self._bring_static(hot, blocks, home, st.end_t.view(1))
        if codec.packed:  # the pool holds what the home holds
            k_new, v_new = (codec.decode(codec.encoded(x)) for x in (k_new, v_new))
        hot.write_token_at(position, k_new, v_new)
        out = block_sparse_attention(qh, hot.pool_k, hot.pool_v, p.static_slots[self.item], q_idx, key_start,
                                     cfg.block_size_q, cfg.block_size_k, block_pos=p.static_blocks[self.item])
        return out.transpose(1, 2)

    def _keep_selection(self, qh, keys, q_idx, key_start) -> torch.Tensor:
        """The tree search's blocks plus those of the tokens until the next refresh, into the
        item's fixed selection buffer (padded with -1 to a width that does not depend on t)."""
        from .hip import merge_blocks

        p, bk = self.policy, self.policy.kernel_cfg.block_size_k
        selected = p.select(qh, keys, q_idx, key_start)
        t = q_idx.long()
        ahead = t // bk + 1 + torch.arange(p.cfg.refresh // bk + 2, device=qh.device)
        last = torch.clamp(t + p.cfg.refresh - 1, max=p.max_len - 1) // bk
        blocks = merge_blocks(selected, torch.where(ahead <= last, ahead, -1))
        buffer = p.static_blocks.get(self.item)
        if buffer is None or buffer.shape != blocks.shape:
            buffer = p.static_blocks[self.item] = torch.empty_like(blocks)
        buffer.copy_(blocks)
        return buffer

    def _bring_static(self, hot, blocks: torch.Tensor, home, length: torch.Tensor) -> None:
        """`_bring` with the length on the device, its slots into the item's fixed buffer."""
        p = self.policy
        b, hq, _, n = blocks.shape
        hkv = hot.pool_k.shape[1]
        from .hip import merge_blocks

        needed = merge_blocks(blocks.reshape(b, hkv, hq // hkv * n), blocks.new_empty(0))
        _, miss_blocks, victims = hot.lookup(needed)
        hot.fill(miss_blocks, victims, self.where.k, self.where.v, length, home, p.spec)
        logical = blocks.reshape(b, hkv, -1)
        slots = hot.slot_of.gather(-1, torch.where(logical >= 0, logical, hot.blocks))
        slots = torch.where(logical >= 0, slots, -1).reshape(blocks.shape).to(torch.int32)
        buffer = p.static_slots.get(self.item)
        if buffer is None or buffer.shape != slots.shape:
            buffer = p.static_slots[self.item] = torch.empty_like(slots)
        buffer.copy_(slots)
