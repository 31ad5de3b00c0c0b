"""HiP hierarchically pruned attention: top-k key-block selection by tree search (select.py) and
block-sparse flash attention over the selected blocks (attention.py)."""
