"""The storage tiers and the copies between them: GPU, pinned CPU memory and disk (tiers.py),
asynchronous copies on streams and threads (transfer.py), and the disk relay that moves disk
tensors through a ring of pinned buffers at the disk's speed (disk_relay.py)."""
